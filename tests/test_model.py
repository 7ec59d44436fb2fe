import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from babyllama.checkpoint import CheckpointError, load_model
from babyllama.configurator import read_model_preset
from model import (
    KVCache,
    ModelArgs,
    SlotKVCache,
    Transformer,
    apply_rope,
    bigram_ids,
    init_residual_projections,
    rope_tables,
    run_as_written,
    sample,
)

SMALL = dict(dim=64, n_layers=2, n_heads=4, vocab_size=97, max_seq_len=64, multiple_of=16)


def small_model(seed: int = 0, scrambled: bool = True, **kw) -> Transformer:
    """A small model; scrambled gives it large random weights, so that greedy outputs vary instead of
    echoing the last input token as a freshly initialised tied model does."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**SMALL, **kw})).eval()
    if not scrambled:
        return model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5 if name.startswith("tok_") else 0.15)
    return model


def test_seed_presets_parameter_counts():
    m92 = Transformer(read_model_preset("baby_92m"))
    assert m92.num_params() == 58_479_616
    assert m92.num_params(count_tied_twice=True) == 91_653_632
    assert m92.args.hidden_dim == 1376
    m218 = Transformer(read_model_preset("baby_218m"))
    assert m218.num_params() == 218_155_008


def test_state_dict_keys_are_the_seeds():
    model = small_model()
    keys = set(model.state_dict())
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        expected |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        expected |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    assert keys == expected
    assert model.output.weight is model.tok_embeddings.weight


def test_raw_state_dict_round_trip(tmp_path):
    a, b = small_model(0), small_model(1)
    tokens = torch.randint(0, 97, (2, 10))
    assert not torch.allclose(a(tokens)[0], b(tokens)[0])
    # The seed's .pth files come from a compiled model: keys carry `_orig_mod.`.
    path = tmp_path / "seed.pth"
    torch.save({"_orig_mod." + k: v for k, v in a.state_dict().items()}, path)
    loaded, ckpt = load_model(str(path), n_heads=4, max_seq_len=64)
    assert ckpt == {}
    assert torch.equal(loaded(tokens)[0], a(tokens)[0])
    loaded_b, _ = load_model(str(path), model_args=b.args)
    assert torch.equal(loaded_b(tokens)[0], a(tokens)[0])
    # Weights tell the options that add or untie them; the shape read off them computes the same.
    c = small_model(2, qk_norm=True, tie_embeddings=False, value_embeddings=1)
    torch.save(c.state_dict(), path)
    loaded_c, _ = load_model(str(path), n_heads=4, max_seq_len=64)
    assert (loaded_c.args.qk_norm, loaded_c.args.tie_embeddings, loaded_c.args.value_embeddings) == (True, False, 1)
    assert torch.equal(loaded_c(tokens)[0], c(tokens)[0])


def test_our_checkpoint_loads(tmp_path):
    from dataclasses import asdict
    a = small_model(3, n_kv_heads=2)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": a.state_dict(), "model_args": asdict(a.args), "step": 7}, path)
    loaded, ckpt = load_model(str(path))
    assert ckpt["step"] == 7 and loaded.args == a.args
    tokens = torch.randint(0, 97, (1, 5))
    assert torch.equal(loaded(tokens)[0], a(tokens)[0])


def test_wrong_shape_names_key_and_shapes(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save(small_model().state_dict(), path)
    shapes = r"tok_embeddings.weight has shape \(97, 64\) but the model expects \(100, 64\)"
    with pytest.raises(CheckpointError, match=shapes):
        load_model(str(path), model_args=ModelArgs(**{**SMALL, "vocab_size": 100}))
    state = small_model().state_dict()
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys \['norm.weight'\].*unexpected keys \['extra.weight'\]"):
        load_model(str(path), model_args=ModelArgs(**SMALL))


def test_missing_checkpoint_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("/nonexistent/ckpt.pt")


@pytest.mark.parametrize("scheme", ["seed", "gpt2", "zero"])
def test_init_schemes_set_the_residual_projections(scheme):
    """The seed's init is the default; gpt2 and zero change only the residual projections."""
    torch.manual_seed(0)
    args = ModelArgs(dim=256, n_layers=8, n_heads=4, vocab_size=512, max_seq_len=16, multiple_of=32)
    model = Transformer(args)  # the seed's init
    if scheme != "seed":
        init_residual_projections(model, scheme)
    small, normal = 0.02 / math.sqrt(2 * args.n_layers), 0.02
    want = {"seed": {"wo": small, "w2": normal, "w3": small, "wq": normal},
            "gpt2": {"wo": small, "w2": small, "w3": normal, "wq": normal},
            "zero": {"wo": 0.0, "w2": 0.0, "w3": normal, "wq": normal}}[scheme]
    for layer in model.layers:
        got = {"wo": layer.attention.wo.weight, "w2": layer.feed_forward.w2.weight,
               "w3": layer.feed_forward.w3.weight, "wq": layer.attention.wq.weight}
        for name, std in want.items():
            assert got[name].std().item() == pytest.approx(std, rel=0.05, abs=1e-9), (name, std)
    if scheme == "zero":  # every block starts as the identity
        tokens = torch.randint(0, 512, (2, 16))
        with torch.no_grad():
            assert torch.equal(model.hidden(tokens), model.norm(model.tok_embeddings(tokens)))


def test_an_unknown_init_is_refused():
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        init_residual_projections(small_model(), "xavier")


def test_loss_ignores_minus_100():
    model = small_model()
    tokens = torch.randint(0, 97, (2, 8))
    targets = torch.randint(0, 97, (2, 8))
    logits, loss = model(tokens, targets)
    masked = targets.clone()
    masked[:, :4] = -100
    _, masked_loss = model(tokens, masked)
    manual = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 97), targets[:, 4:].reshape(-1))
    assert torch.allclose(masked_loss, manual, atol=1e-6)
    assert not torch.allclose(loss, masked_loss)


def test_rope_rotates_adjacent_pairs_and_is_relative():
    cos, sin = rope_tables(ModelArgs(dim=4, n_heads=1, max_seq_len=16, rope_theta=10000.0))  # head size 4
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    out = apply_rope(x, cos[5:6][None], sin[5:6][None]).flatten()
    a0, a1 = 5.0, 5.0 * 10000 ** (-0.5)  # angles of the two pairs at position 5
    expect = [1 * math.cos(a0) - 2 * math.sin(a0), 1 * math.sin(a0) + 2 * math.cos(a0),
              3 * math.cos(a1) - 4 * math.sin(a1), 3 * math.sin(a1) + 4 * math.cos(a1)]
    assert torch.allclose(out, torch.tensor(expect), atol=1e-5)
    # q.k depends only on the distance between positions.
    q, k = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4)

    def dot(i, j):
        return (apply_rope(q, cos[i:i + 1][None], sin[i:i + 1][None])
                * apply_rope(k, cos[j:j + 1][None], sin[j:j + 1][None])).sum()
    assert torch.allclose(dot(3, 1), dot(10, 8), atol=1e-5)


def test_rmsnorm_computes_in_fp32():
    model = small_model()
    x = torch.randn(2, 3, 64) * 100
    ref = model.norm(x)
    out = model.norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, rtol=1e-2, atol=1e-2)


SPEEDRUN_OPTIONS = {"qk_norm": True, "tie_embeddings": False, "logit_softcap": 5.0, "feed_forward": "relu2"}


@pytest.mark.parametrize("options", [{"n_kv_heads": 4}, {"n_kv_heads": 2}, {"n_kv_heads": 2, **SPEEDRUN_OPTIONS}])
def test_cached_logits_equal_full_forward(options):
    model = small_model(scrambled=False, **options)
    tokens = torch.randint(0, 97, (2, 20))
    full, _ = model(tokens)
    cache = KVCache(model.args, 2, 20, "cpu", torch.float32)
    chunks = [model(tokens[:, :7], cache=cache)[0]]  # prefill, then chunks of 1 and 4, then singles
    chunks.append(model(tokens[:, 7:8], cache=cache)[0])
    chunks.append(model(tokens[:, 8:12], cache=cache)[0])
    chunks += [model(tokens[:, t:t + 1], cache=cache)[0] for t in range(12, 20)]
    assert torch.allclose(torch.cat(chunks, 1), full, atol=1e-5)


def test_relu2_feed_forward_squares_the_relu_with_swiglus_parameters(tmp_path):
    from babyllama.checkpoint import model_args_from_state_dict
    from model import FeedForward
    relu2, swiglu = ModelArgs(**SMALL, feed_forward="relu2"), ModelArgs(**SMALL)
    assert relu2.hidden_dim == 272 and swiglu.hidden_dim == 176  # 1.5x as wide, rounded up to multiple_of (16)
    assert 0 <= Transformer(relu2).num_params() - Transformer(swiglu).num_params() <= 2 * 2 * 64 * 16
    ff = FeedForward(relu2)
    assert not hasattr(ff, "w3")
    x = torch.randn(3, 64)
    assert torch.allclose(ff(x), ff.w2(torch.clamp(ff.w1(x), min=0) ** 2), atol=1e-6)
    init_residual_projections(Transformer(relu2), "seed")  # no w3 to initialise: no error
    state = Transformer(relu2).state_dict()
    assert model_args_from_state_dict(state, n_heads=4).feed_forward == "relu2"
    with pytest.raises(ValueError, match="feed_forward 'gelu'"):
        ModelArgs(**SMALL, feed_forward="gelu")


def test_qk_norm_gives_each_heads_query_and_key_the_gains_rms():
    model = small_model(qk_norm=True)
    attention = model.layers[0].attention
    with torch.no_grad():
        attention.q_norm.weight.fill_(2.0)
    seen = {}
    for name in ("q_norm", "k_norm"):
        getattr(attention, name).register_forward_hook(lambda m, i, out, name=name: seen.update({name: out}))
    model(torch.randint(0, 97, (2, 9)))
    head_dim = 64 // 4
    assert seen["q_norm"].shape == (2, 9, 4, head_dim)  # (B, T, heads, head_dim): one norm per head and position
    assert torch.allclose(seen["q_norm"].pow(2).mean(-1).sqrt(), torch.tensor(2.0), atol=1e-3)
    assert torch.allclose(seen["k_norm"].pow(2).mean(-1).sqrt(), torch.tensor(1.0), atol=1e-3)
    assert "layers.0.attention.q_norm.weight" in model.state_dict()
    assert "layers.0.attention.q_norm.weight" not in small_model().state_dict()  # the seed's names otherwise


def test_softcap_bounds_the_logits_and_leaves_small_ones():
    capped, plain = small_model(logit_softcap=3.0), small_model()
    tokens = torch.randint(0, 97, (2, 12))
    logits, plain_logits = capped(tokens)[0], plain(tokens)[0]
    assert plain_logits.abs().max() > 3.0 and logits.abs().max() < 3.0  # scrambled weights give large logits
    assert torch.allclose(logits, 3.0 * torch.tanh(plain_logits / 3.0), atol=1e-5)  # the same weights (seed 0)
    h = torch.randn(2, 64)
    assert torch.allclose(capped.next_token_logits(h), 3.0 * torch.tanh(plain.next_token_logits(h) / 3.0), atol=1e-5)
    capped.loss_chunk = 4
    with pytest.raises(ValueError, match="logit_softcap"):
        capped(tokens, tokens)


def test_value_embeddings_at_zero_gates_equal_the_plain_model_and_cache_equals_full_forward():
    with_ve = small_model(value_embeddings=1, n_kv_heads=2)
    plain = small_model(n_kv_heads=2)
    missing = plain.load_state_dict(with_ve.state_dict(), strict=False).unexpected_keys
    assert sorted(missing) == ["layers.0.attention.value_embedding.weight", "layers.0.attention.value_gate"]
    assert not hasattr(with_ve.layers[1].attention, "value_embedding")  # only the first value_embeddings layers
    tokens = torch.randint(0, 97, (2, 16))
    assert torch.equal(with_ve(tokens)[0], plain(tokens)[0])
    with torch.no_grad():
        with_ve.layers[0].attention.value_gate.copy_(torch.tensor([0.5, -1.0]))
    full = with_ve(tokens)[0]
    assert not torch.allclose(full, plain(tokens)[0])
    cache = KVCache(with_ve.args, 2, 16, "cpu", torch.float32)
    steps = [with_ve(tokens[:, :5], cache=cache)[0]]
    steps += [with_ve(tokens[:, t:t + 1], cache=cache)[0] for t in range(5, 16)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_x0_scalars_start_as_the_plain_model_and_mix_the_embedded_input_into_each_block(tmp_path):
    mixed, plain = small_model(x0_scalars=True, n_kv_heads=2), small_model(n_kv_heads=2)
    unexpected = plain.load_state_dict(mixed.state_dict(), strict=False).unexpected_keys
    assert sorted(unexpected) == ["layers.0.x0_lambdas", "layers.1.x0_lambdas"]
    tokens = torch.randint(0, 97, (2, 16))
    assert torch.equal(mixed(tokens)[0], plain(tokens)[0])
    with torch.no_grad():
        mixed.layers[0].x0_lambdas.copy_(torch.tensor([0.5, 0.25]))
        mixed.layers[1].x0_lambdas.copy_(torch.tensor([2.0, -1.0]))
    seen = {}

    def keep(name: str, value: torch.Tensor) -> None:  # a hook that returns None leaves the call as it was
        seen[name] = value

    hooks = [mixed.tok_embeddings.register_forward_hook(lambda m, args, out: keep("x0", out))]
    for i, layer in enumerate(mixed.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, args, i=i: keep(f"in{i}", args[0])))
        hooks.append(layer.register_forward_hook(lambda m, args, out, i=i: keep(f"out{i}", out)))
    full = mixed(tokens)[0]
    for hook in hooks:
        hook.remove()
    x0 = seen["x0"]
    assert torch.allclose(seen["in0"], 0.5 * x0 + 0.25 * x0)  # before the first block h is x0 itself
    assert torch.allclose(seen["in1"], 2.0 * seen["out0"] - x0)
    cache = KVCache(mixed.args, 2, 16, "cpu", torch.float32)
    steps = [mixed(tokens[:, :5], cache=cache)[0]]
    steps += [mixed(tokens[:, t:t + 1], cache=cache)[0] for t in range(5, 16)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    torch.save(mixed.state_dict(), tmp_path / "m.pth")  # a checkpoint tells the option
    loaded, _ = load_model(str(tmp_path / "m.pth"), n_heads=4, max_seq_len=64)
    assert loaded.args.x0_scalars and torch.equal(loaded(tokens)[0], full)


def test_bigram_ids_hash_pairs_into_all_but_the_last_row_kept_for_an_unknown_previous_token():
    tokens = torch.arange(97).repeat_interleave(97)
    previous = torch.arange(97).repeat(97)
    ids = bigram_ids(previous, tokens, 31)
    assert int(ids.min()) == 0 and int(ids.max()) == 29 and len(ids.unique()) == 30  # every pair row is used
    assert torch.equal(bigram_ids(torch.tensor([-1, 4]), torch.tensor([4, 4]), 31)[:1], torch.tensor([30]))
    with pytest.raises(ValueError, match="bigram_buckets 1"):
        ModelArgs(**{**SMALL, "bigram_buckets": 1})


def test_bigram_embedding_at_zero_equals_the_plain_model_and_each_pair_reads_its_row(tmp_path):
    with_bigrams, plain = small_model(bigram_buckets=31), small_model()
    with torch.no_grad():
        with_bigrams.bigram_embeddings.weight.zero_()
    unexpected = plain.load_state_dict(with_bigrams.state_dict(), strict=False).unexpected_keys
    assert unexpected == ["bigram_embeddings.weight"]
    tokens = torch.tensor([[5, 9, 11, 3, 40, 41]])
    assert torch.equal(with_bigrams(tokens)[0], plain(tokens)[0])
    # Only the row of the pair (11, 3) set: the logits change from the 3 after the 11 on, not before.
    row = int(bigram_ids(torch.tensor([11]), torch.tensor([3]), 31))
    with torch.no_grad():
        with_bigrams.bigram_embeddings.weight[row] = 1.0
    changed = (with_bigrams(tokens)[0] - plain(tokens)[0]).abs().amax(-1)[0]
    assert bool((changed[:3] == 0).all()) and bool((changed[3:] > 0).all())
    # A checkpoint tells its bucket count.
    torch.save(with_bigrams.state_dict(), tmp_path / "m.pth")
    loaded, _ = load_model(str(tmp_path / "m.pth"), n_heads=4, max_seq_len=64)
    assert loaded.args.bigram_buckets == 31 and torch.equal(loaded(tokens)[0], with_bigrams(tokens)[0])


def test_bigram_embedding_cache_and_padding_compute_as_the_full_forward():
    model = small_model(n_kv_heads=2, bigram_buckets=31)  # scrambled: the table is not zero
    tokens = torch.randint(0, 97, (2, 16))
    full = model(tokens)[0]
    cache = KVCache(model.args, 2, 16, "cpu", torch.float32)
    steps = [model(tokens[:, :5], cache=cache)[0]]
    steps += [model(tokens[:, t:t + 1], cache=cache)[0] for t in range(5, 16)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    padded = torch.cat([torch.full((1, 3), 7), tokens[:1]], 1)  # the first token after padding has no previous
    assert torch.allclose(model(padded, pad_left=torch.tensor([3]))[0][:, 3:], full[:1], atol=1e-5)
    prompts = [[5, 9, 11, 3, 40, 41, 42], [7], [60, 61, 62, 63]]
    alone = [model.generate([p], 12, eos_id=None, use_cache=False)[0] for p in prompts]
    recomputed = model.generate(prompts, 12, eos_id=None, use_cache=False)
    assert model.generate(prompts, 12, eos_id=None) == recomputed == alone
    with pytest.raises(ValueError, match="bigram_buckets: the serving engine"):
        model(tokens[:, :1], cache=SlotKVCache(model.args, 2, 16, "cpu", torch.float32))


def test_flops_per_token_count_matmuls_not_lookups():
    from babyllama.quantize import quantize_int8
    plain = small_model(scrambled=False).flops_per_token(64)
    # An untied embedding and the bigram table are looked up, not multiplied: the same matmuls as the plain model.
    for option in ({"tie_embeddings": False}, {"bigram_buckets": 31}):
        assert small_model(scrambled=False, **option).flops_per_token(64) == plain
    quantized = small_model(scrambled=False)
    quantize_int8(quantized)  # a distillation teacher: its output layer is no nn.Linear
    assert quantized.flops_per_token(64) > 0


def test_untied_embeddings_are_a_matrix_of_their_own(tmp_path):
    model = small_model(tie_embeddings=False)
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()
    tied = small_model()
    assert model.num_params() == tied.num_params() + 97 * 64 == model.num_params(count_tied_twice=True)
    torch.save({"model": model.state_dict(), "model_args": vars(model.args)}, tmp_path / "ckpt.pt")
    loaded, _ = load_model(str(tmp_path / "ckpt.pt"))
    assert torch.equal(loaded.output.weight, model.output.weight) and not loaded.args.tie_embeddings


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_attention_by_matmul_equals_sdpa(n_kv_heads):
    from model import causal_attention_by_matmul
    torch.manual_seed(0)
    q = torch.randn(2, 4, 20, 16, requires_grad=True)
    k, v = (torch.randn(2, n_kv_heads, 20, 16, requires_grad=True) for _ in range(2))
    ours = causal_attention_by_matmul(q, k, v, 0.0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv_heads != 4)
    assert torch.allclose(ours, ref, atol=1e-5)
    grad = torch.randn_like(ref)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours_grads, ref_grads))


def test_document_mask_keeps_each_document_to_itself():
    from model import document_mask
    allowed = document_mask(torch.tensor([[5, 2, 7, 8, 2, 9]]), eos_id=2)
    documents = [0, 1, 1, 1, 2, 2]  # an eos opens the document after it
    assert allowed.shape == (1, 1, 6, 6)
    assert all(bool(allowed[0, 0, q, k]) == (k <= q and documents[k] == documents[q])
               for q in range(6) for k in range(6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_with_a_document_mask_each_document_reads_as_if_alone(dtype):
    """A window of documents gives each the logits it has alone, after its eos (the held-out score's reading):
    in float32 through the fused kernel, in bfloat16 through the written-out attention."""
    model = small_model()
    documents = [[2, 5, 9, 14], [2, 30, 31], [2, 7, 8, 40, 41]]
    window = torch.tensor([sum(documents, [])])
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        plain = model(window)[0][0].float()
        model.document_eos = 2
        together = model(window)[0][0].float()
        start = 0
        for document in documents:
            alone = model(torch.tensor([document]))[0][0].float()
            assert (together[start:start + len(document)] - alone).abs().max() <= tolerance * alone.abs().max()
            start += len(document)
    # Without the mask the later documents read the earlier ones.
    assert (plain[4:] - together[4:]).abs().max() > 0.1 * together.abs().max()


def test_bfloat16_training_forward_takes_the_matmul_attention(monkeypatch):
    """On CPU in bfloat16 short sequences go through the written-out attention, and give the loss the
    fused kernel gives (to bfloat16 precision)."""
    import model as model_module
    model = small_model(scrambled=False).train()
    tokens = torch.randint(0, 97, (2, 33))
    calls = []
    original = model_module.causal_attention_by_matmul
    monkeypatch.setattr(model_module, "causal_attention_by_matmul", lambda *a: calls.append(1) or original(*a))
    model(tokens[:, :-1], tokens[:, 1:])
    assert calls == []  # float32: the fused kernel is faster
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model(tokens[:, :-1], tokens[:, 1:])[1]
        assert len(calls) == model.args.n_layers
        monkeypatch.setattr(model_module, "_matmul_attention_is_faster", lambda q: False)
        fused = model(tokens[:, :-1], tokens[:, 1:])[1]
    assert len(calls) == model.args.n_layers and abs(ours.item() - fused.item()) < 2e-2 * fused.item()


def test_left_padding_matches_unpadded():
    model = small_model()
    prompt = torch.randint(0, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], 1)
    logits, _ = model(padded, pad_left=torch.tensor([3]))
    assert torch.allclose(logits[:, 3:], model(prompt)[0], atol=1e-5)


def test_greedy_cache_equals_no_cache_for_ragged_batch():
    model = small_model(n_kv_heads=2)
    prompts = [[5, 9, 11, 3, 40, 41, 42], [7], [60, 61, 62, 63]]
    cached = model.generate(prompts, 25, eos_id=None)
    recomputed = model.generate(prompts, 25, eos_id=None, use_cache=False)
    alone = [model.generate([p], 25, eos_id=None, use_cache=False)[0] for p in prompts]
    assert cached == recomputed == alone
    assert all(len(row) == 25 for row in cached)


def test_generation_stops_per_sequence_on_eos():
    model = small_model()
    prompts = [[5, 9, 11], [7, 8]]
    free = model.generate(prompts, 10, eos_id=None)
    # Row 0 stops at the first token it had not produced before.
    stop = next(i for i, t in enumerate(free[0]) if i > 0 and t not in free[0][:i])
    eos = free[0][stop]
    steps = list(model.generate_stream(prompts, 10, eos_id=eos))
    out = model.generate(prompts, 10, eos_id=eos)
    assert out[0] == free[0][:stop]
    assert steps[stop][0] == eos and all(step[0] is None for step in steps[stop + 1:])
    n_row1 = next((i for i, t in enumerate(free[1]) if t == eos), 10)
    assert out[1] == free[1][:n_row1]


def test_streaming_callback_sees_every_token():
    model = small_model()
    seen = []
    out = model.generate([[1, 2, 3]], 6, eos_id=None, on_token=seen.append)
    assert [s[0] for s in seen] == out[0]


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, 0.0).item() == 4
    topk = {sample(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert topk == {3, 4}
    # softmax of [..., 3, 4] puts 0.64 on 4 and 0.24 on 3: top_p 0.5 keeps only 4, 0.8 keeps both.
    assert {sample(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(100)} == {4}
    assert {sample(logits, 1.0, top_p=0.8, generator=g).item() for _ in range(300)} == {3, 4}
    # top_p 0 keeps the most likely token alone (OpenAI's meaning), never an empty set; 1 keeps them all.
    assert {sample(logits, 1.0, top_p=0.0, generator=g).item() for _ in range(50)} == {4}
    assert len({sample(logits, 1.0, top_p=1.0, generator=g).item() for _ in range(300)}) == 5


def test_decoding_never_picks_an_id_the_tokenizer_lacks():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=100, max_seq_len=64)).eval()
    with torch.no_grad():
        model.output.weight[90:] = 3 * model.output.weight[6]  # the padded ids are the likeliest
    assert min(model.generate([[5, 6]], 20, eos_id=None)[0]) >= 90
    model.limit_vocab(90)
    sampled = model.generate([[5, 6]] * 8, 30, temperature=2.0, eos_id=None)
    assert max(max(row) for row in sampled) < 90 and model.next_token_logits(torch.randn(2, 32)).shape == (2, 90)


def test_repetition_penalty_changes_greedy_choice():
    model = small_model()
    prompt = [[3, 4, 5]]
    plain = model.generate(prompt, 30, eos_id=None)[0]
    penalised = model.generate(prompt, 30, eos_id=None, repetition_penalty=100.0)[0]
    assert len(set(penalised)) == len(penalised)  # a huge penalty never repeats a token
    assert plain != penalised


def test_generation_respects_context():
    model = small_model()
    with pytest.raises(ValueError, match="no room"):
        model.generate([[1] * 64], 5)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[]], 5)


def test_decoding_follows_the_weights_after_an_optimizer_step():
    """The fused AdamW step changes the output matrix in place without bumping its version counter:
    decoding after training (GRPO's rollouts) must not read a stale cached copy of it."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**SMALL))
    x = torch.randint(0, 97, (2, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-1, fused=True)
    for _ in range(2):
        model.eval()
        with torch.no_grad():
            h = model.hidden(x)[:, -1]
            assert torch.allclose(model.next_token_logits(h), model(x)[0][:, -1].float(), atol=1e-5)
        model.train()
        model(x, torch.roll(x, -1, 1))[1].backward()
        optimizer.step()
        optimizer.zero_grad()


def test_run_as_written_runs_eagerly_inside_a_compiled_function():
    seen = []

    @run_as_written
    def probe(x):
        seen.append(torch.compiler.is_compiling())  # traced, this would record True
        return x * 2

    compiled = torch.compile(lambda x: probe(x + 1) - 1, backend="eager")
    for _ in range(2):
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 3.0))
    assert probe(torch.ones(1)).item() == 2 and seen == [False, False, False]


def test_importing_the_model_leaves_the_compiler_unloaded():
    """torch._dynamo (seconds at every start) is imported by torch.compile, not by the model's module."""
    script = "import sys, model; assert 'torch._dynamo' not in sys.modules, 'imported'"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
