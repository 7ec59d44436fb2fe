import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, metrics, run_ok
from conftest import pretrain_command as command

from babyllama.checkpoint import load_model
from model import ModelArgs, Transformer


def test_pretraining_lowers_validation_loss(corpus, small_tokenizer, tmp_path):
    out = tmp_path / "run"
    # A peak far below what the CPU does: MFU still never passes 100%.
    run_ok(command(corpus, small_tokenizer, out, "--max_steps=60", "--eval_interval=20", "--eval_batches=4",
                   "--peak_tflops=1e-6"))
    assert all(0 < m["mfu"] <= 1.0 for m in metrics(out) if "mfu" in m)
    vals = [m["val_loss"] for m in metrics(out) if "val_loss" in m]
    assert len(vals) == 3 and vals[-1] < vals[1] < vals[0] - 0.2
    assert all("val_bpc" in m for m in metrics(out) if "val_loss" in m)
    model, ckpt = load_model(str(out / "ckpt.pt"))
    assert ckpt["step"] == 60 and ckpt["stage"] == "pretrain"


@pytest.mark.parametrize("memory_options", [(), ("--loss_chunk=100", "--checkpoint_activations=true")],
                         ids=["plain", "chunked_checkpointed"])
def test_sigterm_then_resume_is_exact(corpus, small_tokenizer, tmp_path, memory_options):
    steps = 300
    args = (f"--max_steps={steps}", "--log_interval=1", "--eval_interval=100000", "--save_interval=100000",
            *memory_options)
    straight = tmp_path / "straight"
    run_ok(command(corpus, small_tokenizer, straight, *args))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(corpus, small_tokenizer, killed, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "metrics.jsonl").exists() and len((killed / "metrics.jsonl").read_text().splitlines()) >= 10:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    _, ckpt = load_model(str(killed / "ckpt.pt"))  # the killed run left a loadable checkpoint
    stopped_at = ckpt["step"]
    assert 10 <= stopped_at < steps, "the run finished before the signal: make it longer"

    run_ok(command(corpus, small_tokenizer, killed, *args))
    a, b = metrics(straight), metrics(killed)
    assert [m["step"] for m in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-6, (x, y)
    wa = torch.load(straight / "ckpt.pt", weights_only=False)["model"]
    wb = torch.load(killed / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def schedule_of(out) -> dict:
    return torch.load(out / "ckpt.pt", weights_only=False)["schedule"]


def test_time_budget_ends_with_the_schedule_complete(corpus, small_tokenizer, tmp_path):
    """The process fits its steps into the budget (how well is tested on a simulated clock in
    test_budget.py): the schedule is fitted once, every step is run, and min_lr is reached on the last."""
    out = tmp_path / "budget"
    result = run_ok(command(corpus, small_tokenizer, out, "--time_budget_min=0.25", "--max_steps=1000000",
                            "--min_lr=1e-4", "--eval_interval=200", "--eval_batches=4", "--save_interval=500"))
    assert result.stdout.count("time budget 0.25 min:") == 1
    etas = [float(eta) for eta in re.findall(r"ETA ([0-9.]+) min", result.stdout)]
    assert etas and max(etas) <= 0.3, etas  # never the uncapped steps' hours
    assert "/1000000 " not in result.stdout
    rows = metrics(out)
    last = rows[-1]
    assert schedule_of(out)["fitted_to_budget"] and last["step"] == schedule_of(out)["max_steps"] > 20
    assert [m["step"] for m in rows] == list(range(1, last["step"] + 1))
    assert last["lr"] == pytest.approx(1e-4) and rows[-2]["lr"] > 1e-4  # min_lr reached at the last step


def test_time_budget_resume_keeps_the_fitted_steps(corpus, small_tokenizer, tmp_path):
    out = tmp_path / "budget"
    args = ("--time_budget_min=0.5", "--max_steps=1000000", "--min_lr=1e-4", "--log_interval=1",
            "--eval_interval=100000", "--save_interval=100000")
    proc = subprocess.Popen(command(corpus, small_tokenizer, out, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    while time.time() < deadline and not ((out / "ckpt.pt").exists() and len(metrics(out)) >= 40):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "time budget 0.5 min:" in stdout
    fitted = schedule_of(out)
    stopped_at = torch.load(out / "ckpt.pt", weights_only=False)["step"]
    assert fitted["fitted_to_budget"] and stopped_at < fitted["max_steps"]

    # The resumed process gets a budget of its own, with room to spare: what is tested is that the schedule
    # is kept, not how fast this process runs.
    resumed = run_ok(command(corpus, small_tokenizer, out, *args, "--time_budget_min=1"))
    assert "time budget" not in resumed.stdout  # not fitted again
    assert schedule_of(out) == fitted
    rows = metrics(out)
    assert [m["step"] for m in rows] == list(range(1, fitted["max_steps"] + 1))
    assert rows[-1]["lr"] == pytest.approx(1e-4)


def torchrun(corpus, tokenizer, out, port, *extra):
    run_ok([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
            *command(corpus, tokenizer, out, *extra)[1:]], timeout=300)


def two_nodes(corpus, tokenizer, out, port, *extra, nodes=(0, 1), timeout=300) -> list[subprocess.CompletedProcess]:
    """pretrain.py under two torchrun agents on this machine (--nnodes=2, one process each), as two hosts would
    start it, meeting at 127.0.0.1; nodes=(0,) starts the first only."""
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                                "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                                *command(corpus, tokenizer, out, *extra)[1:]], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
              for node in nodes]
    results = []
    for agent in agents:
        stdout, stderr = agent.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    return results


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_with_double_batch(corpus, small_tokenizer, tmp_path, sharding):
    args = ("--max_steps=6", "--log_interval=1", "--eval_interval=3", "--eval_batches=2", "--grad_accum=2",
            f"--fsdp={sharding == 'fsdp'}")
    torchrun(corpus, small_tokenizer, tmp_path / "multi", 29517 + (sharding == "fsdp"), *args)
    single = command(corpus, small_tokenizer, tmp_path / "single", *args[:-1])
    single[single.index("--batch_size=4")] = "--batch_size=8"
    run_ok(single)
    multi, one = metrics(tmp_path / "multi"), metrics(tmp_path / "single")
    assert len(multi) == len(one) == 6
    for x, y in zip(multi, one):
        assert abs(x["loss"] - y["loss"]) < 1e-5
        assert abs(x.get("val_loss", 0) - y.get("val_loss", 0)) < 1e-5
    # Two nodes of one process each (two torchrun agents meeting on loopback) are the same two ranks.
    for node in two_nodes(corpus, small_tokenizer, tmp_path / "nodes", 29521 + (sharding == "fsdp"), *args):
        assert node.returncode == 0, node.stderr[-3000:]
    assert [m["loss"] for m in metrics(tmp_path / "nodes")] == pytest.approx([m["loss"] for m in multi], abs=1e-6)
    if sharding == "fsdp":  # an FSDP checkpoint resumes like any other
        partial = tmp_path / "partial"
        torchrun(corpus, small_tokenizer, partial, 29519, *args[:-1], "--fsdp=true", "--max_steps=3")
        torchrun(corpus, small_tokenizer, partial, 29519, *args)
        assert [m["loss"] for m in metrics(partial)] == pytest.approx([m["loss"] for m in multi], abs=1e-6)
        _, ckpt = load_model(str(partial / "ckpt.pt"))
        assert ckpt["step"] == 6


def test_errors_are_one_line(corpus, small_tokenizer, chatglm_path, tmp_path):
    result = subprocess.run(command(corpus, chatglm_path, tmp_path / "x", "--max_steps=1"), capture_output=True,
                            text=True)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith(
        "error: ") and "made with tokenizer" in result.stderr
    result = subprocess.run(command(corpus, small_tokenizer, tmp_path / "x", "--max_steps=1", "--data=nowhere"),
                            capture_output=True, text=True)
    assert result.stderr.strip().splitlines() == ["error: no corpus at nowhere: run data_process.py first"]


def test_init_reaches_the_model(corpus, small_tokenizer, tmp_path):
    """--init=zero: after one step at a negligible learning rate, the residual projections are still zero."""
    out = tmp_path / "zero"
    run_ok(command(corpus, small_tokenizer, out, "--max_steps=1", "--warmup_steps=0", "--lr=1e-12", "--min_lr=0",
                   "--init=zero"))
    model, _ = load_model(str(out / "ckpt.pt"))
    assert all(layer.attention.wo.weight.abs().max() < 1e-6 for layer in model.layers)
    assert all(layer.feed_forward.w2.weight.abs().max() < 1e-6 for layer in model.layers)
    assert all(layer.feed_forward.w3.weight.std() > 0.01 for layer in model.layers)
    result = subprocess.run(command(corpus, small_tokenizer, tmp_path / "x", "--init=xavier"), capture_output=True,
                            text=True)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--init=xavier: must be one of seed, gpt2, zero" in result.stderr


# The shapes the figures and the seed's released weights rely on: (dim, layers, heads, ids, window).
RECIPE_SHAPES = [("pretrain_tiny", "tiny_shallow", (256, 3, 4, 8192, 256)),
                 ("pretrain_baby_92m", "baby_92m", (512, 8, 8, 64793, 512)),
                 ("pretrain_baby_218m", "baby_218m", (1024, 12, 8, 64793, 1024))]


@pytest.mark.parametrize("recipe,model,shape", RECIPE_SHAPES)
def test_recipes_train_the_shapes_they_name(recipe, model, shape):
    from babyllama.configurator import parse_config
    from pretrain import Config, build_model_args
    cfg = parse_config(Config, [os.path.join(ROOT, "config", f"{recipe}.py"), "--max_steps=7"], check_files=False)
    assert cfg.max_steps == 7 and cfg.model == model
    args = build_model_args(cfg)
    assert (args.dim, args.n_layers, args.n_heads, args.vocab_size, args.max_seq_len) == shape


def test_a_misspelled_preset_setting_is_one_line(corpus, small_tokenizer, tmp_path):
    """n_layer for n_layers used to train the default 8 layers without a word."""
    typo = tmp_path / "typo.py"
    typo.write_text((corpus / "preset.py").read_text().replace("n_layers", "n_layer"))
    result = subprocess.run(command(corpus, small_tokenizer, tmp_path / "x", f"--model={typo}", "--max_steps=1"),
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"error: config file {typo}: unknown settings ['n_layer']"]
    assert not (tmp_path / "x" / "ckpt.pt").exists()


def test_help_lists_settings():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain.py"), "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "--grad_accum" in result.stdout
    assert "micro-steps per optimizer step" in result.stdout


def test_a_bad_init_from_is_one_line_naming_it(corpus, small_tokenizer, tmp_path):
    truncated = tmp_path / "half.pt"
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=600, max_seq_len=32, multiple_of=16)
    torch.save({"model": Transformer(args).state_dict(), "model_args": vars(args)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    result = subprocess.run(command(corpus, small_tokenizer, tmp_path / "out", f"--init_from={truncated}",
                                    "--max_steps=2"), capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(truncated) in last


def test_temp_files_of_a_killed_run_are_removed(corpus, small_tokenizer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for name in (f"ckpt_0000500.pt.tmp{dead}", "ckpt.pt.link", "metrics.jsonl.tmp", "notes.txt"):
        (out / name).write_bytes(b"x")
    result = run_ok(command(corpus, small_tokenizer, out, "--max_steps=2"))
    assert f"removed {out / f'ckpt_0000500.pt.tmp{dead}'}, left by an interrupted run" in result.stdout
    assert sorted(os.listdir(out)) == ["ckpt.pt", "ckpt_0000002.pt", "metrics.jsonl", "notes.txt"]
