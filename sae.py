"""
The post-hoc baseline: a sparse autoencoder (SAE) on one layer's neurons of a frozen, trained model.

    python train.py config/gpt2_1l.py          # the base model first
    python sae.py config/sae_gpt2_1l.py        # then the SAE on its layer 0

f = ReLU(W_enc (x - b_dec) + b_enc),  x_hat = W_dec f + b_dec,  with m features on the layer's n neurons. The recipe
is the authors' (their arthursae code: config/sae_gpt2_1l.py says where each value comes from):
- the loss: mean over tokens and inputs of (x_hat - x)^2 / ||x||, plus l1 * (mean over tokens of sum_i |f_i|);
- independent Kaiming-uniform encoder and decoder, the decoder's columns kept at unit norm: the gradient's part
  along each column is removed before a step, and the columns renormalised after it;
- Adam, the learning rate rising in a half cosine from min_lr to learning_rate over warmup_iters at the start and
  after every resampling, then constant;
- a buffer of activations from random training windows, shuffled, consumed a step at a time and refilled;
- dead features resampled at set steps (Anthropic's method, see resample()).
Where we differ from the authors: one process (the paper's scale, 125,000 steps of 4,096 activations, fits one GPU),
and a fixed seed for every random draw, so that a resumed run equals an uninterrupted one.

The trained SAE's features are the neurons interpret.py explains and sample.py steers (through the reconstruction:
the layer's neurons are replaced by x_hat, with the steered features overwritten first).
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import (checkpoint_bytes, claim_folder, configure, fail, held_run, mixed_precision, pick_device,
                          script_defaults, start_run_folder, write_safely)
from model import load_model, model_name, read_checkpoint
from prepare import check_token_files

# -----------------------------------------------------------------------------------------------------------
out_dir = 'out-sae'
data_dir = 'data'                  # token files are data_dir/dataset/{train,val}.bin (prepare.py)
dataset = 'pile'
init_from = 'scratch'              # 'scratch' or 'resume' (from out_dir/ckpt.pt)
overwrite = False                  # a fresh run into an out_dir that holds a run replaces it only when this is set
base = 'out'                       # the trained model whose layer the SAE reads
layer = 0
expansion = 16                     # features = expansion x the layer's neurons
l1 = 8e-5
batch_size = 4                     # sequences a step: batch_size x block_size activations
block_size = 1024
learning_rate = 4e-4
min_lr = 4e-5                      # where each warm-up starts
warmup_iters = 1000
beta1 = 0.9
beta2 = 0.999
max_iters = 125000
buffer = 2**19                     # activations per buffer fill (whole windows), shuffled, then consumed in order
resample_at = '10000,20000,50000,75000,100000'   # iterations at which dead features are resampled ('' never)
resample_window = 7500             # a feature is dead if it fired in under dead_freq of the activations of
dead_freq = 1e-6                   # ... the last resample_window iterations before a resampling
resample_seqs = 60000              # windows scored for the new directions (the loss increase when spliced)
eval_interval = 500
eval_iters = 20                    # validation batches per eval
log_interval = 10
seed = 1337
device = 'auto'
dtype = 'float32'                  # 'float32' or 'bfloat16' (autocast, for the base model's forward passes)
# -----------------------------------------------------------------------------------------------------------
OPTIONS = script_defaults(globals())


class SparseAutoencoder(nn.Module):
    def __init__(self, n_in, n_features):
        super().__init__()
        # independent Kaiming-uniform encoder and decoder (bounds sqrt(6/m) and sqrt(6/n)), decoder columns normalised
        self.W_enc = nn.Parameter(torch.empty(n_features, n_in).uniform_(-1, 1) * math.sqrt(6 / n_features))  # (m, n)
        W = torch.empty(n_in, n_features).uniform_(-1, 1) * math.sqrt(6 / n_in)
        self.W_dec = nn.Parameter(W / W.norm(dim=0, keepdim=True))   # (n, m), columns are the features' directions
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
        """The authors' l2_loss_form='normalize' and l1_loss_form='l1' (||x|| floored at 1e-6 for an all-zero x)."""
        recon = ((x_hat - x) ** 2 / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)).mean()
        return recon + l1 * f.abs().sum(-1).mean()

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
    """A frozen base model with an SAE on layer `layer`'s neurons, called like a Transformer: its neurons are the
    SAE's features, and with targets its loss is the SAE's on the base's activations."""

    def __init__(self, base, layer, n_features, l1):
        super().__init__()
        for p in base.parameters():
            p.requires_grad_(False)
        self.base, self.layer = base.eval(), layer
        self.sae = SparseAutoencoder(base.config.hidden, n_features)
        self.config = SAEConfig(layer, base.config.hidden, n_features, l1, base.config.block_size,
                                model_name(base.config))

    def activations(self, idx):
        with torch.no_grad():
            _, _, neurons = self.base(idx, return_neurons=True)
        return neurons[self.layer].float()

    def forward(self, idx, targets=None, steer=None, return_neurons=False):
        x = self.activations(idx)
        x_hat, f = self.sae(x)
        loss = None if targets is None else self.sae.loss(x, x_hat, f, self.config.l1)
        if steer and 0 in steer:
            f = steer[0](f)
        return (None, loss, [f]) if return_neurons else (None, loss)

    def splice(self, steer=None):
        """The base model's steering that replaces the layer's neurons by the SAE's reconstruction, with the features
        passed through steer (a function) first: the lossy path."""
        steer = steer or (lambda f: f)
        return {self.layer: lambda a: self.sae.decode(steer(self.sae.encode(a.float()))).to(a.dtype)}


def load_sae(path, ckpt, device):
    """An SAEModel from an SAE checkpoint (its base checkpoint, then the SAE on top); load_model calls it."""
    s = ckpt['sae']
    if not isinstance(s, dict) or not {'base', 'layer', 'n_features', 'l1'} <= set(s):
        raise ValueError(f"{path}: its 'sae' entry lacks base, layer, n_features or l1")
    model = SAEModel(load_model(s['base'], device), s['layer'], s['n_features'], s['l1'])
    try:
        model.sae.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit an SAE of {s['n_features']} features: {str(e).splitlines()[1:2]}")
    model.val_loss = None                    # an SAE's own loss is no language-model loss
    return model.to(device).eval()


# --- training ------------------------------------------------------------------------------------------------------

def check_options():
    for k in ('batch_size', 'block_size', 'expansion', 'buffer', 'resample_window', 'resample_seqs', 'eval_interval',
              'eval_iters', 'log_interval'):
        if globals()[k] < 1:
            fail(f"--{k}={globals()[k]} must be at least 1")
    if buffer // block_size * block_size < batch_size * block_size:
        fail(f"buffer={buffer} holds fewer activations than one step takes ({batch_size * block_size}); raise it")
    if init_from not in ('scratch', 'resume'):
        fail(f"init_from must be 'scratch' or 'resume', got {init_from!r}")
    if error := check_token_files(os.path.join(data_dir, dataset), block_size):   # the ids once the base is loaded
        fail(error)
    try:
        return sorted(int(t) for t in resample_at.split(',') if t.strip())
    except ValueError:
        fail(f"resample_at={resample_at!r}: give iterations separated by commas, e.g. '10000,20000', or ''")


def get_lr(it, resamples):
    """A half cosine from min_lr up to learning_rate over warmup_iters, at the start and after every resampling."""
    since = it - max([0] + [t for t in resamples if t <= it])
    if since >= warmup_iters:
        return learning_rate
    return min_lr + 0.5 * (1 - math.cos(math.pi * since / warmup_iters)) * (learning_rate - min_lr)


def windows(split, offsets, dev):
    """Token windows of block_size at offsets, and the next-token targets."""
    data = np.memmap(os.path.join(data_dir, dataset, f'{split}.bin'), dtype=np.uint16, mode='r')
    x = torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in offsets]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in offsets]))
    return x.to(dev), y.to(dev)


def random_offsets(rng, split, n):
    size = os.path.getsize(os.path.join(data_dir, dataset, f'{split}.bin')) // 2
    return rng.integers(0, size - block_size - 1, size=n)


def fill_buffer(model, rng_state, fill, dev, autocast):
    """Fill number `fill`: the activations of buffer // block_size random training windows, drawn from the sampler
    state rng_state, shuffled by a seeded permutation. Returns them and the sampler state after the draw: a fill is a
    function of the state before it, so a checkpoint keeps that state, not the buffer."""
    rng = np.random.default_rng()
    rng.bit_generator.state = rng_state
    offsets = random_offsets(rng, 'train', buffer // block_size)
    with torch.no_grad(), autocast:
        acts = torch.cat([model.activations(windows('train', chunk, dev)[0]).reshape(-1, model.config.n_in)
                          for chunk in np.array_split(offsets, math.ceil(len(offsets) / batch_size))])
    order = torch.randperm(len(acts), generator=torch.Generator().manual_seed(seed * 100003 + fill))
    return acts[order.to(acts.device)], rng.bit_generator.state


@torch.no_grad()
def evaluate(model, dev, autocast):
    """On a fixed validation slice: the SAE's loss, normalised reconstruction error, explained variance, L0, dead
    features, and the language-model loss clean, with the reconstruction spliced in, and with the layer zeroed."""
    data_size = os.path.getsize(os.path.join(data_dir, dataset, 'val.bin')) // 2
    offsets = np.linspace(0, data_size - block_size - 1, eval_iters * batch_size).astype(np.int64)
    zero = {model.layer: lambda a: torch.zeros_like(a)}
    sums = {k: 0.0 for k in ('loss', 'err', 'norm', 'dev', 'active', 'tokens', 'clean', 'spliced', 'zero', 'seqs')}
    seen = torch.zeros(model.config.n_features, dtype=torch.bool, device=dev)
    for chunk in np.array_split(offsets, eval_iters):
        x, y = windows('val', chunk, dev)
        with autocast:
            a = model.activations(x).reshape(-1, model.config.n_in)
            a_hat, f = model.sae(a)
            lm = [model.base(x, y, steer=s)[1].item() for s in (None, model.splice(), zero)]
        sums['loss'] += model.sae.loss(a, a_hat, f, l1).item() * len(chunk)
        a, a_hat = a.double(), a_hat.double()
        sums['err'] += ((a_hat - a) ** 2).sum().item()
        sums['norm'] += (a ** 2).sum().item()
        sums['dev'] += ((a - a.mean(0)) ** 2).sum().item()
        sums['active'] += (f > 0).sum().item()
        sums['tokens'] += len(a)
        for k, v in zip(('clean', 'spliced', 'zero'), lm):
            sums[k] += v * len(chunk)
        sums['seqs'] += len(chunk)
        seen |= (f > 0).any(0)
    clean, spliced, zeroed = (sums[k] / sums['seqs'] for k in ('clean', 'spliced', 'zero'))
    return {'val_loss': sums['loss'] / sums['seqs'], 'recon_error': sums['err'] / sums['norm'],
            'explained_variance': 1 - sums['err'] / sums['dev'], 'l0': sums['active'] / sums['tokens'],
            'dead_fraction': 1 - seen.float().mean().item(), 'lm_loss_clean': clean, 'lm_loss_spliced': spliced,
            'lm_loss_zero': zeroed, 'loss_recovered': loss_recovered(clean, spliced, zeroed)}


@torch.no_grad()
def resample(model, optimizer, dead, it, dev, autocast):
    """Anthropic's resampling, as the authors run it: over resample_seqs training windows, the increase of each
    token's LM loss when the SAE's reconstruction replaces the layer; one position per window, drawn in proportion to
    it; then one of those positions per dead feature, in proportion to its increase. The feature's decoder column
    and encoder row take that position's input direction, the row scaled to 0.2 x the live rows' mean norm, its bias
    0; their Adam moments are reset."""
    if not len(dead):
        return 0
    sae = model.sae
    rng = np.random.default_rng([seed, it])
    g = torch.Generator(device=dev).manual_seed(seed * 100003 + it)
    offsets = random_offsets(rng, 'train', resample_seqs)

    def token_losses(x, y, steer):
        logits, _ = model.base(x, y, steer=steer)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction='none').view(y.shape)
    increases, inputs = [], []
    for chunk in np.array_split(offsets, math.ceil(len(offsets) / batch_size)):
        x, y = windows('train', chunk, dev)
        with autocast:
            inc = (token_losses(x, y, model.splice()) - token_losses(x, y, None)).clamp_min(0)
            acts = model.activations(x)
        ok = inc.sum(1) > 0
        pick = torch.multinomial(inc[ok], 1, generator=g).squeeze(1)
        increases.append(inc[ok, pick])
        inputs.append(acts[ok, pick])
    weight, x = torch.cat(increases), torch.cat(inputs)
    if not len(weight):
        return 0
    picks = torch.multinomial(weight, len(dead), replacement=len(dead) > int((weight > 0).sum()), generator=g)
    d = x[picks] / x[picks].norm(dim=-1, keepdim=True).clamp_min(1e-6)
    alive = torch.ones(sae.b_enc.shape, dtype=torch.bool, device=d.device).index_fill_(0, dead, False)
    scale = 0.2 * (sae.W_enc[alive].norm(dim=-1).mean() if alive.any() else 1.0)
    sae.W_dec[:, dead] = d.T
    sae.W_enc[dead] = d * scale
    sae.b_enc[dead] = 0
    for p, index in ((sae.W_dec, (slice(None), dead)), (sae.W_enc, dead), (sae.b_enc, dead)):
        for moment in ('exp_avg', 'exp_avg_sq'):
            if moment in optimizer.state.get(p, {}):
                optimizer.state[p][moment][index] = 0
    return len(dead)


def main():
    resamples = check_options()
    try:
        dev = pick_device(device)
        base_model = load_model(base, dev)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if not 0 <= layer < base_model.config.n_layer:
        fail(f"layer={layer}: the base model has layers 0..{base_model.config.n_layer - 1}")
    if error := check_token_files(os.path.join(data_dir, dataset), block_size, base_model.config.vocab_size):
        fail(error)
    autocast = mixed_precision(dev, dtype)
    torch.manual_seed(seed)
    model = SAEModel(base_model, layer, expansion * base_model.config.hidden, l1).to(dev)
    optimizer = torch.optim.Adam(model.sae.parameters(), lr=learning_rate, betas=(beta1, beta2))
    ckpt_path, log_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'log.jsonl')
    tokens = batch_size * block_size

    # the state a checkpoint keeps: the step, the buffer (its fill number, the sampler state it was drawn from, how
    # much of it is used) and the firing counts since fired_since
    it, fill, used, fired_since = 0, 0, 0, 0
    rng_state = np.random.default_rng(seed).bit_generator.state
    fired = torch.zeros(model.config.n_features, dtype=torch.long, device=dev)
    held = held_run(out_dir, init_from, overwrite)
    if init_from == 'resume':
        try:
            ckpt = read_checkpoint(ckpt_path)
            s = ckpt['sae']
            model.sae.load_state_dict(ckpt['model'])
            optimizer.load_state_dict(ckpt['optimizer'])
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
            fail(f"cannot resume from {ckpt_path}: {str(e).splitlines()[0]}")
        it, fill, used, fired_since, rng_state = s['iter'], s['fill'], s['used'], s['fired_since'], s['rng']
        fired = s['fired'].to(dev)
    claim_folder(out_dir, checkpoint_bytes(model.sae.parameters()))
    start_run_folder(out_dir, held, it if init_from == 'resume' else None)
    acts, next_state = fill_buffer(model, rng_state, fill, dev, autocast)

    def log(record):
        try:
            with open(log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:
            fail(f"cannot write {log_path} ({e.strerror}); the last checkpoint is intact")

    c = model.config
    print(f"SAE on layer {c.base_layer} of {base} ({c.base_name}): {c.n_in} neurons -> {c.n_features} features, "
          f"l1={c.l1}, {tokens:,} activations a step")
    t0, start = time.time(), it
    while True:
        if (it % eval_interval == 0 or it == max_iters) and not (it == start and init_from == 'resume'):
            stats = evaluate(model, dev, autocast)
            print(f"step {it}: " + ', '.join(f"{k} {v:.4f}" for k, v in stats.items()))
            log({'iter': it, **stats})
            if it > 0:
                state = {'model': model.sae.state_dict(), 'optimizer': optimizer.state_dict(),
                         'model_args': asdict(model.base.config), 'config': config,
                         'sae': {'base': os.path.abspath(base), 'layer': layer, 'n_features': c.n_features, 'l1': l1,
                                 'iter': it, 'fill': fill, 'used': used, 'rng': rng_state, 'fired': fired.cpu(),
                                 'fired_since': fired_since}}
                error = write_safely(ckpt_path, lambda tmp: torch.save(state, tmp))   # a kill leaves no broken file
                if error:
                    fail(f"{error}; free some space and resume with --init_from=resume")
            t0 = time.time()
        if it >= max_iters:
            break
        if used + tokens > len(acts):                      # refill: the remainder is dropped
            fill, used, rng_state = fill + 1, 0, next_state
            acts, next_state = fill_buffer(model, rng_state, fill, dev, autocast)
        x = acts[used:used + tokens]
        used += tokens
        lr = get_lr(it, resamples)
        for group in optimizer.param_groups:
            group['lr'] = lr
        x_hat, f = model.sae(x)
        loss = model.sae.loss(x, x_hat, f, l1)
        fired += (f > 0).sum(0)
        loss.backward()
        model.sae.remove_parallel_grad_()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.sae.normalize_decoder_()
        it += 1
        if it in resamples:
            freq = fired.double() / ((it - fired_since) * tokens)
            n_dead = resample(model, optimizer, torch.nonzero(freq < dead_freq).squeeze(1), it, dev, autocast)
            print(f"iter {it}: resampled {n_dead} dead features (fired in under {dead_freq:g} of the activations "
                  f"since iter {fired_since})")
        if it + resample_window in resamples or it in resamples:
            fired.zero_()                  # count firing afresh over the window before the next resampling
            fired_since = it
        if it % log_interval == 0:
            lossf = loss.item()
            if not math.isfinite(lossf):
                fail(f"the loss is {lossf} at iter {it}; the last good checkpoint is {ckpt_path}: "
                     f"try a lower learning_rate")
            dt = (time.time() - t0) / log_interval
            t0 = time.time()
            print(f"iter {it}/{max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter")
            log({'iter': it, 'loss': lossf, 'lr': lr})


if __name__ == '__main__':
    config = configure(OPTIONS, sys.argv[1:])
    globals().update(config)
    main()
