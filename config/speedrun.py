# The speedrun's record recipe, which the demo pretrains: the base recipe (config/pretrain_tiny.py) with these on
# top, each kept by A/B runs at the same budget (BENCHMARKS.md, the speedrun's ablations). It exports as the base
# recipe's model does.
document_mask = True  # attention stays inside each document, as the held-out score reads them
muon_dtype = "auto"  # Newton-Schulz in bfloat16 where training is (float32 on CPUs without native bf16)
# Optimizer settings that learn more per step: they win where a budget buys few steps (an AVX2 CPU's float32),
# and with the embedding's rate tie or win where it buys enough to pass over the text several times.
lr = 3e-3
min_lr = 3e-4
normuon = True  # each row of Muon's step divided by its running RMS
muon_momentum_warmup = 100  # Muon's momentum from 0.85 to 0.95 over the first steps
embedding_lr_scale = 5.0  # the embedding (tied to the output; AdamW) learns at 5 times lr, the blocks at lr
