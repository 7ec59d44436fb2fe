# The CPU demo: the tiny model on the built-in corpus (data/demo) with our 8k tokenizer (dtype auto: bfloat16
# autocast where this CPU has native bf16, else float32; torch.compile). Times: BENCHMARKS.md.
model = "tiny"
data = "data/demo"
tokenizer = "data/tokenizer/tokenizer.model"
out_dir = "out/pretrain"
batch_size = 16
grad_accum = 1
max_steps = 1000
warmup_steps = 50
lr = 2e-3
min_lr = 2e-4
eval_interval = 100
eval_batches = 10
save_interval = 100
compile = True
