"""Checkpoint files as users get them: ours, the authors' released ones, and broken or hostile ones, through the
scripts users run."""
import os
import sys

import pytest
import torch

from conftest import TINY, read_log, released_crate, run


def train(data_dir, out_dir, *args, **kw):
    return run('train.py', f'--data_dir={data_dir}', '--dataset=toy', f'--out_dir={out_dir}', *TINY,
               '--batch_size=4', '--log_interval=1', *args, **kw)


@pytest.fixture(scope='module')
def good(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('good')
    train(data_dir, out, '--max_iters=2', '--eval_interval=2')
    return out / 'ckpt.pt'


class RunsCode:
    """Unpickling this would run a shell command: weights_only=True must refuse it."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def broken(case, good, folder):
    """Write the case's file to folder/ckpt.pt."""
    path = folder / 'ckpt.pt'
    raw = good.read_bytes()
    ckpt = torch.load(good, weights_only=True)
    if case == 'truncated':
        path.write_bytes(raw[:len(raw) // 2])
    elif case == 'empty':
        path.write_bytes(b'')
    elif case == 'random bytes':
        path.write_bytes(os.urandom(4096))
    elif case == 'missing key':
        del ckpt['model']['blocks.1.ffn.weight']
        torch.save(ckpt, path)
    elif case == 'wrong shape':
        ckpt['model']['blocks.0.attn.U.weight'] = torch.zeros(32, 16)
        torch.save(ckpt, path)
    elif case == 'released 1L without its dictionary':
        sd, args = released_crate(n_layer=1)
        del sd['_orig_mod.transformer.h.0.ista.weight']
        torch.save({'model': sd, 'model_args': args, 'iter_num': 1}, path)
    elif case == 'runs code when unpickled':
        ckpt['config'] = RunsCode(folder / 'ran')
        torch.save(ckpt, path)
    return path


CASES = {'truncated': 'not a readable PyTorch checkpoint', 'empty': 'is empty (0 bytes)',
         'random bytes': 'not a readable PyTorch checkpoint', 'missing key': 'lacks 1 entry its model needs: blocks.1.ffn.weight',
         'wrong shape': 'blocks.0.attn.U.weight has shape (32, 16), its model_args say (32, 32)',
         'released 1L without its dictionary': 'lacks 1 entry its model needs: transformer.h.0.ista.weight',
         'runs code when unpickled': 'refused because loading it could run code'}


@pytest.mark.parametrize('case', list(CASES))
def test_a_bad_checkpoint_is_one_line_and_exit_2_in_every_script(case, good, data_dir, tmp_path):
    path = broken(case, good, tmp_path)
    before = path.read_bytes()
    runs = {'sample.py': run('sample.py', f'--ckpt={tmp_path}', '--device=cpu', '--num_samples=1', check=False),
            'interpret.py': run('interpret.py', f'--ckpt={tmp_path}', f'--data={data_dir}/toy', '--simulator=tokens',
                                '--device=cpu', check=False),
            'train.py': train(data_dir, tmp_path, '--init_from=resume', '--max_iters=4', check=False)}
    for script, p in runs.items():
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), (script, p.stderr)
        want = CASES[case]
        if script == 'train.py' and case == 'released 1L without its dictionary':
            want = 'model-only file'                        # not a training checkpoint to resume, whatever its model
        assert want in lines[0] and str(path) in lines[0], (script, lines[0])
    assert path.read_bytes() == before and not (tmp_path / 'ran').exists() and not (tmp_path / 'interp').exists()


def test_our_checkpoints_load_with_weights_only(good):
    ckpt = torch.load(good, weights_only=True)
    assert ckpt['iter_num'] == 2 and ckpt['model_args']['n_layer'] == 2
    assert isinstance(ckpt['rng']['torch'], list) and len(ckpt['rng']['torch']) == 1


def test_torchrun_resume_with_dropout_equals_the_uninterrupted_run(data_dir, tmp_path):
    """Each rank saves and restores its own random state, so dropout draws the same numbers after a resume."""
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    env = {'OMP_NUM_THREADS': '1'}
    args = ['--max_iters=8', '--eval_interval=4', '--lr_decay_iters=8', '--dropout=0.1', '--gradient_accumulation_steps=2']
    train(data_dir, tmp_path / 'full', *args, cmd=torchrun, env=env)
    train(data_dir, tmp_path / 'part', *args[1:], '--max_iters=4', cmd=torchrun, env=env)
    assert len(torch.load(tmp_path / 'part' / 'ckpt.pt', weights_only=True)['rng']['torch']) == 2
    train(data_dir, tmp_path / 'part', *args, '--init_from=resume', cmd=torchrun, env=env)
    full = {r['iter']: r['loss'] for r in read_log(tmp_path / 'full') if 'loss' in r}
    part = {r['iter']: r['loss'] for r in read_log(tmp_path / 'part') if 'loss' in r}
    assert sorted(full) == sorted(part) == list(range(1, 9))
    assert all(full[i] == part[i] for i in full), (full, part)


def test_ista_checkpoint_may_change_on_resume(data_dir, tmp_path):
    args = ['--max_iters=4', '--eval_interval=2', '--lr_decay_iters=4']
    train(data_dir, tmp_path / 'full', *args)
    train(data_dir, tmp_path / 'part', *args[1:], '--max_iters=2')
    p = train(data_dir, tmp_path / 'part', *args, '--init_from=resume', '--ista_checkpoint=True')
    full = {r['iter']: r['loss'] for r in read_log(tmp_path / 'full') if 'loss' in r}
    part = {r['iter']: r['loss'] for r in read_log(tmp_path / 'part') if 'loss' in r}
    assert full[3] == pytest.approx(part[3], rel=1e-6) and full[4] == pytest.approx(part[4], rel=1e-6), p.stdout
