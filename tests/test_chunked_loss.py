"""The output layer's loss in chunks (model.ChunkedCrossEntropy) and activation checkpointing: the same
losses and gradients as the plain path, in float32 and under bfloat16 autocast, for the mean and for each
position, with ignored targets, for chunk sizes that do and do not divide the positions."""
import copy
import os
import sys

import pytest
import torch
from conftest import ROOT, metrics, run_ok, stage_flags

from model import IGNORE_INDEX, ModelArgs, Transformer, chunked_cross_entropy, token_logprobs


def model_and_batch(seed: int = 0) -> tuple[Transformer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=97, max_seq_len=24, multiple_of=16,
                                  dropout=0.0))
    tokens = torch.randint(3, 97, (3, 24))
    targets = torch.randint(3, 97, (3, 24))
    targets[:, :5] = IGNORE_INDEX  # a prompt's positions
    targets[1, -3:] = IGNORE_INDEX
    return model, tokens, targets


def grads(model: Transformer) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [1, 7, 24, 72, 500])
def test_chunked_mean_loss_and_gradients_equal_the_plain_ones(chunk):
    plain, tokens, targets = model_and_batch()
    chunked = copy.deepcopy(plain)
    chunked.loss_chunk = chunk
    logits, want = plain(tokens, targets)
    none, got = chunked(tokens, targets)
    assert none is None and logits.shape == (3, 24, 97)
    want.backward()
    got.backward()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    for name, g in grads(plain).items():
        assert torch.allclose(grads(chunked)[name], g, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("chunk", [5, 72])
def test_chunked_log_probabilities_and_their_gradients_equal_the_plain_ones(chunk):
    """What DPO and GRPO use: each labelled token's log-probability, weighted by what follows."""
    plain, tokens, targets = model_and_batch(1)
    chunked = copy.deepcopy(plain)
    chunked.loss_chunk = chunk
    weights = torch.randn(3, 24)
    (want, mask), (got, got_mask) = token_logprobs(plain, tokens, targets), token_logprobs(chunked, tokens, targets)
    assert torch.equal(mask, got_mask) and torch.allclose(got, want, atol=1e-5)
    assert (got[~mask] == 0).all()
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    for name, g in grads(plain).items():
        assert torch.allclose(grads(chunked)[name], g, rtol=1e-4, atol=1e-6), name


def test_under_bfloat16_autocast_within_its_error():
    plain, tokens, targets = model_and_batch(2)
    chunked = copy.deepcopy(plain)
    chunked.loss_chunk = 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = plain(tokens, targets)[1], chunked(tokens, targets)[1]
    want.backward()
    got.backward()
    assert abs(got.item() - want.item()) < 1e-2 * want.item()
    for name, g in grads(plain).items():
        assert (grads(chunked)[name] - g).norm() <= 0.05 * g.norm() + 1e-6, name


def test_without_gradients_the_chunked_loss_keeps_nothing():
    model, tokens, targets = model_and_batch(3)
    model.loss_chunk = 8
    with torch.no_grad():
        _, loss = model(tokens, targets)
    assert loss.grad_fn is None and torch.isfinite(loss)


def test_the_function_alone_against_cross_entropy():
    torch.manual_seed(4)
    h, w = torch.randn(50, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (50,))
    t[::3] = IGNORE_INDEX
    want = torch.nn.functional.cross_entropy(h @ w.t(), t, ignore_index=IGNORE_INDEX)
    got = chunked_cross_entropy(h[None], w, t[None], 9)
    assert torch.allclose(got, want, atol=1e-6)
    all_ignored = chunked_cross_entropy(h[None], w, torch.full((1, 50), IGNORE_INDEX), 9)
    assert float(all_ignored) == 0.0


def test_compiled_with_both_options_gives_the_plain_gradients():
    """torch.compile around the chunked loss and checkpointed blocks (on CUDA the compiled chunked loss once
    gave wrong gradients: it now runs eagerly inside the compiled model)."""
    plain, tokens, targets = model_and_batch(8)
    compiled = copy.deepcopy(plain)
    compiled.loss_chunk, compiled.checkpoint_activations = 10, True
    plain(tokens, targets)[1].backward()
    torch.compile(compiled)(tokens, targets)[1].backward()
    for name, g in grads(plain).items():
        assert torch.allclose(grads(compiled)[name], g, rtol=1e-4, atol=1e-6), name


def test_activation_checkpointing_gives_identical_gradients():
    plain, tokens, targets = model_and_batch(5)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpoint_activations = True
    plain.train()
    checkpointed.train()
    want, got = plain(tokens, targets)[1], checkpointed(tokens, targets)[1]
    want.backward()
    got.backward()
    assert torch.equal(got, want)
    for name, g in grads(plain).items():
        assert torch.allclose(grads(checkpointed)[name], g, rtol=1e-6, atol=1e-7), name


def test_activation_checkpointing_with_dropout_replays_the_same_masks():
    torch.manual_seed(6)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=97, max_seq_len=24, multiple_of=16, dropout=0.2)
    plain = Transformer(args).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpoint_activations = True
    tokens, targets = torch.randint(3, 97, (2, 24)), torch.randint(3, 97, (2, 24))
    torch.manual_seed(7)
    plain(tokens, targets)[1].backward()
    torch.manual_seed(7)
    checkpointed(tokens, targets)[1].backward()
    for name, g in grads(plain).items():
        assert torch.allclose(grads(checkpointed)[name], g, rtol=1e-5, atol=1e-7), name


# Each post-training stage, 20 float32 steps plain and with the loss in chunks (a size that divides nothing)
# and activation checkpointing: the same losses step by step.
STAGES = {
    "sft": lambda ckpt, data, pref: [f"--data={data / 'train.csv'}", "--val_data=", "--batch_size=4"],
    "dpo": lambda ckpt, data, pref: [f"--data={pref / 'train.csv'}", "--val_data=", "--batch_size=4"],
    "train_reward_model": lambda ckpt, data, pref: [f"--data={pref / 'train.csv'}", "--val_data=", "--batch_size=4"],
    "grpo": lambda ckpt, data, pref: [f"--prompts={pref / 'prompts.csv'}", "--task=all", "--group_size=4",
                                      "--prompts_per_step=2", "--max_new_tokens=4", "--kl_beta=0.1"],
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_trains_the_same_with_the_memory_options(stage, pretrained, preference, small_tokenizer, tmp_path):
    ckpt, data = pretrained
    losses = []
    for name, options in (("plain", []), ("chunked", ["--loss_chunk=13", "--checkpoint_activations=true"])):
        out = tmp_path / name
        run_ok([sys.executable, os.path.join(ROOT, f"{stage}.py"), *stage_flags(ckpt, small_tokenizer, out),
                *STAGES[stage](ckpt, data, preference), "--max_steps=20", "--eval_interval=100000", *options])
        losses.append([m["loss"] for m in metrics(out)])
    assert len(losses[0]) == 20 and losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)


def test_logits_beside_a_loss_carry_no_graph_so_a_compiled_backward_fills_no_gradient_for_them():
    """A compiled backward fills a zero gradient for every graph output that nothing differentiates: beside the
    loss the logits come detached (without targets they keep their graph), with the plain gradients."""
    plain, tokens, targets = model_and_batch(9)
    logits, loss = plain(tokens, targets)
    assert not logits.requires_grad and loss.requires_grad and plain(tokens)[0].requires_grad
    loss.backward()
    compiled = copy.deepcopy(plain)
    step = torch.compile(compiled)
    step(tokens, targets)[1].backward()  # compiles
    compiled.zero_grad(set_to_none=True)
    with torch.profiler.profile(record_shapes=True) as profile:
        step(tokens, targets)[1].backward()
    assert not [e for e in profile.events() if e.name in ("aten::fill_", "aten::zero_") and e.input_shapes
                and list(e.input_shapes[0]) == [3, 24, 97]]
    for name, g in grads(plain).items():
        assert torch.allclose(grads(compiled)[name], g, rtol=1e-4, atol=1e-6), name
