"""
Train CRATE or GPT-2 on one CPU, one GPU, or many GPUs with DDP.

    python train.py config/crate_1l.py --max_iters=1000
    torchrun --standalone --nproc_per_node=8 train.py config/crate_small.py
    torchrun --nnodes=2 --node_rank=0 --rdzv_endpoint=HOST:PORT --nproc_per_node=8 train.py config/crate_base.py
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from configurator import configure, fail, mixed_precision, peak_flops, pick_device, script_defaults
from model import (ModelConfig, SAEModel, SparseAutoencoder, Transformer, check_state_dict, load_model, loss_recovered,
                   read_checkpoint)
from prepare import HUB

# -----------------------------------------------------------------------------------------------------------
# defaults: the paper's recipe (the Pile, context 1024, ~0.5M tokens a step, AdamW, cosine schedule)
out_dir = 'out'
data_dir = 'data'                  # token files are data_dir/dataset/{train,val}.bin (written by prepare.py)
dataset = 'pile'
init_from = 'scratch'              # 'scratch' or 'resume' (from out_dir/ckpt.pt)
eval_interval = 1000
eval_iters = 100                   # validation batches per eval, a fixed slice of val.bin (same every eval)
log_interval = 10
always_save_checkpoint = True      # else only when val loss improves
overwrite = False                  # a fresh run into an out_dir that holds a run replaces it only when this is set
seed = 1337
# model (ModelConfig): CRATE by default; GPT-2 is attn='mha', ffn='mlp', bias=False
attn = 'mssa'
ffn = 'ista'
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50304
dropout = 0.0
bias = True
overcomplete = 4
ista_steps = 2
ista_eta = 0.1
ista_lambda = 0.1
activation = 'relu'
# batch: global tokens per step = batch_size * block_size * gradient_accumulation_steps (12 * 1024 * 40)
batch_size = 12                    # sequences per micro-step per process
gradient_accumulation_steps = 40   # micro-steps per optimizer step, summed over all processes
# optimizer
learning_rate = 6e-4
max_iters = 600000                 # the paper's: 600,000 x 491,520 tokens = 295B tokens (config/train_gpt2.py)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                    # 0 disables
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000
min_lr = 6e-5
# system
device = 'auto'                    # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'                     # 'auto' (bf16 on CUDA where supported, else float32), 'float32', 'bfloat16', 'float16'
compile = None                     # None: on for CUDA, off elsewhere
backend = 'auto'                   # DDP backend: 'auto' is nccl on CUDA, gloo on CPU
peak_tflops = 0.0                  # for MFU where the device is not known (CPU); 0 = detect or leave MFU out
ista_checkpoint = False            # recompute ISTA's codes in the backward pass instead of keeping them
# sparse autoencoder mode: train an SAE on one layer's neurons of a frozen trained model (config/sae_*.py has the
# authors' recipe and where each value comes from). The SAE trains on a shuffled buffer of the layer's activations;
# a step takes batch_size * block_size * gradient_accumulation_steps of them. The learning rate rises from min_lr to
# learning_rate over warmup_iters (a half cosine) at the start and again after every resampling, then stays.
sae_base = ''                      # the base checkpoint; set, the trained model is the SAE
sae_layer = 0
sae_expansion = 16                 # features = sae_expansion x the layer's neurons
sae_l1 = 8e-5
sae_buffer = 2**19                 # activations per buffer fill (whole sequences), shuffled, then consumed in order
sae_resample_at = '10000,20000,50000,75000,100000'   # iterations at which dead features are resampled ('' never)
sae_resample_window = 7500         # a feature is dead if it fired in under sae_dead_freq of the activations of
sae_dead_freq = 1e-6               # ... the last sae_resample_window iterations before a resampling
sae_resample_seqs = 60000          # sequences scored for the new directions (the loss increase when spliced)
# -----------------------------------------------------------------------------------------------------------
config = configure(script_defaults(globals()), sys.argv[1:])
globals().update(config)
model_args = {f.name: config[f.name] for f in fields(ModelConfig)}


for k in ('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'eval_iters', 'log_interval', 'sae_expansion',
          'sae_buffer', 'sae_resample_window', 'sae_resample_seqs'):
    if config[k] < 1:
        fail(f"--{k}={config[k]} must be at least 1")
for k in ('max_iters', 'warmup_iters', 'lr_decay_iters', 'learning_rate', 'min_lr', 'weight_decay', 'grad_clip'):
    if config[k] < 0:
        fail(f"--{k}={config[k]} must not be negative")
try:
    ModelConfig(**model_args)
    device = pick_device(device)
except ValueError as e:
    fail(str(e))

# distributed setup, detected from the environment torchrun sets
ddp = int(os.environ.get('RANK', -1)) != -1
device_type = 'cuda' if device.startswith('cuda') else device.split(':')[0]
if ddp:
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if backend == 'auto':
        backend = 'nccl' if device_type == 'cuda' else 'gloo'
    if device_type == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
if gradient_accumulation_steps % world_size:
    fail(f"gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the "
         f"{world_size} processes; pick a multiple of {world_size}")
local_accum = gradient_accumulation_steps // world_size
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if dtype == 'auto':
    dtype = 'bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
if dtype not in ('float32', 'bfloat16', 'float16'):
    fail(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
if compile is None:
    compile = device_type == 'cuda'
autocast = mixed_precision(device, dtype)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
if master:
    print(f"{world_size} process(es) on {device} ({dtype}), {tokens_per_iter:,} tokens per iteration "
          f"= {gradient_accumulation_steps} accumulation x {batch_size} sequences x {block_size} tokens")

# data: flat uint16 GPT-2 tokens. Batches are drawn from one seeded generator that every rank advances the
# same way, each rank taking its own micro-steps of the global batch, so N processes see exactly the
# batches one process with N times the accumulation would, and the generator's state resumes exactly.
data_path = os.path.join(data_dir, dataset)
for split in ('train', 'val'):
    f = os.path.join(data_path, f'{split}.bin')
    if not os.path.exists(f):
        where = '' if data_dir == 'data' else f" --out_dir={data_path}"
        make = (f"python prepare.py --dataset={dataset}{where}" if dataset in HUB else
                f"python prepare.py --files 'docs/*.txt' --name={dataset}{where}")
        fail(f"{f} not found: make it with `{make}`")
    size = os.path.getsize(f)
    if size % 2:
        fail(f"{f} has an odd number of bytes ({size:,}), so it is not a file of uint16 tokens; remake it with prepare.py")
    if size // 2 < block_size + 2:
        fail(f"{f} holds {size // 2} tokens, fewer than block_size + 2 = {block_size + 2}; prepare more data or lower "
             f"block_size")
sampler = np.random.default_rng(seed)


def tokens(split):
    return np.memmap(os.path.join(data_path, f'{split}.bin'), dtype=np.uint16, mode='r')  # fresh map: no leak


def to_device(x, y):
    if device_type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def check_tokens(f, largest):
    if largest >= vocab_limit:
        fail(f"{f} holds token id {largest} but the model's vocabulary is {vocab_limit} (vocab_size); tokenize the "
             f"data with prepare.py (GPT-2 ids, below 50257) or raise vocab_size")


def batch_at(data, offsets):
    x = torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in offsets]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in offsets]))
    return to_device(x, y)


def train_batches():
    """This rank's micro-batches of the next global batch."""
    data = tokens('train')
    offsets = sampler.integers(0, len(data) - block_size - 1, size=(gradient_accumulation_steps, batch_size))
    return [batch_at(data, offsets[rank * local_accum + i]) for i in range(local_accum)]


@torch.no_grad()
def estimate_loss():
    """Mean loss over a fixed slice of each split: eval_iters * batch_size windows spread evenly over the file,
    shared out among the ranks and averaged over all of them. For a language model also, per layer on the validation
    slice, how sparse its neurons are (CRATE's codes A_t, GPT-2's post-ReLU values): the fraction of values that are
    not > 0, the L0 (values > 0 per token) and the neurons never > 0."""
    runner.eval()
    out = {}
    for split in ('train', 'val'):
        data = tokens(split)
        offsets = np.linspace(0, len(data) - block_size - 1, eval_iters * batch_size).astype(np.int64)
        total = torch.zeros(2, device=device, dtype=torch.float64)
        active = torch.zeros(n_layer, model.config.hidden, device=device) if split == 'val' and not sae_base else None
        chunks = np.array_split(offsets, eval_iters)[rank::world_size]
        for chunk in tqdm(chunks, desc=f"eval {split}", disable=not master, leave=False, file=sys.stderr, mininterval=2):
            x, y = batch_at(data, chunk)
            with autocast:
                if sae_base:
                    _, loss = model(x, y)
                else:
                    _, loss, neurons = runner(x, y, return_neurons=True)
            if active is not None:         # per layer and neuron: positions where it is > 0
                active += torch.stack([(a > 0).flatten(0, 1).sum(0) for a in neurons])
            total += torch.tensor([loss.item() * len(chunk), len(chunk)], device=device, dtype=torch.float64)
        if ddp:
            dist.all_reduce(total)
            if active is not None:
                dist.all_reduce(active)
        out[split] = (total[0] / total[1]).item()
        if active is not None:
            n_tok = len(offsets) * block_size
            out['sparsity'] = [{'zero_fraction': round(1 - f.sum().item() / (n_tok * len(f)), 4),
                                'l0': round(f.sum().item() / n_tok, 2), 'dead': int((f == 0).sum())} for f in active]
    if sae_base:
        out.update(sae_statistics())
    runner.train()
    return out


@torch.no_grad()
def sae_statistics():
    """On the validation slice: normalised reconstruction error, explained variance, L0, dead features, and the
    language-model loss clean, with the SAE's reconstruction spliced in, and with the layer zero-ablated."""
    data = tokens('val')
    offsets = np.linspace(0, len(data) - block_size - 1, eval_iters * batch_size).astype(np.int64)
    # sums of: squared error, squared norm, squared deviation from the batch mean, active features, tokens,
    # and clean, spliced, zero-ablated LM loss times sequences, sequences
    sums = torch.zeros(9, device=device, dtype=torch.float64)
    seen = torch.zeros(model.config.n_features, device=device)     # features that fired on the slice
    zero = {sae_layer: lambda a: torch.zeros_like(a)}
    for chunk in np.array_split(offsets, eval_iters)[rank::world_size]:
        x, y = batch_at(data, chunk)
        with autocast:
            a = model.activations(x).reshape(-1, model.config.n_in)
            a_hat, f = model.sae(a)
            lm = [model.base(x, y, steer=s)[1].item() for s in (None, model.splice(), zero)]
        a, a_hat = a.double(), a_hat.double()
        sums += torch.tensor([((a_hat - a) ** 2).sum().item(), (a ** 2).sum().item(), ((a - a.mean(0)) ** 2).sum().item(),
                              (f > 0).sum().item(), len(a), *(l * len(chunk) for l in lm), len(chunk)],
                             device=device, dtype=torch.float64)
        seen = torch.maximum(seen, (f > 0).any(0).float())
    if ddp:
        dist.all_reduce(sums)
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    err, norm, dev, active, n_tok, clean, spliced, zeroed, n_seq = sums.tolist()
    clean, spliced, zeroed = clean / n_seq, spliced / n_seq, zeroed / n_seq
    return {'recon_error': err / norm, 'explained_variance': 1 - err / dev, 'l0': active / n_tok,
            'dead_fraction': 1 - seen.mean().item(), 'lm_loss_clean': clean, 'lm_loss_spliced': spliced,
            'lm_loss_zero': zeroed, 'loss_recovered': loss_recovered(clean, spliced, zeroed)}


def resample_steps():
    try:
        return sorted(int(t) for t in sae_resample_at.split(',') if t.strip())
    except ValueError:
        fail(f"sae_resample_at={sae_resample_at!r}: give iterations separated by commas, e.g. '10000,20000', or ''")


resample_at = resample_steps() if sae_base else []


def get_lr(it):
    """Linear warmup for warmup_iters, then cosine decay to min_lr at lr_decay_iters. An SAE (the authors' schedule):
    a half cosine from min_lr up to learning_rate over warmup_iters, at the start and after every resampling."""
    if sae_base:
        since = it - max([0] + [t for t in resample_at if t <= it])
        if since >= warmup_iters:
            return learning_rate
        return min_lr + 0.5 * (1 - math.cos(math.pi * since / warmup_iters)) * (learning_rate - min_lr)
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# model, optimizer, and state to resume from
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
iter_num, best_val_loss = 0, float('inf')
peak = peak_flops(device, dtype, peak_tflops)
held = [f for f in ('ckpt.pt', 'log.jsonl') if os.path.exists(os.path.join(out_dir, f))]
if init_from == 'scratch' and held and not overwrite:
    fail(f"{out_dir} already holds a run ({', '.join(held)}): continue it with --init_from=resume, train into another "
         f"--out_dir, or replace it with --overwrite=True")
if init_from == 'resume':
    try:
        checkpoint = read_checkpoint(ckpt_path)
    except FileNotFoundError:
        fail(f"init_from='resume' but {ckpt_path} does not exist; train from scratch first or fix out_dir")
    except ValueError as e:
        fail(str(e))
    lacking = [k for k in ('optimizer', 'iter_num', 'best_val_loss', 'rng') if k not in checkpoint]
    if lacking:
        fail(f"{ckpt_path} lacks {', '.join(lacking)}: it is a model-only file (released, or copied), which "
             f"train.py cannot resume; train from scratch into another out_dir")
    if bool(sae_base) != ('sae' in checkpoint):
        fail(f"resume: {ckpt_path} is {'an SAE' if 'sae' in checkpoint else 'a language model'} checkpoint but "
             f"sae_base is {'set' if sae_base else 'not set'}; use the config it was trained with")
    if sae_base and 'buffer' not in checkpoint['sae']:
        fail(f"{ckpt_path} is an SAE checkpoint from before the activation buffer; train it again")
    for k, v in ({} if sae_base else checkpoint['model_args']).items():
        if k != 'ista_checkpoint' and model_args.get(k) != v:   # recomputing ISTA's codes is memory, not the model
            fail(f"resume: {k}={model_args.get(k)!r} here but {v!r} in {ckpt_path}; "
                 f"resume with the same model settings or use a new out_dir")
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
elif init_from != 'scratch':
    fail(f"init_from must be 'scratch' or 'resume', got {init_from!r}")
torch.manual_seed(seed)
try:
    if sae_base:
        base = load_model(sae_base, device)
        if not 0 <= sae_layer < base.config.n_layer:
            fail(f"sae_layer={sae_layer}: the base model has layers 0..{base.config.n_layer - 1}")
        model = SAEModel(base, sae_layer, sae_expansion * base.config.hidden, sae_l1)
        trained = model.sae                      # what is optimised and checkpointed; the base stays frozen
    else:
        model = trained = Transformer(ModelConfig(**model_args))
    if init_from == 'resume':
        check_state_dict(ckpt_path, trained, checkpoint['model'])
except (ValueError, FileNotFoundError) as e:
    fail(str(e))
if init_from == 'resume':
    trained.load_state_dict(checkpoint['model'])
model.to(device)
vocab_limit = (model.base if sae_base else model).config.vocab_size
meta_file = os.path.join(data_path, 'meta.json')
if os.path.exists(meta_file):     # before any batch: prepare.py's files name their vocabulary, others are scanned
    with open(meta_file) as fh:
        check_tokens(meta_file, json.load(fh).get('vocab_size', 1) - 1)
else:
    for split in ('train', 'val'):
        data = tokens(split)
        check_tokens(data.filename, max(int(data[i:i + 2**24].max()) for i in range(0, len(data), 2**24)))
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
if sae_base:   # Adam on the SAE (weight decay 0 by its configs)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay)
else:
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if init_from == 'resume':
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{ckpt_path}: its optimizer state does not fit this model ({e})")
    rng = checkpoint['rng']
    sampler.bit_generator.state = rng['sampler']
    np.random.set_state((rng['numpy'][0], np.array(rng['numpy'][1], dtype=np.uint32), *rng['numpy'][2:]))
    if len(rng['torch']) == world_size:       # each rank its own stream: dropout resumes exactly
        torch.set_rng_state(rng['torch'][rank])
        if device_type == 'cuda' and rng['cuda'][rank] is not None:
            torch.cuda.set_rng_state(rng['cuda'][rank], device)
    else:
        torch.manual_seed(seed + rank + iter_num)
        if master:
            print(f"warning: {ckpt_path} was saved by {len(rng['torch'])} process(es), this run has {world_size}: "
                  f"dropout's random numbers will differ from an uninterrupted run")
else:
    torch.manual_seed(seed + rank)  # dropout differs between ranks; the weights are the same (DDP broadcasts)
# model: the whole model (an SAEModel holds its frozen base); trained: the part that learns and is checkpointed;
# runner: what a training step calls, the trained part compiled and wrapped for DDP
runner = torch.compile(trained) if compile else trained
if ddp:
    runner = DDP(runner, device_ids=[local_rank] if device_type == 'cuda' else None)
flops_per_iter = model.flops_per_token(block_size) * tokens_per_iter
if master and sae_base:
    c = model.config
    print(f"SAE on layer {c.base_layer} of {sae_base} ({c.base_name}): {c.n_in} neurons -> {c.n_features} features, l1={c.l1}")
elif master:
    print(f"{model.get_num_params():,} parameters ({attn} + {ffn}, {n_layer} layers, d={n_embd}), "
          f"{model.flops_per_token(block_size) / 1e6:.1f} MFLOPs per token"
          + ("" if peak else "; MFU not shown: the device's peak is unknown (set --peak_tflops)"))

# The SAE's data: a buffer of sae_buffer // block_size random training windows' activations, shuffled by a seeded
# permutation, consumed a step at a time and refilled when it cannot serve a whole step (the remainder is dropped).
# A fill is a function of the sampler's state before it, so a checkpoint records that state, not the buffer.
buffer, buffer_state = None, None
fired, fired_since = None, 0     # per feature, activations > 0 since iteration fired_since (summed over ranks later)


def fill_buffer(fill):
    global buffer, buffer_state
    buffer_state = {'rng': sampler.bit_generator.state, 'fill': fill, 'used': 0}
    data = tokens('train')
    offsets = sampler.integers(0, len(data) - block_size - 1, size=max(1, sae_buffer // block_size))
    with autocast:
        acts = [model.activations(batch_at(data, chunk)[0]).reshape(-1, model.config.n_in)
                for chunk in np.array_split(offsets, math.ceil(len(offsets) / batch_size))]
    acts = torch.cat(acts)
    order = torch.randperm(len(acts), generator=torch.Generator().manual_seed(seed * 100003 + fill))
    buffer = acts[order.to(acts.device)]


def sae_batches():
    """This rank's micro-batches of the next step's activations (the same buffer on every rank)."""
    if buffer_state['used'] + tokens_per_iter > len(buffer):
        fill_buffer(buffer_state['fill'] + 1)
    used = buffer_state['used']
    step = buffer[used:used + tokens_per_iter].view(gradient_accumulation_steps, batch_size * block_size, -1)
    buffer_state['used'] += tokens_per_iter
    return [(step[rank * local_accum + i], None) for i in range(local_accum)]


def per_token_loss(x, y, steer):
    logits, _ = model.base(x, y, steer=steer)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction='none').view(y.shape)


@torch.no_grad()
def resample_dead(dead):
    """The authors' resampling (Anthropic's): over sae_resample_seqs training windows, the increase of each token's
    LM loss when the SAE's reconstruction replaces the layer; one position per window, drawn in proportion to it;
    then one of those positions per dead feature, in proportion to its increase. The feature's decoder column and
    encoder row take that position's input direction, the row scaled to 0.2 x the live rows' mean norm, its bias 0;
    their Adam moments are reset. Every rank computes the same (seeded) result."""
    if not len(dead):
        return 0
    sae, data = model.sae, tokens('train')
    rng = np.random.default_rng([seed, iter_num])
    g = torch.Generator(device=device).manual_seed(seed * 100003 + iter_num)
    offsets = rng.integers(0, len(data) - block_size - 1, size=sae_resample_seqs)
    increases, inputs = [], []
    for chunk in np.array_split(offsets, math.ceil(len(offsets) / batch_size)):
        x, y = batch_at(data, chunk)
        with autocast:
            inc = (per_token_loss(x, y, model.splice()) - per_token_loss(x, y, None)).clamp_min(0)
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


if sae_base:
    if max(1, sae_buffer // block_size) * block_size < tokens_per_iter:
        fail(f"sae_buffer={sae_buffer} holds fewer activations than one step takes ({tokens_per_iter}); raise it")
    if init_from == 'resume':    # rebuild the buffer the checkpoint was drawing from, where it was
        s = checkpoint['sae']
        sampler.bit_generator.state = s['buffer']['rng']
        fill_buffer(s['buffer']['fill'])
        buffer_state['used'] = s['buffer']['used']
        fired, fired_since = s['fired'].to(device) * int(master), s['fired_since']   # the sum over ranks, once
    else:
        fill_buffer(0)
        fired = torch.zeros(model.config.n_features, dtype=torch.long, device=device)
if init_from == 'resume':
    checkpoint = None


log_path = os.path.join(out_dir, 'log.jsonl')
if master:
    os.makedirs(out_dir, exist_ok=True)     # only now: a run refused above leaves no empty folder
    if os.path.exists(ckpt_path + '.tmp'):
        os.remove(ckpt_path + '.tmp')
        print(f"removed {ckpt_path}.tmp, a partial checkpoint a killed run left")
    if init_from == 'scratch' and held:
        for f in held:
            os.remove(os.path.join(out_dir, f))
        print(f"--overwrite=True: removed the earlier run's {' and '.join(held)} from {out_dir}")
    if init_from == 'resume':    # the log keeps what the checkpoint saw: a killed run's later lines are redone
        lines = kept = []
        if os.path.exists(log_path):
            with open(log_path) as f:
                lines = [l for l in f if l.strip()]
            kept = [l for l in lines if l.endswith('\n') and json.loads(l).get('iter', 0) <= iter_num]  # a cut line goes
            with open(log_path + '.tmp', 'w') as f:
                f.writelines(kept)
            os.replace(log_path + '.tmp', log_path)
        dropped = f"; dropped {len(lines) - len(kept)} log line(s) after it" if len(kept) < len(lines) else ""
        print(f"resuming from iteration {iter_num} of {ckpt_path}{dropped}")


def log(record):
    with open(log_path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def gather_state():
    """What the checkpoint needs from every rank (a collective: every rank calls it): each rank's torch (and CUDA)
    generator state, and an SAE's firing counts summed over the ranks."""
    mine = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device_type == 'cuda' else None)
    every, total = [mine], fired.clone() if sae_base else None
    if ddp:
        every = [None] * world_size
        dist.all_gather_object(every, mine)
        if sae_base:
            dist.all_reduce(total)
    return every, total


def save_checkpoint(gathered):
    """Plain types and tensors only (loadable with weights_only=True); written to a temporary file and renamed, so a
    kill mid-write never leaves a broken ckpt.pt."""
    states, fired_total = gathered
    np_state = np.random.get_state()
    state = {'model': trained.state_dict(), 'optimizer': optimizer.state_dict(), 'model_args': model_args,
             'iter_num': iter_num, 'best_val_loss': best_val_loss, 'config': config,
             'rng': {'sampler': sampler.bit_generator.state, 'torch': [t for t, _ in states],
                     'cuda': [c for _, c in states], 'numpy': [np_state[0], np_state[1].tolist(), *np_state[2:]]}}
    if sae_base:
        state['sae'] = {'base': os.path.abspath(sae_base), 'layer': sae_layer, 'n_features': model.config.n_features,
                        'l1': sae_l1, 'fired': fired_total.cpu(), 'fired_since': fired_since, 'buffer': dict(buffer_state)}
        state['model_args'] = asdict(model.base.config)
    tmp = ckpt_path + '.tmp'
    torch.save(state, tmp)
    os.replace(tmp, ckpt_path)


def stop_on_nonfinite(what, value):
    if not math.isfinite(value):
        if master:
            saved = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was saved"
            also = "" if dtype == 'float32' else " or dtype='float32'"
            print(f"error: {what} is {value} at iter {iter_num}; stopping ({saved}). "
                  f"Try a lower learning_rate, a longer warmup_iters{also}.", file=sys.stderr)
        if ddp:
            dist.destroy_process_group()
        sys.exit(1)


# training loop: iteration iter_num evaluates (and checkpoints) the model after iter_num updates, then steps
if master and not sae_base and decay_lr and max_iters < lr_decay_iters:
    print(f"warning: max_iters={max_iters} < lr_decay_iters={lr_decay_iters}: the learning rate ends at "
          f"{get_lr(max_iters):.2e}, not min_lr={min_lr:g}; pass --lr_decay_iters={max_iters} to decay it within this run",
          file=sys.stderr)
start_iter, t0, timed_iters = iter_num, time.time(), 0
eval_seconds = 0.0                   # the last evaluation's time, for the ETA
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr
    if (iter_num % eval_interval == 0 or iter_num == max_iters) and not (iter_num == start_iter and init_from == 'resume'):
        t_eval = time.time()
        losses = estimate_loss()
        eval_seconds = time.time() - t_eval
        stop_on_nonfinite('validation loss', losses['val'])
        save = iter_num > 0 and (losses['val'] < best_val_loss or always_save_checkpoint)
        best_val_loss = min(best_val_loss, losses['val'])
        gathered = gather_state() if save else None   # every rank's, so that each resumes with its own
        if master:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
                  f"(eval {eval_seconds:.1f} s)")
            if 'sparsity' in losses:
                sp = losses['sparsity']
                print(f"  neurons per layer: zero fraction {', '.join(str(v['zero_fraction']) for v in sp)}; "
                      f"L0 {', '.join(str(v['l0']) for v in sp)}; dead {', '.join(str(v['dead']) for v in sp)}")
            if sae_base:
                print('  ' + ', '.join(f"{k} {v:.4f}" for k, v in losses.items() if k not in ('train', 'val')))
            log({'iter': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val'],
                 **{k: v for k, v in losses.items() if k not in ('train', 'val')}})
            if save:
                save_checkpoint(gathered)
                print(f"saved {ckpt_path}")
        t0, timed_iters = time.time(), 0  # leave evaluation out of the step timing
    if iter_num >= max_iters:
        break

    step_loss = torch.zeros((), device=device)
    for micro_step, (x, y) in enumerate(sae_batches() if sae_base else train_batches()):
        last = micro_step == local_accum - 1  # all-reduce gradients on the last micro-step only
        with (runner.no_sync() if ddp and not last else nullcontext()), autocast:
            if sae_base:
                x_hat, f = runner(x)
                loss = SparseAutoencoder.loss(x, x_hat, f, sae_l1)
                fired += (f > 0).sum(0)
            else:
                _, loss = runner(x, y)
            loss = loss / local_accum  # DDP then averages over ranks: the gradient of the global batch's mean
        step_loss += loss.detach()
        scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trained.parameters(), grad_clip)
    if sae_base:
        trained.remove_parallel_grad_()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if sae_base:
        trained.normalize_decoder_()
    iter_num += 1
    if sae_base and iter_num in resample_at:
        if ddp:
            dist.all_reduce(fired)
        freq = fired.double() / ((iter_num - fired_since) * tokens_per_iter)
        n_dead = resample_dead(torch.nonzero(freq < sae_dead_freq).squeeze(1))
        if master:
            print(f"iter {iter_num}: resampled {n_dead} dead features (fired in under {sae_dead_freq:g} of the "
                  f"activations since iter {fired_since})")
    if sae_base and (iter_num + sae_resample_window in resample_at or iter_num in resample_at):
        fired.zero_()                # count firing afresh over the window before the next resampling
        fired_since = iter_num
    timed_iters += 1

    if iter_num % log_interval == 0:
        if ddp:
            dist.all_reduce(step_loss)
        lossf = step_loss.item() / world_size
        stop_on_nonfinite('training loss', lossf)
        t1 = time.time()
        dt, t0, timed_iters = (t1 - t0) / timed_iters, t1, 0
        if master:
            mfu = f", mfu {flops_per_iter / dt / peak * 100:.1f}%" if peak else ""
            # evaluations still to run, the one at this very iteration included (it runs after this line)
            evals_left = max_iters // eval_interval - (iter_num - 1) // eval_interval + (max_iters % eval_interval > 0)
            eta = (max_iters - iter_num) * dt + evals_left * eval_seconds
            left = f"{eta / 3600:.1f} h" if eta >= 3600 else f"{eta / 60:.1f} min"
            print(f"iter {iter_num}/{max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                  f"{tokens_per_iter / dt:,.0f} tok/s{mfu}, {left} to go")
            log({'iter': iter_num, 'loss': lossf, 'lr': lr, 'ms_per_iter': dt * 1000,
                 'tokens_per_s': tokens_per_iter / dt})

if ddp:
    dist.barrier()                  # rank 0 may still be writing the last checkpoint: tear down together
    runner = None                    # DDP's reducer holds gloo work: release it before its process group
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)                     # gloo threads freeing tensors during interpreter shutdown can abort (SIGABRT)
