# The speedrun's record recipe, which the demo pretrains: the base recipe (config/pretrain_tiny.py) with these on
# top, each kept by A/B runs at the same budget (BENCHMARKS.md, the speedrun's ablations). It exports as the base
# recipe's model does.
document_mask = True  # attention stays inside each document, as the held-out score reads them
muon_dtype = "auto"  # Newton-Schulz in bfloat16 where training is (float32 on CPUs without native bf16)
