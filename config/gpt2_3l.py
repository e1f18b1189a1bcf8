# GPT-2-3l (the paper's baseline at the same size): MHA + ReLU MLP, no biases, same recipe and data as CRATE-3l.
out_dir = 'out-gpt2-3l'
dataset = 'pile'
attn = 'mha'
ffn = 'mlp'
bias = False
activation = 'relu'
n_layer = 3
n_head = 4
n_embd = 128
