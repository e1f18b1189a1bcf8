# GPT-2-1l (the paper's baseline at the same size): MHA + ReLU MLP, no biases, same recipe and data as CRATE-1l.
out_dir = 'out-gpt2-1l'
dataset = 'pile'
attn = 'mha'
ffn = 'mlp'
bias = False
activation = 'relu'
n_layer = 1
n_head = 4
n_embd = 128
