import re

import pytest

from conftest import TINY, run


@pytest.fixture(scope='module')
def ckpt(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('sample')
    run('train.py', f'--data_dir={data_dir}', '--dataset=toy', f'--out_dir={out}', *TINY, '--max_iters=20',
        '--eval_interval=20', '--batch_size=4')
    return str(out)


def sample(ckpt, *args, check=True):
    return run('sample.py', f'--ckpt={ckpt}', '--device=cpu', '--start=1 2 3 4 5', '--max_new_tokens=12', *args,
               check=check)


def test_sampling_is_reproducible_with_a_seed(ckpt):
    a, b = sample(ckpt, '--seed=1'), sample(ckpt, '--seed=1')
    c = sample(ckpt, '--seed=2')
    assert a.stdout == b.stdout and a.stdout != c.stdout
    texts = a.stdout.split('---------------\n')[:-1]
    assert len(texts) == 3 and all(t.startswith('1 2 3 4 5') for t in texts)


def next_table(stdout):
    """rank -> ((token, p) unsteered, (token, p) steered)"""
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^(\d+)\s+('.*?'|\".*?\")\s+([\d.]+)\s+('.*?'|\".*?\")\s+([\d.]+)\s*$", line)
        if m:
            rows[int(m[1])] = ((m[2], float(m[3])), (m[4], float(m[5])))
    return rows


def test_steering_changes_the_next_token_distribution(ckpt):
    p = sample(ckpt, '--steer=0:3:100', '--steer=1:60:100', '--show_next=5', '--num_samples=0')
    rows = next_table(p.stdout)
    assert sorted(rows) == [1, 2, 3, 4, 5]
    unsteered, steered = [r[0] for r in rows.values()], [r[1] for r in rows.values()]
    assert unsteered != steered
    assert all(a[1] >= b[1] for a, b in zip(unsteered, unsteered[1:]))  # sorted by probability
    assert 0 < sum(p for _, p in unsteered) <= 1
    # the scale a value is on: each steered neuron's own range on the prompt, computed here from the model
    from model import load_model
    import torch
    from prepare import gpt2_tokenizer
    x = torch.tensor([gpt2_tokenizer().encode('1 2 3 4 5')])
    _, _, neurons = load_model(ckpt)(x, return_neurons=True)
    for layer, j in ((0, 3), (1, 60)):
        a = neurons[layer][0, :, j]
        assert (f"layer {layer} neuron {j} on this prompt: {a.min().item():.3g} to {a.max().item():.3g}, steered to "
                f"100") in p.stdout, p.stdout


def test_steering_changes_the_samples(ckpt):
    plain, steered = sample(ckpt, '--seed=3'), sample(ckpt, '--seed=3', '--steer=1:7:1000')
    assert plain.stdout != steered.stdout


@pytest.mark.parametrize('spec, message', [('0:41', 'write it as layer:neuron:value'),
                                           ('5:1:100', 'the model has layers 0..1 and neurons 0..127'),
                                           ('0:128:1', 'the model has layers 0..1 and neurons 0..127'),
                                           ('0:5:nan', 'the value must be a finite number'),
                                           ('0:5:-inf', 'the value must be a finite number')])
def test_bad_steering_is_a_clear_error(ckpt, spec, message):
    p = sample(ckpt, f'--steer={spec}', check=False)
    assert p.returncode == 2 and message in p.stderr and p.stderr.count('\n') == 1


@pytest.mark.parametrize('arg, message', [('--show_next=-1', '--show_next=-1 must be at least 0'),
                                          ('--top_k=-5', '--top_k=-5 must be at least 0'),
                                          ('--temperature=-1', '--temperature=-1.0 must be at least 0'),
                                          ('--start=FILE:no/such.txt', '--start=FILE:no/such.txt: cannot read it '
                                                                       '(No such file or directory)'),
                                          ('--start=FILE:', 'cannot read it')])
def test_bad_options_are_one_line(ckpt, arg, message):
    p = sample(ckpt, arg, check=False)
    assert p.returncode == 2 and message in p.stderr and p.stderr.count('\n') == 1, p.stderr


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    p = run('sample.py', f'--ckpt={tmp_path}', check=False)
    assert p.returncode == 2 and 'no checkpoint at' in p.stderr
