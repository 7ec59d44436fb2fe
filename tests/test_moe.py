"""The mixture of experts (model.MoEFeedForward): routing, top-k weights and the balance loss against hand
values, one expert equal to the dense feed-forward, the balance loss spreading tokens, the KV cache, and
the trainer adding the loss and logging each expert's share."""
import pytest
import torch
import torch.nn.functional as F
from conftest import batch, loss_fn, scrambled, settings, transformers_agrees

from babyllama.distributed import Dist
from babyllama.trainer import Trainer, metrics_line
from model import FeedForward, ModelArgs, MoEFeedForward, Transformer, balance_loss, routing_stats

SMALL = dict(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=16, hidden_dim=24)


def moe_args(**kw) -> ModelArgs:
    return ModelArgs(**{**SMALL, "n_experts": 4, "n_active_experts": 2, **kw})


def swiglu(f: FeedForward, x: torch.Tensor) -> torch.Tensor:
    return f.w2(F.silu(f.w1(x)) * f.w3(x))


def test_one_expert_top_1_is_the_dense_feed_forward():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_args(n_experts=1, n_active_experts=1))
    dense = FeedForward(ModelArgs(**SMALL))
    dense.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(3, 5, 32)
    assert torch.equal(moe(x), dense(x))


def test_routing_and_top_k_weights_equal_hand_values():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_args()).eval()
    x = torch.randn(6, 32)
    logits = (x @ moe.router.weight.t()).detach()
    expected = torch.zeros(6, 32)
    for t in range(6):
        probs = [float(v) for v in torch.softmax(logits[t], -1).detach()]
        first, second = sorted(range(4), key=lambda e: -probs[e])[:2]
        total = probs[first] + probs[second]
        expected[t] = (probs[first] / total * swiglu(moe.experts[first], x[t])
                       + probs[second] / total * swiglu(moe.experts[second], x[t]))
    assert torch.allclose(moe(x[None])[0], expected, atol=1e-6)
    # One expert a token: its raw probability (not renormalised to 1, so that the router learns from the loss).
    moe.n_active = 1
    probs = torch.softmax(logits, -1)
    best = probs.argmax(-1)
    single = torch.stack([probs[t, best[t]] * swiglu(moe.experts[int(best[t])], x[t]) for t in range(6)])
    assert torch.allclose(moe(x[None])[0], single, atol=1e-6)


def test_shared_experts_add_to_every_token():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_args(n_shared_experts=2)).eval()
    assert moe.shared.w1.weight.shape == (48, 32)  # two shared experts of 24: one SwiGLU of 48
    x = torch.randn(1, 4, 32)
    routed = moe(x) - swiglu(moe.shared, x)
    moe.shared = None
    assert torch.allclose(routed, moe(x), atol=1e-6)


def test_balance_loss_equals_hand_values():
    # One sequence of two tokens over two experts, top-1: token 0 picks expert 0 (p 0.9), token 1 expert 0
    # (p 0.6): shares (1, 0), mean probabilities (0.75, 0.25): 2 * (1 * 0.75 + 0 * 0.25) = 1.5.
    probs = torch.tensor([[[0.9, 0.1], [0.6, 0.4]]])
    assert float(balance_loss(probs, probs.topk(1, -1).indices)) == pytest.approx(1.5)
    even = torch.tensor([[[0.9, 0.1], [0.2, 0.8]]])  # one token each: shares (0.5, 0.5), means (0.55, 0.45) -> 1
    assert float(balance_loss(even, even.topk(1, -1).indices)) == pytest.approx(1.0)
    # Per sequence, then the mean: the two sequences as one batch give the mean of their losses.
    both = torch.cat([probs, even])
    assert float(balance_loss(both, both.topk(1, -1).indices)) == pytest.approx(1.25)


def _shares_after_training(coefficient: float) -> torch.Tensor:
    """Each expert's share of the tokens after training a top-1 MoE to copy its input, the tokens alike (a
    common offset) and starting on expert 0, with the balance loss weighted by coefficient."""
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_args(n_active_experts=1))
    x = torch.randn(8, 16, 32) + 0.5
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = x.mean((0, 1))  # expert 0 scores highest for every token
    optimizer = torch.optim.Adam(moe.parameters(), lr=3e-2)
    for _ in range(150):
        loss = F.mse_loss(moe(x), x)
        balance, _ = routing_stats(moe)
        optimizer.zero_grad()
        (loss + coefficient * balance).backward()
        optimizer.step()
    moe(x)
    return routing_stats(moe)[1]


def test_the_balance_loss_spreads_the_tokens():
    lopsided = _shares_after_training(0.0)
    assert float(lopsided.max()) > 0.9  # left alone, the router keeps sending the tokens to one expert
    spread = _shares_after_training(0.3)
    assert float(spread.min()) >= 0.5 / 4, spread  # no expert under half its share


@pytest.mark.parametrize("shared", [0, 1])
def test_cached_generation_equals_the_full_forward(shared):
    model = scrambled(moe_args(n_shared_experts=shared, max_seq_len=32), std=0.1)
    prompt = [[3, 9, 4, 1], [7, 2]]
    cached = model.generate(prompt, 12, eos_id=None)
    assert cached == model.generate(prompt, 12, eos_id=None, use_cache=False)
    full, _ = model(torch.tensor([prompt[0] + cached[0]]))
    assert full[0, len(prompt[0]) - 1:-1].argmax(-1).tolist() == cached[0]


def test_active_parameters_count_the_chosen_experts_only():
    dense, moe = Transformer(ModelArgs(**SMALL)), Transformer(moe_args(n_shared_experts=1))
    assert dense.num_active_params() == dense.num_params()
    idle = 2 * 2 * 3 * 32 * 24  # 2 layers x 2 unchosen experts x 3 matrices
    assert moe.num_active_params() == moe.num_params() - idle
    assert moe.num_params() == dense.num_params() + 2 * (4 * 3 * 32 * 24 + 4 * 32)  # 4 more SwiGLUs, the router


def test_the_trainer_adds_the_balance_loss_and_logs_each_experts_share():
    def train(coefficient: float) -> tuple[list, Transformer]:
        torch.manual_seed(0)
        model = Transformer(moe_args())
        trainer = Trainer(model, settings(moe_balance=coefficient), Dist())
        return [trainer.train_step([batch(i, 4), batch(i + 50, 4)], loss_fn) for i in range(3)], model
    with_balance, model = train(1.0)
    without, _ = train(0.0)
    stats = with_balance[0].metrics
    shares = [stats[f"expert_share_{i:02d}"] for i in range(4)]
    assert sum(shares) == pytest.approx(1.0) and stats["balance_loss"] >= 1.0
    assert with_balance[0].loss == without[0].loss  # the logged loss is the model's; the balance is apart
    assert with_balance[1].loss != without[1].loss  # but the balance loss changed the first step's update
    assert routing_stats(model) is None  # nothing left over for the next step
    assert metrics_line(stats).startswith(" balance_loss ") and " experts " in metrics_line(stats)


def test_activation_checkpointing_keeps_the_balance_of_the_forward_only():
    def step(checkpoint: bool):
        torch.manual_seed(0)
        trainer = Trainer(Transformer(moe_args()), settings(checkpoint_activations=checkpoint), Dist())
        return trainer.train_step([batch(0, 4)], loss_fn), trainer.train_step([batch(1, 4)], loss_fn)
    for plain, recomputed in zip(step(False), step(True)):
        assert recomputed.loss == pytest.approx(plain.loss, abs=1e-6)
        assert recomputed.metrics == pytest.approx(plain.metrics, abs=1e-6)


def test_bad_expert_counts_are_refused():
    with pytest.raises(ValueError, match="n_active_experts 3 must be between 1 and n_experts 2"):
        moe_args(n_experts=2, n_active_experts=3)


# ---------------------------------------------------------------- export: transformers and GGUF


@pytest.mark.parametrize("experts,active,shared,architecture", [(8, 2, 0, "MixtralForCausalLM"),  # tiny_moe
                                                                (4, 2, 1, "Qwen2MoeForCausalLM"),
                                                                (4, 1, 0, "Qwen2MoeForCausalLM")])
def test_transformers_gives_our_logits_and_greedy_tokens(tmp_path, experts, active, shared, architecture):
    pytest.importorskip("transformers")
    from dataclasses import asdict

    from babyllama.configurator import read_model_preset
    from export import export_hf, import_hf
    if experts == 8:
        args = read_model_preset("tiny_moe", max_seq_len=96)
    else:
        args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=96, hidden_dim=48,
                         n_experts=experts, n_active_experts=active, n_shared_experts=shared)
    model = scrambled(args, std=0.05 if experts == 8 else 0.1)
    export_hf(model, None, str(tmp_path / "hf"))
    hf = transformers_agrees(model, tmp_path / "hf", torch.randint(3, args.vocab_size, (2, 24)), 24, 48)
    assert type(hf).__name__ == architecture
    back = import_hf(str(tmp_path / "hf"))
    assert asdict(back.args) == asdict(model.args)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_gguf_holds_the_experts_stacked_as_llama_cpp_reads_them(tmp_path, small_tokenizer):
    gguf = pytest.importorskip("gguf")
    from babyllama.errors import UsageError
    from export import export_gguf
    model = scrambled(moe_args(vocab_size=600))
    export_gguf(model, small_tokenizer, str(tmp_path / "m.gguf"))
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert int(reader.fields["llama.expert_count"].parts[-1][0]) == 4
    assert int(reader.fields["llama.expert_used_count"].parts[-1][0]) == 2
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors["blk.1.ffn_down_exps.weight"].shape) == [24, 32, 4]  # innermost first: (experts, dim, hidden)
    sd = model.state_dict()
    for name, w in (("ffn_gate_exps", "w1"), ("ffn_up_exps", "w3"), ("ffn_down_exps", "w2")):
        stored = torch.from_numpy(tensors[f"blk.0.{name}.weight"].data.copy())
        assert torch.equal(stored, torch.stack([sd[f"layers.0.feed_forward.experts.{e}.{w}.weight"] for e in range(4)]))
    router = torch.from_numpy(tensors["blk.0.ffn_gate_inp.weight"].data.copy())
    assert torch.equal(router, sd["layers.0.feed_forward.router.weight"])
    assert "blk.0.ffn_gate.weight" not in tensors
    with pytest.raises(UsageError, match="no GGUF equal"):
        export_gguf(scrambled(moe_args(vocab_size=600, n_shared_experts=1)), small_tokenizer, str(tmp_path / "s.gguf"))


# ---------------------------------------------------------------- LoRA, int8, the serving engine


def test_lora_adapts_and_merges_the_experts():
    import copy

    from babyllama.lora import apply_lora, merge_lora
    model = scrambled(moe_args(n_shared_experts=1))
    adapted = copy.deepcopy(model).train()
    wrapped = apply_lora(adapted, rank=4, alpha=8, targets=["wq", "w1", "w2", "w3"])
    assert wrapped == 2 * (1 + 3 * (4 + 1))  # per layer: wq, and w1, w2, w3 of 4 experts and the shared one
    x = torch.randint(0, 50, (2, 12))
    loss = adapted(x, x)[1] + routing_stats(adapted)[0]
    loss.backward()
    trained = [n for n, p in adapted.named_parameters() if p.grad is not None]
    assert trained and all(".lora_" in n for n in trained)  # the router and the experts' weights stay frozen
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)
        adapted.eval()
        before = adapted(x)[0]
        assert torch.allclose(merge_lora(adapted)(x)[0], before, atol=1e-5)
        assert not torch.allclose(before, model(x)[0], atol=1e-3)


def test_int8_and_the_engine_serve_an_moe():
    import copy
    import queue

    from babyllama.engine import Engine, Request, Sampling
    from babyllama.quantize import quantize_int8
    from model import Router
    model = scrambled(moe_args(dim=64, hidden_dim=64, vocab_size=300, max_seq_len=64), std=0.1)
    int8 = copy.deepcopy(model)
    assert quantize_int8(int8) == []
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.modules())
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(int8.modules(), model.modules())
               if isinstance(a, Router))  # the router stays float: its choices would flip
    tokens = torch.randint(3, 300, (2, 40))
    with torch.no_grad():
        ref, got = model(tokens)[0], int8(tokens)[0]
    assert (got - ref).norm() / ref.norm() < 0.1

    class Tok:
        eos_id = 2

        def decode(self, ids):
            return "".join(chr(0x4E00 + i) for i in ids)
    engine = Engine(model, Tok(), max_batch=4)
    prompts = [[5 + i, 9, 40 + 3 * i][:1 + i % 3] for i in range(6)]  # six requests of three lengths, four rows
    finished = queue.Queue()
    requests = [Request(ids, Sampling(max_tokens=8 + i), lambda e: e.finish and finished.put(e))
                for i, ids in enumerate(prompts)]
    for request in requests:
        engine.submit(request)
    for _ in requests:
        finished.get(timeout=60)
    for i, (request, ids) in enumerate(zip(requests, prompts)):
        assert request.out == model.generate([ids], 8 + i, eos_id=None)[0]


# ---------------------------------------------------------------- resume, and every stage on an MoE


def test_a_resumed_trainer_continues_exactly():
    def trainer(seed: int) -> Trainer:
        torch.manual_seed(seed)
        return Trainer(Transformer(moe_args()), settings(max_steps=6), Dist())
    straight = trainer(0)
    expected = [straight.train_step([batch(i, 4)], loss_fn) for i in range(6)]
    first = trainer(0)
    for i in range(3):
        first.train_step([batch(i, 4)], loss_fn)
    resumed = trainer(1)  # other weights, overwritten by the checkpoint
    resumed.load_state_dict(first.state_dict())
    for i in range(3, 6):
        stats = resumed.train_step([batch(i, 4)], loss_fn)
        assert stats.loss == expected[i].loss and stats.metrics == expected[i].metrics
    assert all(torch.equal(v, straight.model_state()[k]) for k, v in resumed.model_state().items())


def test_every_stage_trains_an_moe(corpus, small_tokenizer, pretrained, preference, tmp_path, capsys):
    from conftest import metrics, stage_flags

    import dpo
    import eval as evaluate
    import grpo
    import pretrain
    import sft
    import train_reward_model
    from babyllama.checkpoint import load_model
    preset = tmp_path / "moe.py"
    experts = "n_experts = 4\nn_active_experts = 2\nn_shared_experts = 1\n"
    preset.write_text((corpus / "preset.py").read_text() + experts)
    base = tmp_path / "pretrain"
    pretrain.main([f"--data={corpus / 'data'}", f"--tokenizer={small_tokenizer}", f"--model={preset}",
                   f"--out_dir={base}", "--dtype=float32", "--peak_tflops=1", "--batch_size=4", "--max_steps=4",
                   "--log_interval=1", "--eval_interval=2", "--eval_batches=1", "--compile=true"])
    assert " experts " in capsys.readouterr().out
    logged = metrics(base)
    assert all(sum(m[f"expert_share_{i:02d}"] for i in range(4)) == pytest.approx(1.0) for m in logged)
    assert all(m["balance_loss"] >= 1.0 for m in logged)
    model, _ = load_model(str(base / "ckpt.pt"))
    assert model.args.n_experts == 4 and model.args.n_shared_experts == 1
    ckpt, (_, sft_data) = base / "ckpt.pt", pretrained
    steps = ["--max_steps=2", "--warmup_steps=1", "--eval_interval=2", "--batch_size=4"]
    sft.main([*stage_flags(ckpt, small_tokenizer, tmp_path / "sft"), f"--data={sft_data / 'train.csv'}",
              f"--val_data={sft_data / 'val.csv'}", "--lora=true", *steps])
    pairs = [f"--data={preference / 'train.csv'}", f"--val_data={preference / 'val.csv'}"]
    dpo.main([*stage_flags(ckpt, small_tokenizer, tmp_path / "dpo"), *pairs, *steps])
    train_reward_model.main([*stage_flags(ckpt, small_tokenizer, tmp_path / "rm"), *pairs, *steps])
    grpo.main([*stage_flags(ckpt, small_tokenizer, tmp_path / "grpo"), f"--prompts={preference / 'prompts.csv'}",
               "--task=all", "--group_size=4", "--prompts_per_step=2", "--max_new_tokens=4", *steps[:2]])
    for stage in ("sft", "dpo", "rm", "grpo"):
        assert "expert_share_00" in metrics(tmp_path / stage)[-1], stage
    evaluate.main([f"--ckpt={tmp_path / 'sft' / 'ckpt.pt'}", f"--tokenizer={small_tokenizer}",
                   f"--val_data={sft_data / 'val.csv'}", "--max_new_tokens=4", f"--out={tmp_path / 'eval'}",
                   "--quantize=int8"])
    assert (tmp_path / "eval" / "summary.json").exists()



@pytest.mark.parametrize("field, value", [("qkv_bias", True), ("decoder_sparse_step", 2), ("mlp_only_layers", [0]),
                                          ("norm_topk_prob", False), ("shared_expert_intermediate_size", 100)])
def test_import_refuses_a_qwen2_moe_config_ours_cannot_compute(field, value):
    """Each qwen2_moe setting our blocks have no equal for is named; the exported config itself converts."""
    pytest.importorskip("transformers")
    from export import feed_forward_from_hf, hf_config
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=300, max_seq_len=32, multiple_of=16, n_experts=4,
                     n_active_experts=2, n_shared_experts=1)
    config = hf_config(args)
    assert feed_forward_from_hf(config, "folder") == {"hidden_dim": args.hidden_dim, "n_experts": 4,
                                                      "n_active_experts": 2, "n_shared_experts": 1}
    setattr(config, field, value)
    with pytest.raises(ValueError, match=f"folder: a qwen2_moe model whose {field} has no equal here"):
        feed_forward_from_hf(config, "folder")
