# The base recipe of the CPU demo's pretraining and the speedrun: tiny_shallow (3 layers of 256, our 8k tokenizer),
# Muon for the blocks' matrices, a warmup-stable-decay schedule; each chosen by A/B runs at the same time budget
# (BENCHMARKS.md, the ablation table). The demo and the speedrun add config/speedrun.py on top (the record recipe).
# dtype auto: bfloat16 autocast where this CPU has native bf16, else float32; torch.compile.
# With --time_budget_min the schedule is fitted to the budget and max_steps only caps it.
model = "tiny_shallow"
data = "data/demo"
tokenizer = "data/tokenizer/tokenizer.model"
out_dir = "out/pretrain"
batch_size = 16
grad_accum = 1
max_steps = 2000
warmup_steps = 50
lr = 2e-3
min_lr = 2e-4
lr_schedule = "wsd"
optimizer = "muon"
eval_interval = 100
eval_batches = 10
save_interval = 100
compile = True
