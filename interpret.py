"""
How interpretable are a model's neurons? The automated explain -> simulate -> score loop.

    python interpret.py --ckpt=out-crate-1l --data=data/pile --layers=all --neurons=random:200 --protocol=all
    python interpret.py --compare out-crate-1l/interp out-gpt2-1l/interp

1. Record: run the model over the first N block_size sequences of val.bin (one flattened token stream) and keep,
   for each selected neuron, the excerpts of each protocol with its activation on every token.
2. Explain each neuron from its explanation set, simulate its activations on the scoring set from that
   explanation, and score the simulation: the Pearson correlation with the true activations, pooled over tokens.
   --scoring=detection,fuzzing scores the explanation by 0/1 answers instead (or as well): which excerpts activate
   the neuron, and whether marked tokens are the ones it fires on (balanced accuracy).
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
import signal
import sys
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from configurator import claim_folder, configure, fail, mixed_precision, pick_device, script_defaults, write_safely
from llm import LLM, BadAnswer, LLMError, answer, at_offsets
from model import GPT2, load_model, model_name
from prepare import PrepareError, gpt2_tokenizer
from prompts import (chat_simulator_messages, classifier_messages, clean_explanation, copies_an_example, digit_probs,
                     expected_from_logprobs, expected_value, explainer_messages, few_shot_slots, marked, parse_list,
                     simulator_prompt, ten_after_one)
from report import compare, summarize, write_all

# -----------------------------------------------------------------------------------------------------------
ckpt = 'out'                 # checkpoint file or directory, hf:OWNER/REPO[/FILE], or gpt2 ... gpt2-xl (OpenAI's)
data = 'data/pile'           # folder holding val.bin (prepare.py)
out = ''                     # default: <checkpoint folder>/interp
layers = 'all'               # 'all' or a comma list, e.g. '0,2'
neurons = 'all'              # 'all', a list ('41' or '5,41,300'), or 'random:200' (a seeded sample per layer)
protocol = 'all'             # 'openai', 'anthropic' or 'all'
scoring = 'simulation'       # 'simulation' (the paper's), 'detection', 'fuzzing', or a comma list of them
n_openai = 8000              # sequences for the OpenAI protocol (the paper's N)
n_anthropic = 800            # sequences for the Anthropic protocol (a prefix of the same stream)
seq_len = 0                  # 0: the model's block_size
excerpt_edges = 'stream'     # 'stream': excerpts run on into the next sequence (the authors'); 'sequence': cut there
batch_size = 8               # sequences per forward pass (the records do not depend on it)
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
OPTIONS = script_defaults(globals())      # the options are the names above, nothing below

TOP, RAND, BANDS, BAND_ITEMS = 50, 50, 11, 20
TOKENS_LABEL = 'token-lookup baseline, not the LLM metric'
WINDOW = {'openai': (32, 32), 'anthropic': (4, 4)}   # tokens before pos, from pos on
POOL = 900                   # Anthropic: random positions per neuron its band items are drawn from (75 a band)
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
METHODS = {'openai': ['top_and_random', 'random_only'], 'anthropic': ['anthropic']}   # scoring by simulation
PER_KIND, MIN_PER_KIND = 10, 5   # detection and fuzzing: excerpts of each kind per neuron, and the fewest scored
BATCH = 5                    # excerpts per detection or fuzzing request
MARK = 0.3                   # fuzzing marks the tokens at 0.3 of their excerpt's largest value or more


def methods_of(p):
    """The scoring methods run on protocol p's records: simulation's, and detection and fuzzing on the OpenAI ones."""
    kinds = scoring.split(',')
    return (METHODS[p] if 'simulation' in kinds else []) + [k for k in ('detection', 'fuzzing')
                                                           if k in kinds and p == 'openai']


class InterpretError(Exception):
    pass


def check_options():
    """The options' values, before any work: a wrong one is a one-line error."""
    for k in ('n_openai', 'n_anthropic', 'batch_size', 'concurrency'):
        if globals()[k] < 1:
            raise InterpretError(f"--{k}={globals()[k]} must be at least 1")
    if protocol not in ('openai', 'anthropic', 'all'):
        raise InterpretError(f"protocol must be 'openai', 'anthropic' or 'all', got {protocol!r}")
    if simulator not in ('chat', 'all-at-once', 'tokens'):
        raise InterpretError(f"simulator must be 'chat', 'all-at-once' or 'tokens', got {simulator!r}")
    if not scoring or not set(scoring.split(',')) <= {'simulation', 'detection', 'fuzzing'}:
        raise InterpretError(f"scoring must be 'simulation', 'detection', 'fuzzing' or a comma list of them, "
                             f"got {scoring!r}")
    if protocol == 'anthropic' and 'simulation' not in scoring:
        raise InterpretError("detection and fuzzing score the OpenAI protocol's records: add simulation to "
                             "--scoring, or use --protocol=openai or all")
    if excerpt_edges not in ('stream', 'sequence'):
        raise InterpretError(f"excerpt_edges must be 'stream' or 'sequence', got {excerpt_edges!r}")
    if seq_len < 0 or dtype not in ('float32', 'bfloat16'):
        raise InterpretError(f"--seq_len must be 0 (the block size) or more and --dtype 'float32' or 'bfloat16'; "
                             f"got {seq_len} and {dtype!r}")


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
    wanted = {p: n for p, n in (('openai', n_openai), ('anthropic', n_anthropic))
              if protocol in (p, 'all') and methods_of(p)}
    stream = read_stream(data, max(wanted.values()), T)
    sizes = {p: min(n, len(stream)) for p, n in wanted.items()}
    short = [f"--n_{p}={n}" for p, n in wanted.items() if sizes[p] < n]
    if short:
        print(f"note: {data}/val.bin holds {len(stream)} sequences of {T} tokens, so {' and '.join(short)} "
              f"{'use' if len(short) > 1 else 'uses'} {len(stream)}; the summary records the number used",
              file=sys.stderr)
    if 'anthropic' in sizes and sizes['anthropic'] * T < RAND + POOL:
        fix = (f"raise --n_anthropic to {math.ceil((RAND + POOL) / T)}" if n_anthropic < len(stream) else
               f"{data}/val.bin holds no more: prepare more validation text, or use --protocol=openai")
        raise InterpretError(f"the Anthropic protocol draws {RAND} random and {POOL} band positions from at least "
                             f"{RAND + POOL} tokens, and {sizes['anthropic']} sequences of {T} hold "
                             f"{sizes['anthropic'] * T}: {fix}")
    vocab = getattr(model, "base", model).config.vocab_size
    if stream.max() >= vocab:
        raise InterpretError(f"{data}/val.bin holds token id {stream.max()} but the model's vocabulary is "
                             f"{vocab}: the data was not tokenized for this model")
    return model, stream, sizes, layer_ids, cols


# --- 1. record: every protocol, layer and neuron in one forward pass (and the bands' counts in a second) -------------

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


def forward_neurons(model, seqs, layer_ids, cols, device, autocast, batch_size):
    """Yield (first stream position, {layer: (positions, selected neurons) float32}, {layer: all its neurons})."""
    T, hidden = seqs.shape[1], model.config.hidden
    for i in range(0, len(seqs), batch_size):
        x = torch.from_numpy(seqs[i:i + batch_size]).to(device)
        with torch.no_grad(), autocast:
            _, _, acts = model(x, return_neurons=True)
        full = {l: acts[l].float().reshape(-1, hidden) for l in layer_ids}
        yield i * T, {l: a if len(cols[l]) == hidden else a[:, torch.as_tensor(cols[l], device=device)]
                      for l, a in full.items()}, full


def window_positions(pos, protocol, P, T=None):
    """(..., w) stream positions of the excerpts around pos, -1 beyond the stream's P positions (and, given T, beyond
    the length-T sequence that holds pos)."""
    before, after = WINDOW[protocol]
    w = pos[..., None] + np.arange(-before, after)
    keep = (w >= 0) & (w < P)
    if T:
        keep &= w // T == pos[..., None] // T
    return np.where(keep, w, -1)


def random_positions(P, k, seed, *key):
    """k distinct uniform positions, seeded by (seed, *key) so that every neuron has its own."""
    return np.random.default_rng([seed, *key]).choice(P, size=k, replace=False)


def sort_keys(values, positions):
    """int64 keys that order like (value, then the earlier position first): the value's float32 bits, made to order
    like the value, above 2^32 - 1 minus the position. Keys are distinct, so a top-k of them is one answer, whatever
    the batches were."""
    bits = (values + 0.0).view(torch.int32).long()                  # + 0.0 turns -0.0 into 0.0
    bits = torch.where(bits < 0, -1 - (bits & 0x7FFFFFFF), bits)    # negative floats: the larger the bits, the smaller
    return bits * 2**32 + (2**32 - 1 - positions)


def recorder(protocol, P, neurons, n_random, seed, key, l, dev):
    """One protocol's record of one layer's neurons over a stream of P positions: each neuron's top-k (its sort keys
    high to low) and its n_random seeded random positions, with the excerpt around each."""
    n, k, W = len(neurons), min(TOP, P), sum(WINDOW[protocol])
    rand = np.stack([random_positions(P, min(n_random, P), seed, key, l, j) for j in neurons])
    return {'keys': torch.full((n, k), torch.iinfo(torch.long).min, device=dev),      # below every real key
            'top': torch.full((n, k, W), float('nan'), device=dev), 'rand': torch.as_tensor(rand, device=dev),
            'rand_acts': torch.full(rand.shape + (W,), float('nan'), device=dev)}


def add_batch(r, protocol, ts, a, context):
    """Merge a batch (first position ts, activations a (positions, n)) into a recorder. context: a's rows with
    WINDOW's rows of the batches around it before and after, NaN beyond the stream: every excerpt of a position in a
    lies in it."""
    (n, k), W = r['keys'].shape, sum(WINDOW[protocol])
    offsets = torch.arange(W, device=a.device)
    read = lambda rows, neuron: context[rows[:, None] + offsets, neuron[:, None]]          # (m, W) excerpts
    # A later position enters the top-k only with a value above the k-th, and after the first batches few do: only
    # those are sorted in (a top-k of every value made the recording 5.65x a forward pass, not 3.80x: bench.py
    # --what=record, CRATE-4L, N = 800 / 800 on the 2-core CPU). The k-th value is the middle of its excerpt.
    kth = r['top'][:, -1, WINDOW[protocol][0]].nan_to_num(-float('inf'))
    row, neuron = torch.nonzero(a > kth, as_tuple=True)
    if len(row):
        keys = torch.cat([r['keys'].view(-1), sort_keys(a[row, neuron], ts + row)])
        owner = torch.cat([torch.arange(n, device=a.device).repeat_interleave(k), neuron])
        order = torch.sort(keys, descending=True).indices
        order = order[torch.sort(owner[order], stable=True).indices]        # by neuron, each one's keys high to low
        size = k + torch.bincount(neuron, minlength=n)
        rank = torch.arange(len(order), device=a.device) - (torch.cumsum(size, 0) - size).repeat_interleave(size)
        keep = order[rank < k]                                                # each neuron's best k, in rank order
        old, new = keep[keep < n * k], keep[keep >= n * k] - n * k
        top = torch.empty((n * k, W), device=a.device)
        top[keep < n * k], top[keep >= n * k] = r['top'].view(n * k, W)[old], read(row[new], neuron[new])
        r['keys'], r['top'] = keys[keep].view(n, k), top.view(n, k, W)
    neuron, item = torch.nonzero((r['rand'] >= ts) & (r['rand'] < ts + len(a)), as_tuple=True)
    r['rand_acts'][neuron, item] = read(r['rand'][neuron, item] - ts, neuron)


def with_context(protocol, prev, cur, nxt, P):
    """(first position, activations, activations with the excerpts' context) of batch cur, cut to the stream's first
    P positions, for each layer. prev and nxt are the batches around it (or None at the stream's ends)."""
    before, after = WINDOW[protocol]
    ts, out = cur[0], {}
    for l, a in cur[1].items():
        a = a[:P - ts]
        head = prev[1][l][-before:] if prev else a[:0]
        tail = nxt[1][l][:max(0, P - nxt[0])][:after] if nxt else a[:0]
        nan = lambda m: torch.full((m, a.shape[1]), float('nan'), device=a.device)
        out[l] = (a, torch.cat([nan(before - len(head)), head, a, tail, nan(after - len(tail))]))
    return ts, out


def count_ranks(counts, a, pool):
    """counts (2, n, R) += per neuron, how many values of a (positions, n) lie above each of its sorted pool values
    (n, R) ([0]), and at or above them ([1])."""
    x = a.T.contiguous()
    x = x.sort(1).values if x.is_cuda else torch.from_numpy(np.sort(x.numpy(), 1))   # numpy's is 8x torch's on a CPU
    counts[0] += len(a) - torch.searchsorted(x, pool, right=True)
    counts[1] += len(a) - torch.searchsorted(x, pool)


def band_items(values, order, counts, P, l, neurons, seed):
    """Per neuron, BANDS x BAND_ITEMS indices into its pool of random positions with values (n, R): BAND_ITEMS drawn
    uniformly from the pool positions whose rank among all P values (high to low) lies in each of the 11 equal-count
    bands below the top twelfth. order sorts each neuron's pool values; counts are count_ranks' over all P values, in
    that order. A pool value's rank is exact, and a value that ties others is ranked among them in a seeded random
    order."""
    edges = np.array([P * b // 12 for b in range(13)])
    out = np.zeros((len(neurons), BANDS * BAND_ITEMS), dtype=np.int64)
    for r, neuron in enumerate(neurons):
        rng = np.random.default_rng([seed, 1, l, neuron])
        greater, ties = np.empty(values.shape[1], np.int64), np.empty(values.shape[1], np.int64)
        greater[order[r]], ties[order[r]] = counts[0, r], counts[1, r] - counts[0, r]
        rank = greater + (rng.random(len(greater)) * ties).astype(np.int64)
        for v in np.unique(values[r][ties > 1]):                           # tied pool values: distinct ranks
            same = np.nonzero(values[r] == v)[0]
            if len(same) > 1:
                rank[same] = greater[same[0]] + rng.choice(ties[same[0]], len(same), replace=False)
        band = np.searchsorted(edges, rank, 'right') - 1
        for b in range(1, 12):
            members = np.nonzero(band == b)[0]
            if len(members) < BAND_ITEMS:
                raise InterpretError(f"layer {l} neuron {neuron}: {len(members)} of the {len(rank)} pool positions "
                                     f"fell in band {b}, fewer than {BAND_ITEMS} (chance about 1e-15); run with "
                                     f"another --seed")
            out[r, (b - 1) * BAND_ITEMS:b * BAND_ITEMS] = rng.choice(members, BAND_ITEMS, replace=False)
    return out


def update_stats(s, a):
    """Accumulate LLM-free statistics of one layer from (positions, h) float32 activations; nonzero counts those > 0."""
    s['tokens'] = s.get('tokens', 0) + a.shape[0]
    s['nonzero'] = s.get('nonzero', 0) + int((a > 0).sum())


def record(model, stream, sizes, layer_ids, cols, dev, autocast, batch_size=8, seed=0, within_sequence=False):
    """Every protocol's records, all layers and neurons at once, each protocol over its prefix of the stream (sizes:
    {protocol: sequences}): the top and random excerpts, and the Anthropic band items. Ties are ordered by stream
    position, so the records do not depend on batch_size. A band item needs its exact rank among all the Anthropic
    values: the items are drawn from a pool of POOL random positions per neuron, recorded in the first pass, whose
    ranks a second pass over the Anthropic prefix counts. Returns the records, {protocol: {layer: {'pos', 'win',
    'acts'}}}, and per layer counts over every neuron (not only the selected): tokens, values > 0, and 'alive'."""
    T = stream.shape[1]
    if batch_size * T < max(WINDOW['openai']):
        raise InterpretError(f"batch_size x seq_len must be at least {max(WINDOW['openai'])} tokens")
    recs = {p: {l: recorder(p, n * T, cols[l], RAND + (POOL if p == 'anthropic' else 0), seed,
                            0 if p == 'openai' else 2, l, dev) for l in layer_ids} for p, n in sizes.items()}

    def merge(prev, cur, nxt):
        for p, n in sizes.items():
            if cur[0] < n * T:
                ts, layers = with_context(p, prev, cur, nxt, n * T)
                for l, (a, context) in layers.items():
                    add_batch(recs[p][l], p, ts, a, context)

    n1, stats = max(sizes.values()), {l: {} for l in layer_ids}
    prev = cur = None         # a batch is merged once the next one is here: its excerpts may reach into both
    batches = forward_neurons(model, stream[:n1], layer_ids, cols, dev, autocast, batch_size)
    for ts, sel, full in tqdm(batches, total=math.ceil(n1 / batch_size), desc='records', unit='batch', file=sys.stderr):
        for l, a in full.items():
            update_stats(stats[l], a)
        if cur:
            merge(prev, cur, (ts, sel))
        prev, cur = cur, (ts, sel)
    merge(prev, cur, None)
    for l in layer_ids:
        r = recs[next(iter(sizes))][l]            # the longer prefix: a neuron's best value says if it ever fired
        stats[l]['alive'] = (r['top'][:, 0, WINDOW[next(iter(sizes))][0]] > 0).cpu()

    if 'anthropic' in sizes:  # the second pass: the rank of every pool value among all the Anthropic values
        before, n = WINDOW['anthropic'][0], sizes['anthropic']
        pools = {l: r['rand_acts'][:, RAND:, before] for l, r in recs['anthropic'].items()}
        ranked = {l: v.sort(1) for l, v in pools.items()}                 # (sorted values, their order)
        counts = {l: torch.zeros((2,) + v.shape, dtype=torch.long, device=dev) for l, v in pools.items()}
        batches = forward_neurons(model, stream[:n], layer_ids, cols, dev, autocast, batch_size)
        batches = tqdm(batches, total=math.ceil(n / batch_size), desc='band ranks', unit='batch', file=sys.stderr)
        for _, sel, _ in batches:
            for l, a in sel.items():
                count_ranks(counts[l], a, ranked[l].values)
        for l, r in recs['anthropic'].items():
            pick = band_items(pools[l].cpu().numpy(), ranked[l].indices.cpu().numpy(), counts[l].cpu().numpy(), n * T,
                              l, cols[l], seed)
            rows = torch.as_tensor(np.arange(len(cols[l]))[:, None], device=dev)
            pick = torch.as_tensor(pick, device=dev) + RAND
            r['bands'], r['bands_acts'] = r['rand'][rows, pick], r['rand_acts'][rows, pick]

    out = {}
    for p, by_layer in recs.items():
        out[p] = {}
        for l, r in by_layer.items():
            pos, acts = [2**32 - 1 - r['keys'] % 2**32, r['rand'][:, :RAND]], [r['top'], r['rand_acts'][:, :RAND]]
            if p == 'anthropic':
                pos, acts = pos + [r['bands']], acts + [r['bands_acts']]
            pos, acts = torch.cat(pos, 1).cpu().numpy(), torch.cat(acts, 1)
            win = window_positions(pos, p, sizes[p] * T, T if within_sequence else None)
            out[p][l] = {'pos': pos, 'win': win, 'acts': np.where(win >= 0, acts.cpu().numpy(), np.float32('nan'))}
    return out, stats


def record_arrays(cols, recs, stream):
    """One layer's records as the arrays the scoring reads and records_L{layer}.npz keeps: per protocol the positions,
    the excerpts' token ids (-1 beyond the stream) and their activations."""
    arrays, flat = {'neurons': np.asarray(cols)}, stream.reshape(-1)
    for p, r in recs.items():
        arrays[f'{p}_pos'] = r['pos']
        arrays[f'{p}_tokens'] = np.where(r['win'] >= 0, flat[np.maximum(r['win'], 0)], -1).astype(np.int32)
        arrays[f'{p}_acts'] = r['acts']
    return arrays


def save(path, write, mode):
    """write(an open file) into path, safely (write_safely); a failure (a full disk) is one line."""
    def to(tmp):
        with open(tmp, mode) as f:
            write(f)
    error = write_safely(path, to)
    if error:
        raise InterpretError(f"{error}; free some space and run the same command again")


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


def token_table(expl, m, decode):
    """The token-lookup baseline's explanation (--simulator=tokens, no LLM): the mean 0-10 activation of each token id
    in the explanation set. Simulating with it looks each token up (0 if unseen): it measures how much of a neuron's
    activity the token's identity alone predicts, which is not the paper's LLM metric."""
    sums, counts = {}, {}
    for toks, a in expl:
        for t, q in zip(toks, quantize(a, m)):
            sums[t] = sums.get(t, 0) + int(q)
            counts[t] = counts.get(t, 0) + 1
    return TokenTable({t: sums[t] / counts[t] for t in sums}, decode)


# --- 2. explain and 3. simulate, by the LLM (llm.py asks) or the token lookup in its place ---------------------------

class Simulation(NamedTuple):
    """One excerpt's simulated activations. hard: read as integers from the answer's text (no logprobs for an
    expected value); no_digit: slots whose alternatives held no 0-10 value (NaN there)."""
    preds: np.ndarray
    hard: bool = False
    no_digit: int = 0


def explanation_set(rec, protocol, n):
    """Neuron row n's explanation excerpts under a protocol, and their largest activation m (not > 0: dead)."""
    expl = excerpts(rec, protocol, SETS[METHODS[protocol][0]][1], n)
    return expl, max(float(a.max()) if len(a) else 0.0 for _, a in expl)


def as_shown(expl, m, decode):
    """Excerpts as the explainer sees them: token texts and 0-10 values."""
    return [([decode([t]) for t in toks], quantize(a, m).tolist()) for toks, a in expl]


async def explain(llm, expl, m, decode):
    """An explanation of a neuron from its explanation excerpts (m: their largest activation); None if the LLM gave
    no usable one. llm None: the token lookup's table."""
    if llm is None:
        return token_table(expl, m, decode)
    shown = as_shown(expl, m, decode)

    def check(r):
        text = clean_explanation(answer(r)[0])
        if not text or copies_an_example(text):
            raise BadAnswer('an empty explanation, or an example neuron\'s')
        return text
    return await llm.ask('explainer', lambda system: explainer_messages(shown, system), check,
                         max_tokens=explainer_max_tokens, temperature=explainer_temperature)


async def simulate_chat(llm, explanation, tokens):
    """The chat simulator: all of an excerpt's activations as a JSON list, each the expected value over its first
    token's top logprobs where the server gives them, else the integers as written (hard)."""
    n = len(tokens)

    def check(r):
        text, logprobs = answer(r)
        values = parse_list(text, 'activations', n, 10)
        if values is None:
            raise BadAnswer('not n activations from 0 to 10')
        expected = expected_from_logprobs(logprobs, n) if logprobs else None
        if expected is None:
            return Simulation(np.array(values, dtype=np.float64), hard=True)
        if any(abs(e - v) > 5.5 for e, v in zip(expected, values)):
            raise BadAnswer('the logprobs contradict the answer')
        return Simulation(np.array(expected, dtype=np.float64))
    return await llm.ask('simulator', lambda system: chat_simulator_messages(explanation, tokens, system), check,
                         schema=('activations', n, 10), max_tokens=8 * n + 40, temperature=0)


async def simulate_all_at_once(llm, explanation, tokens):
    """The paper's method, one prompt per excerpt: the few-shot block, the explanation, and every token as
    'token<TAB>unknown'; at each slot (found by its offset in the prompt we built) the prediction is the expected
    value over the top-k alternatives that read as 0-10, NaN where none does. Where the server writes 10 as '1' then
    '0' (told by the few-shot block's own 10s), a second prompt with '1' in the slots gives P('0' | '1') at each."""
    prompt, slots = simulator_prompt(explanation, tokens)
    try:
        echoed = await llm.prompt_logprobs(prompt)
        if llm.ten_split is None:
            seen = [e[0].strip() for e in at_offsets(echoed, [o for o, v in few_shot_slots() if v == 10]) if e]
            llm.ten_split = None if not seen else seen[0] != '10'
        probs = [digit_probs(e[1]) if e else {} for e in at_offsets(echoed, slots)]
        q = [0.0] * len(slots)
        if llm.ten_split and any(p.get(1) for p in probs):
            prompt1, slots1 = simulator_prompt(explanation, tokens, slot='1')
            echoed1 = await llm.prompt_logprobs(prompt1)
            q = [ten_after_one(e[1]) if e else 0.0 for e in at_offsets(echoed1, [o + 1 for o in slots1])]
    except BadAnswer:
        return None                # an echo of the prompt is not resampled: asking again would not help
    preds = np.array([expected_value(p, qi) if p else np.nan for p, qi in zip(probs, q)], dtype=np.float64)
    return Simulation(preds, no_digit=int(np.isnan(preds).sum()))


async def simulate(llm, explanation, scoring, decode):
    """A Simulation of every scoring excerpt (one request each), or None when any failed."""
    if llm is None:
        return [Simulation(np.array([explanation.get(t, 0.0) for t in toks])) for toks, _ in scoring]
    one = simulate_all_at_once if simulator == 'all-at-once' else simulate_chat
    results = await asyncio.gather(*(one(llm, explanation, [decode([t]) for t in toks]) for toks, _ in scoring))
    return None if any(r is None for r in results) else results


# --- 3b. detection and fuzzing: 0/1 answers about whole excerpts, no logprobs needed -------------------------------

def classifier_examples(rec, n, m, rng):
    """Detection's and fuzzing's excerpts of neuron row n, from its OpenAI records: [(token ids, activations, label)],
    shuffled, or None when it has fewer than MIN_PER_KIND of either kind. Label 1, activating: an excerpt with a value
    that quantises to 1 or more; PER_KIND of them, one from each of PER_KIND equal-count quantiles (by peak) of the
    top excerpts the explainer did not see and the random excerpts that activate. Label 0, non-activating: a random
    excerpt whose values all quantise to 0; PER_KIND of them at random."""
    unseen_top = list(range(1, TOP, 2))
    items = excerpts(rec, 'openai', unseen_top + list(range(TOP, TOP + RAND)), n)
    peak = np.array([quantize(a, m).max() if len(a) else 0 for _, a in items])
    active = np.nonzero(peak >= 1)[0]
    quiet = np.nonzero((peak == 0) & (np.arange(len(items)) >= len(unseen_top)))[0]      # random excerpts only
    if min(len(active), len(quiet)) < MIN_PER_KIND:
        return None
    active = active[np.argsort(-peak[active], kind='stable')]
    picked = [int(rng.choice(q)) for q in np.array_split(active, min(PER_KIND, len(active)))]
    picked += rng.choice(quiet, min(PER_KIND, len(quiet)), replace=False).tolist()
    return [(*items[i], int(peak[i] >= 1)) for i in rng.permutation(picked)]


def classifier_inputs(kind, rec, n, m, key):
    """A neuron's excerpts for detection or fuzzing and the tokens marked in each (none for detection), seeded by
    key = (layer, neuron); None where the neuron has too few of either kind."""
    examples = classifier_examples(rec, n, m, np.random.default_rng([seed, 4, *key]))
    if examples is None:
        return None
    if kind == 'detection':
        return examples, [np.zeros(len(a), dtype=bool) for _, a, _ in examples]
    return examples, fuzzing_marks(examples, np.random.default_rng([seed, 5, *key]))


def excerpt_texts(examples, marks, decode):
    """The excerpts as detection and fuzzing show them: their text, marked tokens inside <<...>>."""
    return [marked([decode([t]) for t in toks], mk) for (toks, _, _), mk in zip(examples, marks)]


def fuzzing_marks(examples, rng):
    """The tokens fuzzing marks in each excerpt: in an activating one those at MARK of its largest value or more; in a
    non-activating one as many random tokens as an activating excerpt has marked on average (rounded up)."""
    marks = [a >= MARK * a.max() if label else None for _, a, label in examples]
    k = math.ceil(np.mean([mk.sum() for mk in marks if mk is not None]))
    for i, (_, a, label) in enumerate(examples):
        if not label:
            marks[i] = np.isin(np.arange(len(a)), rng.choice(len(a), min(k, len(a)), replace=False))
    return marks


async def classify(llm, kind, explanation, examples, marks, decode):
    """Each example's answer (0 or 1, and P(1) where the server gives logprobs, else None), BATCH excerpts a request;
    None when a request failed. marks: each excerpt's marked tokens, a boolean array (all False for detection).
    llm None: the token lookup says 1 where an excerpt's largest looked-up value (detection), or its marked tokens'
    mean value (fuzzing), is 1 or more."""
    if llm is None:
        look = [np.array([explanation.get(t, 0.0) for t in toks]) for toks, _, _ in examples]
        return [(int((v.max() if kind == 'detection' else v[mk].mean()) >= 1), None) for v, mk in zip(look, marks)]
    texts = excerpt_texts(examples, marks, decode)

    async def ask(batch):
        def check(r):
            text, logprobs = answer(r)
            labels = parse_list(text, 'answers', len(batch), 1)
            if labels is None:
                raise BadAnswer('not one 0 or 1 per excerpt')
            p = expected_from_logprobs(logprobs, len(batch)) if logprobs else None
            return list(zip(labels, p or [None] * len(batch)))
        role = 'simulator' if simulator == 'chat' else 'explainer'    # all-at-once's may be a base model, no chat
        return await llm.ask(role, lambda system: classifier_messages(kind, explanation, batch, system), check,
                             schema=('answers', len(batch), 1), max_tokens=4 * len(batch) + 20, temperature=0)
    results = await asyncio.gather(*(ask(texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)))
    return None if any(r is None for r in results) else [a for r in results for a in r]


# --- 4. score: the correlation of simulated and true activations, or the accuracy of 0/1 answers ---------------------

def pearson(x, y):
    """Pearson correlation of the pooled values, or None when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt((dx * dx).sum() * (dy * dy).sum())
    return None if den == 0 or not math.isfinite(den) else float((dx * dy).sum() / den)


def balanced_accuracy(labels, answers):
    """The mean of the rates of right answers on activating and on non-activating excerpts (0.5: chance, whatever
    the mix), with F1 and, where every answer has a P(1), the AUC (the chance an activating excerpt gets the higher)."""
    y, a = np.array(labels), np.array([x for x, _ in answers])
    true_positive_rate, true_negative_rate = (a[y == 1] == 1).mean(), (a[y == 0] == 0).mean()
    tp, fp, fn = int(((a == 1) & (y == 1)).sum()), int(((a == 1) & (y == 0)).sum()), int(((a == 0) & (y == 1)).sum())
    auc = None
    if all(p is not None for _, p in answers):
        p = np.array([p for _, p in answers])
        pos, neg = p[y == 1][:, None], p[y == 0][None, :]
        auc = float(((pos > neg) + 0.5 * (pos == neg)).mean())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return float(true_positive_rate + true_negative_rate) / 2, f1, auc


def failed(m, explanation, why):
    return {'dead': False, 'score': None, 'undefined': True, 'failed': True, 'max_act': m,
            'explanation': explanation and str(explanation), 'failure': why}


async def score_by_simulation(llm, rec, n, protocol, method, explanation, m, decode):
    scoring = excerpts(rec, protocol, SETS[method][2], n)
    result = await simulate(llm, explanation, scoring, decode)
    if result is None:
        return failed(m, explanation, 'simulation')
    preds, hard, no_digit = [r.preds for r in result], any(r.hard for r in result), sum(r.no_digit for r in result)
    slots = sum(len(p) for p in preds)
    if no_digit > max_no_digit * slots:              # not zeros: the simulator did not answer with a value
        return {**failed(m, explanation, f'no digit among the top-k at {no_digit} of {slots} slots'),
                'no_digit': no_digit}
    true, pred = np.concatenate([a for _, a in scoring]), np.concatenate(preds)
    read = ~np.isnan(pred)                            # slots without a digit leave the correlation
    score = pearson(true[read], pred[read])
    return {'dead': False, 'score': score, 'undefined': score is None, 'max_act': m, 'hard': hard,
            'explanation': str(explanation), 'no_digit': int((~read).sum()),
            'show': [(toks, a.tolist(), p.tolist()) for (toks, a), p in zip(scoring[:3], preds[:3])]}


async def score_by_classifying(llm, rec, n, kind, explanation, m, decode, key):
    drawn = classifier_inputs(kind, rec, n, m, key)
    if drawn is None:
        return {'dead': False, 'score': None, 'undefined': True, 'max_act': m, 'explanation': str(explanation)}
    examples, marks = drawn
    answers = await classify(llm, kind, explanation, examples, marks, decode)
    if answers is None:
        return failed(m, explanation, kind)
    ba, f1, auc = balanced_accuracy([label for _, _, label in examples], answers)
    return {'dead': False, 'score': ba, 'undefined': False, 'max_act': m, 'explanation': str(explanation), 'f1': f1,
            'auc': auc, 'examples': len(examples), 'hard': auc is None and llm is not None}


async def score_neuron(rec, n, protocol, decode, llm, key):
    """Explain one neuron from a protocol's explanation set, then score the explanation by every method of that
    protocol, with the LLM (None: the token lookup). key: (layer, neuron), which seeds detection's draws."""
    expl, m = explanation_set(rec, protocol, n)
    if not m > 0:
        return {method: {'dead': True, 'score': None, 'explanation': None} for method in methods_of(protocol)}
    explanation = await explain(llm, expl, m, decode)
    out = {}
    for method in methods_of(protocol):
        if not explanation:
            out[method] = failed(m, explanation, 'explanation')
        elif method in ('detection', 'fuzzing'):
            out[method] = await score_by_classifying(llm, rec, n, method, explanation, m, decode, key)
        else:
            out[method] = await score_by_simulation(llm, rec, n, protocol, method, explanation, m, decode)
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


async def score_all(todo, recs, protocols, decode, llm, done, scores_path, run_key):
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
                    scores.update(await score_neuron(recs[l], n, p, decode, llm, (l, neuron)))
            except (InterpretError, LLMError):
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
    """What a run would ask of the servers, for each kind of request: requests and the tokens of the whole prompts as
    they would be sent, counted with count(text) (GPT-2's tokenizer: the models' own will differ), completions at
    their caps."""
    if simulator == 'tokens':
        return f"--simulator=tokens makes no requests ({len(todo)} neurons to score)"
    tally = {}
    placeholder = 'a short phrase of about ten words describing what the neuron responds to'

    def add(what, messages, completion):
        t = tally.setdefault(what, [0, 0, 0])
        prompt = count(messages) if isinstance(messages, str) else sum(count(x['content']) + 4 for x in messages)
        t[0], t[1], t[2] = t[0] + 1, t[1] + prompt, t[2] + completion

    for l, n, neuron in todo:
        for p in protocols:
            expl, m = explanation_set(recs[l], p, n)
            if not m > 0:
                continue
            add('explanation', explainer_messages(as_shown(expl, m, decode)), explainer_max_tokens)
            if 'simulation' in scoring:
                for toks, _ in excerpts(recs[l], p, SETS[METHODS[p][0]][2], n):   # random_only's are among these
                    tokens = [decode([t]) for t in toks]
                    if simulator == 'all-at-once':
                        add('simulation', simulator_prompt(placeholder, tokens)[0], 1)
                    else:
                        add('simulation', chat_simulator_messages(placeholder, tokens), 8 * len(tokens) + 40)
            for kind in (k for k in ('detection', 'fuzzing') if k in methods_of(p)):
                drawn = classifier_inputs(kind, recs[l], n, m, (l, neuron))
                texts = excerpt_texts(*drawn, decode) if drawn else []
                for i in range(0, len(texts), BATCH):
                    add(kind, classifier_messages(kind, placeholder, texts[i:i + BATCH]), 4 * BATCH + 20)
    lines = [f"dry run: {len(todo)} neurons; requests, prompt tokens and completion tokens at most (GPT-2 tokens):"]
    for what, (r, pt, ct) in tally.items():
        k = len(todo)
        lines.append(f"  {what}: {r:,} requests, {pt:,} + {ct:,} tokens ({r / k:.1f} requests, {pt / k:,.0f} + "
                     f"{ct / k:,.0f} tokens a neuron)")
    if simulator == 'all-at-once':
        lines.append('  (all-at-once: up to twice the simulation requests where the server writes 10 as two tokens)')
    return '\n'.join(lines)


# --- the script ----------------------------------------------------------------------------------------------------

def main():
    check_options()
    try:
        dev = pick_device(device)
        enc = gpt2_tokenizer()
    except (ValueError, PrepareError) as e:
        raise InterpretError(str(e))
    decode = lambda ids: enc.decode([i for i in ids if 0 <= i < enc.n_vocab])
    model, stream, sizes, layer_ids, cols = setup(ckpt, data, seq_len, layers, neurons, protocol, n_openai,
                                                  n_anthropic, seed, dev)
    cfg, T, protocols = model.config, stream.shape[1], list(sizes)
    named = ckpt in GPT2 or ckpt.startswith('hf:')        # a hub name: its own out-<name> folder here
    where = ckpt if os.path.isdir(ckpt) else os.path.dirname(ckpt) or '.'
    folder = out or os.path.join('out-' + ckpt.removeprefix('hf:').replace('/', '--') if named else where, 'interp')
    source = ckpt if named else os.path.abspath(ckpt)
    claim_folder(folder)                      # one run per folder, and one that can be written

    # 1. record, or reuse the records of an earlier run with the same settings
    settings = {'ckpt': source, 'data': os.path.abspath(data), 'seq_len': T, 'seed': seed,
                'excerpt_edges': excerpt_edges, 'n_openai': min(n_openai, len(stream)),
                'n_anthropic': min(n_anthropic, len(stream)),
                'layers': layer_ids, 'neurons': {str(l): cols[l] for l in layer_ids}, 'protocols': protocols}
    meta_path = os.path.join(folder, 'records.json')
    have = json.load(open(meta_path)) if os.path.exists(meta_path) else None
    kept = all(os.path.exists(os.path.join(folder, f'records_L{l}.npz')) for l in layer_ids)
    if have and have['settings'] == settings and kept:
        print(f"using the records in {folder} (same settings)")
        stats = {int(l): v for l, v in have['stats'].items()}
        recs = {l: dict(np.load(os.path.join(folder, f'records_L{l}.npz'))) for l in layer_ids}
    else:
        if os.path.exists(meta_path):
            os.remove(meta_path)
        made, counts = record(model, stream, sizes, layer_ids, cols, dev, mixed_precision(dev, dtype), batch_size, seed,
                              excerpt_edges == 'sequence')
        stats, recs = {}, {}
        for l in layer_ids:
            c = counts[l]
            recs[l] = record_arrays(cols[l], {p: made[p][l] for p in protocols}, stream)
            top_tok = recs[l][f'{protocols[0]}_tokens'][:, :TOP, WINDOW[protocols[0]][0]]    # each top item's own token
            conc = np.mean([np.unique(row, return_counts=True)[1].max() / len(row) for row in top_tok])
            stats[l] = {'zero_fraction': round(1 - c['nonzero'] / (c['tokens'] * cfg.hidden), 4),
                        'l0': round(c['nonzero'] / c['tokens'], 2), 'dead': int((~c['alive']).sum()),
                        'neurons': len(cols[l]), 'top_token_concentration': round(float(conc), 3),
                        'tokens': c['tokens']}
            save(os.path.join(folder, f'records_L{l}.npz'), lambda f: np.savez(f, **recs[l]), 'wb')
        save(meta_path, lambda f: json.dump({'settings': settings, 'stats': stats}, f), 'w')

    # 2. explain, simulate, score: the LLM, or the token lookup in its place; neurons a killed run finished are kept
    run = [settings, scoring, simulator, explainer_model, simulator_model, base_url, simulator_base_url,
           explainer_temperature, simulator_top_logprobs, seed, bad_answer_retries, explainer_max_tokens, max_no_digit]
    run_key = hashlib.sha256(json.dumps(run).encode()).hexdigest()[:16]
    scores_path = os.path.join(folder, 'scores.jsonl')
    done = read_finished(scores_path, run_key) if resume else {}
    if not resume and os.path.exists(scores_path):
        os.remove(scores_path)
    todo = [(l, n, int(neuron)) for l in layer_ids for n, neuron in enumerate(recs[l]['neurons'])
            if (l, int(neuron)) not in done]
    if done:
        print(f"resuming: {len(done)} neurons already scored, {len(todo)} to go")
    if dry_run:
        count = lambda text: len(enc.encode(text, disallowed_special=()))
        print(estimate(todo, recs, protocols, decode, count, simulator, explainer_max_tokens))
        return
    llm = None if simulator == 'tokens' else LLM(
        folder, base_url, explainer_model, simulator_model, simulator_base_url, api_key, concurrency, max_retries,
        timeout, simulator_top_logprobs, bad_answer_retries, seed)
    label = (TOKENS_LABEL if llm is None else
             f"explainer {llm.models['explainer']}, simulator {llm.models['simulator']} ({simulator})")
    unfinished = asyncio.run(score_all(todo, recs, protocols, decode, llm, done, scores_path, run_key))

    # 3. report
    rows, per_method = [], {m: {l: [] for l in layer_ids} for p in protocols for m in methods_of(p)}
    for (l, neuron), scores in sorted(done.items()):
        for m, sc in scores.items():
            per_method[m][l].append(sc)
        defined = ([sc['score'] for m, sc in scores.items() if sc['score'] is not None and m in SETS]   # simulation's,
                   or [sc['score'] for sc in scores.values() if sc['score'] is not None])               # else any
        rows.append({'layer': l, 'neuron': neuron, 'scores': scores, 'best': max(defined) if defined else None})
    val_loss = model.val_loss
    summary = {'ckpt': source, 'model_name': model_name(cfg), 'model': vars(cfg).copy(),
               'val_loss': None if val_loss is None else round(float(val_loss), 4), 'simulator': simulator,
               'simulator_label': label, 'settings': settings, 'unfinished': len(unfinished),
               'layer_ids': layer_ids, 'stats': {str(l): v for l, v in stats.items()},
               'methods': {m: {'layers': {str(l): v for l, v in s['layers'].items()}, 'model': s['model']}
                           for m, s in ((m, summarize(v, cfg.n_layer)) for m, v in per_method.items())}}
    print(write_all(folder, summary, rows, decode))
    if llm:
        print(f"LLM: {llm.requests} requests ({llm.cached} answered from the cache), "
              f"{llm.prompt_tokens:,} prompt + {llm.completion_tokens:,} completion tokens")
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
                fail("--compare needs one or more interp folders, e.g. --compare out-crate/interp out-gpt2/interp")
            page = os.path.join(os.path.dirname(os.path.normpath(sys.argv[2].split('+')[0])), 'compare.html')
            print(compare(sys.argv[2:], page))
            print(f"wrote {page}: the scores side by side, and the training curves on shared axes")
        else:
            globals().update(configure(OPTIONS, sys.argv[1:]))
            # asyncio.run (3.11+) turns Ctrl-C into a cancellation of its task, which a client library deep in a
            # request can swallow, and the run then goes on; a handler of our own keeps it a KeyboardInterrupt
            signal.signal(signal.SIGINT, interrupt)
            main()
    except (InterpretError, LLMError, ValueError) as e:     # ValueError: compare()'s missing or unreadable folders
        fail(str(e))
    except OSError as e:                          # a write that failed (a full disk): what was finished is kept
        fail(f"cannot write {e.filename} ({e.strerror}); finished neurons are kept: free some space and run the same "
             f"command again")
    except KeyboardInterrupt:
        print("\ninterrupted: finished neurons are kept; run the same command again to go on", file=sys.stderr)
        sys.exit(130)
