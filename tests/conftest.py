import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a model small enough that a training step takes milliseconds on one CPU core
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--vocab_size=1024', '--dropout=0.0',
        '--device=cpu', '--compile=False', '--eval_iters=2', '--gradient_accumulation_steps=1', '--warmup_iters=5', '--learning_rate=3e-3']


def markov_tokens(n, seed):
    """A learnable stream: t' = (5t + 3) mod 64, with a random token 10% of the time."""
    rng = np.random.default_rng(seed)
    out, t = np.empty(n, dtype=np.uint16), 0
    for i in range(n):
        t = (5 * t + 3) % 64 if rng.random() > 0.1 else int(rng.integers(64))
        out[i] = t
    return out


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    os.makedirs(root / 'toy')
    markov_tokens(20000, 0).tofile(root / 'toy' / 'train.bin')
    markov_tokens(4000, 1).tofile(root / 'toy' / 'val.bin')
    return str(root)


def run(script, *args, check=True, env=None, cmd=None, timeout=600):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    p = subprocess.run((cmd or [sys.executable]) + [os.path.join(ROOT, script), *args], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]
