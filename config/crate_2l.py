# CRATE-2l (the paper's sizes): MSSA + ISTA, trained with the paper's recipe (train.py's defaults) on the Pile.
# Ablations are overrides: --ffn=mlp, --ista_lambda=0, --attn=mha, --ista_steps=3, --overcomplete=8.
out_dir = 'out-crate-2l'
dataset = 'pile'
attn = 'mssa'
ffn = 'ista'
bias = True
n_layer = 2
n_head = 4
n_embd = 128
