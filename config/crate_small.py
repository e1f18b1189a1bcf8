# CRATE-small (the paper's sizes): MSSA + ISTA, trained with the paper's recipe (train.py's defaults) on the Pile.
# Ablations are overrides: --ffn=mlp, --ista_lambda=0, --attn=mha, --ista_steps=3, --overcomplete=8.
out_dir = 'out-crate-small'
dataset = 'pile'
attn = 'mssa'
ffn = 'ista'
bias = True
n_layer = 6
n_head = 12
n_embd = 768
