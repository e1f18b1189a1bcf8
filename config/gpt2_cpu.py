# A tiny GPT-2 that trains on a 2-core CPU in about 7 minutes (300 steps of 2,048 tokens; the 50k-token output
# layer dominates), to try the code without a GPU.
# Data: any prepared dataset, e.g. `python prepare.py --dataset=tinystories` (needs the network) or
# `python prepare.py --files='my_texts/*.txt' --name=mytext` and then --dataset=mytext.
out_dir = 'out-gpt2-cpu'
dataset = 'tinystories'
device = 'cpu'
compile = False
attn = 'mha'
ffn = 'mlp'
bias = False
n_layer = 2
n_head = 4
n_embd = 128
block_size = 128
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 300
lr_decay_iters = 300
warmup_iters = 30
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 100
eval_iters = 20
log_interval = 10
