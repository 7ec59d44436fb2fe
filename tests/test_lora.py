from dataclasses import asdict

import pytest
import torch

from babyllama.checkpoint import load_model
from babyllama.distributed import Dist
from babyllama.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora
from babyllama.trainer import TrainConfig, Trainer
from model import ModelArgs, Transformer

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=60, max_seq_len=16, multiple_of=16)
LORA = {"rank": 4, "alpha": 8.0, "targets": ["wq", "wv", "w1", "w2"]}


def lora_model():
    torch.manual_seed(0)
    model = Transformer(ARGS)
    apply_lora(model, **LORA)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.1)  # as after training: B is no longer zero
    return model


def test_merged_weights_give_the_same_logits():
    model = lora_model().eval()
    tokens = torch.randint(0, 60, (2, 12))
    with_adapters = model(tokens)[0]
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(Transformer(ARGS).state_dict())  # the seed's names again
    assert torch.allclose(merged(tokens)[0], with_adapters, atol=1e-5)


def test_only_adapters_train():
    model = lora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, TrainConfig(lr=1e-2, min_lr=1e-4, warmup_steps=1, max_steps=1000,
                                                weight_decay=0.1, dtype="float32"), Dist())
    x = torch.randint(0, 60, (4, 16))
    for _ in range(3):
        trainer.train_step([(x, torch.roll(x, -1, 1))], lambda m, b: m(b[0], b[1])[1])
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]) != (".lora_" in k), k
    assert set(lora_state_dict(model)) == {k for k in after if ".lora_" in k}


def test_lora_checkpoint_loads_merged(tmp_path):
    model = lora_model().eval()
    tokens = torch.randint(0, 60, (1, 10))
    expected = model(tokens)[0]
    torch.save({"model": model.state_dict(), "model_args": asdict(ARGS), "lora": LORA}, tmp_path / "ckpt.pt")
    loaded, _ = load_model(str(tmp_path / "ckpt.pt"))
    assert not any(isinstance(m, LoRALinear) for m in loaded.modules())
    assert torch.allclose(loaded(tokens)[0], expected, atol=1e-5)


def test_unknown_target_is_an_error():
    with pytest.raises(ValueError, match="no linear layer"):
        apply_lora(Transformer(ARGS), 4, 8.0, ["q_proj"])
