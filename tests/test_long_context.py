"""RoPE scaling past the trained length: the frequencies by hand and against transformers, the KV cache,
the settings that load a longer window, export, the position report and the plot."""
import json
import math
import sys
from dataclasses import asdict, replace

import pytest
import torch
from conftest import ROOT, pretrain_command, run_ok, scrambled, transformers_agrees

from babyllama.checkpoint import ContextSettings, load_model
from model import KVCache, ModelArgs, rope_frequencies

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=32, multiple_of=16)


def scaled(kind: str, factor: float = 4.0, length: int = 128, args: ModelArgs = ARGS) -> ModelArgs:
    return replace(args, max_seq_len=length, rope_scaling=kind, rope_factor=factor, rope_original_len=args.max_seq_len)


def test_linear_and_ntk_frequencies_by_hand():
    plain, one = rope_frequencies(ARGS)
    linear, scale = rope_frequencies(scaled("linear"))
    assert torch.allclose(linear, plain / 4) and scale == one == 1.0
    ntk, scale = rope_frequencies(scaled("ntk"))
    assert ntk[0] == plain[0] and scale == 1.0  # the fastest pair turns as trained
    assert torch.isclose(ntk[-1], plain[-1] / 4)  # the slowest is stretched by the whole factor
    assert torch.all(ntk[1:-1] < plain[1:-1]) and torch.all(ntk[1:-1] > plain[1:-1] / 4)


def test_yarn_frequencies_by_hand():
    # head 16, base 10000, trained 32: the pair turning 32 times sits below pair 0 (low = 0) and the pair
    # turning once at 16 ln(32 / 2pi) / (2 ln 10000) = 1.41, so high = 2: pair 0 kept, pair 1 halfway,
    # the rest divided by the factor; attention sharpened by 0.1 ln 4 + 1.
    plain, _ = rope_frequencies(ARGS)
    yarn, scale = rope_frequencies(scaled("yarn"))
    assert yarn[0] == plain[0]
    assert torch.isclose(yarn[1], plain[1] / 4 * 0.5 + plain[1] * 0.5)
    assert torch.allclose(yarn[2:], plain[2:] / 4)
    assert scale == pytest.approx(0.1 * math.log(4) + 1)
    assert rope_frequencies(scaled("yarn", factor=1.0))[1] == 1.0


def test_yarn_equals_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from export import hf_config
    args = scaled("yarn", 8.0, 2048, replace(ARGS, dim=256, n_heads=4, n_kv_heads=4, max_seq_len=256))
    config = hf_config(args)
    assert isinstance(config, LlamaConfig)
    theirs, their_scale = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    ours, scale = rope_frequencies(args)
    assert torch.allclose(ours.float(), theirs, rtol=1e-6) and scale == pytest.approx(their_scale)
    assert (ours != rope_frequencies(replace(args, rope_scaling=""))[0]).any()


def test_settings_load_a_longer_window():
    trained = replace(ARGS, max_seq_len=32)
    yarn = ContextSettings(max_seq_len=128, rope_scaling="yarn").applied(trained)
    assert (yarn.max_seq_len, yarn.rope_scaling, yarn.rope_factor, yarn.rope_original_len) == (128, "yarn", 4.0, 32)
    again = ContextSettings(max_seq_len=256).applied(yarn)  # the model's own scaling, stretched further
    assert (again.rope_scaling, again.rope_factor, again.rope_original_len) == ("yarn", 8.0, 32)
    given = ContextSettings(rope_scaling="linear", rope_factor=2.0).applied(trained)
    assert (given.max_seq_len, given.rope_factor) == (32, 2.0)
    off = ContextSettings(rope_scaling="none").applied(yarn)
    assert (off.max_seq_len, off.rope_scaling, off.rope_factor, off.rope_original_len) == (128, "", 1.0, 0)
    assert ContextSettings().applied(trained) == trained
    with pytest.raises(ValueError, match="rope_original_len"):
        replace(ARGS, rope_scaling="yarn", rope_factor=2.0)


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn"])
def test_cached_logits_equal_full_forward_past_the_trained_length(kind):
    model = scrambled(scaled(kind, length=96), 0.1)
    tokens = torch.randint(0, 300, (2, 90))
    full, _ = model(tokens)
    cache = KVCache(model.args, 2, 90, "cpu", torch.float32)
    chunks = [model(tokens[:, :40], cache=cache)[0], model(tokens[:, 40:41], cache=cache)[0]]
    chunks += [model(tokens[:, t:t + 7], cache=cache)[0] for t in range(41, 90, 7)]
    assert torch.allclose(torch.cat(chunks, 1), full, atol=1e-5)
    assert model.generate([tokens[0, :50].tolist()], 40, eos_id=None) == \
        model.generate([tokens[0, :50].tolist()], 40, eos_id=None, use_cache=False)


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn"])
def test_transformers_gives_our_logits_when_scaled(tmp_path, kind):
    pytest.importorskip("transformers")
    from export import export_hf, import_hf
    model = scrambled(scaled(kind, length=128), 0.1)
    export_hf(model, None, str(tmp_path / "hf"))
    x = torch.randint(3, 300, (1, 120))
    transformers_agrees(model, tmp_path / "hf", x, 40, 80)
    back = import_hf(str(tmp_path / "hf"))
    assert torch.allclose(back(x)[0], model(x)[0], atol=1e-5)
    if kind != "ntk":  # ntk goes out as the larger base it is
        assert (back.args.rope_scaling, back.args.rope_factor, back.args.rope_original_len) == \
            (kind, 4.0, 32 if kind == "yarn" else 128)


def test_gguf_carries_the_scaling(tmp_path, small_tokenizer):
    gguf = pytest.importorskip("gguf")
    from export import export_gguf
    model = scrambled(scaled("yarn", length=128, args=replace(ARGS, vocab_size=600)), 0.1)
    export_gguf(model, small_tokenizer, str(tmp_path / "m.gguf"))
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields

    def value(key):
        return fields[key].contents()
    assert value("llama.rope.scaling.type") == "yarn" and value("llama.rope.scaling.factor") == 4.0
    assert value("llama.rope.scaling.original_context_length") == 32 and value("llama.context_length") == 128
    ntk = scrambled(scaled("ntk", length=128, args=replace(ARGS, vocab_size=600)), 0.1)
    export_gguf(ntk, small_tokenizer, str(tmp_path / "n.gguf"))
    fields = gguf.GGUFReader(str(tmp_path / "n.gguf")).fields
    assert value("llama.rope.freq_base") == pytest.approx(10000 * 4 ** (16 / 14), rel=1e-6)
    assert "llama.rope.scaling.type" not in fields


def test_continue_at_a_longer_length_then_report_by_position(tmp_path, corpus, small_tokenizer, pretrained):
    """pretrain.py continues a model at 2x its length with yarn; eval_pretrain.py --long_context reports
    each bucket with and without scaling, and plot.py draws the report."""
    pretrained = pretrained[0]
    base = load_model(pretrained)[0].args
    run_ok(pretrain_command(corpus, small_tokenizer, tmp_path / "long", f"--init_from={pretrained}",
                            f"--max_seq_len={2 * base.max_seq_len}", "--rope_scaling=yarn", "--max_steps=2",
                            "--eval_interval=2"))
    extended, _ = load_model(str(tmp_path / "long" / "ckpt.pt"))
    assert (extended.args.max_seq_len, extended.args.rope_scaling, extended.args.rope_factor,
            extended.args.rope_original_len) == (2 * base.max_seq_len, "yarn", 2.0, base.max_seq_len)
    report = tmp_path / "long.json"
    out = run_ok([sys.executable, f"{ROOT}/eval_pretrain.py", f"--ckpt={pretrained}", f"--tokenizer={small_tokenizer}",
                  f"--bin={corpus}/data/val.bin", "--long_context=2", "--scalings=none,yarn,linear",
                  "--prompts=春", "--max_new_tokens=2", "--max_windows=4", f"--json={report}"]).stdout
    positions = json.loads(report.read_text())["by_position"]
    L = base.max_seq_len
    assert positions["trained_length"] == L and positions["unit"] == "bits per character"
    assert positions["buckets"] == [[0, L // 4], [L // 4, L // 2], [L // 2, L], [L, 2 * L]]
    none, yarn, linear = (positions["scalings"][k] for k in ("none", "yarn", "linear"))
    assert all(math.isfinite(v) and v > 0 for v in none + yarn + linear)
    assert none[0] != yarn[0] != linear[0]  # each read with its own tables
    assert "bits per character by position" in out and f"{L:>6}-{2 * L - 1:<7}" in out
    lines = __import__("plot").plot_positions([str(report)], str(tmp_path / "long.png"))
    assert (tmp_path / "long.png").stat().st_size > 0
    assert [v for _, v in lines["long yarn"]] == pytest.approx(yarn)


def test_long_context_needs_a_long_enough_file(tmp_path, corpus, small_tokenizer, pretrained):
    from eval_pretrain import main
    pretrained = pretrained[0]
    with pytest.raises(SystemExit) as e:
        main([f"--ckpt={pretrained}", f"--tokenizer={small_tokenizer}", f"--bin={corpus}/data/val.bin",
              "--long_context=1000", "--prompts=春", "--max_new_tokens=1"])
    assert e.value.code != 0
    with pytest.raises(SystemExit):
        main([f"--ckpt={pretrained}", f"--tokenizer={small_tokenizer}", f"--bin={corpus}/data/val.bin",
              "--long_context=2", "--scalings=none,rope", "--prompts=春", "--max_new_tokens=1"])


def test_checkpoints_without_scaling_fields_still_load(tmp_path):
    model = scrambled(ARGS, 0.1)
    old = {k: v for k, v in asdict(ARGS).items() if not k.startswith("rope_") or k == "rope_theta"}
    torch.save({"model": model.state_dict(), "model_args": old}, tmp_path / "old.pt")
    loaded, _ = load_model(str(tmp_path / "old.pt"), context=ContextSettings(max_seq_len=64, rope_scaling="yarn"))
    assert (loaded.args.rope_scaling, loaded.args.rope_factor, loaded.args.max_seq_len) == ("yarn", 2.0, 64)
    x = torch.randint(0, 300, (1, 60))
    assert loaded(x)[0].shape == (1, 60, 300)
