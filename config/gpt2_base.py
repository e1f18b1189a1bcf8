# GPT-2-base (the paper's baseline at the same size): MHA + ReLU MLP, no biases, same recipe and data as CRATE-base.
out_dir = 'out-gpt2-base'
dataset = 'pile'
attn = 'mha'
ffn = 'mlp'
bias = False
activation = 'relu'
n_layer = 12
n_head = 12
n_embd = 768
