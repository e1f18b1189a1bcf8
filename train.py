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
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from configurator import (checkpoint_bytes, claim_folder, configure, fail, held_run, mixed_precision, peak_flops,
                          pick_device, release_folder, script_defaults, start_run_folder, write_safely)
from model import GPT2, ModelConfig, Transformer, check_state_dict, load_model, read_checkpoint
from prepare import check_token_files

# -----------------------------------------------------------------------------------------------------------
# defaults: the paper's recipe (the Pile, context 1024, ~0.5M tokens a step, AdamW, cosine schedule)
out_dir = 'out'
data_dir = 'data'                  # token files are data_dir/dataset/{train,val}.bin (written by prepare.py)
dataset = 'pile'
init_from = 'scratch'              # 'scratch', 'resume' (from out_dir/ckpt.pt), or 'gpt2', 'gpt2-medium', 'gpt2-large',
                                   # 'gpt2-xl' to fine-tune OpenAI's weights (from the Hugging Face hub)
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
dtype = 'auto'                     # 'auto' (bf16 on a CUDA GPU that has it, else float32), 'float32', 'bfloat16',
                                   # 'float16'
compile = None                     # None: on for CUDA, off elsewhere
backend = 'auto'                   # DDP backend: 'auto' is nccl on CUDA, gloo on CPU
peak_tflops = 0.0                  # for MFU where the device is not known (CPU); 0 = detect or leave MFU out
ista_checkpoint = False            # recompute ISTA's codes in the backward pass instead of keeping them
wandb_log = False                  # also log to Weights & Biases (pip install wandb); log.jsonl is always written
wandb_project = 'nanocrate'
wandb_run_name = 'run'
# -----------------------------------------------------------------------------------------------------------
config = configure(script_defaults(globals()), sys.argv[1:])
globals().update(config)
model_args = {f.name: config[f.name] for f in fields(ModelConfig)}


for k in ('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'eval_iters', 'log_interval'):
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
if init_from not in ('scratch', 'resume', *GPT2):
    fail(f"init_from must be 'scratch', 'resume' or one of {', '.join(GPT2)}, got {init_from!r}")
if wandb_log:
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True needs the wandb package: pip install wandb (or leave wandb_log off)")

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
    native_bf16 = device_type == 'cuda' and torch.cuda.is_bf16_supported(including_emulation=False)  # not V100, T4
    dtype = 'bfloat16' if native_bf16 else 'float32'
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
if error := check_token_files(data_path, block_size):      # the files now; their ids once the model is known
    fail(error)
sampler = np.random.default_rng(seed)


def tokens(split):
    return np.memmap(os.path.join(data_path, f'{split}.bin'), dtype=np.uint16, mode='r')  # fresh map: no leak


def to_device(x, y):
    if device_type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


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
    not > 0, the L0 (values > 0 per token) and the neurons never > 0. (The unwrapped model: ranks may run
    different numbers of batches, which a DDP forward would wait on.)"""
    runner.eval()
    out = {}
    for split in ('train', 'val'):
        data = tokens(split)
        offsets = np.linspace(0, len(data) - block_size - 1, eval_iters * batch_size).astype(np.int64)
        total = torch.zeros(2, device=device, dtype=torch.float64)
        active = torch.zeros(model.config.n_layer, model.config.hidden, device=device) if split == 'val' else None
        chunks = np.array_split(offsets, eval_iters)[rank::world_size]
        chunks = tqdm(chunks, desc=f"eval {split}", disable=not master, leave=False, file=sys.stderr, mininterval=2)
        for chunk in chunks:
            x, y = batch_at(data, chunk)
            with autocast:
                _, loss, neurons = model(x, y, return_neurons=True)
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
    runner.train()
    return out


def get_lr(it):
    if not decay_lr:
        return learning_rate
    # 1) linear warm-up for warmup_iters steps
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) after lr_decay_iters, the floor min_lr
    if it > lr_decay_iters:
        return min_lr
    # 3) in between, cosine decay from learning_rate down to min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# model, optimizer, and state to resume from
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
iter_num, best_val_loss = 0, float('inf')
peak = peak_flops(device, dtype, peak_tflops)
held = held_run(out_dir, init_from, overwrite)
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
    pretrained = checkpoint.get('pretrained')
    if pretrained:                        # a fine-tuned GPT-2: its shape is OpenAI's, not the command line's
        model_args = checkpoint['model_args']
    for k, v in checkpoint['model_args'].items():
        if k != 'ista_checkpoint' and model_args.get(k) != v:   # recomputing ISTA's codes is memory, not the model
            fail(f"resume: {k}={model_args.get(k)!r} here but {v!r} in {ckpt_path}; "
                 f"resume with the same model settings or use a new out_dir")
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
else:
    pretrained = init_from if init_from in GPT2 else None
    if pretrained:
        try:
            gpt2 = load_model(pretrained)
        except ValueError as e:
            fail(str(e))
        if block_size > gpt2.config.block_size:
            fail(f"block_size={block_size}: {pretrained} was trained on at most {gpt2.config.block_size} tokens")
        model_args = {**vars(gpt2.config), 'block_size': block_size, 'dropout': dropout}
torch.manual_seed(seed)
model = Transformer(ModelConfig(**model_args))
if init_from == 'resume':
    try:
        check_state_dict(ckpt_path, model, checkpoint['model'])
    except ValueError as e:
        fail(str(e))
    model.load_state_dict(checkpoint['model'])
elif pretrained:
    model.load_state_dict({**gpt2.state_dict(), 'wpe.weight': gpt2.wpe.weight[:block_size]})
model.to(device)
if error := check_token_files(data_path, block_size, model.config.vocab_size):    # before anything is written
    fail(error)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
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
# runner: what a training step calls, the model compiled and wrapped for DDP
runner = torch.compile(model) if compile else model
if ddp:
    runner = DDP(runner, device_ids=[local_rank] if device_type == 'cuda' else None)
flops_per_iter = model.flops_per_token(block_size) * tokens_per_iter
if master:
    c = model.config
    print(f"{model.get_num_params():,} parameters ({c.attn} + {c.ffn}, {c.n_layer} layers, d={c.n_embd}), "
          f"{model.flops_per_token(block_size) / 1e6:.1f} MFLOPs per token"
          + ("" if peak else "; MFU not shown: the device's peak is unknown (set --peak_tflops)"))

log_path = os.path.join(out_dir, 'log.jsonl')


def agree(ok):
    """Every rank goes on only if rank 0 could (it said why in one line): no rank waits for a collective that will
    never come."""
    if ddp:
        flag = torch.tensor([float(ok)], device=device)
        dist.broadcast(flag, 0)
        ok = flag.item() == 1
    if not ok:
        if ddp:
            dist.destroy_process_group()
        sys.exit(2)


ok = True
if master:      # one run per out_dir, writable, with room for a checkpoint
    try:
        claim_folder(out_dir, checkpoint_bytes(model.parameters()))
        start_run_folder(out_dir, held, iter_num if init_from == 'resume' else None)
    except SystemExit:
        ok = False
agree(ok)
wandb_id = checkpoint.get('wandb_id') if init_from == 'resume' else None
if wandb_log and master:          # a resume continues the same wandb run
    wandb_id = wandb.init(project=wandb_project, name=wandb_run_name, config=config, id=wandb_id, resume='allow').id


def log(record):
    """Append to log.jsonl (and send wandb the same numbers, each layer's sparsity as its own); False (said in one
    line) when it cannot be written."""
    if wandb_log:
        flat = {k: v for k, v in record.items() if k != 'sparsity'}
        for l, layer in enumerate(record.get('sparsity', [])):
            flat.update({f'layer{l}/{k}': v for k, v in layer.items()})
        wandb.log(flat, step=record['iter'])
    try:
        with open(log_path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        return True
    except OSError as e:
        print(f"error: cannot write {log_path} ({e.strerror}); the last checkpoint is intact", file=sys.stderr)
        return False


def gather_state():
    """Each rank's torch (and CUDA) generator state, for the checkpoint (a collective: every rank calls it)."""
    mine = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device_type == 'cuda' else None)
    every = [mine]
    if ddp:
        every = [None] * world_size
        dist.all_gather_object(every, mine)
    return every


def save_checkpoint(states):
    """Plain types and tensors only (loadable with weights_only=True); written to a temporary file and renamed, so a
    kill mid-write never leaves a broken ckpt.pt. False (said in one line) when it could not be written."""
    np_state = np.random.get_state()
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'model_args': model_args,
             'iter_num': iter_num, 'best_val_loss': best_val_loss, 'config': config, 'pretrained': pretrained,
             'wandb_id': wandb_id,
             'rng': {'sampler': sampler.bit_generator.state, 'torch': [t for t, _ in states],
                     'cuda': [c for _, c in states], 'numpy': [np_state[0], np_state[1].tolist(), *np_state[2:]]}}
    error = write_safely(ckpt_path, lambda tmp: torch.save(state, tmp))
    if error:
        print(f"error: {error}; free some space and resume with --init_from=resume", file=sys.stderr)
    else:
        print(f"saved {ckpt_path}")
    return not error


def stop_on_nonfinite(what, value):
    if not math.isfinite(value):
        if master:
            saved = (f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else
                     "no checkpoint was saved")
            also = "" if dtype == 'float32' else " or dtype='float32'"
            print(f"error: {what} is {value} at iter {iter_num}; stopping ({saved}). "
                  f"Try a lower learning_rate, a longer warmup_iters{also}.", file=sys.stderr)
        if ddp:
            dist.destroy_process_group()
        sys.exit(1)


# training loop: iteration iter_num evaluates (and checkpoints) the model after iter_num updates, then steps
if master and decay_lr and max_iters < lr_decay_iters:
    print(f"warning: max_iters={max_iters} < lr_decay_iters={lr_decay_iters}: the learning rate ends at "
          f"{get_lr(max_iters):.2e}, not min_lr={min_lr:g}; pass --lr_decay_iters={max_iters} to decay it within "
          f"this run",
          file=sys.stderr)
start_iter, t0, timed_iters = iter_num, time.time(), 0
run_start, last_eval = t0, None
eval_seconds = 0.0                   # the last evaluation's time, for the ETA
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr
    resumed_here = iter_num == start_iter and init_from == 'resume'      # its eval is in the log already
    if (iter_num % eval_interval == 0 or iter_num == max_iters) and not resumed_here:
        t_eval = time.time()
        losses = estimate_loss()
        eval_seconds, last_eval = time.time() - t_eval, losses
        stop_on_nonfinite('validation loss', losses['val'])
        save = iter_num > 0 and (losses['val'] < best_val_loss or always_save_checkpoint)
        best_val_loss = min(best_val_loss, losses['val'])
        gathered = gather_state() if save else None   # every rank's, so that each resumes with its own
        ok = True
        if master:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
                  f"(eval {eval_seconds:.1f} s)")
            if 'sparsity' in losses:
                sp = losses['sparsity']
                print(f"  neurons per layer: zero fraction {', '.join(str(v['zero_fraction']) for v in sp)}; "
                      f"L0 {', '.join(str(v['l0']) for v in sp)}; dead {', '.join(str(v['dead']) for v in sp)}")
            ok = log({'iter': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val'],
                      **{k: v for k, v in losses.items() if k not in ('train', 'val')}})
            ok = ok and (not save or save_checkpoint(gathered))
        agree(ok)                         # a failed write stops every rank
        t0, timed_iters = time.time(), 0  # leave evaluation out of the step timing
    if iter_num >= max_iters:
        break

    step_loss = torch.zeros((), device=device)
    for micro_step, (x, y) in enumerate(train_batches()):
        last = micro_step == local_accum - 1  # all-reduce gradients on the last micro-step only
        with (runner.no_sync() if ddp and not last else nullcontext()), autocast:
            _, loss = runner(x, y)
            loss = loss / local_accum  # DDP then averages over ranks: the gradient of the global batch's mean
        step_loss += loss.detach()
        scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    timed_iters += 1

    if iter_num % log_interval == 0:
        if ddp:
            dist.all_reduce(step_loss)
        lossf = step_loss.item() / world_size
        stop_on_nonfinite('training loss', lossf)
        t1 = time.time()
        dt, t0, timed_iters = (t1 - t0) / timed_iters, t1, 0
        ok = True
        if master:
            mfu = f", mfu {flops_per_iter / dt / peak * 100:.1f}%" if peak else ""
            # evaluations still to run, the one at this very iteration included (it runs after this line)
            evals_left = max_iters // eval_interval - (iter_num - 1) // eval_interval + (max_iters % eval_interval > 0)
            eta = (max_iters - iter_num) * dt + evals_left * eval_seconds
            left = f"{eta / 3600:.1f} h" if eta >= 3600 else f"{eta / 60:.1f} min"
            print(f"iter {iter_num}/{max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                  f"{tokens_per_iter / dt:,.0f} tok/s{mfu}, {left} to go")
            ok = log({'iter': iter_num, 'loss': lossf, 'lr': lr, 'ms_per_iter': dt * 1000,
                      'tokens_per_s': tokens_per_iter / dt})
        agree(ok)

if master:      # what the run did, and what to do with it
    done = iter_num - start_iter
    print(f"done in {(time.time() - run_start) / 60:.1f} min: {done:,} iterations, {done * tokens_per_iter:,} tokens"
          + (f"; val loss {last_eval['val']:.4f}, best {best_val_loss:.4f}" if last_eval else ""))
    if last_eval and 'sparsity' in last_eval:
        print("  the neurons' zero fraction per layer: "
              + ', '.join(f"{v['zero_fraction']:.2f}" for v in last_eval['sparsity']))
    print(f"next: python sample.py --ckpt={out_dir} --start='Once upon a time'\n"
          f"      python interpret.py --ckpt={out_dir} --data={data_path} --simulator=tokens --neurons=random:64")

if ddp:
    dist.barrier()                  # rank 0 may still be writing the last checkpoint: tear down together
    runner = None                    # DDP's reducer holds gloo work: release it before its process group
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    if master:
        release_folder(out_dir)     # os._exit runs no atexit handlers
    os._exit(0)                     # gloo threads freeing tensors during interpreter shutdown can abort (SIGABRT)
