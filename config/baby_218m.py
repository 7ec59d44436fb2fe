# The seed's Llama2-Chinese-218M: 218.2M unique parameters.
dim = 1024
n_layers = 12
n_heads = 8
max_seq_len = 1024
vocab_size = 64793
multiple_of = 32
