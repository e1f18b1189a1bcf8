"""
How interpretable are a model's neurons? The automated explain -> simulate -> score loop.

    python interpret.py --ckpt=out-crate-1l --data=data/pile --layers=all --neurons=random:200 --protocol=all
    python interpret.py --compare out-crate-1l/interp out-gpt2-1l/interp

1. Record: run the model over the first N block_size sequences of val.bin (one flattened token stream) and keep,
   for each selected neuron, the excerpts of each protocol with its activation on every token.
2. Explain each neuron from its explanation set, simulate its activations on the scoring set from that
   explanation, and score the simulation: the Pearson correlation with the true activations, pooled over tokens.
3. Report: neurons.jsonl, summary.json, summary.md and report.html in <out> (written by report.py).

Protocols (record indices within a neuron's excerpts):
    OpenAI (N = 8000, 64-token excerpts [pos-32, pos+32)): 50 top positions, then 50 uniformly random ones.
        explanation: top 0, 2, 4, 6, 8
        top_and_random scoring: top 1, 3, 5, 7, 9 + random 0, 2, 4, 6, 8;  random_only: random 0, 2, 4, 6, 8
    Anthropic (N = 800, 8-token excerpts [pos-4, pos+4)): top 50, random 50, then 20 random positions from each of
        the 11 equal-count bands below the top twelfth of the ranked N*T positions.
        explanation: top 0-14, items 0-1 of each band, random 0-4
        scoring: top 15-24, items 2-3 of each band, random 5-9, and top 25-34 cut to 3 tokens (out of context)

--simulator=tokens is a token-lookup baseline that needs no LLM: its "explanation" is the mean 0-10 activation of
each token id in the explanation set, and it predicts that value for each token (0 if unseen). It is labelled as
such in every report; it is not the paper's LLM metric.
"""

import asyncio
import hashlib
import json
import math
import os
import re
import signal
import sys

import numpy as np
import torch
from tqdm import tqdm

from configurator import configure, fail, mixed_precision, pick_device, script_defaults
from model import load_model, model_name
from prepare import PrepareError, gpt2_tokenizer
from report import compare, markdown, summarize, write_report

# -----------------------------------------------------------------------------------------------------------
ckpt = 'out'                 # checkpoint file or directory (ours or a released CRATE checkpoint)
data = 'data/pile'           # folder holding val.bin (prepare.py)
out = ''                     # default: <checkpoint folder>/interp
layers = 'all'               # 'all' or a comma list, e.g. '0,2'
neurons = 'all'              # 'all', a list ('41' or '5,41,300'), or 'random:200' (a seeded sample per layer)
protocol = 'all'             # 'openai', 'anthropic' or 'all'
n_openai = 8000              # sequences for the OpenAI protocol (the paper's N)
n_anthropic = 800            # sequences for the Anthropic protocol (a prefix of the same stream)
seq_len = 0                  # 0: the model's block_size
batch_size = 8               # sequences per forward pass
seed = 0
simulator = 'chat'           # 'chat', 'all-at-once' (the paper's, prompt logprobs) or 'tokens' (offline baseline)
explainer_model = ''         # e.g. mistralai/Mistral-7B-Instruct-v0.2
simulator_model = ''         # default: the explainer model; the paper used meta-llama/Llama-2-7b-hf
base_url = ''                # an OpenAI-compatible server, default $OPENAI_BASE_URL
simulator_base_url = ''      # when the simulator lives on another server
api_key = ''                 # default $OPENAI_API_KEY; any string for a local server
explainer_temperature = 1.0  # the paper's (OpenAI's explainer default)
explainer_max_tokens = 60    # the paper's
simulator_top_logprobs = 5   # all-at-once: alternatives per position (the paper: 5)
concurrency = 16             # requests in flight
max_retries = 3              # the client's retries of 408/429/5xx
timeout = 120.0              # seconds per request
bad_answer_retries = 2       # an empty explanation or a malformed simulation is asked again this often
max_no_digit = 0.1           # all-at-once: a neuron whose slots had no 0-10 digit among their top-k this often fails
resume = True                # keep the neurons a killed run finished
dry_run = False              # print how many requests and tokens a run would use, and stop
device = 'auto'
dtype = 'float32'            # 'float32' or 'bfloat16' (recording)
# -----------------------------------------------------------------------------------------------------------

TOP, RAND, BANDS, BAND_ITEMS = 50, 50, 11, 20
WINDOW = {'openai': (32, 32), 'anthropic': (4, 4)}   # tokens before pos, from pos on
PEAK_RUN = 32                # OpenAI recording: a neuron's maximum over runs of up to this many positions
EVEN = [0, 2, 4, 6, 8]
SETS = {  # scoring method -> (protocol, explanation records, scoring records); 'ooc:i' = record i cut to 3 tokens
    'top_and_random': ('openai', EVEN, [1, 3, 5, 7, 9] + [TOP + i for i in EVEN]),
    'random_only': ('openai', EVEN, [TOP + i for i in EVEN]),
    'anthropic': ('anthropic',
                  list(range(15)) + [TOP + RAND + BAND_ITEMS * b + i for b in range(BANDS) for i in (0, 1)]
                  + [TOP + i for i in range(5)],
                  list(range(15, 25)) + [TOP + RAND + BAND_ITEMS * b + i for b in range(BANDS) for i in (2, 3)]
                  + [TOP + i for i in range(5, 10)] + [f'ooc:{i}' for i in range(25, 35)]),
}
METHODS = {'openai': ['top_and_random', 'random_only'], 'anthropic': ['anthropic']}


class InterpretError(Exception):
    pass


# --- what to interpret ---------------------------------------------------------------------------------------------

def numbers(text):
    """'5,41,300' (or '41') -> [5, 41, 300]; anything else is the user's mistake, said in one line."""
    try:
        return sorted({int(x) for x in text.split(',') if x.strip()}) or None
    except ValueError:
        return None


def pick_neurons(cfg, layers, neurons, seed):
    """The layers and, per layer, the neurons to interpret, from --layers and --neurons."""
    layer_ids = list(range(cfg.n_layer)) if layers == 'all' else numbers(str(layers))
    if not layer_ids or not all(0 <= l < cfg.n_layer for l in layer_ids):
        raise InterpretError(f"--layers={layers}: give 'all' or layer numbers 0..{cfg.n_layer - 1} separated by commas")
    h, spec = cfg.hidden, str(neurons)
    if spec == 'all':
        return layer_ids, {l: list(range(h)) for l in layer_ids}
    if spec.startswith('random:'):
        k = numbers(spec[7:])
        if not k or len(k) > 1 or not 0 < k[0] <= h:
            raise InterpretError(f"--neurons={spec}: write random:K with K from 1 to {h}, e.g. random:200")
        return layer_ids, {l: sorted(np.random.default_rng([seed, 3, l]).choice(h, k[0], replace=False).tolist())
                           for l in layer_ids}
    chosen = numbers(spec)
    if not chosen or not all(0 <= j < h for j in chosen):
        raise InterpretError(f"--neurons={spec}: give 'all', neuron numbers 0..{h - 1} separated by commas (e.g. 41 "
                             f"or 5,41,300), or random:K for K random neurons per layer")
    return layer_ids, {l: chosen for l in layer_ids}


def setup(ckpt, data, seq_len, layers, neurons, protocol, n_openai, n_anthropic, seed, dev):
    """Load the model and the validation sequences, and pick the neurons: what the recording pass needs.
    Returns (model, stream, sizes, layer_ids, cols), sizes = {protocol: sequences it uses}."""
    try:
        model = load_model(ckpt, dev)
    except (FileNotFoundError, ValueError) as e:
        raise InterpretError(str(e))
    cfg = model.config
    T = seq_len or cfg.block_size
    if T > cfg.block_size:
        raise InterpretError(f"seq_len={T} is longer than the model's block_size={cfg.block_size}")
    layer_ids, cols = pick_neurons(cfg, layers, neurons, seed)
    wanted = {p: n for p, n in (('openai', n_openai), ('anthropic', n_anthropic)) if protocol in (p, 'all')}
    stream = read_stream(data, max(wanted.values()), T)
    sizes = {p: min(n, len(stream)) for p, n in wanted.items()}
    short = [f"--n_{p}={n}" for p, n in wanted.items() if sizes[p] < n]
    if short:
        print(f"note: {data}/val.bin holds {len(stream)} sequences of {T} tokens, so {' and '.join(short)} use(s) "
              f"{len(stream)}; the summary records the number used", file=sys.stderr)
    vocab = getattr(model, "base", model).config.vocab_size
    if stream.max() >= vocab:
        raise InterpretError(f"{data}/val.bin holds token id {stream.max()} but the model's vocabulary is "
                             f"{vocab}: the data was not tokenized for this model")
    return model, stream, sizes, layer_ids, cols


# --- 1. record: one forward pass, every protocol, layer and neuron at once -----------------------------------------

def read_stream(data_dir, n_seq, T):
    """The first n_seq non-overlapping length-T sequences of val.bin, (n, T) int64."""
    path = os.path.join(data_dir, 'val.bin')
    if not os.path.exists(path):
        raise InterpretError(f"{path} not found: make it with `python prepare.py` (or --files) and pass --data=FOLDER")
    val = np.memmap(path, dtype=np.uint16, mode='r')
    n = min(n_seq, len(val) // T)
    if n == 0:
        raise InterpretError(f"{path} holds {len(val)} tokens, less than one sequence of {T}; lower --seq_len")
    return np.asarray(val[:n * T], dtype=np.int64).reshape(n, T)


def forward_neurons(model, seqs, device, autocast, batch_size):
    """Yield (first sequence index, [per-layer neurons (B, T, h)]) over seqs in batches."""
    for i in range(0, len(seqs), batch_size):
        x = torch.from_numpy(seqs[i:i + batch_size]).to(device)
        with torch.no_grad(), autocast:
            _, _, acts = model(x, return_neurons=True)
        yield i, acts


def window_positions(pos, protocol, P):
    """(..., w) stream positions of the excerpts around pos, -1 where clipped at the stream's ends."""
    before, after = WINDOW[protocol]
    w = pos[..., None] + np.arange(-before, after)
    return np.where((w >= 0) & (w < P), w, -1)


def random_positions(P, k, seed, *key):
    """k distinct uniform positions, seeded by (seed, *key) so that every neuron has its own."""
    return np.random.default_rng([seed, *key]).choice(P, size=k, replace=False)


def top_and_random(P, T, layer_ids, cols, dev, protocol, seed, key, n_random=RAND):
    """A recorder of one protocol's top-k and random excerpts over a stream of P positions, fed batch by batch:
    add(first position, {layer: (positions, neurons) activations of the selected neurons}), then finish() -> records.
    Memory does not grow with P: per neuron a running top-k on the device with each entry's excerpt, plus the
    excerpts of its random positions. A batch is merged once the next one has arrived, so that excerpts crossing
    into a neighbouring batch can be read."""
    before, after = WINDOW[protocol]
    k = min(TOP, P)
    offsets = torch.arange(-before, after, device=dev)
    G = math.gcd(T, PEAK_RUN)   # positions a peak covers: it divides every batch
    state = {}
    for l in layer_ids:
        n = len(cols[l])
        rand = np.stack([random_positions(P, min(n_random, P), seed, key, l, j) for j in cols[l]])
        by_pos = np.argsort(rand, axis=None, kind='stable')    # random entries in stream order, sliced per batch
        state[l] = {'vals': torch.full((k, n), -float('inf'), device=dev),
                    'pos': torch.zeros((k, n), dtype=torch.long, device=dev),
                    'rand': torch.as_tensor(rand, device=dev),
                    'rand_sorted': rand.reshape(-1)[by_pos], 'rand_order': torch.as_tensor(by_pos, device=dev),
                    'win': torch.full((k + rand.shape[1], n, len(offsets)), float('nan'), device=dev),  # top, random
                    'neuron': torch.arange(n, device=dev)}
    recent = []   # (first position, {layer: (positions, neurons)}): the last two batches and the end of the one before
    waiting = None   # the last batch added, merged once the next one is

    def windows(l, ts, a, pos, neuron):
        """Activations of `neuron` on the excerpt around each position of the batch a (first position ts). Most
        excerpts lie inside it and take one gather; those that cross into a neighbour are read from `recent` (the
        previous batch's end, this batch, the next), NaN beyond the stream's ends."""
        p, W = pos - ts, before + after
        if len(a) >= W:   # a strided view of every excerpt of the batch, (positions, neurons, W): no index arithmetic
            vals = a.unfold(0, W, 1)[(p - before).clamp(0, len(a) - W), neuron]
            cross = torch.nonzero((p < before) | (p + after > len(a))).squeeze(1)
        else:             # a short last batch: every excerpt crosses
            vals, cross = torch.empty((len(p), W), device=dev), torch.arange(len(p), device=dev)
        if len(cross):
            wp, nc = pos[cross, None] + offsets, neuron[cross, None]
            v = torch.full(wp.shape, float('nan'), device=dev)
            for start, acts in recent:
                b = acts[l]
                i = wp - start
                v = torch.where((i >= 0) & (i < len(b)), b[i.clamp(0, len(b) - 1), nc], v)
            vals[cross] = v
        return vals

    def replacements(st, a, peaks, ts):
        """(slot, neuron, value, position) of the entries of batch a (first position ts) that enter the top-k.
        Contenders are values above their neuron's k-th best. The maxima of runs of G positions (peaks) find the
        (run, neuron) pairs that hold any, so only those runs are compared, not all B*T*h activations."""
        kth = st['vals'].min(0).values
        c, s = torch.nonzero((peaks > kth).T, as_tuple=True)                      # pairs in neuron order
        pair_acts = a.view(-1, G, a.shape[1])[s, :, c]                             # (pairs, G)
        p, t = torch.nonzero(pair_acts > kth[c, None], as_tuple=True)
        r, c, v = s[p] * G + t, c[p], pair_acts[p, t]                              # by neuron, then position
        if not len(r):
            return r, c, v, r                                                      # none (all empty)
        # pack each neuron's contenders into a column of a small dense block: (most per neuron, neurons)
        counts = torch.bincount(c, minlength=a.shape[1])
        cand = torch.nonzero(counts).squeeze(1)
        col = torch.cumsum(counts > 0, 0)[c] - 1
        row = torch.arange(len(c), device=dev) - (torch.cumsum(counts, 0) - counts)[c]
        block = torch.full((int(counts.max()), len(cand)), -float('inf'), device=dev)
        block_pos = torch.zeros(block.shape, dtype=torch.long, device=dev)
        block[row, col], block_pos[row, col] = v, ts + r
        # c contenders can push out only the c lowest old entries: rank those m against the block and keep m
        m = min(len(block), k)
        low, low_slot = torch.topk(st['vals'][:, cand], m, dim=0, largest=False, sorted=False)
        vals, idx = torch.sort(torch.cat([low, block]), dim=0, descending=True, stable=True)  # ties: old stays
        c, r = torch.nonzero((idx[:m] >= m).T, as_tuple=True)                 # new entries that stay
        oc, orow = torch.nonzero((idx[m:] < m).T, as_tuple=True)              # old ones pushed out, as many
        return low_slot[idx[m + orow, oc], oc], cand[c], vals[r, c], block_pos[idx[r, c] - m, c]  # freed slots

    def merge(ts, acts, peaks):
        """Merge a batch into each neuron's top-k. The top-k lives in k slots per neuron (unordered); a new entry
        takes the slot of one it pushed out, so only new entries' excerpts are read; after the first batches
        they are few. The excerpts of the random positions in the batch are read with them."""
        for l, st in state.items():
            a = acts[l]
            if ts == 0:   # the first batch: every value would contend, so its own top-k fills the slots
                top, rows = torch.topk(a, min(k, len(a)), dim=0)
                grid = torch.meshgrid(torch.arange(len(top), device=dev), st['neuron'], indexing='ij')
                slot, neuron, vals, pos = grid[0].reshape(-1), grid[1].reshape(-1), top.reshape(-1), rows.reshape(-1)
            else:
                slot, neuron, vals, pos = replacements(st, a, peaks[l], ts)
            st['vals'][slot, neuron], st['pos'][slot, neuron] = vals, pos
            lo, hi = np.searchsorted(st['rand_sorted'], [ts, ts + a.shape[0]])   # random positions in this batch
            ri, nr = st['rand_order'][lo:hi], st['rand'].shape[1]              # flat indices into (neurons, RAND)
            slot, neuron = torch.cat([slot, k + ri % nr]), torch.cat([neuron, ri // nr])
            pos = torch.cat([pos, st['rand'].view(-1)[ri]])
            if len(pos):
                st['win'][slot, neuron] = windows(l, ts, a, pos, neuron)

    def add(ts, sel):
        nonlocal recent, waiting
        peaks = {l: a.view(-1, G, a.shape[1]).amax(1) for l, a in sel.items()}   # maxima of runs of G positions
        recent = recent[-2:] + [(ts, sel)]
        if waiting:
            merge(*waiting)          # the batch before this one: both its neighbours are at hand
            t0, done, _ = waiting    # later excerpts reach back into its last `before` positions only
            recent[-2] = (t0 + len(done[layer_ids[0]]) - before, {l: a[-before:].clone() for l, a in done.items()})
        waiting = (ts, sel, peaks)

    def finish():
        merge(*waiting)
        records = {}
        for l, st in state.items():
            order = torch.argsort(st['vals'], dim=0, descending=True, stable=True)     # slots in rank order
            neuron = st['neuron'][None, :].expand_as(order)
            pos = torch.cat([st['pos'][order, neuron].T, st['rand']], 1).cpu().numpy()
            records[l] = {'pos': pos,
                          'acts': torch.cat([st['win'][order, neuron], st['win'][k:]]).transpose(0, 1).cpu().numpy(),
                          'alive': (st['vals'].max(0).values > 0).cpu()}               # a neuron's best value says it
        return records
    return add, finish


# Anthropic's rank bands need each neuron's quantiles. Values are binned, order-preserving, by their float32 bits:
# exact zero alone in the middle bin, and each binade of magnitudes in [2^MAG_LO, 2^MAG_HI) split in 2^QUANT_BITS
# bins (relative width 2^-4 = 6.25%), smaller and larger magnitudes in one end bin per sign. Positions in one bin are
# ranked as ties, in a seeded random order. So the bands are exact for the binned values: an item of band b has a
# value within one bin of the band's value range. Ties at zero, the common case, are exact.
QUANT_BITS, MAG_LO, MAG_HI = 4, -20, 12
MAG_BINS = ((MAG_HI - MAG_LO) << QUANT_BITS) + 2          # per sign, the two end bins included
NBINS = 2 * MAG_BINS + 1


# The band items are drawn from a pool of POOL uniformly random positions per neuron, recorded with their excerpts in
# the same pass: each lands in a band with probability 1/12, so a band holds 75 of them on average, and fewer than
# BAND_ITEMS with probability 1.9e-15 (binomial, 900, 1/12). A band's items, drawn uniformly from the pool positions
# in it, are a uniform sample of the band.
POOL = 900


def value_bins(a):
    """float32 values -> int32 bins in [0, NBINS), monotone in the value; bin MAG_BINS is exactly zero (either sign)."""
    bits = a.view(torch.int32)
    mag = ((bits & 0x7FFFFFFF) >> (23 - QUANT_BITS)) - ((127 + MAG_LO) << QUANT_BITS) + 1   # 1 = the binade 2^MAG_LO
    return MAG_BINS + torch.sign(a).int() * (mag.clamp_(0, MAG_BINS - 1) + 1)


def count_bins(counts, a, chunk=128):
    """counts (n * NBINS) += how often each neuron's values in a (positions, n) fell in each bin. The work goes a
    chunk of neurons at a time, neuron-major, which keeps its temporaries in cache and makes the counting touch one
    neuron's counts at a time (5x faster on the 2-core CPU than counting in position-major order)."""
    at = a.T.contiguous()
    for j in range(0, len(at), chunk):
        b = value_bins(at[j:j + chunk])
        offset = NBINS * torch.arange(len(b), dtype=torch.int32, device=a.device)[:, None]
        counts[j * NBINS:(j + len(b)) * NBINS] += torch.bincount((b + offset).view(-1), minlength=len(b) * NBINS)


def band_items(hist, pool_pos, pool_vals, P, l, neurons, seed):
    """Per neuron, BANDS x BAND_ITEMS indices into its pool: BAND_ITEMS drawn uniformly from the pool positions that
    fall in each of the 11 bands below the top twelfth of its values ranked high to low (hist: (n, NBINS) counts over
    all P positions). A pool position's rank is uniform among its bin's ranks, distinct ones within a bin that
    straddles a band edge (a bin is a tie, ranked in a seeded random order)."""
    edges = np.array([P * b // 12 for b in range(13)])
    desc = hist[:, ::-1]                                       # counts from the highest bin down
    above = np.cumsum(desc, 1) - desc                          # ranks before each bin
    idx = NBINS - 1 - value_bins(torch.from_numpy(pool_vals)).numpy()
    out = np.zeros((len(neurons), BANDS * BAND_ITEMS), dtype=np.int64)
    for r, neuron in enumerate(neurons):
        rng = np.random.default_rng([seed, 1, l, neuron])
        i = idx[r]
        start, count = above[r][i], desc[r][i]
        rank = start + (rng.random(len(i)) * count).astype(np.int64)
        first, last = np.searchsorted(edges, start, 'right') - 1, np.searchsorted(edges, start + count - 1, 'right') - 1
        for b in np.unique(i[first != last]):                  # a bin across a band edge: distinct ranks
            where = np.nonzero(i == b)[0]
            rank[where] = above[r][b] + rng.choice(desc[r][b], len(where), replace=False)
        band = np.searchsorted(edges, rank, 'right') - 1
        for b in range(1, 12):
            members = np.nonzero(band == b)[0]
            if len(members) < BAND_ITEMS:
                raise InterpretError(f"layer {l} neuron {neuron}: {len(members)} of the {len(i)} pool positions fell in "
                                     f"band {b}, fewer than {BAND_ITEMS} (chance about 1e-15); run again with another --seed")
            out[r, (b - 1) * BAND_ITEMS:b * BAND_ITEMS] = rng.choice(members, BAND_ITEMS, replace=False)
    return out


def update_stats(s, a):
    """Accumulate LLM-free statistics of one layer from (positions, h) float32 activations; nonzero counts those > 0."""
    s['tokens'] = s.get('tokens', 0) + a.shape[0]
    bits = a.view(torch.int32)   # a float is > 0 exactly when its bits as an int32 are; faster than a > 0
    count = torch.int32 if bits.numel() < 2**31 else torch.int64
    s['nonzero'] = s.get('nonzero', 0) + bits.clamp(0, 1).sum(dtype=count).item()


def record(model, stream, sizes, layer_ids, cols, dev, autocast, batch_size=8, seed=0):
    """Every protocol's records, all layers and neurons at once, in one forward pass over the longest protocol's
    prefix of the stream (sizes: {protocol: sequences}), each protocol fed its own prefix: the OpenAI top and random
    excerpts; the Anthropic top and random excerpts, a pool of random excerpts for its bands, and each neuron's
    histogram of binned values, from which the bands are cut at the end. Returns the records,
    {protocol: {layer: {'pos', 'win', 'acts'}}}, and per layer the counts of every neuron's values (not only the
    selected ones): tokens, values > 0, and which neurons were ever > 0."""
    T, hidden = stream.shape[1], model.config.hidden
    if batch_size * T < max(WINDOW['openai']):
        raise InterpretError(f"batch_size x seq_len must be at least {max(WINDOW['openai'])} tokens")
    n_anth = sizes.get('anthropic', 0)
    if n_anth and n_anth * T < 12 * BAND_ITEMS:
        raise InterpretError(f"the Anthropic protocol needs at least {12 * BAND_ITEMS} tokens; raise --n_anthropic")
    recorders = {'openai': lambda n: top_and_random(n * T, T, layer_ids, cols, dev, 'openai', seed, 0),
                 'anthropic': lambda n: top_and_random(n * T, T, layer_ids, cols, dev, 'anthropic', seed, 2,
                                                       RAND + POOL)}
    recorders = {p: recorders[p](n) for p, n in sizes.items()}
    pick = {l: None if len(cols[l]) == hidden else torch.as_tensor(cols[l], device=dev) for l in layer_ids}
    hists = {l: torch.zeros(len(cols[l]) * NBINS, dtype=torch.long, device=dev) for l in layer_ids} if n_anth else {}
    n1, stats = max(sizes.values()), {l: {} for l in layer_ids}
    batches = forward_neurons(model, stream[:n1], dev, autocast, batch_size)
    for i, acts in tqdm(batches, total=math.ceil(n1 / batch_size), desc='records', unit='batch', file=sys.stderr):
        sel = {}
        for l in layer_ids:
            full = acts[l].float().reshape(-1, hidden)
            update_stats(stats[l], full)
            sel[l] = full if pick[l] is None else full[:, pick[l]]
        for p, n in sizes.items():
            if i < n:    # the batch's positions that lie in the protocol's first n sequences
                m = (min(n, i + len(acts[layer_ids[0]])) - i) * T
                recorders[p][0](i * T, {l: a[:m] for l, a in sel.items()})
                if p == 'anthropic':
                    for l, a in sel.items():
                        count_bins(hists[l], a[:m])
    records = {p: rec[1]() for p, rec in recorders.items()}
    for l in layer_ids:
        stats[l]['alive'] = records[next(iter(sizes))][l]['alive']
    if n_anth:    # the pool's excerpts become the bands' items
        before = WINDOW['anthropic'][0]
        for l in layer_ids:
            r, k = records['anthropic'][l], TOP + RAND
            pool = band_items(hists[l].view(len(cols[l]), NBINS).cpu().numpy(), r['pos'][:, k:],
                              r['acts'][:, k:, before], n_anth * T, l, cols[l], seed)
            rows = np.arange(len(cols[l]))[:, None]
            r['pos'] = np.concatenate([r['pos'][:, :k], r['pos'][:, k:][rows, pool]], 1)
            r['acts'] = np.concatenate([r['acts'][:, :k], r['acts'][:, k:][rows, pool]], 1)
    return {p: {l: {'pos': r['pos'], 'win': window_positions(r['pos'], p, sizes[p] * T), 'acts': r['acts']}
                for l, r in recs.items()} for p, recs in records.items()}, stats


def record_arrays(cols, recs, stream):
    """One layer's records as the arrays the scoring reads and records_L{layer}.npz keeps: per protocol the positions,
    the excerpts' token ids (-1 beyond the stream) and their activations."""
    arrays, flat = {'neurons': np.asarray(cols)}, stream.reshape(-1)
    for p, r in recs.items():
        arrays[f'{p}_pos'] = r['pos']
        arrays[f'{p}_tokens'] = np.where(r['win'] >= 0, flat[np.maximum(r['win'], 0)], -1).astype(np.int32)
        arrays[f'{p}_acts'] = r['acts']
    return arrays


def save_records(folder, l, arrays):
    tmp = os.path.join(folder, f'records_L{l}.tmp.npz')
    np.savez(tmp, **arrays)
    os.replace(tmp, os.path.join(folder, f'records_L{l}.npz'))


# --- 2. explain and simulate: a neuron's excerpts, the token-lookup baseline, and the LLM roles --------------------

def excerpts(rec, protocol, items, n):
    """[(token ids, activations)] of neuron row n for record items (ints, or 'ooc:i' for the 3 tokens around
    the peak of record i), padding removed."""
    toks, acts = rec[f'{protocol}_tokens'][n], rec[f'{protocol}_acts'][n]
    peak = WINDOW[protocol][0]
    out = []
    for it in items:
        if isinstance(it, str):
            i = int(it.split(':')[1])
            t, a = toks[i, peak - 1:peak + 2], acts[i, peak - 1:peak + 2]
        else:
            t, a = toks[it], acts[it]
        keep = t >= 0
        out.append((t[keep].tolist(), a[keep].astype(np.float64)))
    return out


def quantize(a, m):
    """Activations as the explainer and simulator see them: integers 0-10, floor(10 * max(a, 0) / m)."""
    return np.floor(10 * np.maximum(a, 0) / m).astype(np.int64).clip(0, 10)


class TokenTable(dict):
    """A token-lookup explanation, {token id: mean 0-10 activation}, shown as its five highest entries."""

    def __init__(self, table, decode):
        super().__init__(table)
        top = sorted(table.items(), key=lambda kv: -kv[1])[:5]
        self.text = 'tokens: ' + ', '.join(f"{decode([t])!r} {v:.1f}" for t, v in top)

    def __str__(self):
        return self.text


class TokenLookup:
    """The offline baseline in the LLM's place (--simulator=tokens). Its explanation of a neuron is the mean 0-10
    activation of each token id in the explanation set; its simulation looks each token up (0 if unseen). It
    measures how much of a neuron's activity the token's identity alone predicts: not the paper's LLM metric."""

    label = 'token-lookup baseline, not the LLM metric'
    max_no_digit = 0.0          # it predicts a value at every token

    async def explain(self, expl, m, decode):
        sums, counts = {}, {}
        for toks, a in expl:
            for t, q in zip(toks, quantize(a, m)):
                sums[t] = sums.get(t, 0) + int(q)
                counts[t] = counts.get(t, 0) + 1
        return TokenTable({t: sums[t] / counts[t] for t in sums}, decode)

    async def simulate(self, table, scoring, decode):
        return [np.array([table.get(t, 0.0) for t in toks]) for toks, _ in scoring], False, 0


# --- the LLM roles: explainer and simulators through any OpenAI-compatible server ----------------------------------
# The prompts follow the structure of OpenAI's automated-interpretability as the paper ran it (instructions, a fixed
# block of few-shot example neurons, then the neuron under test), with our own wording and our own examples. The
# few-shot block comes first and is the same in every request, so that a server's prefix cache can reuse it.

EXPLANATION_PREFIX = 'the main thing this neuron does is find'
INSTRUCTIONS = (
    "We study single neurons inside a language model. Each neuron responds to some particular thing in a short "
    "text. Its activation on each token is written as token<TAB>activation, an integer from 0 (silent) to 10 "
    "(strongest); most activations are 0.")
EXPLAINER_TASK = (" Read the excerpts a neuron responds to and say, in a short phrase, what it responds to. Look at "
                  "which tokens fire and at what surrounds them; prefer a precise phrase to a general one.")
SIMULATOR_TASK = (" Given a neuron's explanation, predict its activation on each token; \"unknown\" marks an "
                  "activation to predict.")
CHAT_SIMULATOR_TASK = (" Given a neuron's explanation and a list of tokens, answer with the activation of each token "
                       "as JSON only: {\"activations\": [one integer per token]}.")


# Example neurons, written for this project: (explanation, excerpts of (token, activation 0-10)).
FEW_SHOT = [
    ('days of the week, most strongly when they name a day of a meeting or event', [
        [(' The', 0), (' board', 0), (' met', 0), (' on', 0), (' Friday', 10), (' and', 0), (' again', 0),
         (' on', 0), (' Sunday', 8), (' evening', 1), ('.', 0)],
        [(' Every', 0), (' Tuesday', 9), (' the', 0), (' market', 0), (' opens', 0), (' at', 0), (' six', 0),
         ('.', 0)]]),
    ('closing brackets that end a parenthetical remark or citation', [
        [(' results', 0), (' (', 0), ('see', 0), (' Table', 0), (' 2', 1), (')', 10), (' were', 0),
         (' clear', 0), (' (', 0), ('p', 0), (' <', 0), (' 0', 0), ('.', 0), ('05', 0), (').', 7)]]),
    ('words about the sea, boats and water', [
        [(' The', 0), (' boat', 5), (' drifted', 2), (' across', 0), (' the', 0), (' bay', 8), (' while', 0),
         (' waves', 10), (' broke', 1), (' on', 0), (' the', 0), (' shore', 6), ('.', 0)]]),
]


def show_token(text):
    return text.replace('\\', '\\\\').replace('\n', '\\n').replace('\t', '\\t')


def listing(tokens, values):
    """One excerpt as <start>, token<TAB>value lines, <end>; values may be 'unknown'."""
    return '<start>\n' + ''.join(f"{show_token(t)}\t{v}\n" for t, v in zip(tokens, values)) + '<end>\n'


def explainer_body(excerpts):
    """excerpts: [(token texts, 0-10 values)]: the listings, and the non-zero tokens again when they are rare."""
    shown = sum(len(v) for _, v in excerpts)
    nonzero = [show_token(t) for toks, vals in excerpts for t, v in zip(toks, vals) if v > 0]
    body = ''.join(listing(t, v) for t, v in excerpts)
    if len(nonzero) < 0.2 * shown:
        body += 'Non-zero tokens: ' + ', '.join(nonzero) + '\n'
    return body + f'\nComplete the sentence: {EXPLANATION_PREFIX}'


def with_instructions(system, turns, system_role):
    """A system message, or (for a chat template that rejects one) the instructions at the head of the first turn."""
    if system_role:
        return [{'role': 'system', 'content': system}] + turns
    return [{**turns[0], 'content': system + '\n\n' + turns[0]['content']}] + turns[1:]


def explainer_messages(expl, m, decode, system_role=True):
    turns = []
    for explanation, examples in FEW_SHOT:
        turns += [{'role': 'user', 'content': explainer_body([([t for t, _ in ex], [v for _, v in ex]) for ex in examples])},
                  {'role': 'assistant', 'content': explanation}]
    turns.append({'role': 'user', 'content': explainer_body([([decode([t]) for t in toks], quantize(a, m).tolist())
                                                             for toks, a in expl])})
    return with_instructions(INSTRUCTIONS + EXPLAINER_TASK, turns, system_role)


def clean_explanation(text, limit=300):
    """The answer's first line, without the prompt's lead-in, a trailing period or one pair of enclosing quotes."""
    line = (text or '').strip().split('\n')[0].strip()
    for lead in (EXPLANATION_PREFIX, 'find'):
        if line.lower().startswith(lead + ' '):
            line = line[len(lead) + 1:].strip()
    line = line.rstrip('.').strip()
    for a, b in ('""', "''", '“”', '‘’', '``'):
        if len(line) >= 2 and line[0] == a and line[-1] == b and b not in line[1:-1]:   # one pair around it all
            line = line[1:-1].strip()
            break
    return line[:limit]


def simulator_prompt(explanation, tokens, slot='unknown'):
    """The all-at-once prompt for one excerpt and the character offsets of its slots: the few-shot block (the same
    in every request), then the explanation and the excerpt with `slot` where each activation would be."""
    parts = [INSTRUCTIONS + SIMULATOR_TASK + '\n']
    for i, (expl, examples) in enumerate(FEW_SHOT):
        parts.append(f"\nNeuron {i + 1}\nExplanation: {EXPLANATION_PREFIX} {expl}\nActivations:\n"
                     + ''.join(listing([t for t, _ in ex], [v for _, v in ex]) for ex in examples))
    head = ''.join(parts) + (f"\nNeuron {len(FEW_SHOT) + 1}\nExplanation: {EXPLANATION_PREFIX} {explanation}\n"
                             f"Activations:\n<start>\n")
    slots, body = [], head
    for t in tokens:
        body += show_token(t) + '\t'
        slots.append(len(body))
        body += slot + '\n'
    return body + '<end>\n', slots


def few_shot_slots():
    """Offsets and values of the few-shot block's own activations in simulator_prompt (they tell how the server
    tokenises '10')."""
    prompt, _ = simulator_prompt('x', [])
    out, pos = [], 0
    for _, examples in FEW_SHOT:
        for ex in examples:
            for t, v in ex:
                pos = prompt.index(show_token(t) + '\t', pos) + len(show_token(t)) + 1
                out.append((pos, v))
    return out


def chat_simulator_messages(explanation, tokens, system_role=True):
    turns = []
    for expl, examples in FEW_SHOT:
        ex = [p for e in examples for p in e]
        turns += [{'role': 'user', 'content': chat_simulator_question(expl, [t for t, _ in ex])},
                  {'role': 'assistant', 'content': json.dumps({'activations': [v for _, v in ex]})}]
    turns.append({'role': 'user', 'content': chat_simulator_question(explanation, tokens)})
    return with_instructions(INSTRUCTIONS + CHAT_SIMULATOR_TASK, turns, system_role)


def chat_simulator_question(explanation, tokens):
    numbered = '\n'.join(f"{i}: {json.dumps(t)}" for i, t in enumerate(tokens))
    return (f"Explanation: {EXPLANATION_PREFIX} {explanation}.\n{len(tokens)} tokens:\n{numbered}\n"
            f"Reply with {{\"activations\": [{len(tokens)} integers from 0 to 10]}}.")


def activation_schema(n):
    return {'type': 'json_schema', 'json_schema': {'name': 'activations', 'strict': True, 'schema': {
        'type': 'object', 'additionalProperties': False, 'required': ['activations'],
        'properties': {'activations': {'type': 'array', 'minItems': n, 'maxItems': n,
                                       'items': {'type': 'integer', 'minimum': 0, 'maximum': 10}}}}}}


def parse_activations(text, n):
    """The n integers 0-10 of an answer: its JSON object's "activations", else a bracketed list [v, v, ...]. Other
    integers in the text (an echo of the numbered listing, say) are not an answer."""
    if not isinstance(text, str):
        return None
    values = None
    start, end = text.find('{'), text.rfind('}')
    if start >= 0 and end > start:
        try:
            obj = json.loads(text[start:end + 1])
            values = obj.get('activations') if isinstance(obj, dict) else None
        except json.JSONDecodeError:
            values = None
    if values is None:
        bracket = re.search(r'\[([\d\s,]*)\]', text)
        values = [int(x) for x in bracket.group(1).replace(',', ' ').split()] if bracket else None
    ok = (isinstance(values, list) and len(values) == n
          and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10 for v in values))
    return values if ok else None


class BadAnswer(Exception):
    """An answer that cannot be used (malformed, inconsistent, refused for this request only): it fails that
    request, after bounded retries the neuron, never the run, and it is not cached."""


def valid_alternatives(alts):
    """{token: logprob} of an answer's alternatives that are what logprobs must be: a string and a finite
    number <= 0 (anything else, a server's NaN, 1e308 or a string, is dropped)."""
    if isinstance(alts, list):
        alts = {a.get('token'): a.get('logprob') for a in alts if isinstance(a, dict)}
    if not isinstance(alts, dict):
        return {}
    return {t: float(lp) for t, lp in alts.items() if isinstance(t, str) and isinstance(lp, (int, float))
            and not isinstance(lp, bool) and math.isfinite(lp) and lp <= 1e-6}


VALUES = {str(v) for v in range(11)}


def digit_probs(alts):
    """{value: probability} of the alternatives that read as a value 0-10 ('10' only where it is one token)."""
    probs = {}
    for tok, lp in alts.items():
        s = tok.strip()
        if s in VALUES:
            probs[int(s)] = probs.get(int(s), 0.0) + math.exp(lp)
    return probs


def expected_value(probs, ten_given_one=0.0):
    """E[value] over the digit alternatives, renormalised. Where the server writes 10 as '1' then '0', the mass of
    '1' is 1 or 10: ten_given_one = P('0' next | '1') splits it (1 p + 9 p q adds the 10s)."""
    total = sum(probs.values())
    if not total:
        return None
    ev = sum(v * p for v, p in probs.items()) / total
    return ev + 9 * probs.get(1, 0.0) / total * ten_given_one


def ten_after_one(alts):
    """P(the value goes on with '0' | it began with '1'), from the alternatives of the token after the '1': '0'
    against an ending (newline, comma, bracket, space)."""
    zero = sum(math.exp(lp) for t, lp in alts.items() if t.startswith('0'))
    end = sum(math.exp(lp) for t, lp in alts.items() if not t.strip() or t.strip()[0] in ',]}\n')
    return zero / (zero + end) if zero + end else 0.0


def expected_from_logprobs(content, n):
    """Each activation's expected value from a chat answer's tokens with top_logprobs, or None when they do not
    line up with n numbers. A value's first token gives the digit distribution; where 10 is written as two tokens
    and the answer wrote '1' then a digit, the next token's alternatives tell 10 from 1 (elsewhere '1' reads 1)."""
    if not content:
        return None
    text, values, prev_digit, pending = '', [], False, None
    for tok in content:
        tok = tok if isinstance(tok, dict) else {}
        piece = tok.get('token') if isinstance(tok.get('token'), str) else ''
        inside = '[' in text
        digits = piece.strip(' ,[]\n')
        alts = valid_alternatives(tok.get('top_logprobs') or [])
        if pending is not None:       # the token after a value's first token '1'
            probs = pending
            q = ten_after_one(alts) if alts else float(piece.startswith('0'))
            values[-1] = expected_value(probs, q if 10 not in probs else 0.0)
            pending = None
        if inside and digits.isdigit() and not prev_digit:
            alts = alts or {piece: 0.0}
            probs = digit_probs(alts)
            if not probs:
                probs = {int(digits): 1.0} if digits in VALUES else {}
            values.append(expected_value(probs))
            if digits == '1' and not piece.rstrip().endswith(','):
                pending = probs
        prev_digit = inside and digits.isdigit() and not piece.rstrip().endswith(',')
        text += piece
        if inside and ']' in piece:
            break
    return values if len(values) == n and all(v is not None for v in values) else None


def prompt_tokens(choice, prompt):
    """[(start offset, token text, {alternative: logprob})] of the prompt's tokens, from an echo (tokens,
    top_logprobs, text_offset) or vLLM's prompt_logprobs; None when they cannot be aligned with the prompt."""
    lp = choice.get('logprobs') or {}
    if lp.get('tokens') and lp.get('top_logprobs') is not None:
        toks, alts = lp['tokens'], lp['top_logprobs']
        offsets = lp.get('text_offset') or []
        if len(offsets) != len(toks):
            offsets, pos = [], 0
            for t in toks:
                offsets.append(pos)
                pos += len(t or '')
        if not ''.join(t or '' for t in toks).startswith(prompt):
            return None
        return [(o, t or '', valid_alternatives(a)) for o, t, a in zip(offsets, toks, alts) if o < len(prompt)]
    if choice.get('prompt_logprobs'):      # vLLM: per position {token_id: {logprob, rank, decoded_token}}, the
        entries = [valid_alternatives({v.get('decoded_token'): v.get('logprob') for v in e.values()})  # the prompt's
                   for e in choice['prompt_logprobs'] if e is not None]                    # own token among them
        for start in range(len(prompt)):     # where the first token ends: the offset the rest aligns from
            out, pos = [], start
            for alts in entries:
                match = max((t for t in alts if t and prompt.startswith(t, pos)), key=len, default=None)
                if match is None:
                    break
                out.append((pos, match, alts))
                pos += len(match)
            if pos >= len(prompt):
                return out
        return None
    raise InterpretError("the simulator server returned no prompt logprobs, which --simulator=all-at-once needs; "
                         "use --simulator=chat or --simulator=tokens")


def at_offsets(tokens, offsets):
    """For each character offset, the (text, alternatives) of the prompt token that starts there, else None."""
    by_start = {o: (t, a) for o, t, a in tokens}
    return [by_start.get(o) for o in offsets]


class LLM:
    """The two LLM roles, with a cache of every usable answer in llm_cache.jsonl (re-runs make no requests), a
    bound on the requests in flight that halves when requests time out, and the fallbacks servers need, learned
    from each role's first request, which goes alone."""

    def __init__(self, folder, mode, base_url, explainer_model, simulator_model='', simulator_base_url='', api_key='',
                 concurrency=16, max_retries=3, timeout=120.0, explainer_temperature=1.0, explainer_max_tokens=60,
                 top_logprobs=5, bad_answer_retries=2, max_no_digit=0.1, seed=0):
        import openai
        self.openai = openai
        self.cache_path = os.path.join(folder, 'llm_cache.jsonl')
        self.cache = {}
        if os.path.exists(self.cache_path):
            with open(self.cache_path) as f:
                text = f.read()
            for i, line in enumerate(text.split('\n')):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    self.cache[item['key']] = item['response']
                except (json.JSONDecodeError, KeyError, TypeError):
                    print(f"warning: skipping a torn line {i + 1} of {self.cache_path}", file=sys.stderr)
            if text and not text.endswith('\n'):        # a torn last line: the next record starts on its own line
                with open(self.cache_path, 'a') as f:
                    f.write('\n')
        self.cache_file = open(self.cache_path, 'a')
        url = base_url or os.environ.get('OPENAI_BASE_URL', '')
        key = api_key or os.environ.get('OPENAI_API_KEY', '') or 'none'
        if not url:
            raise InterpretError("--simulator=chat or all-at-once needs a server: pass --base_url (or set OPENAI_BASE_URL), "
                                 "or use --simulator=tokens for the offline baseline")
        self.urls = {'explainer': url, 'simulator': simulator_base_url or url}
        self.models = {'explainer': explainer_model, 'simulator': simulator_model or explainer_model}
        for role, name in self.models.items():
            if not name:
                raise InterpretError(f"name the {role} model with --explainer_model (and --simulator_model if it differs)")
        self.clients = {role: openai.AsyncOpenAI(base_url=u, api_key=key, max_retries=max_retries, timeout=timeout)
                        for role, u in self.urls.items()}
        self.limit, self.active, self.slots = concurrency, 0, asyncio.Condition()
        self.mode, self.max_no_digit, self.seed, self.retries = mode, max_no_digit, seed, bad_answer_retries
        self.temperature, self.max_tokens, self.top_logprobs = explainer_temperature, explainer_max_tokens, top_logprobs
        self.label = f"explainer {self.models['explainer']}, simulator {self.models['simulator']} ({mode})"
        self.requests = self.cached = self.prompt_tokens = self.completion_tokens = 0
        self.fmt = 'json_schema'              # json_schema -> json_object -> text, as far as the server goes
        self.limit_param = 'max_tokens'       # or max_completion_tokens, when a server refuses max_tokens
        self.logprobs = True
        self.system_role = {'explainer': True, 'simulator': True}   # False: its chat template rejects a system turn
        self.ten_split = None                 # all-at-once: does the simulator write 10 as '1' then '0'?
        self.probing = {'explainer': False, 'simulator': False}
        self.probed = {'explainer': asyncio.Event(), 'simulator': asyncio.Event()}

    async def slot(self):
        async with self.slots:
            await self.slots.wait_for(lambda: self.active < self.limit)
            self.active += 1

    async def release(self):
        async with self.slots:
            self.active -= 1
            self.slots.notify_all()

    async def call(self, role, endpoint, attempt, check, **request):
        """check(response) -> what the caller needs, or BadAnswer. Only an answer that passed is cached."""
        request['model'] = self.models[role]
        key = hashlib.sha256(json.dumps([self.urls[role], endpoint, request, attempt], sort_keys=True).encode()).hexdigest()
        if key in self.cache:
            try:
                value = check(self.cache[key])
                self.cached += 1
                return value
            except BadAnswer:
                del self.cache[key]                     # an older run's answer that no longer passes: ask again
        api = self.clients[role].chat.completions if endpoint == 'chat' else self.clients[role].completions
        extra = request.pop('extra_body', None)
        for tries in range(2):
            await self.slot()
            try:
                response = (await api.create(**request, **({'extra_body': extra} if extra else {}))).model_dump()
                break
            except self.openai.APITimeoutError:
                if self.limit > 1:                      # queued at a server that works one request at a time?
                    self.limit = max(1, self.limit // 2)
                    print(f"warning: requests to the {role} server time out; {self.limit} in flight from now on "
                          f"(a local server: --concurrency=1 or a longer --timeout)", file=sys.stderr)
                if tries:
                    raise                               # slow, not unreachable: the neuron is left for a re-run
            except self.openai.APIConnectionError:
                raise InterpretError(f"cannot reach the {role} server at {self.urls[role]}; start it or fix --base_url")
            except self.openai.AuthenticationError:
                raise InterpretError(f"the {role} server at {self.urls[role]} refused the API key; set --api_key or OPENAI_API_KEY")
            except self.openai.NotFoundError:
                raise InterpretError(f"model {self.models[role]!r} not found at {self.urls[role]}; check --{role}_model")
            except self.openai.APIStatusError:
                raise                                   # the caller decides: a feature, this request, or the server
            except (self.openai.APIError, ValueError, TypeError, AttributeError) as e:
                raise BadAnswer(f"unreadable answer ({type(e).__name__})")   # not JSON, or not the protocol's shape
            finally:
                await self.release()
        if extra:
            request['extra_body'] = extra
        self.requests += 1
        usage = response.get('usage') if isinstance(response.get('usage'), dict) else {}
        self.prompt_tokens += usage.get('prompt_tokens') or 0
        self.completion_tokens += usage.get('completion_tokens') or 0
        value = check(response)
        self.cache[key] = response
        self.cache_file.write(json.dumps({'key': key, 'response': response}) + '\n')
        self.cache_file.flush()
        return value

    async def chat(self, role, messages, check, attempt=0, schema=None, **request):
        """A chat request; messages(system_role) builds the turns; schema=n asks for n activations in the
        best format the server takes. A role's first request goes alone, the others waiting for it: what it
        learns about the server (max_tokens, a system turn, response formats, logprobs) they use."""
        if not self.probed[role].is_set():
            if self.probing[role]:
                await self.probed[role].wait()
            else:
                self.probing[role] = True
                try:
                    return await self.chat_once(role, messages, check, attempt, schema, True, request)
                finally:
                    self.probed[role].set()
        return await self.chat_once(role, messages, check, attempt, schema, False, request)

    async def chat_once(self, role, messages, check, attempt, schema, probe, request):
        while True:
            req, limit, system, fmt, logprobs = dict(request), self.limit_param, self.system_role[role], self.fmt, self.logprobs
            if limit != 'max_tokens' and 'max_tokens' in req:
                req[limit] = req.pop('max_tokens')
            if schema is not None:
                if fmt != 'text':
                    req['response_format'] = activation_schema(schema) if fmt == 'json_schema' else {'type': 'json_object'}
                if logprobs:
                    req.update(logprobs=True, top_logprobs=20)
            try:
                return await self.call(role, 'chat', attempt, check, messages=messages(system), **req)
            except (self.openai.BadRequestError, self.openai.InternalServerError) as e:
                text = str(e).lower()
                if (limit, system, fmt, logprobs) != (self.limit_param, self.system_role[role], self.fmt, self.logprobs):
                    continue                            # another request changed a setting meanwhile: send again
                refused = isinstance(e, self.openai.BadRequestError)
                if refused and 'max_tokens' in text and limit == 'max_tokens':
                    self.limit_param = 'max_completion_tokens'
                elif refused and 'system' in text and system:
                    self.system_role[role] = False
                elif refused and 'logprob' in text and schema is not None and logprobs:
                    self.logprobs = False
                elif schema is not None and fmt != 'text' and (not refused and probe or refused and any(
                        w in text for w in ('response_format', 'schema', 'json', 'grammar'))):
                    # llama.cpp's server answers json_schema with a 500: on the probe a 500 is the format's; a 400
                    # is the format's only where it names it (a prompt too long for the context is this one's)
                    self.fmt = {'json_schema': 'json_object', 'json_object': 'text'}[fmt]
                elif refused:
                    raise BadAnswer(f"the server refused this request ({str(e)[:120]})")   # e.g. too long: this one only
                else:
                    raise                               # a server error: the neuron is left for a re-run

    async def explain(self, expl, m, decode):
        """One explanation; a malformed or empty answer is asked again with another seed."""
        def check(r):
            try:
                text = clean_explanation(r['choices'][0]['message'].get('content'))
            except (KeyError, IndexError, TypeError, AttributeError):
                raise BadAnswer('no message in the answer')
            if not text:
                raise BadAnswer('an empty explanation')
            return text
        for attempt in range(self.retries + 1):
            try:
                return await self.chat('explainer', lambda system: explainer_messages(expl, m, decode, system), check,
                                       attempt, max_tokens=self.max_tokens, temperature=self.temperature,
                                       seed=self.seed + attempt)
            except BadAnswer:
                continue
        return None

    async def simulate_chat(self, explanation, toks, decode):
        """(predictions, hard, slots without a digit) for one excerpt, or None after bounded retries of bad answers
        (retries at temperature 1 with another seed: a deterministic server would repeat its answer)."""
        tokens = [decode([t]) for t in toks]
        n = len(tokens)

        def check(r):
            try:
                choice = r['choices'][0]
                text = choice['message'].get('content')
            except (KeyError, IndexError, TypeError, AttributeError):
                raise BadAnswer('no message in the answer')
            values = parse_activations(text, n)
            if values is None:
                raise BadAnswer('not n activations from 0 to 10')
            content = (choice.get('logprobs') or {}).get('content') if isinstance(choice.get('logprobs'), dict) else None
            if content:
                if not isinstance(content, list) or ''.join(str((c or {}).get('token', '')) for c in content) != text:
                    raise BadAnswer('the logprobs do not spell the answer')
                expected = expected_from_logprobs(content, n)
                if expected is not None:
                    if any(abs(e - v) > 5.5 for e, v in zip(expected, values)):
                        raise BadAnswer('the logprobs contradict the answer')
                    return np.array(expected, dtype=np.float64), False, 0
            return np.array(values, dtype=np.float64), True, 0
        for attempt in range(self.retries + 1):
            try:
                return await self.chat('simulator', lambda system: chat_simulator_messages(explanation, tokens, system),
                                       check, attempt, schema=n, max_tokens=8 * n + 40,
                                       temperature=0 if attempt == 0 else 1.0, seed=self.seed + attempt)
            except BadAnswer:
                continue
        return None

    async def prompt_logprobs(self, prompt):
        """The prompt's echoed tokens with their top-k alternatives (an echo is not resampled: no retries)."""
        k = self.top_logprobs

        def check(r):
            try:
                tokens = prompt_tokens(r['choices'][0], prompt)
            except (KeyError, IndexError, TypeError, AttributeError):
                raise BadAnswer('no choices in the answer')
            if tokens is None:
                raise BadAnswer("the echoed tokens do not spell the prompt")
            return tokens
        return await self.call('simulator', 'completions', 0, check, prompt=prompt, max_tokens=1, temperature=0,
                               echo=True, logprobs=k, extra_body={'prompt_logprobs': k})

    async def simulate_all_at_once(self, explanation, toks, decode):
        """The paper's method, one prompt per excerpt: the few-shot block, the explanation, and every token as
        'token<TAB>unknown'; at each slot (found by its offset in the prompt we built) the prediction is the
        expected value over the top-k alternatives that read as 0-10. Where the server writes 10 as '1' then '0'
        (told by the few-shot block's own 10s), a second prompt with '1' in the slots gives P('0' | '1') at each.
        Returns (predictions, False, slots without a digit), NaN at those slots; None if the answer cannot be read."""
        tokens = [decode([t]) for t in toks]
        prompt, slots = simulator_prompt(explanation, tokens)
        try:
            echoed = await self.prompt_logprobs(prompt)
            if self.ten_split is None:
                seen = [e[0].strip() for e in at_offsets(echoed, [o for o, v in few_shot_slots() if v == 10]) if e]
                self.ten_split = None if not seen else seen[0] != '10'
            probs = [digit_probs(e[1]) if e else {} for e in at_offsets(echoed, slots)]
            q = [0.0] * len(slots)
            if self.ten_split and any(p.get(1) for p in probs):
                prompt1, slots1 = simulator_prompt(explanation, tokens, slot='1')
                echoed1 = await self.prompt_logprobs(prompt1)
                q = [ten_after_one(e[1]) if e else 0.0 for e in at_offsets(echoed1, [o + 1 for o in slots1])]
        except BadAnswer:
            return None                # an echo of the prompt is not resampled: asking again would not help
        preds = np.array([expected_value(p, qi) if p else np.nan for p, qi in zip(probs, q)], dtype=np.float64)
        return preds, False, int(np.isnan(preds).sum())

    async def simulate(self, explanation, scoring, decode):
        """Predictions for every scoring excerpt (one request each), whether any is 'hard' (integers, no logprobs) and
        how many slots had no digit among their alternatives (NaN there); None = failed."""
        one = self.simulate_all_at_once if self.mode == 'all-at-once' else self.simulate_chat
        results = await asyncio.gather(*(one(explanation, toks, decode) for toks, _ in scoring))
        if any(r is None for r in results):
            return None
        return [p for p, _, _ in results], any(h for _, h, _ in results), sum(n for _, _, n in results)


# --- 3. score: the correlation of simulated and true activations, every neuron, resumable --------------------------

def pearson(x, y):
    """Pearson correlation of the pooled values, or None when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt((dx * dx).sum() * (dy * dy).sum())
    return None if den == 0 or not math.isfinite(den) else float((dx * dy).sum() / den)


async def score_neuron(rec, n, protocol, decode, sim):
    """Explain, simulate and score one neuron under every scoring method of a protocol, with sim the LLM or the
    token lookup. The scoring methods of one protocol share the explanation (and identical requests are answered
    once, from the cache)."""
    out, explanation = {}, None
    for method in METHODS[protocol]:
        _, expl_items, score_items = SETS[method]
        expl = excerpts(rec, protocol, expl_items, n)
        m = max(float(a.max()) if len(a) else 0.0 for _, a in expl)
        if not m > 0:
            out[method] = {'dead': True, 'score': None, 'explanation': None}
            continue
        scoring = excerpts(rec, protocol, score_items, n)
        explanation = explanation or await sim.explain(expl, m, decode)
        result = await sim.simulate(explanation, scoring, decode) if explanation else None
        if result is None:
            out[method] = {'dead': False, 'score': None, 'undefined': True, 'failed': True, 'max_act': m,
                           'explanation': explanation, 'failure': 'explanation' if not explanation else 'simulation'}
            continue
        preds, hard, no_digit = result
        slots = sum(len(p) for p in preds)
        if no_digit > sim.max_no_digit * slots:          # not zeros: the simulator did not answer with a value
            out[method] = {'dead': False, 'score': None, 'undefined': True, 'failed': True, 'max_act': m,
                           'explanation': explanation, 'no_digit': no_digit,
                           'failure': f'no digit among the top-k at {no_digit} of {slots} slots'}
            continue
        true, pred = np.concatenate([a for _, a in scoring]), np.concatenate(preds)
        read = ~np.isnan(pred)                            # slots without a digit leave the correlation
        score = pearson(true[read], pred[read])
        out[method] = {'dead': False, 'score': score, 'undefined': score is None, 'max_act': m, 'hard': hard,
                       'explanation': str(explanation), 'no_digit': int((~read).sum()),
                       'show': [(toks, a.tolist(), p.tolist()) for (toks, a), p in zip(scoring[:3], preds[:3])]}
    return out


def read_finished(path, run_key):
    """{(layer, neuron): scores} that an earlier run with the same settings finished; a torn line is skipped."""
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for i, line in enumerate(f):
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    print(f"warning: skipping a torn line {i + 1} of {path}", file=sys.stderr)
                    continue
                if r.get('run') == run_key:
                    done[(r['layer'], r['neuron'])] = r['scores']
    return done


async def score_all(todo, recs, protocols, decode, sim, done, scores_path, run_key):
    """Score the neurons concurrently (an LLM bounds its requests in flight), appending each to scores.jsonl as
    it finishes; a neuron that failed (bad answers) is reported but not recorded, so the next run asks again.
    Returns the neurons left unfinished by server errors or timeouts."""
    unfinished = []
    bar = tqdm(total=len(todo), desc='explain, simulate, score', unit='neuron', file=sys.stderr)
    with open(scores_path, 'a') as out_f:
        async def one(l, n, neuron):
            try:
                scores = {}
                for p in protocols:
                    scores.update(await score_neuron(recs[l], n, p, decode, sim))
            except InterpretError:
                raise
            except Exception as e:               # whatever a server sends, it ends this neuron, not the run
                unfinished.append(f"layer {l} neuron {neuron}: {type(e).__name__}")
                return
            done[(l, neuron)] = scores
            if not any(s.get('failed') for s in scores.values()):
                out_f.write(json.dumps({'run': run_key, 'layer': l, 'neuron': neuron, 'scores': scores}) + '\n')
                out_f.flush()
            bar.update()
        await asyncio.gather(*(one(*t) for t in todo))
    bar.close()
    return unfinished


def estimate(todo, recs, protocols, decode, count, simulator, explainer_max_tokens):
    """What a run would ask of the servers: requests and tokens of the whole prompts as they would be sent, counted
    with count(text) (GPT-2's tokenizer: the models' own will differ), completions at their caps."""
    if simulator == 'tokens':
        return f"--simulator=tokens makes no requests ({len(todo)} neurons to score)"
    requests, prompt, completion = 0, 0, 0
    placeholder = 'a short phrase of about ten words describing what the neuron responds to'
    for l, n, _ in todo:
        for p in protocols:
            expl = excerpts(recs[l], p, SETS[METHODS[p][0]][1], n)
            m = max(float(a.max()) if len(a) else 0.0 for _, a in expl)
            if not m > 0:
                continue
            requests += 1
            prompt += sum(count(x['content']) + 4 for x in explainer_messages(expl, m, decode))
            completion += explainer_max_tokens
            for toks, _ in excerpts(recs[l], p, SETS[METHODS[p][0]][2], n):   # random_only's are among these
                tokens = [decode([t]) for t in toks]
                requests += 1
                if simulator == 'all-at-once':
                    prompt += count(simulator_prompt(placeholder, tokens)[0])
                    completion += 1
                else:
                    prompt += sum(count(x['content']) + 4 for x in chat_simulator_messages(placeholder, tokens))
                    completion += 8 * len(tokens) + 40
    twice = (' (all-at-once: up to twice the simulator requests where the server writes 10 as two tokens)'
             if simulator == 'all-at-once' else '')
    return (f"dry run: {len(todo)} neurons, about {requests:,} requests, {prompt:,} prompt tokens and up to "
            f"{completion:,} completion tokens, counted in GPT-2 tokens{twice}")


# --- the script ----------------------------------------------------------------------------------------------------

def main():
    for k in ('n_openai', 'n_anthropic', 'batch_size', 'concurrency'):
        if globals()[k] < 1:
            raise InterpretError(f"--{k}={globals()[k]} must be at least 1")
    if protocol not in ('openai', 'anthropic', 'all'):
        raise InterpretError(f"protocol must be 'openai', 'anthropic' or 'all', got {protocol!r}")
    if simulator not in ('chat', 'all-at-once', 'tokens'):
        raise InterpretError(f"simulator must be 'chat', 'all-at-once' or 'tokens', got {simulator!r}")
    if seq_len < 0 or dtype not in ('float32', 'bfloat16'):
        raise InterpretError(f"--seq_len must be 0 (the block size) or more and --dtype 'float32' or 'bfloat16'; "
                             f"got {seq_len} and {dtype!r}")
    try:
        dev = pick_device(device)
        enc = gpt2_tokenizer()
    except (ValueError, PrepareError) as e:
        raise InterpretError(str(e))
    decode = lambda ids: enc.decode([i for i in ids if 0 <= i < enc.n_vocab])
    model, stream, sizes, layer_ids, cols = setup(ckpt, data, seq_len, layers, neurons, protocol, n_openai,
                                                  n_anthropic, seed, dev)
    cfg, T, protocols = model.config, stream.shape[1], list(sizes)
    folder = out or os.path.join(ckpt if os.path.isdir(ckpt) else os.path.dirname(ckpt) or '.', 'interp')
    os.makedirs(folder, exist_ok=True)

    # 1. record, or reuse the records of an earlier run with the same settings (both protocols' sizes are in them,
    # asked for or not, as they always were, so that earlier runs' records stay reusable)
    settings = {'ckpt': os.path.abspath(ckpt), 'data': os.path.abspath(data), 'seq_len': T, 'seed': seed,
                'n_openai': min(n_openai, len(stream)), 'n_anthropic': min(n_anthropic, len(stream)),
                'layers': layer_ids, 'neurons': {str(l): cols[l] for l in layer_ids}, 'protocols': protocols}
    meta_path = os.path.join(folder, 'records.json')
    have = json.load(open(meta_path)) if os.path.exists(meta_path) else None
    if have and have['settings'] == settings and all(os.path.exists(os.path.join(folder, f'records_L{l}.npz')) for l in layer_ids):
        print(f"using the records in {folder} (same settings)")
        stats = {int(l): v for l, v in have['stats'].items()}
        recs = {l: dict(np.load(os.path.join(folder, f'records_L{l}.npz'))) for l in layer_ids}
    else:
        if os.path.exists(meta_path):
            os.remove(meta_path)
        made, counts = record(model, stream, sizes, layer_ids, cols, dev, mixed_precision(dev, dtype), batch_size, seed)
        stats, recs = {}, {}
        for l in layer_ids:
            c = counts[l]
            recs[l] = record_arrays(cols[l], {p: made[p][l] for p in protocols}, stream)
            top_tok = recs[l][f'{protocols[0]}_tokens'][:, :TOP, WINDOW[protocols[0]][0]]    # each top item's own token
            conc = np.mean([np.unique(row, return_counts=True)[1].max() / len(row) for row in top_tok])
            stats[l] = {'zero_fraction': round(1 - c['nonzero'] / (c['tokens'] * cfg.hidden), 4),
                        'l0': round(c['nonzero'] / c['tokens'], 2), 'dead': int((~c['alive']).sum()),
                        'neurons': len(cols[l]), 'top_token_concentration': round(float(conc), 3), 'tokens': c['tokens']}
            save_records(folder, l, recs[l])
        with open(meta_path + '.tmp', 'w') as f:
            json.dump({'settings': settings, 'stats': stats}, f)
        os.replace(meta_path + '.tmp', meta_path)

    # 2. explain, simulate, score: the LLM, or the token lookup in its place; neurons a killed run finished are kept
    run_key = hashlib.sha256(json.dumps([settings, simulator, explainer_model, simulator_model, base_url,
                                         simulator_base_url, explainer_temperature, simulator_top_logprobs, seed,
                                         bad_answer_retries, explainer_max_tokens, max_no_digit]).encode()).hexdigest()[:16]
    scores_path = os.path.join(folder, 'scores.jsonl')
    done = read_finished(scores_path, run_key) if resume else {}
    if not resume and os.path.exists(scores_path):
        os.remove(scores_path)
    todo = [(l, n, int(neuron)) for l in layer_ids for n, neuron in enumerate(recs[l]['neurons']) if (l, int(neuron)) not in done]
    if done:
        print(f"resuming: {len(done)} neurons already scored, {len(todo)} to go")
    if dry_run:
        count = lambda text: len(enc.encode(text, disallowed_special=()))
        print(estimate(todo, recs, protocols, decode, count, simulator, explainer_max_tokens))
        return
    sim = TokenLookup() if simulator == 'tokens' else LLM(
        folder, simulator, base_url, explainer_model, simulator_model, simulator_base_url, api_key, concurrency,
        max_retries, timeout, explainer_temperature, explainer_max_tokens, simulator_top_logprobs, bad_answer_retries,
        max_no_digit, seed)
    unfinished = asyncio.run(score_all(todo, recs, protocols, decode, sim, done, scores_path, run_key))

    # 3. report
    rows, per_method = [], {m: {l: [] for l in layer_ids} for p in protocols for m in METHODS[p]}
    for (l, neuron), scores in sorted(done.items()):
        for m, sc in scores.items():
            per_method[m][l].append(sc)
        defined = [sc['score'] for sc in scores.values() if sc['score'] is not None]
        rows.append({'layer': l, 'neuron': neuron, 'scores': scores, 'best': max(defined) if defined else None})
    val_loss = model.val_loss
    summary = {'ckpt': os.path.abspath(ckpt), 'model_name': model_name(cfg), 'model': vars(cfg).copy(),
               'val_loss': None if val_loss is None else round(float(val_loss), 4), 'simulator': simulator,
               'simulator_label': sim.label, 'settings': settings, 'unfinished': len(unfinished),
               'layer_ids': layer_ids, 'stats': {str(l): v for l, v in stats.items()},
               'methods': {m: {'layers': {str(l): v for l, v in s['layers'].items()}, 'model': s['model']}
                           for m, s in ((m, summarize(v, cfg.n_layer)) for m, v in per_method.items())}}
    with open(os.path.join(folder, 'neurons.jsonl'), 'w') as f:
        for r in rows:
            slim = {k: {kk: vv for kk, vv in v.items() if kk != 'show'} for k, v in r['scores'].items()}
            f.write(json.dumps({'layer': r['layer'], 'neuron': r['neuron'], 'simulator': simulator, 'scores': slim}) + '\n')
    with open(os.path.join(folder, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    md = markdown(summary)
    with open(os.path.join(folder, 'summary.md'), 'w') as f:
        f.write(md)
    write_report(folder, summary, rows, decode)
    print(md)
    if isinstance(sim, LLM):
        print(f"LLM: {sim.requests} requests ({sim.cached} answered from the cache), "
              f"{sim.prompt_tokens:,} prompt + {sim.completion_tokens:,} completion tokens")
    print(f"wrote {folder}/neurons.jsonl, summary.json, summary.md, report.html")
    if unfinished:
        print(f"error: {len(unfinished)} neurons unfinished after server errors ({unfinished[0]}); run the same "
              f"command again to finish them", file=sys.stderr)
        sys.exit(1)
    failed = sum(v['failed'] for m in summary['methods'].values() for v in m['layers'].values())
    scored = sum(v['scored'] for m in summary['methods'].values() for v in m['layers'].values())
    if failed:
        print(f"warning: {failed} neuron scores failed (answers the simulator or explainer could not give); they are "
              f"not recorded, so the same command asks again", file=sys.stderr)
    if not scored and failed:
        print("error: no neuron could be scored; see the failures in neurons.jsonl", file=sys.stderr)
        sys.exit(1)


def interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == '__main__':
    try:
        if sys.argv[1:2] == ['--compare']:
            if len(sys.argv) < 3:
                fail("--compare needs one or more interp folders, e.g. --compare out-crate-1l/interp out-gpt2-1l/interp")
            print(compare(sys.argv[2:]))
        else:
            globals().update(configure(script_defaults(globals()), sys.argv[1:]))
            # asyncio.run (3.11+) turns Ctrl-C into a cancellation of its task, which a client library deep in a
            # request can swallow, and the run then goes on; a handler of our own keeps it a KeyboardInterrupt
            signal.signal(signal.SIGINT, interrupt)
            main()
    except (InterpretError, ValueError) as e:     # ValueError: compare()'s missing or unreadable folders
        fail(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted: finished neurons are kept; run the same command again to go on", file=sys.stderr)
        sys.exit(130)
