"""
The benchmarks: each prints its figures (README, "Performance", has what was measured and on which machine).

    python bench.py --what=train --n_layer=2 --n_head=4 --n_embd=128 --batch_size=8 --block_size=256
    python bench.py --what=record --ckpt=out-crate-1l --data=data/shared --n_openai=800 --n_anthropic=800

train: trains each model of --models for `steps` optimizer steps a round on random tokens, the models alternating
for `rounds` rounds after a warm-up (and compilation) round, and prints tokens/s, ms/step, the model's training
FLOPs per token, MFU where the device's peak is known, the activation memory one step keeps for the backward pass,
and on CUDA the peak allocated memory.
record: interpret.py's recording of every protocol against a plain forward pass over the same tokens, alternating for
`rounds` rounds; each round's ratio and the median (the machine's speed drifts, so a round compares neighbours in
time), and the memory: the recording's state and its records by their arrays, and the process's peak RSS.
"""

import resource
import sys
import time

import numpy as np
import torch

from configurator import configure, fail, mixed_precision, peak_flops, pick_device, script_defaults
from model import ModelConfig, Transformer

# -----------------------------------------------------------------------------------------------------------
what = 'train'               # 'train' or 'record'
rounds = 3
device = 'auto'
dtype = 'float32'            # 'float32' or 'bfloat16' (autocast)
batch_size = 8               # sequences per step (train) or per forward pass (record)
seed = 1337
# train: the models, named, at one size
models = 'crate,gpt2'        # some of crate, gpt2
steps = 10                   # timed optimizer steps per model per round
n_layer = 2
n_head = 4
n_embd = 128
block_size = 256
vocab_size = 50304
overcomplete = 4
ista_steps = 2
ista_checkpoint = False
learning_rate = 6e-4
compile = False
peak_tflops = 0.0            # for MFU where the device's peak is unknown (a CPU)
# record: a checkpoint and interpret.py's settings
ckpt = 'out'
data = 'data/pile'
protocol = 'all'
layers = 'all'
neurons = 'all'
n_openai = 800
n_anthropic = 800
seq_len = 0                  # 0: the model's block_size
# -----------------------------------------------------------------------------------------------------------
OPTIONS = script_defaults(globals())
KINDS = {'crate': dict(attn='mssa', ffn='ista', bias=True), 'gpt2': dict(attn='mha', ffn='mlp', bias=False)}


def seconds(fn, dev):
    """Wall time of fn(), the device's queued work included."""
    sync = torch.cuda.synchronize if dev.startswith('cuda') else (lambda: None)
    sync()
    t0 = time.time()
    fn()
    sync()
    return time.time() - t0


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10     # Linux reports KiB


def activation_bytes(model, x, y, autocast):
    """Bytes of the tensors one forward pass keeps for the backward pass (each storage counted once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        _, loss = model(x, y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) - sum(p.untyped_storage().nbytes() for p in model.parameters())


def bench_train(dev, autocast):
    names = models.split(',')
    for name in names:
        if name not in KINDS:
            fail(f"--models: unknown model {name!r}; name some of {', '.join(KINDS)}")
    size = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size,
                overcomplete=overcomplete, ista_steps=ista_steps, ista_checkpoint=ista_checkpoint)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, block_size + 1), generator=g)
    x, y = ids[:, :-1].contiguous().to(dev), ids[:, 1:].contiguous().to(dev)
    runs = {}
    for name in names:
        torch.manual_seed(seed)
        try:
            m = Transformer(ModelConfig(**size, **KINDS[name])).to(dev)
        except ValueError as e:
            fail(str(e))
        runs[name] = {'model': m, 'step': torch.compile(m) if compile else m, 'times': [], 'peak': None,
                      'opt': m.configure_optimizers(0.1, learning_rate, (0.9, 0.95), dev.split(':')[0]),
                      'act': activation_bytes(m, x, y, autocast)}

    def train(r, n):
        for _ in range(n):
            with autocast:
                _, loss = r['step'](x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(r['model'].parameters(), 1.0)
            r['opt'].step()
            r['opt'].zero_grad(set_to_none=True)
    for r in runs.values():
        train(r, 2)                                   # warm-up and compilation
    for _ in range(rounds):
        for r in runs.values():
            if dev.startswith('cuda'):
                torch.cuda.reset_peak_memory_stats(dev)
            r['times'].append(seconds(lambda: train(r, steps), dev) / steps)
            if dev.startswith('cuda'):
                r['peak'] = torch.cuda.max_memory_allocated(dev)
    peak = peak_flops(dev, dtype, peak_tflops)
    tokens = batch_size * block_size
    print(f"training on {dev} ({dtype}{', compiled' if compile else ''}): {n_layer} layers, d={n_embd}, "
          f"batch {batch_size} x {block_size}, {rounds} rounds x {steps} steps, median step")
    for name, r in runs.items():
        dt = float(np.median(r['times']))
        fpt = r['model'].flops_per_token(block_size)
        mfu = f"{fpt * tokens / dt / peak * 100:5.1f}%" if peak else "  n/a"
        mem = f", peak memory {r['peak'] / 2**20:,.0f} MiB" if r['peak'] is not None else ""
        r['per_token'] = dt / tokens
        print(f"{name:6s} {r['model'].get_num_params() / 1e6:7.2f}M params  {tokens / dt:12,.0f} tok/s  "
              f"{dt * 1000:9.1f} ms/step  {fpt / 1e6:9.1f} MFLOPs/token  MFU {mfu}  "
              f"activations {r['act'] / 2**20:,.1f} MiB{mem}")
    if 'crate' in runs and 'gpt2' in runs:
        c, gp = runs['crate'], runs['gpt2']
        t_ratio = c['per_token'] / gp['per_token']
        f_ratio = c['model'].flops_per_token(block_size) / gp['model'].flops_per_token(block_size)
        print(f"crate/gpt2: time per token {t_ratio:.3f}, FLOPs per token {f_ratio:.3f} "
              f"(time over FLOPs {t_ratio / f_ratio:.3f}), activation memory {c['act'] / gp['act']:.2f}")


def record_bytes(sizes, T, cols, batch):
    """(what the recording holds while it runs, the records it returns), in bytes, by the arrays record() makes: per
    neuron and protocol the top-k's keys and excerpts, the random (and for Anthropic the pool's) positions and
    excerpts, the Anthropic pool's sorted values, their order and rank counts, and three batches of activations;
    then positions, window positions and excerpt activations per record item. Neither depends on the number of
    sequences."""
    from interpret import BAND_ITEMS, BANDS, POOL, RAND, TOP, WINDOW
    n = sum(len(c) for c in cols.values())
    state = records = 0
    for p, m in sizes.items():
        k, r, w = min(TOP, m * T), min(RAND + (POOL if p == 'anthropic' else 0), m * T), sum(WINDOW[p])
        state += k * (8 + w * 4) + r * (8 + w * 4) + ((4 + 8 + 2 * 8) * (r - RAND) if p == 'anthropic' else 0)
        records += (k + RAND + (BANDS * BAND_ITEMS if p == 'anthropic' else 0)) * (8 + w * (8 + 4))
    return n * state + 3 * batch * T * n * 4, n * records


def bench_record(dev, autocast):
    from interpret import InterpretError, record, setup
    try:
        model, stream, sizes, layer_ids, cols = setup(ckpt, data, seq_len, layers, neurons, protocol, n_openai,
                                                      n_anthropic, seed, dev)
    except InterpretError as e:
        fail(str(e))
    T = stream.shape[1]
    seqs = stream[:max(sizes.values())]

    def forward():
        for i in range(0, len(seqs), batch_size):
            with torch.no_grad(), autocast:
                model(torch.from_numpy(seqs[i:i + batch_size]).to(dev))
    forward()                                         # warm-up
    rss0 = peak_rss_mib()
    print(f"recording {', '.join(f'{p} {m} x {T}' for p, m in sizes.items())} tokens, batch_size={batch_size}, "
          f"{sum(map(len, cols.values()))} neurons in {len(layer_ids)} layer(s), device {dev}; "
          f"forward = one plain pass over {len(seqs)} x {T} tokens")
    ratios = []
    for r in range(rounds):
        tf = seconds(forward, dev)
        tr = seconds(lambda: record(model, stream, sizes, layer_ids, cols, dev, autocast, batch_size, seed), dev)
        ratios.append(tr / tf)
        print(f"round {r + 1}: forward {tf:.3g} s ({seqs.size / tf:,.0f} tok/s), recording {tr:.3g} s = "
              f"{tr / tf:.2f}x forward")
    print(f"recording over forward: {sorted(ratios)[len(ratios) // 2]:.2f}x time (median of {rounds} rounds)")
    state, records = record_bytes(sizes, T, cols, batch_size)
    mem = f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB" if dev.startswith('cuda') else ""
    print(f"memory: recording state {state:,} bytes ({state / 2**20:,.1f} MiB) and records {records:,} bytes "
          f"({records / 2**20:,.1f} MiB), by their arrays, independent of N; process peak RSS {rss0:,.0f} MiB after "
          f"the plain forward, {peak_rss_mib():,.0f} MiB after the recording{mem}")


if __name__ == '__main__':
    globals().update(configure(OPTIONS, sys.argv[1:]))
    for k in ('rounds', 'steps', 'batch_size', 'n_openai', 'n_anthropic'):
        if globals()[k] < 1:
            fail(f"--{k}={globals()[k]} must be at least 1")
    if what not in ('train', 'record') or dtype not in ('float32', 'bfloat16'):
        fail(f"--what must be 'train' or 'record' and --dtype 'float32' or 'bfloat16'; got {what!r} and {dtype!r}")
    try:
        dev = pick_device(device)
    except ValueError as e:
        fail(str(e))
    (bench_train if what == 'train' else bench_record)(dev, mixed_precision(dev, dtype))
