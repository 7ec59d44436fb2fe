# tiny_shallow with a mixture of experts (docs/12_moe.md): each block's feed-forward is 8 experts of half
# tiny_shallow's width, each token sent to 2 of them, so a token goes through as many parameters as in
# tiny_shallow while the model holds four times its feed-forward weights.
dim = 256
n_layers = 3
n_heads = 4
n_kv_heads = 4
max_seq_len = 256
vocab_size = 8192
hidden_dim = 352
n_experts = 8
n_active_experts = 2
