"""The speedrun's held-out bits per character (heldout.py), on hand-made cases with known probabilities."""
import math

import numpy as np
import pytest
import torch

from babyllama.heldout import bits, scored_windows, split_documents
from model import IGNORE_INDEX, ModelArgs, Transformer

EOS, V = 2, 16


class NextIsPlusOne:
    """Probability 1/2 that the next token is this one + 1, the other half spread over the rest."""

    def __call__(self, x: torch.Tensor):
        p = torch.full((*x.shape, V), 0.5 / (V - 1))
        p.scatter_(-1, ((x + 1) % V)[..., None], 0.5)
        return p.log(), None


def test_known_probabilities_give_known_bits():
    # After the eos: 3 follows 2 (+1), 4 follows 3, 5 follows 4: one bit each; the closing eos after 5
    # is not 6: log2(2 (V - 1)) bits.
    total, count = bits(NextIsPlusOne(), [[3, 4, 5]], EOS, window=64)
    assert count == 4 and total == pytest.approx(3 + math.log2(2 * (V - 1)))
    # The same document cut into windows of 2 tokens scores the same targets with the same probabilities.
    assert bits(NextIsPlusOne(), [[3, 4, 5]], EOS, window=2) == pytest.approx((total, 4))
    # Documents are scored on their own: two documents are the sum of each.
    both, n = bits(NextIsPlusOne(), [[3, 4, 5], [7, 9]], EOS, window=64)
    assert n == 7 and both == pytest.approx(total + bits(NextIsPlusOne(), [[7, 9]], EOS, window=64)[0])


@pytest.mark.parametrize("window", [2, 3, 8])
def test_windows_score_every_token_once_with_half_a_context(window):
    for length in range(0, 40):
        doc = list(range(10, 10 + length))
        pieces = scored_windows(doc, EOS, window)
        seq = [EOS, *doc, EOS]
        scored = []
        for inputs, targets in pieces:
            assert 0 < len(inputs) <= window and len(targets) == len(inputs)
            start = next(i for i in range(len(seq)) if seq[i:i + len(inputs)] == inputs)
            for j, t in enumerate(targets):
                if t != IGNORE_INDEX:
                    assert t == seq[start + j + 1]
                    assert start == 0 or j >= window // 2  # at least half a context before it
                    scored.append(start + j + 1)
        assert scored == list(range(1, len(seq)))  # each token and the closing eos, once, in order


def test_windows_of_a_real_model_match_scoring_each_token_by_hand():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=16, multiple_of=16)).eval()
    doc = torch.randint(3, 64, (37,)).tolist()
    seq, window = [EOS, *doc, EOS], 16
    want = 0.0
    with torch.no_grad():
        for t in range(1, len(seq)):  # each token from the context the protocol gives it
            start = 0 if t <= window else ((t - 1 - window // 2) // (window // 2)) * (window // 2)
            logits, _ = model(torch.tensor([seq[start:t]]))
            want -= torch.log_softmax(logits[0, -1], -1)[seq[t]].item() / math.log(2)
    total, count = bits(model, [doc, doc[:5]], EOS, window, batch_size=3)
    assert count == len(doc) + 1 + 6
    alone, _ = bits(model, [doc[:5]], EOS, window)
    assert total - alone == pytest.approx(want, rel=1e-4)


def test_split_documents_at_each_eos():
    stream = np.array([5, 6, EOS, EOS, 7, EOS], dtype=np.uint16)
    assert [d.tolist() for d in split_documents(stream, EOS)] == [[5, 6], [], [7]]
