# GPT-2-2l (the paper's baseline at the same size): MHA + ReLU MLP, no biases, same recipe and data as CRATE-2l.
out_dir = 'out-gpt2-2l'
dataset = 'pile'
attn = 'mha'
ffn = 'mlp'
bias = False
activation = 'relu'
n_layer = 2
n_head = 4
n_embd = 128
