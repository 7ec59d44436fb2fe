import json
import os

from conftest import ROOT

from demo import MODELS, Config, results_table, stages


def test_every_stage_names_a_script_and_configs_that_exist():
    for name, _, command in stages(Config()):
        assert os.path.isfile(os.path.join(ROOT, command[0])), name
        for arg in command[1:]:
            if arg.startswith("config/"):
                assert os.path.isfile(os.path.join(ROOT, arg)), arg


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
            "idiom": {"f1": 0.1 * i, "rouge_l": 0.05 * i, "reward": float(i)}}}))
        (ev / f"{name}_choice.json").write_text(json.dumps({"accuracy": 0.25 + 0.1 * i}))
    table = results_table(Config(out_dir=str(tmp_path)))
    assert "4.500 nats/token, 5.500 bits per character" in table
    assert "idiom 0.900 (10 pairs)" in table
    assert "| grpo | 0.300 | 0.150 | 3.000 | 0.550 | 0.000 |" in table
