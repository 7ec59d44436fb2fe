import importlib
import json
import os
from dataclasses import asdict

from conftest import ROOT

from demo import MODELS, Config, results_table, stages


def test_every_stage_command_parses_with_its_script(monkeypatch):
    """Each stage's script exists, and its settings take every flag and config file the demo passes
    (a renamed flag fails here, not twenty minutes into a demo)."""
    from babyllama.configurator import parse_config
    monkeypatch.chdir(ROOT)
    for name, _, command in stages(Config()):
        assert os.path.isfile(os.path.join(ROOT, command[0])), name
        script = importlib.import_module(command[0].removesuffix(".py"))
        if command[0] == "plot.py":  # argparse of its own: its positional folder and --out
            assert len(command) == 2 and not command[1].startswith("-"), command
            continue
        cfg = parse_config(script.Config, command[1:], script.__doc__, check_files=False)
        for arg in command[1:]:
            if arg.startswith("--"):
                key, value = arg[2:].split("=", 1)
                assert str(getattr(cfg, key)).lower() == value.lower(), (name, arg)


def test_results_table(tmp_path):
    ev = tmp_path / "eval"
    ev.mkdir()
    (tmp_path / "rm").mkdir()
    (ev / "base_pretrain.json").write_text(json.dumps({"scores": {"bin": {
        "path": "data/demo/val.bin", "loss": 4.5, "perplexity": 90.0, "bits_per_char": 5.5}}}))
    (tmp_path / "rm" / "eval.json").write_text(json.dumps({"idiom": {"pairs": 10, "accuracy": 0.9},
                                                           "all": {"pairs": 10, "accuracy": 0.9}}))
    for i, name in enumerate(MODELS):
        (ev / name).mkdir()
        (ev / name / "summary.json").write_text(json.dumps({"val_answer_loss": 3.0 - i, "scores": {
            "idiom": {"f1": 0.1 * i, "rouge_l": 0.05 * i, "reward": float(i)},
            "all": {"distinct_2": 0.2 * i, "loop": 0.125 * i}}, "tool_tasks": {
                split: {kind: {"valid_call": 0.25 * i, "right_tool": 0.2 * i, "right_arguments": 0.1 * i + shift,
                               "right_answer": 0.3 * i - low, "right_answer_without_tools": 0.01 * i}
                        for kind, low in (("all", 0.0), ("arithmetic", 0.1))}
                for split, shift in (("numbers", 0.0), ("templates", 0.05))}}))
        (ev / f"{name}_choice.json").write_text(json.dumps({"accuracy": 0.25 + 0.1 * i}))
    table = results_table(Config(out_dir=str(tmp_path)))
    assert "4.500 nats/token, 5.500 bits per character" in table
    assert "idiom 0.900 (10 pairs)" in table
    assert "| grpo | 0.300 | 0.150 | 3.000 | 0.550 | 0.000 | 0.600 | 37.5% |" in table
    assert "| grpo | all | 75% / 75% | 60% / 60% | 30% / 35% | 90% / 90% | 3% / 3% |" in table
    assert "| grpo | arithmetic | 75% / 75% | 60% / 60% | 30% / 35% | 80% / 80% | 3% / 3% |" in table
    assert "lookup" not in table  # a kind no split holds (no tables downloaded) has no row


def test_samples_show_each_prompt_with_an_answer(tmp_path, small_tokenizer):
    import shutil

    import torch

    from demo import BASE_PROMPTS, CHAT_QUESTIONS, samples
    from model import ModelArgs, Transformer
    (tmp_path / "data" / "tokenizer").mkdir(parents=True)
    shutil.copy(small_tokenizer, tmp_path / "data" / "tokenizer" / "tokenizer.model")
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=600, max_seq_len=64, multiple_of=16)
    for stage in ("pretrain", "sft"):
        torch.manual_seed(0)
        (tmp_path / "out" / stage).mkdir(parents=True)
        torch.save({"model": Transformer(args).state_dict(), "model_args": asdict(args)},
                   tmp_path / "out" / stage / "ckpt.pt")
    table = samples(Config(data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "out")))
    rows = table.splitlines()[2:]
    assert len(rows) == len(BASE_PROMPTS) + len(CHAT_QUESTIONS)
    for row, prompt in zip(rows, BASE_PROMPTS + CHAT_QUESTIONS):
        cells = row.split(" | ")
        assert cells[1] == prompt and row.endswith(" |")
