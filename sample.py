"""
Sample from a trained model (ours or a released CRATE checkpoint), optionally steering neurons.

    python sample.py --ckpt=out-crate-1l --start="Once upon a time" --num_samples=3
    python sample.py --ckpt=out-crate-1l --start="1 2 3 4 5" --steer=0:41:100 --show_next=5 --num_samples=0
"""

import math
import sys

import torch
import torch.nn.functional as F

from configurator import configure, fail, mixed_precision, pick_device, script_defaults
from model import load_model, overwrite
from prepare import PrepareError, gpt2_tokenizer

# -----------------------------------------------------------------------------------------------------------
ckpt = 'out'                 # a checkpoint file or folder, hf:OWNER/REPO[/FILE], or gpt2 ... gpt2-xl (OpenAI's)
start = '\n'                 # the prompt, or FILE:path to read it from a file
num_samples = 3
max_new_tokens = 200
temperature = 0.8            # 0 = greedy
top_k = 200                  # 0 = no top-k cut
seed = 1337
steer = []                   # layer:neuron:value, repeatable: overwrite that neuron at every position
show_next = 0                # print the top-k next-token probabilities for the prompt, with and without steering
device = 'auto'
dtype = 'float32'            # 'float32' or 'bfloat16'
# -----------------------------------------------------------------------------------------------------------
globals().update(configure(script_defaults(globals()), sys.argv[1:]))


def parse_steer(specs, model, sae):
    """['0:41:100', ...] -> {0: [(41, 100.0)]}, checked against the model's layers and neuron count. For an SAE
    the layer is the base model's layer the SAE reads, and the neuron is a feature."""
    out = {}
    for spec in specs:
        try:
            layer, neuron, value = spec.split(':')
            layer, neuron, value = int(layer), int(neuron), float(value)
        except ValueError:
            fail(f"--steer={spec}: write it as layer:neuron:value, e.g. --steer=0:41:100")
        if not math.isfinite(value):
            fail(f"--steer={spec}: the value must be a finite number, e.g. --steer=0:41:100")
        L, h = model.config.n_layer, model.config.hidden
        if sae and not (layer == model.layer and 0 <= neuron < h):
            fail(f"--steer={spec}: this SAE reads layer {model.layer} and has features 0..{h - 1}")
        if not sae and not (0 <= layer < L and 0 <= neuron < h):
            fail(f"--steer={spec}: the model has layers 0..{L - 1} and neurons 0..{h - 1}")
        out.setdefault(layer, []).append((neuron, value))
    return out


for name, low in (('num_samples', 0), ('max_new_tokens', 0), ('top_k', 0), ('show_next', 0), ('temperature', 0)):
    if globals()[name] < low:
        fail(f"--{name}={globals()[name]} must be at least {low}")
if dtype not in ('float32', 'bfloat16'):
    fail(f"--dtype={dtype}: use 'float32' or 'bfloat16'")
try:
    device = pick_device(device)
    model = load_model(ckpt, device)
except (FileNotFoundError, ValueError) as e:
    fail(str(e))
sae = hasattr(model, 'splice')      # an SAEModel (sae.py): its neurons are features, read from a base layer
steering = parse_steer(steer, model, sae)
original, asked = model, steering
if sae:                           # an SAE: steer its features, the layer's neurons become its reconstruction (lossy)
    steered = overwrite(sum(steering.values(), []))
    model, noop, steering = model.base, model.splice(), model.splice(steered) if steering else None
else:                             # steer the model's own neurons: the machinery alone changes nothing
    noop = {l: overwrite([]) for l in steering}
    steering = {l: overwrite(pairs) for l, pairs in steering.items()}
autocast = mixed_precision(device, dtype)
try:
    enc = gpt2_tokenizer()
except PrepareError as e:
    fail(str(e))


def decode(ids):
    return enc.decode([i for i in ids if i < enc.n_vocab])  # the padding ids (50257..50303) have no text


if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else 'not UTF-8 text'
        fail(f"--start=FILE:{start[5:]}: cannot read it ({why}); "
             f"give a readable UTF-8 text file")
ids = enc.encode(start, allowed_special={'<|endoftext|>'})
if not ids:
    fail("the prompt is empty; pass --start=TEXT or --start=FILE:path")
if max(ids) >= model.config.vocab_size:
    fail(f"the prompt has token {max(ids)} but the model's vocabulary is {model.config.vocab_size}; "
         f"this model was not trained on GPT-2 tokens of that range")
x = torch.tensor(ids, dtype=torch.long, device=device)[None, -model.config.block_size:]

if show_next:
    with torch.no_grad(), autocast:
        probs = {name: F.softmax(model(x, steer=s)[0][0, -1].float(), dim=-1)
                 for name, s in (('unsteered', None), ('no-op', noop), ('steered', steering))}
    p, q = probs['unsteered'], probs['no-op']
    kl = (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum().item()
    print(f"next token after {start[-60:]!r}")
    print(f"fidelity: the intervention alone, with nothing steered, moves the next token's distribution by "
          f"KL(unsteered || intervention with nothing steered) = {kl:.6g} nats (0: it changes nothing)")
    if asked:      # the scale a steered value is on: the neuron's own values on this prompt
        with torch.no_grad(), autocast:
            neurons = original(x, return_neurons=True)[2]
        for layer, pairs in asked.items():
            a = neurons[0 if sae else layer][0].float()
            for j, v in pairs:
                print(f"layer {layer} neuron {j} on this prompt: {a[:, j].min().item():.3g} to "
                      f"{a[:, j].max().item():.3g}, steered to {v:g}")
    columns = ['unsteered'] + (['steered'] if steering else [])
    print('rank  ' + ''.join(f"{c:<32}" for c in columns))
    show_next = min(show_next, len(p))
    top = {c: torch.topk(probs[c], show_next) for c in columns}
    for r in range(show_next):
        cells = [f"{decode([top[c].indices[r].item()])!r:<20}{top[c].values[r].item():<12.6f}" for c in columns]
        print(f"{r + 1:<6}" + ''.join(cells).rstrip())

torch.manual_seed(seed)
for _ in range(num_samples):
    with torch.no_grad(), autocast:
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, steer=steering or None)
    print(decode(y[0].tolist()))
    print('---------------')
