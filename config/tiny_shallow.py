# The demo's and the speedrun's model (config/pretrain_tiny.py, BENCHMARKS.md): tiny's vocabulary in 3 layers
# of 256 instead of 6 of 288.
# On a 10-minute CPU budget fewer, narrower layers take more steps and learn more (the ablation table).
dim = 256
n_layers = 3
n_heads = 4
n_kv_heads = 4
max_seq_len = 256
vocab_size = 8192
multiple_of = 32
