# The seed's 92M shape with a mixture of experts (docs/12_moe.md): 8 experts of half baby_92m's feed-forward
# width, 2 of them per token, so that a token goes through as many parameters as in baby_92m.
dim = 512
n_layers = 8
n_heads = 8
max_seq_len = 512
vocab_size = 64793
hidden_dim = 688
n_experts = 8
n_active_experts = 2
