"""int8 weights (quantize.py): each layer's weight within half a quantization step of the float one, the
model's logits close to float32's with mostly the same next token, and the serving engine decoding it."""
import copy

import pytest
import torch

from babyllama.quantize import Int8Linear, quantize_int8
from model import ModelArgs, Transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=500, max_seq_len=64, multiple_of=32)
    m = Transformer(args).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return m


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
    int8 = quantize_int8(copy.deepcopy(model))
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
    int8 = quantize_int8(copy.deepcopy(model))

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
