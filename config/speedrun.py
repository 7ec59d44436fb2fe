# The speedrun's recipe (speedrun.py): the tiny model pretrained within a time budget on People's Daily.
model = "tiny"
batch_size = 16
max_steps = 1000
warmup_steps = 50
lr = 2e-3
min_lr = 2e-4
eval_interval = 100
eval_batches = 10
save_interval = 100
compile = True
