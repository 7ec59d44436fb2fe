"""Every script against a table of mistakes users make: out-of-range numbers, unknown choices, a folder
where a file goes, a file where a folder goes. Each must stop with a non-zero exit and one line on stderr
that names the setting, without a traceback, and change none of the user's files."""
import hashlib
import importlib
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, write_csv

from model import ModelArgs, Transformer

# (script, its bad flag(s), what the error line must name). {file} is an existing file of the user's, {dir}
# a folder, {missing} a path that does not exist; the good flags of each script come from GOOD below.
BAD_SETTINGS = [
    ("pretrain", "--batch_size=0", "--batch_size=0"),
    ("pretrain", "--max_seq_len=100000000", "--max_seq_len=100000000"),
    ("pretrain", "--grad_accum=-1", "--grad_accum=-1"),
    ("pretrain", "--lr=nan", "--lr=nan"),
    ("pretrain", "--dtype=float8", "--dtype=float8"),
    ("pretrain", "--device=gpu", "--device=gpu"),
    ("pretrain", "--out_dir={file}", "--out_dir="),
    ("pretrain", "--init_from={dir}", "--init_from="),
    ("pretrain", "--tokenizer={missing}", "--tokenizer="),
    ("pretrain", "--time_budget_min=-1", "--time_budget_min=-1"),
    ("sft", "--batch_size=0", "--batch_size=0"),
    ("sft", "--lora_rank=0", "--lora_rank=0"),
    ("sft", "--epochs=0", "--epochs=0"),
    ("sft", "--data={dir}", "--data="),
    ("sft", "--out_dir={file}", "--out_dir="),
    ("dpo", "--beta=0", "--beta=0"),
    ("dpo", "--label_smoothing=2", "--label_smoothing=2"),
    ("grpo", "--group_size=1", "--group_size=1"),
    ("grpo", "--task=poetry", "--task=poetry"),
    ("grpo", "--reward=human", "--reward=human"),
    ("grpo", "--temperature=-1", "--temperature=-1"),
    ("grpo", "--grad_accum=2", "--grad_accum=2"),
    ("pretrain", "--log_to=mlflow", "--log_to=mlflow"),
    ("pretrain", "--dist_timeout_min=0", "--dist_timeout_min=0"),
    ("pretrain", "--out_dir_shared=maybe", "--out_dir_shared=maybe"),
    ("distill", "--temperature=0", "--temperature=0"),
    ("distill", "--mix=2", "--mix=2"),
    ("distill", "--black_box=true --data={bin_dir}", "--black_box=true"),
    ("distill", "--teacher={dir}", "--teacher="),
    ("distill", "--teacher={file}", "{file}"),
    ("export", "--peft_adapter={dir}", "--peft_adapter"),
    ("train_reward_model", "--eval_pairs=0", "--eval_pairs=0"),
    ("chat", "--top_p=2", "--top_p=2"),
    ("chat", "--temperature=nan", "--temperature=nan"),
    ("chat", "--repetition_penalty=0", "--repetition_penalty=0"),
    ("chat", "--max_new_tokens=-1", "--max_new_tokens=-1"),
    ("chat", "--ckpt={dir}", "--ckpt="),
    ("eval", "--max_new_tokens=0", "--max_new_tokens=0"),
    ("eval", "--out={file}", "--out="),
    ("eval", "--questions_file={dir}", "--questions_file="),
    ("eval_choice", "--format=xml", "--format=xml"),
    ("eval_choice", "--shots=-1", "--shots=-1"),
    ("eval_choice", "--json={dir}", "--json="),
    ("eval_pretrain", "--top_p=-0.1", "--top_p=-0.1"),
    ("eval_pretrain", "--max_windows=0", "--max_windows=0"),
    ("eval_pretrain", "--text={missing}", "--text="),
    ("serve", "--port=99999", "--port=99999"),
    ("serve", "--port=-1", "--port=-1"),
    ("serve", "--max_tokens=0", "--max_tokens=0"),
    ("plan", "--gpus=0", "--gpus=0"),
    ("plan", "--mfu=2", "--mfu=2"),
    ("plan", "--gpu=GTX", "--gpu=GTX"),
    ("data_process", "--bands=0", "--bands=0"),
    ("data_process", "--ngram=0", "--ngram=0"),
    ("data_process", "--workers=-1", "--workers=-1"),
    ("data_process", "--val_fraction=1", "--val_fraction=1"),
    ("data_process", "--out_dir={file}", "--out_dir="),
    ("data_process", "--tokenizer={dir}", "--tokenizer="),
    ("sft_data_process", "--val_fraction=-0.1", "--val_fraction=-0.1"),
    ("sft_data_process", "--max_chars=0", "--max_chars=0"),
    ("sft_data_process", "--out_dir={file}", "--out_dir="),
    ("train_tokenizer", "--vocab_size=100", "--vocab_size=100"),
    ("train_tokenizer", "--vocab_size=70000", "--vocab_size=70000"),
    ("train_tokenizer", "--character_coverage=0", "--character_coverage=0"),
    ("train_tokenizer", "--out={dir}", "--out="),
    ("download_data", "--raw_dir={file}", "--raw_dir="),
    ("demo", "--pretrain_min=-1", "--pretrain_min=-1"),
    ("demo", "--out_dir={file}", "--out_dir="),
    ("export", "--unknown_flag=1", "--unknown_flag"),
    ("pretrain", "--batch_size=many", "--batch_size"),
]
# An output under one of the user's files: named before any work, nothing written.
BAD_SETTINGS += [(script, f"--{flag}={{file}}/{name}", "{file}") for script, flag, name in [
    ("train_tokenizer", "out", "tokenizer.model"), ("data_process", "out_dir", "corpus"),
    ("pretrain", "out_dir", "run"), ("export", "out", "hf"), ("download_data", "raw_dir", "raw"),
    ("speedrun", "work_dir", "runs"),
    ("speedrun", "json", "result.json"), ("eval", "out", "eval"), ("eval_choice", "json", "r.json"),
    ("eval_pretrain", "json", "r.json"), ("demo", "out_dir", "out"), ("sft", "out_dir", "sft")]]
# Settings checked before the long steps, and numbers past any real plan.
BAD_SETTINGS += [
    ("speedrun", "--flags=--lr=abc", "--lr"),
    ("speedrun", "--flags=--model=huge", "huge"),
    ("speedrun", "--recipe={missing}", "{missing}"),
    ("plan", "--tokens=1e30", "--tokens"),
    ("plan", "--micro_batch=100000000", "--micro_batch"),
    ("plan", "--gpus=1000000000", "--gpus"),
    ("eval_pretrain", "--top_p=nan", "--top_p"),
    ("eval", "--reward_model={file} --val_data={csv}", "{file}"),
    ("eval", "--reward_model={ckpt} --val_data=", "--val_data"),
    ("export", "--import_from={missing} --out={out}/imported.pt", "{missing}"),
    ("export", "--import_from={file} --out={out}/imported.pt", "{file}"),
    ("export", "--import_from={dir} --out={out}/imported.pt", "{dir}"),
    ("eval_pretrain", "--bin={foreign_bin}", "{foreign_bin}"),
]
if not torch.cuda.is_available():
    BAD_SETTINGS += [(script, "--device=cuda", "--device=cuda") for script in ("chat", "pretrain", "eval", "sft")]
# Files of the wrong kind: Windows-encoded text, binary data where text goes. The error names the file.
BAD_SETTINGS += [("sft", "--data={gbk_csv}", "{gbk_csv}"), ("dpo", "--data={gbk_pairs}", "{gbk_pairs}"),
                 ("eval", "--val_data={gbk_csv}", "{gbk_csv}"), ("eval", "--questions_file={gbk_text}", "{gbk_text}"),
                 ("eval_pretrain", "--text={gbk_text}", "{gbk_text}"),
                 ("eval_choice", "--val_data={gbk_choice}", "{gbk_choice}"),
                 ("train_reward_model", "--data={gbk_pairs}", "{gbk_pairs}")]
# A text file where a tokenizer or a checkpoint goes: every command that reads one names the file.
TOKENIZER_READERS = ["pretrain", "sft", "dpo", "grpo", "distill", "train_reward_model", "chat", "eval", "eval_choice",
                     "eval_pretrain", "serve", "data_process", "export"]
# (pretrain.py's --init_from: tests/test_pretrain.py, with a corpus to reach it)
CHECKPOINT_READERS = {"sft": "init_from", "dpo": "init_from", "grpo": "init_from",
                      "train_reward_model": "init_from", "chat": "ckpt", "eval": "ckpt", "eval_choice": "ckpt",
                      "eval_pretrain": "ckpt", "serve": "ckpt", "export": "ckpt"}
BAD_SETTINGS += [(script, "--tokenizer={file}", "{file}") for script in TOKENIZER_READERS]
BAD_SETTINGS += [(script, f"--{flag}={{file}}", "{file}") for script, flag in CHECKPOINT_READERS.items()]

# The flags that make every other setting of a script right, so that the bad one is the only problem.
GOOD = {
    "pretrain": "--data={bin_dir} --tokenizer={tokenizer} --out_dir={out}",
    "sft": "--init_from={ckpt} --data={csv} --val_data= --tokenizer={tokenizer} --out_dir={out}",
    "dpo": "--init_from={ckpt} --data={pairs} --val_data= --tokenizer={tokenizer} --out_dir={out}",
    "grpo": "--init_from={ckpt} --prompts={csv} --tokenizer={tokenizer} --out_dir={out}",
    "distill": "--teacher={ckpt} --data={csv} --tokenizer={tokenizer} --out_dir={out}",
    "train_reward_model": "--init_from={ckpt} --data={pairs} --val_data= --tokenizer={tokenizer} --out_dir={out}",
    "chat": "--ckpt={ckpt} --tokenizer={tokenizer}",
    "eval": "--ckpt={ckpt} --tokenizer={tokenizer} --val_data= --out={out}",
    "eval_choice": "--ckpt={ckpt} --tokenizer={tokenizer} --val_data={csv}",
    "eval_pretrain": "--ckpt={ckpt} --tokenizer={tokenizer} --bin=",
    "serve": "--ckpt={ckpt} --tokenizer={tokenizer}",
    "plan": "",
    "data_process": "--sources= --inputs=txt:{text} --tokenizer={tokenizer} --out_dir={out}",
    "sft_data_process": "--builtin= --preference= --inputs=alpaca:{json} --out_dir={out}",
    "train_tokenizer": "--sources= --inputs=txt:{text} --out={out}/tokenizer.model",
    "download_data": "--sources=",
    "demo": "--data_dir={out}/data --out_dir={out}/out --sft_dir={out}/sft",
    "export": "--ckpt={ckpt} --tokenizer={tokenizer} --out={out}/hf",
    "speedrun": "--work_dir={out}/speedrun --raw_dir={out}/raw",
}


def snapshot(folder) -> dict[str, str]:
    """Every file under folder with a digest of its bytes."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return files


@pytest.fixture(scope="module")
def user_files(tmp_path_factory, small_tokenizer) -> dict[str, str]:
    """A user's folder: a model, data of every kind, a stray file and a folder."""
    home = tmp_path_factory.mktemp("user")
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=600, max_seq_len=32, multiple_of=16)
    torch.save({"model": Transformer(args).state_dict(), "model_args": vars(args)}, home / "ckpt.pt")
    write_csv(home / "sft.csv", ["prompt", "answer", "history"], [["你好", "你好！", "[]"]] * 4)
    write_csv(home / "pairs.csv", ["prompt", "chosen", "rejected"], [["你好", "你好！", "走开"]] * 4)
    (home / "corpus.txt").write_text("床前明月光，疑是地上霜。\n" * 20, encoding="utf-8")
    (home / "alpaca.json").write_text('[{"instruction": "你好", "input": "", "output": "你好！"}]', encoding="utf-8")
    (home / "bins").mkdir()
    (home / "notes.txt").write_text("我的笔记\n", encoding="utf-8")
    (home / "a_folder").mkdir()
    (home / "gbk.csv").write_bytes("prompt,answer,history\n你好,你好！,[]\n".encode("gbk"))
    (home / "gbk_pairs.csv").write_bytes("prompt,chosen,rejected\n你好,你好！,走开\n".encode("gbk"))
    (home / "gbk_choice.csv").write_bytes("question,A,B,C,D,answer\n一加一,1,2,3,4,B\n".encode("gbk"))
    (home / "gbk.txt").write_bytes("床前明月光，疑是地上霜。\n".encode("gbk"))
    np.full(2000, 9000, dtype=np.uint16).tofile(home / "foreign.bin")  # ids of a larger tokenizer's
    return {"ckpt": str(home / "ckpt.pt"), "csv": str(home / "sft.csv"), "pairs": str(home / "pairs.csv"),
            "text": str(home / "corpus.txt"), "json": str(home / "alpaca.json"), "bin_dir": str(home / "bins"),
            "file": str(home / "notes.txt"), "dir": str(home / "a_folder"), "missing": str(home / "nothing.model"),
            "tokenizer": small_tokenizer, "out": str(home / "out"), "home": str(home),
            "gbk_csv": str(home / "gbk.csv"), "gbk_pairs": str(home / "gbk_pairs.csv"),
            "gbk_choice": str(home / "gbk_choice.csv"), "gbk_text": str(home / "gbk.txt"),
            "foreign_bin": str(home / "foreign.bin")}


def argv_of(script: str, bad: str, files: dict[str, str]) -> list[str]:
    return (GOOD[script] + " " + bad).format(**files).split()


def assert_one_line_error(code, stderr: str, names: str) -> None:
    assert code not in (0, None), "the script did not fail"
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], stderr[-1000:]


@pytest.mark.parametrize("script,bad,names", BAD_SETTINGS, ids=[f"{s}:{b}" for s, b, _ in BAD_SETTINGS])
def test_a_bad_setting_is_one_line_naming_it(script, bad, names, user_files, capsys, monkeypatch):
    monkeypatch.chdir(user_files["home"])
    before = snapshot(user_files["home"])
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as stopped:
        module.main(argv_of(script, bad, user_files))
    code, err = stopped.value.code, capsys.readouterr().err
    if isinstance(code, str):  # SystemExit("error: ...") prints its message and exits with 1
        code, err = 1, err + code
    assert_one_line_error(code, err, names.format(**user_files))
    assert snapshot(user_files["home"]) == before, "a user's file was changed"


# Inputs whose problem shows only once read: warnings and progress may come first, the error is the last line.
BAD_DATA = [("train_tokenizer", "--inputs=txt:{empty}", "no text to train on"),
            ("train_tokenizer", "--inputs=txt:{garbage}", "{garbage}: not text but binary data"),
            ("data_process", "--inputs=txt:{garbage}", "{garbage}: not text but binary data"),
            ("data_process", "--inputs=txt:{gbk_text}", "--encoding=gb18030")]


@pytest.mark.parametrize("script,bad,names", BAD_DATA, ids=[f"{s}:{b}" for s, b, _ in BAD_DATA])
def test_bad_data_ends_in_one_line_naming_it(script, bad, names, user_files, capsys, monkeypatch, tmp_path):
    import gzip
    files = dict(user_files, empty=str(tmp_path / "empty.txt"), garbage=str(tmp_path / "garbage.txt.gz"))
    (tmp_path / "empty.txt").write_bytes(b"")
    with gzip.open(tmp_path / "garbage.txt.gz", "wb") as f:
        f.write(bytes(range(256)) * 20)
    monkeypatch.chdir(user_files["home"])
    before = snapshot(user_files["home"])
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(script).main(argv_of(script, bad, files))
    err = capsys.readouterr().err
    assert stopped.value.code not in (0, None) and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: ") and names.format(**files) in err.strip().splitlines()[-1]
    assert snapshot(user_files["home"]) == before, "a user's file was changed"


def test_chat_with_standard_input_closed_is_one_line(user_files):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), *argv_of("chat", "", user_files)],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: os.close(0))
    assert_one_line_error(result.returncode, result.stderr, "standard input is closed")


@pytest.mark.parametrize("script,bad", [("pretrain", "--batch_size=0"), ("serve", "--port=99999"),
                                        ("data_process", "--bands=0"), ("chat", "--top_p=2")])
def test_the_same_from_the_command_line(script, bad, user_files):
    """The in-process table above, as a user sees it: exit status and stderr of the real process."""
    before = snapshot(user_files["home"])
    result = subprocess.run([sys.executable, os.path.join(ROOT, f"{script}.py"), *argv_of(script, bad, user_files)],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                            cwd=user_files["home"])
    assert_one_line_error(result.returncode, result.stderr, bad)
    assert snapshot(user_files["home"]) == before


@pytest.mark.parametrize("args,names", [(["{dir}"], "no metrics at"), (["{dir}", "--smooth=0"], "--smooth"),
                                        (["{dir}", "--x=time"], "--x")])
def test_plot_errors_are_one_line(args, names, user_files):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), *[a.format(**user_files) for a in args]],
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result.returncode, result.stderr, names)


def test_chat_set_answers_a_bad_value_in_one_line_and_goes_on(user_files):
    commands = "\n".join(["/set max_new_tokens=-1", "/set temperature=nan", "/set repetition_penalty=0",
                          "/set top_p=2", "/set temperature=-0.5", "/set top_k=x", "/set top_k=5", "/settings"])
    result = subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), f"--ckpt={user_files['ckpt']}",
                             f"--tokenizer={user_files['tokenizer']}"], input=commands + "\n", capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[:6] == ["error: --max_new_tokens=-1: must be at least 1",
                         "error: --temperature=nan: must be a finite number",
                         "error: --repetition_penalty=0.0: must be greater than 0",
                         "error: --top_p=2.0: must be at most 1",
                         "error: --temperature=-0.5: must be at least 0",
                         "error: --top_k=x: invalid literal for int() with base 10: 'x'"]
    assert lines[6] == "top_k = 5"
    assert lines[7] == "temperature=0.0, top_k=5, top_p=1.0, repetition_penalty=1.1, max_new_tokens=256"


def test_a_port_in_use_is_one_line(user_files):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), f"--ckpt={user_files['ckpt']}",
                                 f"--tokenizer={user_files['tokenizer']}", f"--port={port}"], capture_output=True,
                                text=True, timeout=120)
    assert_one_line_error(result.returncode, result.stderr, str(port))
