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

import json
import math
import os
import warnings
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
    activation: str = 'relu'     # MLP only: 'relu' (the paper's baseline), 'gelu', or 'gelu_tanh' (OpenAI's GPT-2)
    ista_checkpoint: bool = False  # recompute ISTA's codes in backward: less activation memory, one more pass

    def __post_init__(self):
        checks = [(getattr(self, k) >= 1, f"{k} must be at least 1, got {getattr(self, k)}")
                  for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size', 'ista_steps', 'overcomplete')]
        checks += [
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.ista_eta > 0 and self.ista_lambda >= 0,
             f"ista_eta must be > 0 and ista_lambda >= 0, got {self.ista_eta} and {self.ista_lambda}"),
            (self.attn in ('mssa', 'mha'), f"attn must be 'mssa' or 'mha', got {self.attn!r}"),
            (self.ffn in ('ista', 'mlp'), f"ffn must be 'ista' or 'mlp', got {self.ffn!r}"),
            (self.activation in ('relu', 'gelu', 'gelu_tanh'),
             f"activation must be 'relu', 'gelu' or 'gelu_tanh', got {self.activation!r}"),
            (self.n_embd % max(1, self.n_head) == 0, f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}"),
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
        self.c_proj.scaled_init = True
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
        self.c_proj.scaled_init = True
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=2)
        y = causal_attention(q, k, v, self.n_head, self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y))


def overwrite(pairs):
    """A steering function: neurons a with neuron j set to value v at every position, for each (j, v) in pairs."""
    def steer(a):
        a = a.clone()
        for j, v in pairs:
            a[..., j] = v
        return a
    return steer


class ISTA(nn.Module):
    """Overcomplete sparse coding by t unrolled ISTA steps on min_A 1/2 ||x - D A||^2 + lambda ||A||_1, A >= 0:
        A_0 = 0,  A_k = ReLU(A_{k-1} + eta D^T (x - D A_{k-1}) - eta lambda),  output D A_t (no residual).
    The dictionary D (d x h) is stored as weight = D^T (h x d), uniform in +-sqrt(6/d) as the authors' code
    initialises it (kaiming_uniform_ with its default a=0; nn.Linear's a=sqrt(5) would give +-1/sqrt(d))."""

    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.hidden, cfg.n_embd))
        nn.init.kaiming_uniform_(self.weight)                   # fan_in = d; not an nn.Linear, so N(0, 0.02) skips it
        self.steps, self.eta, self.lam = cfg.ista_steps, cfg.ista_eta, cfg.ista_lambda
        self.checkpoint = cfg.ista_checkpoint
        self.dropout = nn.Dropout(cfg.dropout)

    def codes(self, x):
        D, eta, lam = self.weight.t(), self.eta, self.lam            # D: (d, h); x: (..., d), the codes: (..., h)
        a = F.relu(eta * x @ D - eta * lam)                          # A_1, the step from A_0 = 0 (D A_0 = 0)
        for _ in range(self.steps - 1):
            a = F.relu(a + eta * (x - a @ D.t()) @ D - eta * lam)    # the step from A_{k-1} to A_k
        return a

    def forward(self, x, steer=None):
        if self.checkpoint and torch.is_grad_enabled():
            a = torch.utils.checkpoint.checkpoint(self.codes, x, use_reentrant=False)
        else:
            a = self.codes(x)
        a = steer(a) if steer else a
        return self.dropout(a @ self.weight), a              # D A_t, and the codes A_t


class MLP(nn.Module):
    """GPT-2 MLP, ReLU by default (the paper's baseline): W_2 relu(W_1 x); its hidden values are the neurons."""

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.hidden, bias=cfg.bias)
        self.act = {'relu': nn.ReLU(), 'gelu': nn.GELU(), 'gelu_tanh': nn.GELU(approximate='tanh')}[cfg.activation]
        self.c_proj = nn.Linear(cfg.hidden, cfg.n_embd, bias=cfg.bias)
        self.c_proj.scaled_init = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, steer=None):
        a = self.act(self.c_fc(x))
        a = steer(a) if steer else a
        return self.dropout(self.c_proj(a)), a


def model_name(cfg):
    """CRATE, GPT-2, 'GPT-2 + SAE', or the parts of an ablation ('mssa+mlp')."""
    if hasattr(cfg, 'base_name'):
        return f"{cfg.base_name} + SAE"
    return {('mssa', 'ista'): 'CRATE', ('mha', 'mlp'): 'GPT-2'}.get((cfg.attn, cfg.ffn), f'{cfg.attn}+{cfg.ffn}')


class Block(nn.Module):
    """One layer: attention with its skip connection, then the feed-forward part (ISTA or MLP). forward returns
    the layer's output and its neurons (ISTA's codes A_t or the MLP's hidden values)."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = LayerNorm(cfg)
        self.attn = MSSA(cfg) if cfg.attn == 'mssa' else MHA(cfg)
        self.ln_2 = LayerNorm(cfg)
        self.ffn = ISTA(cfg) if cfg.ffn == 'ista' else MLP(cfg)

    def forward(self, z, steer=None):
        z = z + self.attn(self.ln_1(z))                  # Z_half = Z + MSSA(LN1(Z))
        y, a = self.ffn(self.ln_2(z), steer)
        if isinstance(self.ffn, ISTA):
            return y, a                                  # Z_next = D A_t: no residual around ISTA
        return z + y, a                                  # GPT-2: Z_half + MLP(LN2(Z_half))


class Transformer(nn.Module):
    """Token and position embeddings, n_layer Blocks, a final LayerNorm and the output layer tied to the token
    embedding. GPT-2's init: N(0, 0.02) for Linear and Embedding weights, 0.02 / sqrt(2 n_layer) for the projections
    that write into the residual stream (marked scaled_init), zero biases; ISTA's dictionary keeps its own init."""

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
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if getattr(m, 'scaled_init', False) else 0.02
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, 'bias', None) is not None:
                    nn.init.zeros_(m.bias)

    def get_num_params(self, non_embedding=True):
        """Parameters, the tied embedding counted once; position embeddings left out by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, steer=None, return_neurons=False):
        """idx (B, T) token ids. steer: {layer: function} replaces that layer's neurons by the function of them
        (overwrite([(neuron, value), ...]) sets neurons). Returns (logits, loss), plus the list of per-layer neurons
        (B, T, h) if return_neurons. Without targets only the last position's logits are computed."""
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
# Checkpoints: ours (train.py) and the paper's released CRATE checkpoints (nanoGPT-format dicts).

RELEASED_NAMES = {'transformer.wte.': 'wte.', 'transformer.wpe.': 'wpe.', 'transformer.ln_f.': 'ln_f.',
                  'transformer.h.': 'blocks.', '.prenorm_1.': '.ln_1.', '.prenorm_2.': '.ln_2.',
                  '.attn.c_attn.': '.attn.U.', '.ista.weight': '.ffn.weight'}


def read_checkpoint(path):
    """torch.load with weights_only=True (tensors and plain types only: reading a downloaded file never runs its
    code), as a dict with 'model' and 'model_args'. Every way a file can be wrong is a ValueError of one line."""
    ckpt = read_tensors(path)
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k), dict) for k in ('model', 'model_args')):
        raise ValueError(f"{path} is not a model checkpoint (expected a dict with 'model' and 'model_args')")
    return ckpt


def read_tensors(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one with `python train.py config/crate_1l.py` "
                                f"or pass --ckpt=PATH")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes): a copy or save that did not finish; copy it again or retrain")
    try:
        with warnings.catch_warnings():           # torch warns about old pickle protocols; the error says enough
            warnings.simplefilter('ignore')
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        if 'global' in str(e).lower():            # a class or function to import: what could run code
            raise ValueError(f"{path} holds Python objects beyond tensors and plain types; it is refused because "
                             f"loading it could run code (torch.load weights_only=True)")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated, or another kind of file): {first}")
    return ckpt


def hub_file(name):
    """hf:OWNER/REPO/FILE, or hf:OWNER/REPO for the repository's one .pt file: a local path, downloaded into the
    Hugging Face hub's cache (with its progress bar) or, offline (HF_HUB_OFFLINE=1), found there."""
    import huggingface_hub as hub
    parts = name[3:].split('/')
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"{name}: write hf:OWNER/REPO (its one .pt file) or hf:OWNER/REPO/FILE")
    repo, file = '/'.join(parts[:2]), '/'.join(parts[2:])
    try:
        if not file:
            try:
                files = hub.list_repo_files(repo)
            except hub.errors.HfHubHTTPError:
                raise                             # the hub answered: no such repository
            except Exception:                     # offline or unreachable: the files the cache holds
                root = hub.snapshot_download(repo, local_files_only=True)
                files = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs]
            pts = sorted(f for f in files if f.endswith('.pt'))
            if len(pts) != 1:
                raise ValueError(f"{name} holds {len(pts)} .pt files{': ' if pts else ''}{', '.join(pts[:4])}; name "
                                 f"one as hf:{repo}/FILE")
            file = pts[0]
        return hub.hf_hub_download(repo, file)
    except hub.errors.LocalEntryNotFoundError:
        raise ValueError(f"{name} is not in the hub cache ({hub.constants.HF_HUB_CACHE}) and the hub cannot be "
                         f"reached: fetch it where there is a network (hf download {repo} {file}) and copy the cache")
    except (hub.errors.RepositoryNotFoundError, hub.errors.EntryNotFoundError) as e:
        raise ValueError(f"{name} is not on the hub ({type(e).__name__}): check the name")


GPT2 = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')      # OpenAI's weights, on the hub as openai-community/NAME


def from_gpt2(name):
    """OpenAI's GPT-2 as a Transformer: its config and weights from the hub, Conv1D weights (in, out) transposed
    into our Linear's (out, in), and GELU in its tanh form."""
    with open(hub_file(f'hf:openai-community/{name}/config.json')) as f:
        hf = json.load(f)
    if hf.get('activation_function', 'gelu_new') != 'gelu_new':
        raise ValueError(f"{name}: activation {hf['activation_function']!r}, where GPT-2's is gelu_new (tanh)")
    d = hf['n_embd']
    cfg = ModelConfig(attn='mha', ffn='mlp', n_layer=hf['n_layer'], n_head=hf['n_head'], n_embd=d,
                      block_size=hf['n_positions'], vocab_size=hf['vocab_size'], bias=True,
                      overcomplete=(hf.get('n_inner') or 4 * d) // d, activation='gelu_tanh')
    sd = {}
    for k, v in read_tensors(hub_file(f'hf:openai-community/{name}/pytorch_model.bin')).items():
        k = k.removeprefix('transformer.')
        if k.endswith(('.attn.bias', '.attn.masked_bias')) or k == 'lm_head.weight':
            continue                              # causal-mask buffers, and the output layer tied to wte
        if k.endswith(('c_attn.weight', 'c_proj.weight', 'c_fc.weight')):
            v = v.t()
        sd[('blocks.' + k[2:] if k.startswith('h.') else k).replace('.mlp.', '.ffn.')] = v
    sd['lm_head.weight'] = sd.get('wte.weight')
    model = Transformer(cfg)
    check_state_dict(name, model, sd)
    model.load_state_dict(sd)
    return model


def from_released(state_dict, model_args):
    """Map a released CRATE checkpoint (keys transformer.h.{i}.prenorm_1, .attn.c_attn = U, .ista.weight = D^T,
    maybe prefixed by _orig_mod.) to our names and a ModelConfig. The authors' CRATE always has LayerNorm and
    c_proj biases while their train.py records bias=False, so the biases follow the state dict, not model_args."""
    sd = {}
    for k, v in state_dict.items():
        k = k.removeprefix('_orig_mod.')
        if k.endswith('.attn.bias') and v.dim() == 4:  # a causal-mask buffer, not a parameter
            continue
        for old, new in RELEASED_NAMES.items():
            k = k.replace(old, new)
        sd[k] = v
    known = {f.name for f in fields(ModelConfig)}
    args = {k: v for k, v in model_args.items() if k in known and v is not None}
    args['bias'] = any(k.endswith(('ln_1.bias', 'ln_2.bias', 'ln_f.bias', 'c_proj.bias')) for k in sd)
    return sd, ModelConfig(**{**args, 'attn': 'mssa', 'ffn': 'ista'})


def released_key(k):
    """Our state-dict key in a released checkpoint's naming (RELEASED_NAMES backwards)."""
    for old, new in RELEASED_NAMES.items():
        if not old.startswith('transformer.'):
            k = k.replace(new, old)
        elif k.startswith(new):
            k = old + k[len(new):]
    return k


def check_state_dict(path, model, sd, name=lambda k: k):
    """Name the missing, unexpected or mis-shaped entries of sd against model, in the file's own key names
    (name(our key): released_key for a released checkpoint)."""
    want = model.state_dict()
    missing = [name(k) for k in want if k not in sd]
    extra = [name(k) for k in sd if k not in want]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} entr{'y' if len(missing) == 1 else 'ies'} its model needs: "
                         f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if extra:
        raise ValueError(f"{path} has {len(extra)} entr{'y' if len(extra) == 1 else 'ies'} its model_args do not "
                         f"explain: {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
    for k, v in want.items():
        if not isinstance(sd[k], torch.Tensor) or sd[k].shape != v.shape:
            got = tuple(sd[k].shape) if isinstance(sd[k], torch.Tensor) else type(sd[k]).__name__
            raise ValueError(f"{path}: {name(k)} has shape {got}, its model_args say {tuple(v.shape)}")


def load_model(path, device='cpu'):
    """A Transformer (or sae.py's SAEModel) from a checkpoint written by train.py or released by the paper's authors, in
    eval mode, with .val_loss the checkpoint's best validation loss if it has one. path: a .pt file or a directory
    holding ckpt.pt, hf:OWNER/REPO[/FILE] on the Hugging Face hub, or OpenAI's GPT-2 by name (gpt2, gpt2-medium,
    gpt2-large, gpt2-xl). The format is told by the keys: transformer.* (released CRATE) or wte.weight (ours)."""
    if path in GPT2:
        model = from_gpt2(path)
        model.val_loss = None
        return model.to(device).eval()
    if path.startswith('hf:'):
        path = hub_file(path)
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    ckpt = read_checkpoint(path)
    sd, args = ckpt['model'], ckpt['model_args']
    if 'sae' in ckpt:                        # an SAE on a base model's layer (sae.py)
        from sae import load_sae
        return load_sae(path, ckpt, device)
    keys = [k.removeprefix('_orig_mod.') for k in sd]
    try:
        if any(k.startswith('transformer.') for k in keys):
            (sd, cfg), name = from_released(sd, args), released_key
        elif 'wte.weight' in keys:
            cfg, name = ModelConfig(**args), (lambda k: k)
        else:
            raise ValueError(f"{path}: its state dict is neither ours (wte.weight, blocks.*) nor a released CRATE "
                             f"checkpoint's (transformer.*)")
    except TypeError as e:
        raise ValueError(f"{path}: its model_args do not describe a model here ({e})")
    model = Transformer(cfg)
    check_state_dict(path, model, sd, name)
    model.load_state_dict(sd)
    model.val_loss = ckpt.get('best_val_loss')
    return model.to(device).eval()
