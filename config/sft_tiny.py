# SFT of the CPU demo's tiny model on the built-in tasks (sft_data_process.py): idiom meanings, character
# definitions and alpaca_zh_demo.
init_from = "out/pretrain/ckpt.pt"
data = "sft_data/sft_data.csv"
val_data = "sft_data/sft_val.csv"
tokenizer = "data/tokenizer/tokenizer.model"
out_dir = "out/sft"
batch_size = 16
epochs = 2.0
lr = 1e-3
min_lr = 1e-4
warmup_steps = 30
eval_interval = 200
save_interval = 200
compile = False
