"""The Llama2 decoder shared by every stage: RMSNorm, RoPE, grouped-query attention, SwiGLU, KV-cache
generation, and the log-probabilities the training stages score answers with.

State-dict names are the seed's (and llama2.c's), so the seed's released weights load with strict=True.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # label value that the loss skips; never the pad id
ROPE_SCALINGS = ("", "linear", "ntk", "yarn")
FEED_FORWARDS = ("swiglu", "relu2")
YARN_BETA_FAST, YARN_BETA_SLOW = 32, 1  # the YaRN paper's (and transformers', llama.cpp's) defaults


def run_as_written(fn: Callable) -> Callable:
    """fn, which torch.compile runs as written (torch.compiler.disable) where a compiled model calls it. The
    decorator is applied at that call, not here: it imports torch._dynamo, which would add seconds to the
    start of every script, and most (evaluation, chat, serving, export) never compile."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)
    return call


@dataclass
class ModelArgs:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head attention)
    vocab_size: int = 64793
    hidden_dim: int | None = None  # None: the seed's rule from dim and multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    dropout: float = 0.0
    # RoPE past the trained length (docs/11_long_context.md): '' none, linear, ntk or yarn, stretching
    # rope_original_len, the length the positions were trained at, by rope_factor
    rope_scaling: str = ""
    rope_factor: float = 1.0
    rope_original_len: int = 0
    # Mixture of experts (docs/12_moe.md): each block's feed-forward becomes n_experts SwiGLUs of hidden_dim, each
    # token routed to n_active_experts of them, plus n_shared_experts that every token goes through; 0: dense
    n_experts: int = 0
    n_active_experts: int = 1
    n_shared_experts: int = 0
    # Choices the speedrun's A/B runs tried (BENCHMARKS.md, the ablation table); the defaults are the seed's model
    qk_norm: bool = False  # RMSNorm each head's query and key before RoPE (as Qwen3), with a learned gain
    tie_embeddings: bool = True  # the output layer is the embedding matrix (the seed's); False: a matrix of its own
    logit_softcap: float = 0.0  # logits become cap * tanh(logits / cap) (as Gemma 2), bounded by cap; 0: off
    value_embeddings: int = 0  # the first this many layers add a gated embedding of the token to its values
    feed_forward: str = "swiglu"  # or relu2: w2(relu(w1 x)^2), no w3, half as wide again (the same parameters)
    bigram_buckets: int = 0  # an input embedding of each (previous token, token) pair hashed into this many rows
    x0_scalars: bool = False  # each block reads a * x + b * x0 (x0: the embedded input), a and b its own, from 1 and 0

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim} must divide by n_heads {self.n_heads}, "
                             f"and n_heads by n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head size {self.dim // self.n_heads} must be even for RoPE")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling {self.rope_scaling!r} is not one of {ROPE_SCALINGS}")
        if self.rope_scaling and (self.rope_factor < 1 or self.rope_original_len < 1):
            raise ValueError(f"rope_scaling={self.rope_scaling} needs rope_factor >= 1 and the trained length "
                             f"rope_original_len (got {self.rope_factor}, {self.rope_original_len})")
        if self.n_experts and not 1 <= self.n_active_experts <= self.n_experts or min(self.n_experts,
                                                                                        self.n_shared_experts) < 0:
            raise ValueError(f"n_active_experts {self.n_active_experts} must be between 1 and n_experts "
                             f"{self.n_experts}, and n_shared_experts {self.n_shared_experts} not negative")
        if self.bigram_buckets == 1 or self.bigram_buckets < 0:
            raise ValueError(f"bigram_buckets {self.bigram_buckets} must be 0 (off) or at least 2")
        if self.feed_forward not in FEED_FORWARDS:
            raise ValueError(f"feed_forward {self.feed_forward!r} is not one of {FEED_FORWARDS}")
        if self.hidden_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
            if self.feed_forward == "relu2":  # two matrices as many weights as SwiGLU's three
                self.hidden_dim = self.multiple_of * math.ceil(1.5 * self.hidden_dim / self.multiple_of)

    @property
    def trained_len(self) -> int:
        """The length the positions were trained at (the window itself when RoPE is not scaled)."""
        return self.rope_original_len if self.rope_scaling else self.max_seq_len

    @property
    def rope_base(self) -> float:
        """RoPE's base: ntk scaling raises it so that the slowest pair turns rope_factor times slower."""
        if self.rope_scaling != "ntk":
            return self.rope_theta
        d = self.dim // self.n_heads
        return self.rope_theta * self.rope_factor ** (d / (d - 2))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: in bf16/fp16 the mean of squares loses precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def rope_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """(one rotation frequency per adjacent pair of a head, the factor on cos and sin) under args'
    scaling. linear divides every frequency by the factor; ntk raises the base so that the slowest
    pair is stretched by the factor and the fastest kept; yarn keeps the pairs that turn many times
    within the trained length, divides those that turn less than once, blends between, and sharpens
    attention by 0.1 ln(factor) + 1 (as transformers and llama.cpp compute it)."""
    d, base, factor = args.dim // args.n_heads, args.rope_base, args.rope_factor
    freqs = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    if args.rope_scaling == "linear":
        return freqs / factor, 1.0
    if args.rope_scaling != "yarn" or factor == 1:
        return freqs, 1.0

    def pair_turning(turns: float) -> float:  # the pair index whose frequency turns `turns` times
        return d * math.log(args.rope_original_len / (turns * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(pair_turning(YARN_BETA_FAST)), 0)
    high = min(math.ceil(pair_turning(YARN_BETA_SLOW)), d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    return freqs / factor * ramp + freqs * (1 - ramp), 0.1 * math.log(factor) + 1.0


def rope_tables(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim // 2), one frequency per adjacent pair."""
    freqs, scale = rope_frequencies(args)
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float64), freqs)
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of x (B, T, H, D); cos/sin are (B or 1, T, D/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def bigram_ids(previous: torch.Tensor, tokens: torch.Tensor, buckets: int) -> torch.Tensor:
    """Each (previous token, token) pair's row of the bigram embedding: a multiplicative hash into the
    first buckets - 1 rows (as modded-nanogpt's bigram embedding); the last row is for a token whose
    previous one is not known (previous = -1)."""
    pairs = torch.bitwise_xor(previous * 36313, tokens * 27191) % (buckets - 1)
    return torch.where(previous < 0, buckets - 1, pairs)


class KVCache:
    """Keys and values of every layer for a batch, preallocated to max_len slots."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype):
        shape = (batch, args.n_kv_heads, max_len, args.dim // args.n_heads)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.pos = 0  # slots filled so far
        self.last_tokens: torch.Tensor | None = None  # each row's last token (ModelArgs.bigram_buckets)

    def advance(self, T: int) -> None:
        self.pos += T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class SlotKVCache:
    """Keys and values for a changing set of sequences, each at its own length (continuous batching).
    The active sequences are rows 0..n-1; a sequence that leaves is replaced by the last row, so the
    rows in use stay one contiguous view. Each forward step adds one token to every active row."""

    def __init__(self, args: ModelArgs, slots: int, max_len: int, device, dtype):
        shape = (slots, args.n_kv_heads, max_len, args.dim // args.n_heads)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # tokens held by each row
        self.n = 0  # active rows
        self.slots, self.max_len = slots, max_len

    def add(self, prefilled: KVCache) -> int:
        """Copy a one-sequence cache (a prompt's prefill) into the next free row; returns the row."""
        row, length = self.n, prefilled.pos
        for layer in range(len(self.k)):
            self.k[layer][row, :, :length] = prefilled.k[layer][0, :, :length]
            self.v[layer][row, :, :length] = prefilled.v[layer][0, :, :length]
        self.lengths[row] = length
        self.n += 1
        return row

    def remove(self, row: int) -> None:
        """Free a row: the last active row moves into it (the caller renumbers that sequence)."""
        last = self.n - 1
        if row != last:
            length = int(self.lengths[last])
            for layer in range(len(self.k)):
                self.k[layer][row, :, :length] = self.k[layer][last, :, :length]
                self.v[layer][row, :, :length] = self.v[layer][last, :, :length]
            self.lengths[row] = self.lengths[last]
        self.n = last

    def positions(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RoPE tables (n, 1, D/2) at each row's next position, and the mask (n, 1, 1, S) of its keys."""
        lengths = self.lengths[:self.n]
        self._span = int(lengths.max()) + 1
        keys = torch.arange(self._span, device=lengths.device)
        return cos[lengths][:, None], sin[lengths][:, None], (keys[None] <= lengths[:, None])[:, None, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, at = torch.arange(self.n, device=k.device), self.lengths[:self.n]
        self.k[layer][rows, :, at] = k[:, :, 0]
        self.v[layer][rows, :, at] = v[:, :, 0]
        return self.k[layer][:self.n, :, :self._span], self.v[layer][:self.n, :, :self._span]

    def advance(self, T: int) -> None:
        self.lengths[:self.n] += T


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, args.norm_eps)
        self.qk_norm = args.qk_norm
        if layer_id < args.value_embeddings:  # (modded-nanogpt): each head's gate starts at 0, the plain values
            self.value_embedding = nn.Embedding(args.vocab_size, args.n_kv_heads * self.head_dim)
            self.value_gate = nn.Parameter(torch.zeros(args.n_kv_heads))
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, mask, cache: KVCache | SlotKVCache | None, layer: int,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "value_embedding"):
            v = v + self.value_gate[:, None].to(v.dtype) * self.value_embedding(tokens).view_as(v).to(v.dtype)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if cache is None and _matmul_attention_is_faster(q):
            out = causal_attention_by_matmul(q, k, v, dropout, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                                 dropout_p=dropout, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, T, -1)))


def _matmul_attention_is_faster(q: torch.Tensor) -> bool:
    """On CPU in bfloat16/float16, PyTorch's flash-attention kernel is slow for short sequences: up to
    512 tokens the written-out attention is faster, at 1,024 it loses; in float32 the kernel is faster
    for most shapes (bench/bench_attention.py, BENCHMARKS.md)."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and 1 < q.size(-2) <= 512


def causal_attention_by_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
                               allowed: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim), future positions masked) v for (B, heads, T, head_dim) inputs,
    written out; k and v may have fewer heads (grouped-query attention). allowed (B, 1, T, T), when given,
    is the mask instead of the causal one: True where a query may see a key."""
    if k.size(1) != q.size(1):
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    B, H, T, D = q.shape
    if allowed is None:  # scale * q k^T + mask in one baddbmm: -inf above the diagonal
        future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        scores = torch.baddbmm(future, q.reshape(B * H, T, D), k.reshape(B * H, T, D).transpose(1, 2), alpha=D ** -0.5)
    else:  # the mask broadcast over the heads, never copied per head
        scores = (q @ k.transpose(-1, -2)).mul_(D ** -0.5).masked_fill_(~allowed, float("-inf")).view(B * H, T, T)
    probs = torch.softmax(scores, dim=-1)
    if dropout:
        probs = F.dropout(probs, dropout)
    return (probs @ v.reshape(B * H, T, D)).view(B, H, T, D)


def document_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, 1, T, T): each position sees the earlier positions of its own document. An eos starts the next
    document, as the held-out score (heldout.py) and a chat read one: its first input is the eos before it."""
    document = (tokens == eos_id).cumsum(-1)
    same = document[:, :, None] == document[:, None, :]
    T = tokens.size(1)
    return (same & torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril())[:, None]


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); or with args.feed_forward="relu2", w2(relu(w1 x)^2) (modded-nanogpt)."""

    def __init__(self, args: ModelArgs, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or args.hidden_dim
        self.w1 = nn.Linear(args.dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, args.dim, bias=False)
        if args.feed_forward == "swiglu":
            self.w3 = nn.Linear(args.dim, hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "w3"):
            return self.dropout(self.w2(F.relu(self.w1(x)).square()))
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Router(nn.Module):
    """Each token's probability over the experts: a softmax of a linear map, in float32 (in bfloat16 close
    scores would tie and the choice would flip between runs). Not an nn.Linear, so that LoRA and int8
    leave it alone."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(args.n_experts, args.dim))
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float()).softmax(-1)


class MoEFeedForward(nn.Module):
    """A mixture of experts: the router sends each token to its n_active_experts most probable experts,
    whose outputs are summed weighted by those probabilities (renormalised to sum to 1 when there are
    several; with one, the raw probability, so that the router learns from the loss), plus the shared
    experts every token goes through. No token is dropped: each expert takes all the tokens sent to it.

    In training it records, for each forward, the balance loss (balance_loss) and each expert's share of
    the routed tokens, for the trainer to add and log (routing_stats)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_active = args.n_active_experts
        self.router = Router(args)
        self.experts = nn.ModuleList(FeedForward(args) for _ in range(args.n_experts))
        # Several shared experts are one SwiGLU as wide as all of them (a sum of SwiGLUs is one).
        self.shared = FeedForward(args, args.n_shared_experts * args.hidden_dim) if args.n_shared_experts else None
        self.balance_losses: list[torch.Tensor] = []
        self.expert_shares: list[torch.Tensor] = []

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probabilities (N, n_experts), chosen experts (N, k), their weights (N, k)) of tokens x (N, dim)."""
        probs = self.router(x)
        weights, chosen = probs.topk(self.n_active, dim=-1)
        if self.n_active > 1:
            weights = weights / weights.sum(-1, keepdim=True)
        return probs, chosen, weights

    @run_as_written  # the experts' row counts change every batch: compiled, each would recompile
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs, chosen, weights = self.route(flat)
        # The (token, expert) pairs sorted by expert: one gather, each expert a contiguous slice, one
        # scatter back. Every expert runs, on no rows if no token chose it, so that each has a gradient
        # on every process (DDP waits for all of them).
        order = chosen.flatten().argsort(stable=True)
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts))
        tokens = order // self.n_active
        routed = flat.index_select(0, tokens).split(counts.tolist())  # its backward: one index_add
        outputs = torch.cat([expert(rows) for expert, rows in zip(self.experts, routed)])
        outputs = outputs * weights.flatten()[order, None].to(outputs.dtype)
        out = torch.zeros_like(flat).index_add(0, tokens, outputs.to(flat.dtype))
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.training and torch.is_grad_enabled():
            self.balance_losses.append(balance_loss(probs.view(*x.shape[:-1], -1), chosen.view(*x.shape[:-1], -1)))
            self.expert_shares.append(counts.float() / chosen.numel())
        return out.view_as(x)


def balance_loss(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The mean over sequences of n_experts * sum over experts of (the expert's share of the sequence's
    (token, expert) pairs) * (its mean probability over the sequence), for probs (B, T, n_experts) and
    chosen (B, T, k): 1 when every sequence spreads evenly, n_experts when one expert takes all. Per
    sequence (as DeepSeek-V3's sequence-wise loss), so that the batch's loss is the mean of its sequences':
    split over micro-batches or processes, it stays the same."""
    n_experts = probs.shape[-1]
    picked = F.one_hot(chosen, n_experts).flatten(1, 2).float().mean(1)  # (B, n_experts): shares per sequence
    return n_experts * (picked * probs.mean(1)).sum(-1).mean()


def routing_stats(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the balance loss, each expert's share of the routed tokens), averaged over the MoE layers and the
    training forwards since the last call; None when there were none (a dense model). Clears them."""
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward) and m.balance_losses]
    if not layers:
        return None
    loss = torch.stack([x for m in layers for x in m.balance_losses]).mean()
    shares = torch.stack([x for m in layers for x in m.expert_shares]).mean(0)
    for m in layers:
        m.balance_losses, m.expert_shares = [], []
    return loss, shares


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, layer_id)
        self.feed_forward = MoEFeedForward(args) if args.n_experts else FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        if args.x0_scalars:  # (a, b) of a * x + b * x0: the plain block to start with (modded-nanogpt)
            self.x0_lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x, cos, sin, mask, cache, tokens=None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, self.layer_id, tokens)
        return h + self.feed_forward(self.ffn_norm(h))


INITS = ("seed", "gpt2", "zero")


def init_residual_projections(model: Transformer, scheme: str) -> None:
    """The starting weights of the matrices that write into the residual stream (the rest: normal, std 0.02).
    seed: GPT-2's smaller std, 0.02/sqrt(2 n_layers), given as llama2.c and the seed give it, to wo and to w3
    (the feed-forward's linear branch; its residual projection is w2); runs match the seed's.
    gpt2: that std for wo and w2, the two residual projections. zero: wo and w2 start at zero, so each block
    starts as the identity (modded-nanogpt's choice)."""
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; expected one of {', '.join(INITS)}")
    small = 0.02 / math.sqrt(2 * model.args.n_layers)
    stds = {"seed": {"wo": small, "w3": small},  # w2 left as drawn
            "gpt2": {"wo": small, "w2": small, "w3": 0.02}, "zero": {"wo": 0.0, "w2": 0.0, "w3": 0.02}}[scheme]
    for layer in model.layers:
        weights = {"wo": [layer.attention.wo.weight], "w2": [f.w2.weight for f in feed_forwards(layer)],
                   "w3": [f.w3.weight for f in feed_forwards(layer) if hasattr(f, "w3")]}
        for name, std in stds.items():
            for weight in weights[name]:
                if std:
                    nn.init.normal_(weight, mean=0.0, std=std)
                else:
                    nn.init.zeros_(weight)


def feed_forwards(layer: TransformerBlock) -> list[FeedForward]:
    """A block's SwiGLUs: its feed-forward, or its experts and shared experts."""
    return [m for m in layer.feed_forward.modules() if isinstance(m, FeedForward)]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        if args.bigram_buckets:
            self.bigram_embeddings = nn.Embedding(args.bigram_buckets, args.dim)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # as in the seed
        cos, sin = rope_tables(args)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        self.generated_vocab = args.vocab_size  # decoding picks ids below this (limit_vocab)
        self.loss_chunk = 0  # positions per chunk of the loss (ChunkedCrossEntropy); 0: the whole logits at once
        self.checkpoint_activations = False  # recompute each block's activations in the backward (training)
        self.document_eos: int | None = None  # pretraining's --document_mask: attention stays inside each document
        self.apply(self._init_weights)
        init_residual_projections(self, "seed")
        if args.bigram_buckets:  # starts as the plain model
            nn.init.zeros_(self.bigram_embeddings.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, count_tied_twice: bool = False) -> int:
        """Unique parameters; with count_tied_twice a shared embedding/output matrix counts twice,
        which is how the seed's model names (92M, 218M) count."""
        n = sum(p.numel() for p in self.parameters())
        return n + self.output.weight.numel() if count_tied_twice and self.args.tie_embeddings else n

    def num_active_params(self) -> int:
        """Parameters a token goes through: of an MoE's experts, only the n_active_experts it is sent to."""
        a = self.args
        idle = a.n_layers * (a.n_experts - a.n_active_experts) * 3 * a.dim * a.hidden_dim if a.n_experts else 0
        return self.num_params() - idle

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L T d, N the active
        parameters (an MoE's idle experts do no work for the token)."""
        # Every parameter is a matmul weight once, but a table a token id indexes is a lookup (free) unless it is
        # the output matrix too (tied).
        lookups = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding)
                      and not (m is self.tok_embeddings and self.args.tie_embeddings))
        return 6 * (self.num_active_params() - lookups) + 12 * self.args.n_layers * seq_len * self.args.dim

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | SlotKVCache | None = None, pad_left: torch.Tensor | None = None,
                last_only: bool = False, per_token: bool = False,
                loss_head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, V), or (B, 1, V) with last_only, and the mean cross-entropy over the targets
        that are not IGNORE_INDEX (None without targets), or with per_token each position's (B, T), 0
        where ignored; beside a loss the logits come detached. With loss_chunk set and targets given the
        logits are never made whole (ChunkedCrossEntropy) and None is returned for them. loss_head(hidden
        states, output weight), when given, is the loss instead (distillation), with no logits returned:
        inside forward, so that DDP and FSDP see it.

        pad_left (B,) gives how many left-padding tokens each row of a generation batch starts with;
        cache, when given, holds the keys and values of the tokens before these ones."""
        h = self.hidden(tokens, cache=cache, pad_left=pad_left)
        if self.args.logit_softcap and (loss_head is not None or targets is not None and self.loss_chunk):
            raise ValueError("logit_softcap is computed on whole logits only: not with distillation or loss_chunk")
        if loss_head is not None:
            return None, loss_head(h, self.output.weight)
        if targets is not None and self.loss_chunk:
            return None, chunked_cross_entropy(h, self.output.weight, targets, self.loss_chunk, per_token)
        logits = self.softcap(self.output(h[:, -1:] if last_only else h))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="none" if per_token else "mean")
            loss = loss.view(targets.shape) if per_token else loss
            # The loss is what trains: logits that kept their graph would cost a compiled backward a zero-filled
            # gradient the size of all the logits, for an output nothing differentiates.
            logits = logits.detach()
        return logits, loss

    def hidden(self, tokens: torch.Tensor, cache: KVCache | SlotKVCache | None = None,
               pad_left: torch.Tensor | None = None, between_layers: Callable[[], None] | None = None) -> torch.Tensor:
        """The final normalised hidden states (B, T, dim), before the output projection. between_layers is
        called after each layer (the serving engine prefills new requests there rather than after a step)."""
        B, T = tokens.shape
        if isinstance(cache, SlotKVCache) and self.args.bigram_buckets:
            raise ValueError("bigram_buckets: the serving engine's cache does not keep each row's last token")
        if isinstance(cache, SlotKVCache):  # one new token for each active row, at its own position
            cos, sin, mask = cache.positions(self.freqs_cos, self.freqs_sin)
        else:
            start = cache.pos if cache is not None else 0
            if start + T > self.args.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.args.max_seq_len}")
            cos, sin, mask = self._positions(B, T, start, pad_left, tokens.device)
            if self.document_eos is not None and cache is None and pad_left is None:
                mask = document_mask(tokens, self.document_eos)
        h = self.tok_embeddings(tokens)
        if self.args.bigram_buckets:
            previous = self._previous_tokens(tokens, cache, pad_left)
            h = h + self.bigram_embeddings(bigram_ids(previous, tokens, self.args.bigram_buckets))
        h = x0 = self.dropout(h)
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if self.args.x0_scalars:  # every block sees the embedded input again, as much as it learned to
                h = layer.x0_lambdas[0] * h + layer.x0_lambdas[1] * x0
            if recompute:  # keep only each block's input; its activations are recomputed in the backward
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, cache, tokens, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache, tokens)
            if between_layers is not None:
                between_layers()
        if cache is not None:
            cache.advance(T)
        return self.norm(h)

    def _previous_tokens(self, tokens: torch.Tensor, cache: KVCache | None,
                         pad_left: torch.Tensor | None) -> torch.Tensor:
        """The token before each one, -1 where it is not known: a window's first token, a prompt's first
        after its padding. A cache keeps each row's last token for the next call."""
        first = cache.last_tokens if cache is not None else None
        if first is None:
            first = tokens.new_full(tokens.shape[:1], -1)
        previous = torch.cat([first[:, None], tokens[:, :-1]], dim=1)
        if pad_left is not None:
            start = cache.pos if cache is not None else 0
            slots = torch.arange(start, start + tokens.shape[1], device=tokens.device)
            previous = previous.masked_fill(slots[None] <= pad_left[:, None], -1)
        if cache is not None:
            cache.last_tokens = tokens[:, -1]
        return previous

    def _positions(self, B: int, T: int, start: int, pad_left, device):
        """RoPE tables for these positions and the attention mask (None means plain causal or none)."""
        slots = torch.arange(start, start + T, device=device)
        if pad_left is None or not bool(pad_left.any()):
            cos, sin = self.freqs_cos[slots][None], self.freqs_sin[slots][None]
            mask = None
            if T > 1 and start > 0:  # a chunk after cached tokens: causal against its own slots only
                mask = torch.arange(start + T, device=device)[None] <= slots[:, None]
            return cos, sin, mask
        pos = (slots[None] - pad_left[:, None]).clamp(min=0)  # (B, T) position of each token in its row
        keys = torch.arange(start + T, device=device)
        causal = keys[None, :] <= slots[:, None]  # (T, S)
        real = keys[None, :] >= pad_left[:, None]  # (B, S)
        # A padding query attends to itself only, so no row of the mask is empty (that gives NaN).
        mask = (causal[None] & real[:, None]) | (keys[None, None, :] == slots[None, :, None])
        return self.freqs_cos[pos], self.freqs_sin[pos], mask[:, None]

    @torch.inference_mode()
    def generate_stream(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
                        top_k: int | None = None, top_p: float | None = None,
                        repetition_penalty: float = 1.0, eos_id: int | None = 2, use_cache: bool = True,
                        generator: torch.Generator | None = None) -> Iterator[list[int | None]]:
        """Yield, after every step, the new token of each prompt (None once that prompt has stopped).

        Prompts of different lengths are left-padded into one batch. use_cache=False recomputes the
        whole sequence for every token, as the seed did; it exists to check and to measure the cache."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        device = self.freqs_cos.device
        longest = max(len(p) for p in prompts)
        max_new_tokens = min(max_new_tokens, self.args.max_seq_len - longest)
        if max_new_tokens <= 0:
            raise ValueError(f"prompt of {longest} tokens leaves no room in max_seq_len {self.args.max_seq_len}")
        B = len(prompts)
        pad = torch.tensor([longest - len(p) for p in prompts], device=device)
        seq = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        cache = None
        if use_cache:
            dtype = self.tok_embeddings.weight.dtype
            cache = KVCache(self.args, B, longest + max_new_tokens, device, dtype)
        step_input = seq
        for _ in range(max_new_tokens):
            if not use_cache:
                step_input = seq
            logits = self.next_token_logits(self.hidden(step_input, cache=cache, pad_left=pad)[:, -1])
            if repetition_penalty != 1.0:
                logits = _penalize_repeats(logits, seq, pad, repetition_penalty)
            nxt = sample(logits, temperature, top_k, top_p, generator)
            yield [None if d else int(t) for t, d in zip(nxt.tolist(), done.tolist())]
            if eos_id is not None:
                done |= nxt == eos_id
            if bool(done.all()):
                return
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            step_input = nxt[:, None]

    def read_as(self, args: ModelArgs) -> None:
        """Read with args' window and RoPE scaling; the weights stay (their shapes must be args')."""
        self.args = args
        cos, sin = rope_tables(args)
        self.freqs_cos, self.freqs_sin = cos.to(self.freqs_cos.device), sin.to(self.freqs_sin.device)

    def limit_vocab(self, n: int) -> None:
        """Decode only ids below n: those of the tokenizer, when the model's vocabulary is larger (padded
        for speed, or a preset's size with a smaller tokenizer); the tokenizer cannot decode the rest."""
        self.generated_vocab = min(n, self.args.vocab_size)
        self._output_t_key = None

    def next_token_logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits (B, generated_vocab) of last hidden states h (B, dim), for decoding."""
        if isinstance(self.output, nn.Linear):
            return self.softcap((h @ self._output_transposed()).float())
        return self.softcap(self.output.logits(h)[:, :self.generated_vocab])  # a quantized output layer (quantize.py)

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """logits squashed into (-cap, cap) by cap * tanh(logits / cap) when args.logit_softcap is set."""
        cap = self.args.logit_softcap
        return cap * torch.tanh(logits.float() / cap) if cap else logits

    def train(self, mode: bool = True) -> Transformer:
        # Fused optimizers update weights in place without bumping their version counter, so the cached
        # transposed output matrix is dropped whenever the mode changes (a training loop that samples,
        # as GRPO does, switches to eval mode for every rollout).
        self._output_t_key = None
        return super().train(mode)

    def _output_transposed(self) -> torch.Tensor:
        """The output matrix stored as (dim, vocab): a one-row matmul reads it faster than the (vocab,
        dim) layout on a CPU (BENCHMARKS.md), and at batch 1 decoding is bound by reading weights. Only the
        rows of generated_vocab; cached until the weights change or the mode does (train)."""
        w = self.output.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if getattr(self, "_output_t_key", None) != key:
            self._output_t, self._output_t_key = w.detach()[:self.generated_vocab].t().contiguous(), key
        return self._output_t

    def generate(self, prompts: list[list[int]], max_new_tokens: int,
                 on_token: Callable[[list[int | None]], None] | None = None, **kwargs) -> list[list[int]]:
        """The new tokens of each prompt, up to and excluding its eos; on_token sees every step."""
        eos_id = kwargs.get("eos_id", 2)
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.generate_stream(prompts, max_new_tokens, **kwargs):
            if on_token is not None:
                on_token(step)
            for row, tok in zip(out, step):
                if tok is not None and tok != eos_id:
                    row.append(tok)
        return out


def _penalize_repeats(logits: torch.Tensor, seq: torch.Tensor, pad: torch.Tensor, penalty: float):
    """CTRL's repetition penalty on every token already in the row (prompt and generated)."""
    real = torch.arange(seq.shape[1], device=seq.device)[None] >= pad[:, None]
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen.scatter_(1, seq, real)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits (B, V); temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        logits = keep_top_p(logits, torch.tensor([[top_p]], device=logits.device))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def keep_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits (B, V) with -inf outside each row's smallest set of most likely tokens whose probability
    reaches top_p (B, 1) (nucleus sampling). The most likely token is always kept, so top_p 0 leaves only
    it (greedy, as OpenAI's API means 0) and no row is ever empty; rows with top_p 1 keep every token."""
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(-1)
    drop = (probs.cumsum(-1) - probs >= top_p) & (top_p < 1)
    drop[:, 0] = False
    return logits.scatter(1, order, ordered.masked_fill(drop, float("-inf")))


# ---------------------------------------------------------------- the loss without the whole logits


class ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of the output projection h @ weight^T against targets, `chunk` positions at a time:
    the (positions, vocab) logits never exist whole, in the forward or the backward. Per position
    (per_token) or their mean over the targets that are not IGNORE_INDEX. The mean's gradients are
    computed in the forward, chunk by chunk, while each chunk's logits are at hand (the backward only
    scales them); the per-position losses' gradients depend on what follows, so their backward
    recomputes each chunk's logits. Matmuls in the autocast dtype when autocast is on, the softmax in
    float32, as the plain path does."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                per_token: bool, want_grads: bool) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        w, valid = weight.to(dtype), targets != IGNORE_INDEX
        ctx.chunk, ctx.per_token, ctx.dtype = chunk, per_token, dtype
        if per_token:
            losses = torch.cat([_chunk_loss(h[s:s + chunk].to(dtype), w, targets[s:s + chunk])[0]
                                for s in range(0, len(h), chunk)])
            ctx.save_for_backward(h, weight, targets)
            return losses
        scale = valid.float() / valid.sum().clamp(min=1)  # each target's share of the mean
        total, grad_h = h.new_zeros((), dtype=torch.float32), torch.empty_like(h) if want_grads else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_grads else None
        for s in range(0, len(h), chunk):
            h_c = h[s:s + chunk].to(dtype)
            losses, probs = _chunk_loss(h_c, w, targets[s:s + chunk])
            total += (losses * scale[s:s + chunk]).sum()
            if want_grads:
                _chunk_grads(probs, h_c, w, targets[s:s + chunk], scale[s:s + chunk], grad_h[s:s + chunk], grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.per_token:
            grad_h, grad_w = ctx.saved_tensors
            return grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(grad_w.dtype), None, None, None, None
        h, weight, targets = ctx.saved_tensors
        chunk, w = ctx.chunk, weight.to(ctx.dtype)
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight, dtype=torch.float32)
        scale = grad_out.float() * (targets != IGNORE_INDEX)
        for s in range(0, len(h), chunk):
            h_c = h[s:s + chunk].to(ctx.dtype)
            _, probs = _chunk_loss(h_c, w, targets[s:s + chunk])
            _chunk_grads(probs, h_c, w, targets[s:s + chunk], scale[s:s + chunk], grad_h[s:s + chunk], grad_w)
        return grad_h, grad_w.to(weight.dtype), None, None, None, None


def _chunk_loss(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each position of a chunk (0 where the target is ignored) and the float32 softmax."""
    logits = (h @ w.t()).float()
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    probs = logits.sub_(lse[:, None]).exp_()  # in place: the chunk's logits are not needed again
    return torch.where(targets != IGNORE_INDEX, lse - picked, 0.0), probs


def _chunk_grads(probs: torch.Tensor, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                 scale: torch.Tensor, grad_h: torch.Tensor, grad_w: torch.Tensor) -> None:
    """Write the chunk's gradient with respect to h into grad_h and add the weight's into grad_w (float32),
    for losses weighted by scale: d loss / d logits = (softmax - one-hot) * scale."""
    probs.scatter_add_(1, targets.clamp(min=0)[:, None], -torch.ones_like(probs[:, :1]))
    grad_logits = probs.mul_(scale[:, None]).to(h.dtype)
    grad_h.copy_(grad_logits @ w)
    grad_w.add_(grad_logits.t() @ h)


@run_as_written  # compiled, its gradients came out wrong on CUDA (torch 2.11)
def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                          per_token: bool = False) -> torch.Tensor:
    """The mean cross-entropy (or each position's, per_token) of h (B, T, dim) projected by weight (V, dim)
    against targets (B, T), chunk positions at a time (ChunkedCrossEntropy). Under torch.compile the
    blocks are compiled and this runs eagerly: its work is large matmuls either way."""
    # Whether gradients are wanted is decided here: inside the Function's forward the grad mode is off.
    want_grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    losses = ChunkedCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), chunk, per_token,
                                       want_grads)
    return losses.view(targets.shape) if per_token else losses


# ---------------------------------------------------------------- log-probabilities of labelled tokens


def token_logprobs(model: Transformer, inputs: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability (B, T) of each labelled token (0 where labels are IGNORE_INDEX), and the mask."""
    _, losses = model(inputs, labels, per_token=True)
    return -losses, labels != IGNORE_INDEX


def answer_logprobs(model: Transformer, inputs: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probabilities of the labelled tokens of each row, and how many there are: the
    sequence log-probability of an answer, for multiple choice and DPO."""
    picked, mask = token_logprobs(model, inputs, labels)
    return picked.sum(-1), mask.sum(-1)
