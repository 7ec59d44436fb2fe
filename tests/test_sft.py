import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, metrics, run_nodes, run_ok

from babyllama.checkpoint import load_model


def sft_command(ckpt, data, tokenizer, out, *extra) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "sft.py"), f"--init_from={ckpt}", f"--data={data / 'train.csv'}",
            f"--val_data={data / 'val.csv'}", f"--tokenizer={tokenizer}", f"--out_dir={out}", "--dtype=float32",
            "--peak_tflops=1", "--batch_size=8", "--log_interval=1", "--eval_interval=5", "--eval_batches=1",
            "--lr=3e-3", "--warmup_steps=2", *extra]


def sft(ckpt, data, tokenizer, out, *extra):
    return run_ok(sft_command(ckpt, data, tokenizer, out, *extra))


def test_full_sft_lowers_answer_loss_and_resumes(pretrained, small_tokenizer, tmp_path):
    ckpt, data = pretrained
    out = tmp_path / "sft"
    sft(ckpt, data, small_tokenizer, out, "--max_steps=10")
    vals = [m["val_loss"] for m in metrics(out) if "val_loss" in m]
    assert vals[-1] < vals[0]
    model, state = load_model(str(out / "ckpt.pt"))
    assert state["stage"] == "sft" and state["step"] == 10
    sft(ckpt, data, small_tokenizer, out, "--max_steps=14")  # continues from step 10
    assert [m["step"] for m in metrics(out)] == list(range(1, 15))


def test_lora_sft_trains_adapters_and_loads_merged(pretrained, small_tokenizer, tmp_path):
    ckpt, data = pretrained
    out = tmp_path / "lora"
    sft(ckpt, data, small_tokenizer, out, "--max_steps=6", "--lora=true", "--lora_rank=4", "--lora_targets=wq,wv")
    adapter = torch.load(out / "adapter.pt", weights_only=False)
    assert adapter["lora"]["rank"] == 4 and all(".lora_" in k for k in adapter["adapters"])
    merged, state = load_model(str(out / "ckpt.pt"))
    base, _ = load_model(str(ckpt))
    assert set(merged.state_dict()) == set(base.state_dict())
    changed = {k for k in base.state_dict() if not torch.equal(base.state_dict()[k], merged.state_dict()[k])}
    assert changed and all(k.endswith(("wq.weight", "wv.weight")) for k in changed)


def test_wrong_tokenizer_is_refused(pretrained, chatglm_path, tmp_path):
    ckpt, data = pretrained
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), f"--init_from={ckpt}",
                             f"--data={data / 'train.csv'}", "--val_data=", f"--tokenizer={chatglm_path}",
                             f"--out_dir={tmp_path}"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "trained with another tokenizer" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_nodes_equal_one_node_of_two_processes(pretrained, small_tokenizer, tmp_path, sharding):
    ckpt, data = pretrained
    extra = ("--max_steps=5", f"--fsdp={sharding == 'fsdp'}")
    one = sft_command(ckpt, data, small_tokenizer, tmp_path / "one", *extra)
    run_ok([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            f"--master_port={29541 + (sharding == 'fsdp')}", *one[1:]], timeout=300)
    run_nodes([sft_command(ckpt, data, small_tokenizer, tmp_path / "two", *extra)] * 2, 29543 + (sharding == "fsdp"))
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in two] == list(range(1, 6))
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], abs=1e-6)
    assert [m.get("val_loss") for m in two] == pytest.approx([m.get("val_loss") for m in one], abs=1e-6)
