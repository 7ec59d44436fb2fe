"""What a training run needs of the hardware: common GPUs (memory, dense bf16 peak), a model of the
memory one training process holds, part by part, for our Transformer under the trainer's AdamW, and
the bytes a training step sends between nodes.

The memory model counts what PyTorch keeps: float32 weights, gradients and AdamW's two moments; the
half-precision copies of the weights that autocast makes and the backward pass keeps; the activations
each layer saves for backward (per token, from model.py's operations); and the logits, which are
float32 for the loss; and the backward pass's own buffers by a factor measured on a CPU.
tests/test_plan.py checks the whole against the peak memory of real training steps.
"""
from __future__ import annotations

from dataclasses import dataclass

from model import ModelArgs


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense (no sparsity) tensor-core peak from the data sheet
    usd_per_hour: float  # a typical cloud price for one GPU, for the cost estimate


GPUS = {g.name: g for g in (
    GPU("H200", 141, 989, 3.5), GPU("H100", 80, 989, 2.5), GPU("H100-PCIe", 80, 756, 2.0),
    GPU("A100-80G", 80, 312, 1.6), GPU("A100-40G", 40, 312, 1.2), GPU("L40S", 48, 362, 1.0), GPU("L40", 48, 181, 0.9),
    GPU("A10G", 24, 70, 0.5), GPU("A10", 24, 125, 0.6), GPU("L4", 24, 121, 0.5), GPU("4090", 24, 165, 0.4),
    GPU("3090", 24, 71, 0.25), GPU("V100", 32, 125, 0.5), GPU("T4", 16, 65, 0.2),
)}

# Parts of the names torch.cuda.get_device_name() returns, tried in order (longer first where one
# contains another).
DEVICE_NAMES = (("H200", "H200"), ("H100 PCIe", "H100-PCIe"), ("H100", "H100"), ("H800", "H100"),
                ("A100-SXM4-80GB", "A100-80G"), ("A100 80GB", "A100-80G"), ("A100", "A100-40G"),
                ("A800", "A100-80G"), ("L40S", "L40S"), ("L40", "L40"), ("A10G", "A10G"), ("A10", "A10"),
                ("L4", "L4"), ("RTX 4090", "4090"), ("RTX 3090", "3090"), ("V100", "V100"), ("T4", "T4"))


def gpu_of_device_name(device_name: str) -> GPU | None:
    """The table's entry for a name such as 'NVIDIA H100 80GB HBM3', or None."""
    for key, name in DEVICE_NAMES:
        if key in device_name:
            return GPUS[name]
    return None


def block_params(args: ModelArgs) -> int:
    """The weight matrices of one block: attention, and the feed-forward or every expert, the shared ones
    and the router."""
    d, kv = args.dim, args.n_kv_heads * (args.dim // args.n_heads)
    feed_forwards = args.n_experts + args.n_shared_experts if args.n_experts else 1
    matrices = 2 if args.feed_forward == "relu2" else 3
    return 2 * d * d + 2 * d * kv + matrices * d * args.hidden_dim * feed_forwards + args.n_experts * d


def n_params(args: ModelArgs) -> int:
    """Unique parameters of our Transformer: the embedding (and the output matrix when not tied to it), the
    blocks, the final norm, and the speedrun's options' tables, gates and norms."""
    head, kv = args.dim // args.n_heads, args.n_kv_heads * (args.dim // args.n_heads)
    tables = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2) + args.bigram_buckets * args.dim
    options = (min(args.value_embeddings, args.n_layers) * (args.vocab_size * kv + args.n_kv_heads)
               + args.n_layers * 2 * head * args.qk_norm + args.n_layers * 2 * args.x0_scalars)
    return tables + options + args.n_layers * (block_params(args) + 2 * args.dim) + args.dim


def layer_activation_bytes_per_token(args: ModelArgs, seq_len: int, dtype_bytes: int, matmul_attention: bool) -> float:
    """Bytes one token's activations in one layer take from the forward pass until the backward pass frees
    them: the float32 residual stream and each RMSNorm's float32 normalised input (4 x dim each), the
    half-precision inputs autocast makes for the projections, q and k after RoPE, v, the attention output
    and its reshaped copy, and the feed-forward's four hidden-size tensors (w1 x, its SiLU, w3 x, their
    product), for each expert the token goes through; an MoE also keeps, per routed copy of the token, its
    gathered input and the expert's output, and the router's float32 probabilities.
    Flash attention adds its float32 log-sum-exp per head; the written-out attention (model.py's choice on
    a CPU in bf16) keeps the probabilities, seq_len per head."""
    d, h, heads = args.dim, args.hidden_dim, args.n_heads
    kv = args.n_kv_heads * (d // heads)
    per_layer = 16 * d + dtype_bytes * (5 * d + 2 * kv + 4 * h)
    if args.n_experts:
        k = args.n_active_experts
        per_layer += dtype_bytes * (4 * h * (k + args.n_shared_experts - 1) + 2 * d * k) + 8 * args.n_experts
    return per_layer + (dtype_bytes * heads * seq_len if matmul_attention else 4 * heads)


def activation_bytes_per_token(args: ModelArgs, seq_len: int, dtype_bytes: int, matmul_attention: bool,
                               checkpoint_activations: bool = False) -> float:
    """Bytes one token's activations take, every layer's and the final norm's input and output. With
    activation checkpointing each layer keeps only its float32 input, and one layer at a time has its
    activations back, and their gradients, while its backward runs."""
    layer = layer_activation_bytes_per_token(args, seq_len, dtype_bytes, matmul_attention)
    kept = args.n_layers * 4 * args.dim + 2 * layer if checkpoint_activations else args.n_layers * layer
    return kept + 8 * args.dim


def logits_bytes(args: ModelArgs, tokens: int, loss_chunk: int = 0) -> float:
    """What the loss holds at the start of the backward pass. Whole: three float32 vocabulary-sized tensors
    per token (the log-softmax it saved, the gradient of the loss and the gradient of the logits). In
    chunks (model.ChunkedCrossEntropy): two float32 chunks of logits at a time, the weight's float32
    gradient and the hidden states' gradient, computed in the forward and held until the backward."""
    if not loss_chunk:
        return 12 * args.vocab_size * tokens
    return 8 * args.vocab_size * min(loss_chunk, tokens) + 4 * args.vocab_size * args.dim + 4 * args.dim * tokens


# The backward pass allocates gradients of activations while the saved ones are still held, and the
# allocator does not reuse every freed block: peaks measured on a CPU (tests/test_plan.py) are this
# much above the saved activations and logits. An empirical factor, not derived.
BACKWARD_OVERHEAD = 0.35


@dataclass
class MemoryPlan:
    weights: float  # bytes per process: float32 weights
    half_weights: float  # autocast's half-precision copies, kept for backward
    gradients: float
    optimizer: float  # AdamW's two moments
    activations: float
    logits: float
    backward: float  # gradients of activations, allocator slack (BACKWARD_OVERHEAD)

    @property
    def total(self) -> float:
        return (self.weights + self.half_weights + self.gradients + self.optimizer + self.activations + self.logits
                + self.backward)


def training_memory(args: ModelArgs, micro_batch: int, seq_len: int, dtype: str = "bfloat16", processes: int = 1,
                    fsdp: bool = False, matmul_attention: bool = False, loss_chunk: int = 0,
                    checkpoint_activations: bool = False) -> MemoryPlan:
    """Peak memory of one training process. Under FSDP weights, gradients and optimizer states are
    split across the processes, and one block at a time is gathered whole. loss_chunk and
    checkpoint_activations are the trainer's settings of those names."""
    half = dtype in ("bfloat16", "float16")
    dtype_bytes = 2 if half else 4
    p = n_params(args)
    shard = processes if fsdp else 1
    gathered = 4 * block_params(args) if fsdp and processes > 1 else 0  # one block's full weights at a time
    tokens = micro_batch * seq_len
    activations = tokens * activation_bytes_per_token(args, seq_len, dtype_bytes, matmul_attention,
                                                      checkpoint_activations)
    logits = logits_bytes(args, tokens, loss_chunk)
    return MemoryPlan(
        weights=4 * p / shard + gathered,
        half_weights=dtype_bytes * p if half else 0.0,
        gradients=4 * p / shard + gathered,
        optimizer=8 * p / shard,
        activations=activations,
        logits=logits,
        backward=BACKWARD_OVERHEAD * (activations + logits))


def largest_micro_batch(args: ModelArgs, seq_len: int, memory_bytes: float, **kw) -> int:
    """The most sequences per micro-batch whose planned memory fits in memory_bytes (0: none fits)."""
    batch = 0
    while training_memory(args, batch + 1, seq_len, **kw).total <= memory_bytes and batch < 65536:
        batch += 1
    return batch


def gradient_traffic(params: int, nodes: int, grad_accum: int = 1, fsdp: bool = False) -> float:
    """Bytes each node sends to the others in one optimizer step: float32 tensors of `params` entries in
    ring collectives, where each pass moves (nodes - 1) / nodes of a tensor through each node's link.
    DDP all-reduces the gradients once a step (a reduce-scatter and an all-gather: two passes); FSDP2
    gathers the parameters for every micro-step's forward and again for its backward, and
    reduce-scatters the gradients once a step."""
    passes = 2 * grad_accum + 1 if fsdp else 2
    return passes * 4 * params * (nodes - 1) / nodes
