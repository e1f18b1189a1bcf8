import os
import sys

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
        train(data_dir, out, '--max_iters=80', '--eval_interval=80', '--batch_size=8', *model)
        evals = [r for r in read_log(out) if 'val_loss' in r]
        assert evals[0]['iter'] == 0 and evals[-1]['iter'] == 80
        assert evals[0]['val_loss'] > 6.5                        # about ln(1024) at init
        assert evals[-1]['val_loss'] < 3.0                       # learned the chain (its entropy is ~1)
        assert not os.path.exists(out / 'ckpt.pt.tmp')
        cfg = load_model(str(out)).config
        assert (cfg.attn, cfg.ffn, cfg.bias) == (('mha', 'mlp', False) if model else ('mssa', 'ista', True))


def test_resume_equals_uninterrupted_run_bit_for_bit(data_dir, tmp_path):
    args = ['--max_iters=12', '--eval_interval=6', '--lr_decay_iters=12', '--dropout=0.1']
    train(data_dir, tmp_path / 'full', *args)
    train(data_dir, tmp_path / 'part', *args[1:], '--max_iters=6')
    ckpt = torch.load(tmp_path / 'part' / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 6 and set(ckpt['rng']) == {'sampler', 'torch', 'cuda', 'numpy'}
    train(data_dir, tmp_path / 'part', *args, '--init_from=resume')
    full, part = losses(tmp_path / 'full'), losses(tmp_path / 'part')
    assert sorted(full) == sorted(part) == list(range(1, 13))
    assert all(full[i] == part[i] for i in full)               # exact float equality, with dropout on
    for a, b in zip(load_model(str(tmp_path / 'full')).parameters(), load_model(str(tmp_path / 'part')).parameters()):
        assert torch.equal(a, b)


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
    (['--dataset=missing'], 'missing/train.bin not found: make it with `python prepare.py'),
    (['--init_from=resume'], "init_from='resume' but"),
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
    assert 'the last good checkpoint is' in p.stderr
    assert (out / 'ckpt.pt').read_bytes() == before


def test_resume_refuses_a_different_model(data_dir, tmp_path):
    train(data_dir, tmp_path, '--max_iters=1', '--eval_interval=1')
    p = train(data_dir, tmp_path, '--init_from=resume', '--n_layer=3', '--max_iters=2', check=False)
    assert p.returncode == 2 and 'resume: n_layer=3 here but 2 in' in p.stderr


def test_benchmark_mode_prints_one_line_per_model(tmp_path):
    p = run('train.py', '--bench=crate,gpt2', '--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=32',
            '--vocab_size=256', '--batch_size=4', '--bench_steps=2', '--bench_rounds=1', '--device=cpu',
            '--compile=False', f'--out_dir={tmp_path / "never"}', '--dataset=none')
    lines = {l.split()[0]: l for l in p.stdout.splitlines() if l.split() and l.split()[0] in ('crate', 'gpt2')}
    assert set(lines) == {'crate', 'gpt2'}
    from model import ModelConfig, Transformer
    for name, args in (('crate', {}), ('gpt2', dict(attn='mha', ffn='mlp', bias=False))):
        fpt = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=256, **args)).flops_per_token()
        assert f"{fpt / 1e6:9.1f} MFLOPs/token" in lines[name]
        assert float(lines[name].split('tok/s')[0].split()[-1].replace(',', '')) > 0
    assert 'crate/gpt2: time per token' in p.stdout and not (tmp_path / 'never').exists()


@pytest.mark.parametrize('cfg', sorted(f for f in os.listdir(os.path.join(ROOT, 'config')) if f.endswith('.py')))
def test_every_config_file_is_valid(cfg, tmp_path):
    """Each config's keys and types pass the configurator: the run gets as far as looking for its data."""
    p = run('train.py', f'config/{cfg}', f'--data_dir={tmp_path}', f'--out_dir={tmp_path / "o"}', check=False)
    assert p.returncode == 2 and 'train.bin not found: make it with `python prepare.py' in p.stderr, p.stderr
