"""int8 weights (quantize.py): each layer's weight within half a quantization step of the float one, the
model's logits close to float32's with mostly the same next token, decoding logits in float32 precision
where it matters, layers the kernel cannot handle left float, and the serving engine decoding it."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import scrambled

from babyllama.quantize import Int8Linear, quantize_int8
from model import ModelArgs, Transformer


def quantized(model: Transformer) -> Transformer:
    int8 = copy.deepcopy(model)
    assert quantize_int8(int8) == []
    return int8


@pytest.fixture(scope="module")
def model() -> Transformer:
    return scrambled(ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=500, max_seq_len=64, multiple_of=32), 0.1)


def test_int8_linear_is_within_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(96, 64)
    layer = Int8Linear(w)
    step = w.abs().amax(1, keepdim=True) / 127 * (1 + 2**-7)  # the scale, rounded up to bfloat16
    assert ((layer.dequantized() - w).abs() <= step / 2).all()
    assert layer.weight_int8.dtype == torch.int8 and layer.weight_int8.abs().max() <= 127
    x = torch.randn(5, 3, 64)
    y, want = layer(x), x @ w.t()
    assert y.shape == want.shape and y.dtype == x.dtype
    assert (y - want).norm() / want.norm() < 0.03


def test_quantized_model_decodes_like_the_float_one(model):
    int8 = quantized(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.modules())
    assert torch.equal(int8.tok_embeddings.weight, model.tok_embeddings.weight)  # the lookup stays float
    tokens = torch.randint(3, 500, (2, 40))
    with torch.no_grad():
        ref, got = model(tokens)[0], int8(tokens)[0]
    assert (got - ref).norm() / ref.norm() < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9  # the same next token, mostly


def test_the_engine_serves_a_quantized_model(model):
    import queue

    from babyllama.engine import Engine, Request, Sampling
    int8 = quantized(model)

    class Tok:
        eos_id = 2

        def decode(self, ids):
            return "".join(chr(0x4E00 + i) for i in ids)
    engine = Engine(int8, Tok(), max_batch=2)
    events = queue.Queue()
    request = Request([5, 6, 7], Sampling(max_tokens=12), events.put)
    engine.submit(request)
    while not events.get(timeout=30).finish:
        pass
    assert request.out == int8.generate([[5, 6, 7]], 12, eos_id=None)[0]


def test_decoding_logits_are_float32_where_the_choice_is_made(model):
    """The kernel rounds its results to bfloat16, where the top two often tie exactly; the ids near the top
    are recomputed in float32 from the same int8 weights: no ties, and the argmax of the exact product."""
    layer = quantized(model).output
    torch.manual_seed(2)
    h = torch.randn(400, model.args.dim)
    rounded, logits = layer(h).float(), layer.logits(h)
    exact = h.bfloat16().float() @ layer.dequantized().t()  # the kernel's products, summed in float32
    assert logits.dtype == torch.float32
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] > top2[:, 1]).all()
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    rounded_top2 = rounded.topk(2, dim=-1).values
    assert (rounded_top2[:, 0] == rounded_top2[:, 1]).any(), "the check above would not have seen a tie"


def test_layers_the_kernel_cannot_handle_stay_float():
    args = ModelArgs(dim=36, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=16, hidden_dim=98)
    model = Transformer(args)
    left = quantize_int8(model)
    assert "layers.0.feed_forward.w2" in left and "output" in left  # input widths 98 and 36
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    with pytest.raises(ValueError, match="multiple of 32"):
        Int8Linear(torch.randn(8, 36))


@pytest.mark.parametrize("dim,hidden", [(36, 98), (64, 98)])
def test_odd_shapes_decode_under_int8_in_a_process_of_their_own(dim, hidden, small_tokenizer, tmp_path):
    """The kernel kills the process on some widths: a crash here fails this test, not the suite."""
    from dataclasses import asdict

    from conftest import ROOT
    args = ModelArgs(dim=dim, n_layers=1, n_heads=2, vocab_size=600, max_seq_len=32, hidden_dim=hidden)
    torch.save({"model": Transformer(args).state_dict(), "model_args": asdict(args)}, tmp_path / "ckpt.pt")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), f"--ckpt={tmp_path / 'ckpt.pt'}",
                             f"--tokenizer={small_tokenizer}", "--quantize=int8", "--max_new_tokens=8"],
                            input="你好\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.endswith("\n"), "no answer line"
    assert "leaves" in result.stderr and "multiples of 32" in result.stderr, result.stderr
