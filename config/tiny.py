# A small CPU model for our own 8k-vocab tokenizer: 8.3M unique parameters (2.4M of them the embedding), 6 layers
# of 288. pretrain.py's default preset; the demo trains tiny_shallow (config/pretrain_tiny.py).
dim = 288
n_layers = 6
n_heads = 6
n_kv_heads = 6
max_seq_len = 256
vocab_size = 8192
multiple_of = 32
