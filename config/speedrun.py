# The speedrun's recipe (speedrun.py): chosen by A/B runs at the same budget (BENCHMARKS.md, the ablation
# table). The budget (--time_budget_min) sets the steps; max_steps only caps them.
model = "tiny_shallow"
batch_size = 16
max_steps = 100000
warmup_steps = 50
lr = 2e-3
min_lr = 2e-4
lr_schedule = "wsd"
eval_interval = 100
eval_batches = 10
save_interval = 100
compile = True
