import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, read_log, run
from model import load_model


def train(data_dir, out_dir, *args, **kw):
    return run('train.py', f'--data_dir={data_dir}', '--dataset=toy', f'--out_dir={out_dir}', *TINY,
               '--batch_size=4', '--log_interval=1', *args, **kw)


def losses(out_dir):
    return {r['iter']: r['loss'] for r in read_log(out_dir) if 'loss' in r}


def test_training_lowers_the_loss(data_dir, tmp_path):
    for model in ([], ['--attn=mha', '--ffn=mlp', '--bias=False']):
        out = tmp_path / ('gpt2' if model else 'crate')
        p = train(data_dir, out, '--max_iters=80', '--eval_interval=80', '--batch_size=8', *model)
        assert re.search(r'done in [\d.]+ min: 80 iterations, 20,480 tokens; val loss [\d.]+, best [\d.]+', p.stdout)
        assert f'next: python sample.py --ckpt={out}' in p.stdout and f'python interpret.py --ckpt={out}' in p.stdout
        evals = [r for r in read_log(out) if 'val_loss' in r]
        assert evals[0]['iter'] == 0 and evals[-1]['iter'] == 80
        assert evals[0]['val_loss'] > 6.5                        # about ln(1024) at init
        assert evals[-1]['val_loss'] < 3.0                       # learned the chain (its entropy is ~1)
        assert not os.path.exists(out / 'ckpt.pt.tmp')
        trained = load_model(str(out))
        cfg = trained.config
        assert (cfg.attn, cfg.ffn, cfg.bias) == (('mha', 'mlp', False) if model else ('mssa', 'ista', True))
        # each eval logs the neurons' sparsity on the validation slice: recompute it from the saved model
        val = np.fromfile(os.path.join(data_dir, 'toy', 'val.bin'), dtype=np.uint16).astype(np.int64)
        x = torch.from_numpy(np.stack([val[i:i + 32] for i in np.linspace(0, len(val) - 33, 2 * 8).astype(np.int64)]))
        with torch.no_grad():
            _, _, neurons = trained(x, return_neurons=True)
        for a, logged in zip(neurons, evals[-1]['sparsity']):
            active = (a > 0).flatten(0, 1)
            assert logged == {'zero_fraction': round(1 - active.float().mean().item(), 4),
                              'l0': round(active.sum().item() / x.numel(), 2), 'dead': int((~active.any(0)).sum())}
        assert len(evals[0]['sparsity']) == 2


def test_torchrun_two_processes_equal_one_with_twice_the_accumulation(data_dir, tmp_path):
    args = ['--max_iters=6', '--eval_interval=6', '--gradient_accumulation_steps=4']
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    p = train(data_dir, tmp_path / 'ddp', *args, cmd=torchrun, env={'OMP_NUM_THREADS': '1'})
    assert '2 process(es) on cpu' in p.stdout
    train(data_dir, tmp_path / 'one', *args, env={'OMP_NUM_THREADS': '1'})
    ddp, one = read_log(tmp_path / 'ddp'), read_log(tmp_path / 'one')
    assert [r['iter'] for r in ddp] == [r['iter'] for r in one]
    for a, b in zip(ddp, one):
        for k in ('loss', 'train_loss', 'val_loss'):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6)
    assert losses(tmp_path / 'one')[6] < losses(tmp_path / 'one')[1]
    for a, b in zip(load_model(str(tmp_path / 'ddp')).parameters(), load_model(str(tmp_path / 'one')).parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_accumulation_must_divide_among_processes(data_dir, tmp_path):
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    p = train(data_dir, tmp_path, '--gradient_accumulation_steps=3', cmd=torchrun, check=False)
    assert p.returncode != 0 and 'must be divisible by the 2 processes' in p.stderr


@pytest.mark.parametrize('args, message', [
    (['--no_such_option=1'], "unknown option 'no_such_option'"),
    (['--max_iters=ten'], 'max_iters must be int'),
    (['--learning_rate=True'], 'learning_rate must be float'),
    (['--bias=1'], 'bias must be bool'),
    (['config/no_such_config.py'], 'config file config/no_such_config.py not found'),
    (['--max_iters'], 'write overrides as --key=value'),
    (['--attn=linear'], "attn must be 'mssa' or 'mha'"),
    (['--dataset=missing'], "missing/train.bin not found: make it with `python prepare.py --files='docs/*.txt' "
                            "--name=missing --out_dir="),
    (['--dataset=tinystories'], 'tinystories/train.bin not found: make it with `python prepare.py --dataset=tinystories'),
    (['--init_from=resume'], "init_from='resume' but"),
    (['--batch_size=0'], '--batch_size=0 must be at least 1'),
    (['--eval_iters=-1'], '--eval_iters=-1 must be at least 1'),
    (['--max_iters=-5'], '--max_iters=-5 must not be negative'),
    (['--n_head=0'], 'n_head must be at least 1, got 0'),
    (['--block_size=-4'], 'block_size must be at least 1, got -4'),
    (['--dropout=1.0'], 'dropout must be in [0, 1)'),
    (['--device=cuda:99' if torch.cuda.is_available() else '--device=cuda'], 'GPU'),
])
def test_config_errors_are_one_line_with_exit_code_2(data_dir, tmp_path, args, message):
    p = train(data_dir, tmp_path / 'x', *args, check=False)
    assert p.returncode == 2
    assert message in p.stderr and p.stderr.count('\n') == 1 and 'Traceback' not in p.stderr


def test_config_file_and_overrides(data_dir, tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("import math\nmax_iters = 2\nlearning_rate = 1e-3\nn_layer = 1\n")
    out = tmp_path / 'o'
    p = train(data_dir, out, str(cfg), '--learning_rate=2e-3', '--eval_interval=2', '--warmup_iters=0',
              '--decay_lr=False')
    assert 'mssa + ista, 1 layers' in p.stdout
    assert [r['lr'] for r in read_log(out) if 'lr' in r] == [2e-3, 2e-3]
    cfg.write_text("max_iter = 2\n")
    p = train(data_dir, out, str(cfg), check=False)
    assert p.returncode == 2 and f"unknown option 'max_iter' in {cfg}" in p.stderr


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    out = tmp_path / 'nan'
    train(data_dir, out, '--max_iters=2', '--eval_interval=2')
    before = (out / 'ckpt.pt').read_bytes()
    p = train(data_dir, out, '--init_from=resume', '--max_iters=10', '--learning_rate=1e30', '--grad_clip=0',
              '--warmup_iters=0', '--decay_lr=False', '--eval_interval=4', check=False)
    assert p.returncode == 1 and ('loss is nan at iter' in p.stderr or 'loss is inf at iter' in p.stderr)
    assert 'the last good checkpoint is' in p.stderr and "dtype='float32'" not in p.stderr   # it is float32
    assert (out / 'ckpt.pt').read_bytes() == before


def test_resume_refuses_a_different_model(data_dir, tmp_path):
    train(data_dir, tmp_path, '--max_iters=1', '--eval_interval=1')
    p = train(data_dir, tmp_path, '--init_from=resume', '--n_layer=3', '--max_iters=2', check=False)
    assert p.returncode == 2 and 'resume: n_layer=3 here but 2 in' in p.stderr


def test_training_benchmark_prints_each_models_size_and_speed():
    p = run('bench.py', '--what=train', '--models=crate,gpt2', '--n_layer=1', '--n_head=2', '--n_embd=32',
            '--block_size=32', '--vocab_size=256', '--batch_size=4', '--steps=2', '--rounds=1', '--device=cpu')
    lines = {l.split()[0]: l for l in p.stdout.splitlines() if l.split() and l.split()[0] in ('crate', 'gpt2')}
    assert set(lines) == {'crate', 'gpt2'}
    from model import ModelConfig, Transformer
    for name, args in (('crate', {}), ('gpt2', dict(attn='mha', ffn='mlp', bias=False))):
        m = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=256, **args))
        assert f"{m.flops_per_token() / 1e6:9.1f} MFLOPs/token" in lines[name]
        assert f"{m.get_num_params() / 1e6:7.2f}M params" in lines[name]
        assert float(lines[name].split('tok/s')[0].split()[-1].replace(',', '')) > 0
    assert 'crate/gpt2: time per token' in p.stdout


@pytest.mark.parametrize('cfg', sorted(f for f in os.listdir(os.path.join(ROOT, 'config')) if f.endswith('.py')))
def test_every_config_file_is_valid(cfg, tmp_path):
    """Each config's keys and types pass the configurator: the run gets as far as looking for its data."""
    script = 'sae.py' if cfg.startswith('sae_') else 'train.py'
    p = run(script, f'config/{cfg}', f'--data_dir={tmp_path}', f'--out_dir={tmp_path / "o"}', check=False)
    assert p.returncode == 2 and 'train.bin not found: make it with' in p.stderr, p.stderr


def one_line_error(p, message):
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and p.stderr.count('\n') == 1 and 'Traceback' not in p.stderr, p.stderr


def test_a_config_file_that_fails_names_its_line(data_dir, tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("max_iters = 2\nn_layer = depth\n")
    one_line_error(train(data_dir, tmp_path / 'o', str(cfg), check=False),
                   f"config file {cfg} line 2: NameError: name 'depth' is not defined")
    cfg.write_text("max_iters = 2\nn_layer = = 3\n")
    one_line_error(train(data_dir, tmp_path / 'o', str(cfg), check=False), f"config file {cfg} line 2: invalid syntax")
    assert not (tmp_path / 'o').exists()


def test_bad_token_files_are_refused_before_anything_is_written(data_dir, tmp_path):
    good = np.fromfile(os.path.join(data_dir, 'toy', 'train.bin'), dtype=np.uint16)
    for name, train_bytes, meta, message in (
            ('odd', good.tobytes() + b'\0', None, 'has an odd number of bytes (40,001)'),
            ('big', np.append(good, np.uint16(2000)).tobytes(), None, 'train.bin holds token id 2000 but the model'),
            ('meta', good.tobytes(), {'vocab_size': 50257}, "meta.json holds token id 50256 but the model's vocabulary "
                                                            "is 1024")):
        d = tmp_path / name / 'toy'
        d.mkdir(parents=True)
        (d / 'train.bin').write_bytes(train_bytes)
        shutil.copy(os.path.join(data_dir, 'toy', 'val.bin'), d / 'val.bin')
        if meta:
            (d / 'meta.json').write_text(json.dumps(meta))
        one_line_error(train(tmp_path / name, tmp_path / 'o', check=False), message)
        assert not (tmp_path / 'o').exists()               # no empty run folder left behind


def test_a_fresh_run_never_overwrites_a_run(data_dir, tmp_path):
    out = tmp_path / 'run'
    p = train(data_dir, out, '--max_iters=4', '--eval_interval=2')
    assert 'warning: max_iters=4 < lr_decay_iters=600000' in p.stderr and 'eval val' in p.stderr
    assert re.search(r'step 2: train loss [\d.]+, val loss [\d.]+ \(eval [\d.]+ s\)', p.stdout)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    one_line_error(train(data_dir, out, '--max_iters=2', '--eval_interval=2', check=False),
                   'holds a run (ckpt.pt, log.jsonl): continue it with --init_from=resume, train into another --out_dir, '
                   'or replace it with --overwrite=True')
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    p = train(data_dir, out, '--max_iters=2', '--eval_interval=2', '--lr_decay_iters=2', '--overwrite=True')
    assert "removed the earlier run's ckpt.pt and log.jsonl" in p.stdout and 'warning' not in p.stderr
    assert [r['iter'] for r in read_log(out)] == [0, 1, 2, 2]       # the new run's log only
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 2


def test_resume_after_a_kill_equals_the_uninterrupted_run_bit_for_bit(data_dir, tmp_path):
    """A kill after iteration 6 with the last checkpoint at 3: the log has 4..6 twice unless resume cuts it; the
    losses and weights then equal an uninterrupted run's exactly, dropout included (every random state is kept)."""
    args = ['--eval_interval=3', '--lr_decay_iters=6', '--dropout=0.1']
    full, part = tmp_path / 'full', tmp_path / 'part'
    train(data_dir, full, *args, '--max_iters=6')
    train(data_dir, part, *args, '--max_iters=3')
    ckpt = torch.load(part / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 3 and set(ckpt['rng']) == {'sampler', 'torch', 'cuda', 'numpy'}
    ckpt3 = (part / 'ckpt.pt').read_bytes()
    train(data_dir, part, *args, '--max_iters=6', '--init_from=resume')
    (part / 'ckpt.pt').write_bytes(ckpt3)                 # as if killed after 6 before its checkpoint was written
    with open(part / 'log.jsonl', 'a') as f:
        f.write('{"iter": 7, "lo')                         # and in the middle of a log line
    (part / 'ckpt.pt.tmp').write_bytes(b'half a checkpoint')
    p = train(data_dir, part, *args, '--max_iters=6', '--init_from=resume')
    assert 'resuming from iteration 3 of' in p.stdout and 'dropped 5 log line(s) after it' in p.stdout
    assert f'removed {part / "ckpt.pt.tmp"}, a partial checkpoint' in p.stdout
    numbers = lambda out: [(r['iter'], r.get('loss'), r.get('val_loss')) for r in read_log(out)]
    assert numbers(part) == numbers(full)                 # one line per iteration, the same losses exactly
    assert not (part / 'ckpt.pt.tmp').exists()
    for a, b in zip(load_model(str(full)).parameters(), load_model(str(part)).parameters()):
        assert torch.equal(a, b)


WANDB = '''"""A stand-in for wandb: each call appended to $WANDB_CALLS as a JSON line."""
import json, os
def _write(call):
    with open(os.environ['WANDB_CALLS'], 'a') as f:
        f.write(json.dumps(call) + '\\n')
class _Run:
    def __init__(self, id):
        self.id = id
def init(project=None, name=None, config=None, id=None, resume=None):
    _write({'init': {'project': project, 'name': name, 'id': id, 'resume': resume}})
    return _Run(id or 'run-1')
def log(data, step=None):
    _write({'log': data, 'step': step})
'''


def test_wandb_logs_what_log_jsonl_holds_and_a_resume_continues_its_run(data_dir, tmp_path):
    (tmp_path / 'stand-in').mkdir()
    (tmp_path / 'stand-in' / 'wandb.py').write_text(WANDB)
    env = {'PYTHONPATH': str(tmp_path / 'stand-in'), 'WANDB_CALLS': str(tmp_path / 'calls.jsonl')}
    args = ['--eval_interval=2', '--wandb_log=True', '--wandb_project=p', '--wandb_run_name=r']
    train(data_dir, tmp_path / 'run', '--max_iters=2', *args, env=env)
    train(data_dir, tmp_path / 'run', '--max_iters=4', '--init_from=resume', *args, env=env)
    calls = [json.loads(l) for l in open(tmp_path / 'calls.jsonl')]
    inits = [c['init'] for c in calls if 'init' in c]
    assert inits == [{'project': 'p', 'name': 'r', 'id': None, 'resume': 'allow'},
                     {'project': 'p', 'name': 'r', 'id': 'run-1', 'resume': 'allow'}]     # the same run again
    logged = [(c['step'], c['log']) for c in calls if 'log' in c]
    want = []
    for r in read_log(tmp_path / 'run'):
        flat = {k: v for k, v in r.items() if k != 'sparsity'}
        for l, layer in enumerate(r.get('sparsity', [])):
            flat.update({f'layer{l}/{k}': v for k, v in layer.items()})
        want.append((r['iter'], flat))
    assert logged == want and any('layer1/zero_fraction' in d for _, d in logged)
    (tmp_path / 'absent').mkdir()                                  # as if wandb were not installed
    (tmp_path / 'absent' / 'wandb.py').write_text("raise ImportError('No module named wandb')")
    p = train(data_dir, tmp_path / 'none', '--max_iters=2', '--wandb_log=True', check=False,
              env={'PYTHONPATH': str(tmp_path / 'absent')})
    assert p.returncode == 2 and 'pip install wandb' in p.stderr and not (tmp_path / 'none').exists()
