# GPT-2-small (the paper's baseline at the same size): MHA + ReLU MLP, no biases, same recipe and data as CRATE-small.
out_dir = 'out-gpt2-small'
dataset = 'pile'
attn = 'mha'
ffn = 'mlp'
bias = False
activation = 'relu'
n_layer = 6
n_head = 12
n_embd = 768
