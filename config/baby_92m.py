# The seed's Llama2-Chinese-92M: 58.5M unique parameters (91.7M counting the tied embedding twice).
dim = 512
n_layers = 8
n_heads = 8
max_seq_len = 512
vocab_size = 64793
multiple_of = 32
