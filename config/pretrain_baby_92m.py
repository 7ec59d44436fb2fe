# The seed's 92M model on the seed's corpora, tokenized with the ChatGLM2 tokenizer into data/seed
# (see README: data_process.py --tokenizer=chatglm_tokenizer/tokenizer.model --out_dir=data/seed ...).
# 32 x 4 x 512 = 65,536 tokens per optimizer step on one GPU; with torchrun the batch grows with the
# number of processes.
model = "baby_92m"
data = "data/seed"
tokenizer = "chatglm_tokenizer/tokenizer.model"
out_dir = "out/baby_92m"
batch_size = 32
grad_accum = 4
max_steps = 30000
warmup_steps = 1000
lr = 3e-4
min_lr = 3e-5
eval_interval = 1000
save_interval = 1000
compile = True
