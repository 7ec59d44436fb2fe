"""The wrong file in the right flag: every script that loads a checkpoint, given an empty, truncated or
foreign file or a directory, and every script that loads a tokenizer, given a text file, stops with one
line naming the file, never a traceback."""
import importlib
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from model import ModelArgs, Transformer

# Each script with the flag that names the checkpoint it loads first, and its data flags (an existing file
# or none, so that the checkpoint is what is wrong).
CHECKPOINT_FLAGS = [("eval.py", "--ckpt", "--val_data="), ("eval_choice.py", "--ckpt", ""),
                    ("eval_pretrain.py", "--ckpt", "--bin="), ("export.py", "--ckpt", ""), ("chat.py", "--ckpt", ""),
                    ("serve.py", "--ckpt", ""), ("sft.py", "--init_from", "--data={data} --val_data="),
                    ("dpo.py", "--init_from", "--data={data} --val_data="),
                    ("grpo.py", "--init_from", "--prompts={data}"),
                    ("train_reward_model.py", "--init_from", "--data={data} --val_data=")]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("bad")
    good = folder / "good.pt"
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=600, max_seq_len=32, multiple_of=16)
    torch.save({"model": Transformer(args).state_dict(), "model_args": vars(args)}, good)
    data = good.read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    (folder / "empty.pt").write_bytes(b"")
    (folder / "notes.txt").write_text("这不是检查点\n", encoding="utf-8")
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.pt")  # a readable file of another kind
    (folder / "a_folder").mkdir()
    (folder / "data.csv").write_text("prompt,answer,history\n", encoding="utf-8")
    return {kind: str(folder / name) for kind, name in (("truncated", "truncated.pt"), ("empty", "empty.pt"),
                                                         ("text", "notes.txt"), ("foreign", "foreign.pt"),
                                                         ("directory", "a_folder"))}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def assert_one_line_error(result: subprocess.CompletedProcess, names: str) -> None:
    assert result.returncode != 0, result.stdout[-500:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and names in last, result.stderr[-1000:]


def run_main(script: str, *args: str, capsys) -> subprocess.CompletedProcess:
    """The script's main in this process (no interpreter start per call): its exit status and output."""
    main = importlib.import_module(script.removesuffix(".py")).main
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(script, code, out.out, out.err)


@pytest.mark.parametrize("script,flag,data_flags", CHECKPOINT_FLAGS, ids=[s for s, _, _ in CHECKPOINT_FLAGS])
def test_a_bad_checkpoint_is_one_line_naming_it(script, flag, data_flags, bad_files, small_tokenizer, capsys):
    data = os.path.join(os.path.dirname(bad_files["empty"]), "data.csv")
    for kind, path in bad_files.items():
        args = (f"{flag}={path}", f"--tokenizer={small_tokenizer}", *data_flags.format(data=data).split())
        # One file through a real process (its stderr and exit status as a shell sees them), the rest in this one.
        result = run(script, *args) if kind == "truncated" else run_main(script, *args, capsys=capsys)
        assert_one_line_error(result, path)


@pytest.mark.parametrize("script,data_flag", [("eval.py", "--val_data="), ("eval_pretrain.py", "--bin="),
                                              ("chat.py", "--seed=0")])
def test_a_text_file_as_tokenizer_is_one_line_naming_it(script, data_flag, bad_files, tmp_path):
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=600, max_seq_len=32, multiple_of=16)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": Transformer(args).state_dict(), "model_args": vars(args)}, ckpt)
    result = run(script, f"--ckpt={ckpt}", f"--tokenizer={bad_files['text']}", data_flag)
    assert_one_line_error(result, bad_files["text"])
    assert "not a SentencePiece tokenizer model" in result.stderr
