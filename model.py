"""
CRATE and GPT-2 in one file.

CRATE (Yu et al. 2023; the language-model version of Bai & Ma 2024) replaces the two halves of a
transformer block by the two steps of an unrolled optimisation of a sparse rate reduction objective:

    Z_half = Z + MSSA(LN1(Z))            multi-head subspace self-attention: compress tokens
    Z_next = ISTA(LN2(Z_half))           one overcomplete dictionary, sparse codes A: sparsify

GPT-2 is the same skeleton with MHA and a ReLU MLP (with its residual). `ModelConfig.attn` and
`ModelConfig.ffn` pick the parts, so CRATE, GPT-2 and every ablation are one class, `Transformer`.
The neurons we interpret are CRATE's sparse codes A_t and GPT-2's post-ReLU MLP hidden values.
"""

import ast
import math
import os
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class ModelConfig:
    attn: str = 'mssa'           # 'mssa' (CRATE) or 'mha' (GPT-2)
    ffn: str = 'ista'            # 'ista' (CRATE) or 'mlp' (GPT-2)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50304      # GPT-2's 50257 padded to a multiple of 64
    dropout: float = 0.0
    bias: bool = True            # biases in Linear layers and LayerNorms (never on U or the dictionary)
    overcomplete: int = 4        # h = overcomplete * n_embd
    ista_steps: int = 2          # t
    ista_eta: float = 0.1        # step size eta
    ista_lambda: float = 0.1     # sparsity weight lambda
    activation: str = 'relu'     # MLP only: 'relu' (the paper's baseline) or 'gelu'
    ista_checkpoint: bool = False  # recompute ISTA's codes in backward: less activation memory, one more pass

    def __post_init__(self):
        checks = [
            (self.attn in ('mssa', 'mha'), f"attn must be 'mssa' or 'mha', got {self.attn!r}"),
            (self.ffn in ('ista', 'mlp'), f"ffn must be 'ista' or 'mlp', got {self.ffn!r}"),
            (self.activation in ('relu', 'gelu'), f"activation must be 'relu' or 'gelu', got {self.activation!r}"),
            (self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}"),
            (self.ista_steps >= 1, f"ista_steps must be >= 1, got {self.ista_steps}"),
            (self.overcomplete >= 1, f"overcomplete must be >= 1, got {self.overcomplete}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def hidden(self):
        return self.overcomplete * self.n_embd


def LayerNorm(cfg):
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


def causal_attention(q, k, v, n_head, dropout):
    """Per head k: softmax(q_k k_k^T / sqrt(p)) v_k with a causal mask; (B, T, C) in and out."""
    B, T, C = q.shape
    heads = lambda t: t.view(B, T, n_head, C // n_head).transpose(1, 2)    # (B, K, T, p)
    y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True, dropout_p=dropout)
    return y.transpose(1, 2).contiguous().view(B, T, C)


class MSSA(nn.Module):
    """Multi-head subspace self-attention: one projection U per head serves as query, key and value.
    u_k = U_k x;  head_k = softmax(u_k u_k^T / sqrt(p)) u_k (causal);  out = W_o [head_1 ... head_K]."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.U = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual = True
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        u = self.U(x)
        y = causal_attention(u, u, u, self.n_head, self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y))


class MHA(nn.Module):
    """GPT-2 attention: separate query, key and value projections (one d -> 3d linear)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual = True
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=2)
        y = causal_attention(q, k, v, self.n_head, self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y))


def steer_(a, steer):
    """Overwrite neuron j with value v at every position, for each (j, v) in steer; returns a new tensor.
    steer may instead be a function of the neurons that returns their replacement (e.g. an SAE's reconstruction)."""
    if callable(steer):
        return steer(a)
    if not steer:
        return a
    a = a.clone()
    for j, v in steer:
        a[..., j] = v
    return a


class ISTA(nn.Module):
    """Overcomplete sparse coding by t unrolled ISTA steps on min_A 1/2 ||x - D A||^2 + lambda ||A||_1, A >= 0:
        A_0 = 0,  A_k = ReLU(A_{k-1} + eta D^T (x - D A_{k-1}) - eta lambda),  output D A_t (no residual).
    The dictionary D (d x h) is stored as weight = D^T (h x d), Kaiming-uniform like nn.Linear's weight."""

    residual = False

    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.hidden, cfg.n_embd))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default, fan_in = d
        self.weight.keep_init = True                            # not touched by the N(0, 0.02) init
        self.steps, self.eta, self.lam = cfg.ista_steps, cfg.ista_eta, cfg.ista_lambda
        self.checkpoint = cfg.ista_checkpoint
        self.dropout = nn.Dropout(cfg.dropout)

    def codes(self, x):
        W, eta = self.weight, self.eta                               # W = D^T
        # b = eta D^T x - eta lambda: computed once (one matmul with the constant folded in as its bias)
        b = F.linear(x, eta * W, x.new_full((W.shape[0],), -eta * self.lam))
        a = F.relu(b)                                                # step 1 from A_0 = 0
        for _ in range(self.steps - 1):                              # A_k = ReLU(A_{k-1} + b - eta D^T D A_{k-1})
            Da = (a @ W).flatten(0, -2)                              # D A_{k-1}
            a = F.relu(torch.addmm((a + b).flatten(0, -2), Da, W.t(), alpha=-eta).view_as(a))
        return a

    def forward(self, x, steer=None):
        if self.checkpoint and torch.is_grad_enabled():
            a = torch.utils.checkpoint.checkpoint(self.codes, x, use_reentrant=False)
        else:
            a = self.codes(x)
        a = steer_(a, steer)
        return self.dropout(a @ self.weight), a              # D A_t, and the codes A_t


class MLP(nn.Module):
    """GPT-2 MLP, ReLU by default (the paper's baseline): W_2 relu(W_1 x); its hidden values are the neurons."""

    residual = True

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.hidden, bias=cfg.bias)
        self.act = nn.ReLU() if cfg.activation == 'relu' else nn.GELU()
        self.c_proj = nn.Linear(cfg.hidden, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, steer=None):
        a = steer_(self.act(self.c_fc(x)), steer)
        return self.dropout(self.c_proj(a)), a


def model_name(cfg):
    """CRATE, GPT-2, 'GPT-2 + SAE', or the parts of an ablation ('mssa+mlp')."""
    if hasattr(cfg, 'base_name'):
        return f"{cfg.base_name} + SAE"
    return {('mssa', 'ista'): 'CRATE', ('mha', 'mlp'): 'GPT-2'}.get((cfg.attn, cfg.ffn), f'{cfg.attn}+{cfg.ffn}')


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = LayerNorm(cfg)
        self.attn = MSSA(cfg) if cfg.attn == 'mssa' else MHA(cfg)
        self.ln_2 = LayerNorm(cfg)
        self.ffn = ISTA(cfg) if cfg.ffn == 'ista' else MLP(cfg)

    def forward(self, z, steer=None):
        z = z + self.attn(self.ln_1(z))                  # Z_half = Z + MSSA(LN1(Z))
        y, a = self.ffn(self.ln_2(z), steer)
        return (z + y if self.ffn.residual else y), a    # ISTA: Z_next = D A_t; MLP: Z_half + MLP(LN2(Z_half))


class Transformer(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if getattr(m, 'residual', False) else 0.02
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, 'bias', None) is not None:
                    nn.init.zeros_(m.bias)

    def get_num_params(self, non_embedding=True):
        """Parameters, the tied embedding counted once; position embeddings left out by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, steer=None, return_neurons=False):
        """idx (B, T) token ids. steer: {layer: [(neuron, value), ...]} overwrites those neurons at every
        position. Returns (logits, loss), plus the list of per-layer neurons (B, T, h) if return_neurons.
        Without targets only the last position's logits are computed."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size={self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        neurons = []
        for l, block in enumerate(self.blocks):
            x, a = block(x, steer.get(l) if steer else None)
            if return_neurons:
                neurons.append(a)
        x = self.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits, loss = self.lm_head(x[:, [-1], :]), None
        return (logits, loss, neurons) if return_neurons else (logits, loss)

    def flops_per_token(self, T=None):
        """Training FLOPs (forward + backward = 3 x forward) per token of matrix work, with sequence length T.
        Forward, per token and layer (2 FLOPs per multiply-add, d = n_embd, h = hidden):
            MHA  2*3d^2 (q, k, v) + 2d^2 (proj) + 4*T*d (scores and weighted sum)
            MSSA 2*d^2 (U) + 2d^2 (proj) + 4*T*d            -- half of MHA's projections
            MLP  4*d*h                                       -- two matmuls
            ISTA 4*t*d*h: D^T x, then per extra step D A and D^T(D A), then D A_t = 2t matmuls
        plus the lm_head, 2*d*V. The causal mask is not discounted (as kernels and FlopCounterMode count it)."""
        c = self.config
        d, h, T = c.n_embd, c.hidden, T or c.block_size
        attn = (8 if c.attn == 'mha' else 4) * d * d + 4 * T * d
        ffn = (4 * c.ista_steps if c.ffn == 'ista' else 4) * d * h
        return 3 * (c.n_layer * (attn + ffn) + 2 * d * c.vocab_size)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on the >= 2-D tensors (matrices, embeddings, the dictionary) only."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == 'cuda')

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, steer=None):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:], steer=steer)
            logits = logits[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float('inf')
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, nxt), dim=1)
        return idx


# ----------------------------------------------------------------------------------------------------------
# The post-hoc baseline: a sparse autoencoder on one layer's neurons of a frozen, trained model.

class SparseAutoencoder(nn.Module):
    """f = ReLU(W_enc (x - b_dec) + b_enc),  x_hat = W_dec f + b_dec,  m features for n inputs.
    loss = mean over tokens of ||x_hat - x||^2 / ||x|| + l1 * sum_i |f_i|, decoder columns kept at unit norm."""

    def __init__(self, n_in, n_features):
        super().__init__()
        W = torch.randn(n_in, n_features)
        W /= W.norm(dim=0, keepdim=True)
        self.W_dec = nn.Parameter(W)                    # (n, m), columns are the features' directions
        self.W_enc = nn.Parameter(W.T.clone())          # (m, n)
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.b_dec = nn.Parameter(torch.zeros(n_in))

    def encode(self, x):
        return F.relu(F.linear(x - self.b_dec, self.W_enc, self.b_enc))

    def decode(self, f):
        return F.linear(f, self.W_dec, self.b_dec)

    def forward(self, x):
        f = self.encode(x)
        return self.decode(f), f

    @staticmethod
    def loss(x, x_hat, f, l1):
        recon = ((x_hat - x) ** 2).sum(-1) / x.norm(dim=-1).clamp_min(1e-6)
        return (recon + l1 * f.abs().sum(-1)).mean()

    @torch.no_grad()
    def remove_parallel_grad_(self):
        """Drop the part of each decoder column's gradient along the column: a step then only turns it."""
        if self.W_dec.grad is not None:
            W, g = self.W_dec, self.W_dec.grad
            g -= (g * W).sum(0, keepdim=True) * W

    @torch.no_grad()
    def normalize_decoder_(self):
        self.W_dec /= self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12)


def loss_recovered(clean, spliced, zero):
    """The share of the loss gap between zero-ablating a layer and leaving it alone that the SAE's reconstruction
    closes: (L_zero - L_spliced) / (L_zero - L_clean)."""
    return (zero - spliced) / (zero - clean) if zero != clean else float('nan')


@dataclass
class SAEConfig:
    """What interpret.py and sample.py read of an SAE model: one 'layer' of n_features neurons."""
    base_layer: int
    n_in: int
    n_features: int
    l1: float
    block_size: int
    base_name: str
    n_layer: int = 1

    @property
    def hidden(self):
        return self.n_features


class SAEModel(nn.Module):
    """A frozen base model with an SAE on layer `layer`'s neurons. forward() has the Transformer's signature:
    with targets it returns the SAE's loss on the base's activations (that is what train.py trains), and its
    neurons are the SAE's features."""

    def __init__(self, base, layer, n_features, l1):
        super().__init__()
        for p in base.parameters():
            p.requires_grad_(False)
        self.base, self.layer = base.eval(), layer
        self.sae = SparseAutoencoder(base.config.hidden, n_features)
        self.config = SAEConfig(layer, base.config.hidden, n_features, l1, base.config.block_size, model_name(base.config))
        self.register_buffer('fired', torch.zeros(n_features, dtype=torch.bool))  # since the last resampling
        self.last_x = None

    def train(self, mode=True):
        super().train(mode)
        self.base.eval()            # the base stays in eval mode (no dropout)
        return self

    def activations(self, idx):
        with torch.no_grad():
            _, _, neurons = self.base(idx, return_neurons=True)
        return neurons[self.layer].float()

    def forward(self, idx, targets=None, steer=None, return_neurons=False):
        x = self.activations(idx)
        x_hat, f = self.sae(x)
        loss = None
        if targets is not None:
            loss = self.sae.loss(x, x_hat, f, self.config.l1)
            if self.training:
                self.fired |= (f > 0).reshape(-1, f.shape[-1]).any(0)
                self.last_x = x.detach().reshape(-1, x.shape[-1])
        f = steer_(f, steer.get(0) if steer else None)
        return (None, loss, [f]) if return_neurons else (None, loss)

    def flops_per_token(self, T=None):
        """The base's forward pass, and the SAE's two matmuls forward and backward."""
        return self.base.flops_per_token(T) // 3 + 3 * 4 * self.config.n_in * self.config.n_features

    def splice(self, steer=None):
        """The base model's steering for 'replace the layer's neurons by the SAE's reconstruction', with
        features overwritten by steer [(j, v)] first: the lossy path."""
        return {self.layer: lambda a: self.sae.decode(steer_(self.sae.encode(a.float()), steer)).to(a.dtype)}

    @torch.no_grad()
    def resample_dead_(self, optimizer):
        """Features that did not fire since the last call get new directions: the (normalised) inputs the SAE
        reconstructs worst, sampled with probability proportional to the squared loss; the encoder row is that
        direction scaled to 0.2 x the mean norm of the live rows, its bias 0, and their Adam moments reset."""
        dead = torch.nonzero(~self.fired).squeeze(1)
        self.fired.zero_()
        if len(dead) == 0 or self.last_x is None:
            return 0
        x = self.last_x
        x_hat, _ = self.sae(x)
        weight = ((x_hat - x) ** 2).sum(-1) ** 2
        if weight.sum() <= 0:
            return 0
        g = torch.Generator(device=x.device).manual_seed(len(dead))
        picks = torch.multinomial(weight, len(dead), replacement=len(dead) > len(x), generator=g)
        d = x[picks] - self.sae.b_dec
        d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        alive = self.fired.new_ones(self.fired.shape).index_fill_(0, dead, False)
        scale = 0.2 * (self.sae.W_enc[alive].norm(dim=-1).mean() if alive.any() else 1.0)
        self.sae.W_dec[:, dead] = d.T
        self.sae.W_enc[dead] = d * scale
        self.sae.b_enc[dead] = 0
        for p, index in ((self.sae.W_dec, (slice(None), dead)), (self.sae.W_enc, dead), (self.sae.b_enc, dead)):
            for moment in ('exp_avg', 'exp_avg_sq'):
                if moment in optimizer.state.get(p, {}):
                    optimizer.state[p][moment][index] = 0
        return len(dead)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: ours (train.py) and the paper's released CRATE checkpoints (nanoGPT-format dicts).

RELEASED_NAMES = {'transformer.wte.': 'wte.', 'transformer.wpe.': 'wpe.', 'transformer.ln_f.': 'ln_f.',
                  'transformer.h.': 'blocks.', '.prenorm_1.': '.ln_1.', '.prenorm_2.': '.ln_2.',
                  '.attn.c_attn.': '.attn.U.', '.ista.weight': '.ffn.weight'}


def from_released(state_dict, model_args):
    """Map a released CRATE checkpoint (keys transformer.h.{i}.prenorm_1, .attn.c_attn = U, .ista.weight = D^T,
    maybe prefixed by _orig_mod.) to our names and a ModelConfig."""
    sd = {}
    for k, v in state_dict.items():
        k = k.removeprefix('_orig_mod.')
        if k.endswith('.attn.bias') and v.dim() == 4:  # a causal-mask buffer, not a parameter
            continue
        for old, new in RELEASED_NAMES.items():
            k = k.replace(old, new)
        sd[k] = v
    known = {f.name for f in fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in model_args.items() if k in known}, attn='mssa', ffn='ista')
    return sd, cfg


def load_model(path, device='cpu'):
    """A Transformer (or SAEModel) from a checkpoint written by train.py or released by the paper's authors, in
    eval mode, with .val_loss the checkpoint's best validation loss if it has one. path: a .pt file or a directory
    holding ckpt.pt."""
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one with `python train.py config/crate_1l.py` "
                                f"or pass --ckpt=PATH")
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
    if not isinstance(ckpt, dict) or 'model' not in ckpt or 'model_args' not in ckpt:
        raise ValueError(f"{path} is not a model checkpoint (expected a dict with 'model' and 'model_args')")
    sd, args = ckpt['model'], ckpt['model_args']
    if 'sae' in ckpt:                        # an SAE: its base checkpoint, then the SAE on top
        s = ckpt['sae']
        model = SAEModel(load_model(s['base'], device), s['layer'], s['n_features'], s['l1'])
        model.sae.load_state_dict(sd)
        model.val_loss = None                # an SAE's own loss is no language-model loss
        return model.to(device).eval()
    if any(k.endswith('.ista.weight') for k in sd):
        sd, cfg = from_released(sd, args)
    else:
        cfg = ModelConfig(**args)
    model = Transformer(cfg)
    model.load_state_dict(sd)
    model.val_loss = ckpt.get('best_val_loss')
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------
# The configurator shared by train.py, sample.py and interpret.py:
#     python script.py [config/x.py ...] [--key=value ...]
# A config file is Python assignments; a --key=value is read as a Python literal (else as a string).
# Every key must already be a default of the script, with a value of the same type; list defaults collect
# repeated flags (--steer=a --steer=b). Errors are one line and exit with code 2.

def _typed(key, value, default):
    kind = type(default)
    if default is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list and isinstance(value, (str, tuple)):
        return list(value) if isinstance(value, tuple) else [value]
    raise TypeError(f"{key} must be {kind.__name__} (default {default!r}), got {value!r}")


def configure(defaults, argv):
    """defaults: {key: value}; argv: config files and --key=value. Returns the merged, type-checked dict."""
    cfg, repeated = dict(defaults), set()
    try:
        for arg in argv:
            if not arg.startswith('--'):
                if not os.path.isfile(arg):
                    raise ValueError(f"config file {arg} not found (configs are in config/, e.g. config/crate_1l.py)")
                scope = {}
                exec(open(arg).read(), scope)
                items = [(k, v) for k, v in scope.items()
                         if not k.startswith('_') and isinstance(v, (bool, int, float, str, list, tuple, type(None)))]
                source = arg
            else:
                if '=' not in arg:
                    raise ValueError(f"{arg}: write overrides as --key=value")
                k, raw = arg[2:].split('=', 1)
                try:
                    v = ast.literal_eval(raw)
                except (ValueError, SyntaxError):
                    v = raw
                if isinstance(defaults.get(k), str):
                    v = raw                # a string option takes the text as written
                if isinstance(defaults.get(k), list):
                    v = cfg[k] + [raw] if k in repeated else [raw]
                    repeated.add(k)
                items, source = [(k, v)], arg
            for k, v in items:
                if k not in defaults:
                    raise KeyError(f"unknown option {k!r} in {source}; known: {', '.join(sorted(defaults))}")
                cfg[k] = _typed(k, v, defaults[k])
    except (ValueError, KeyError, TypeError, SyntaxError) as e:
        msg = e.args[0] if isinstance(e, KeyError) else str(e)
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    return cfg


def script_defaults(scope):
    """The options of a script: its module-level names of plain types, in order (defaults at the top)."""
    return {k: v for k, v in scope.items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str, list, type(None)))}
