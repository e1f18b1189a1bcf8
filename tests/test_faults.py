"""Faults a user meets, through the scripts a user runs: a full disk, a read-only folder, a folder that is a file, two
runs into one folder. Each is one line and loses nothing. Full and read-only disks are small tmpfs mounts, which
need root (CI runs as root); elsewhere those tests skip, saying so."""
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, planted_model, read_log, run, save
from model import ModelConfig, Transformer


@contextlib.contextmanager
def tmpfs(path, size_kb, readonly=False):
    os.makedirs(path)
    options = f"{'ro,' if readonly else ''}size={size_kb}k"
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)], capture_output=True).returncode:
        pytest.skip('mounting a small tmpfs needs root (CI runs as root)')
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', str(path)])


def train(data_dir, out_dir, *args, **kw):
    return run('train.py', f'--data_dir={data_dir}', '--dataset=toy', f'--out_dir={out_dir}', *TINY,
               '--batch_size=4', '--log_interval=1', *args, check=False, **kw)


def one_line(p, *words):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    errors = [l for l in p.stderr.splitlines() if l.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in p.stderr, p.stderr[-2000:]
    assert all(w in errors[0] for w in words), errors[0]


def checkpoint_bytes():
    """What train.py's start-up check asks for the TINY model: its weights and Adam's two moments, and 10%."""
    args = {a.split('=')[0][2:]: a.split('=')[1] for a in TINY if a.split('=')[0][2:] in
            ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size')}
    model = Transformer(ModelConfig(**{k: int(v) for k, v in args.items()}))
    return int(1.1 * 12 * sum(p.numel() for p in model.parameters()))


def test_a_disk_that_fills_loses_no_checkpoint(data_dir, tmp_path):
    """Room for one checkpoint at the start, not for a second beside it: the second save fails in one line, its
    temporary file is removed, the first is intact; resuming on the full disk is refused at once, and resuming
    where there is room finishes the run."""
    need = checkpoint_bytes()
    with tmpfs(tmp_path / 'disk', int(1.3 * need) // 1024) as disk:
        out = disk / 'run'
        p = train(data_dir, out, '--max_iters=4', '--eval_interval=2')
        one_line(p, f'cannot write {out / "ckpt.pt"}', 'No space left on device', 'the previous one is intact')
        assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl']          # no .tmp, no lock
        first = (out / 'ckpt.pt').read_bytes()
        p = train(data_dir, out, '--max_iters=4', '--eval_interval=2', '--init_from=resume')
        one_line(p, f'{out} has', 'bytes free and a checkpoint needs about', 'free some space')
        assert (out / 'ckpt.pt').read_bytes() == first
        shutil.copytree(out, tmp_path / 'room')
    p = train(data_dir, tmp_path / 'room', '--max_iters=4', '--eval_interval=2', '--init_from=resume')
    assert p.returncode == 0 and 'resuming from iteration 2' in p.stdout, p.stderr
    assert [r['iter'] for r in read_log(tmp_path / 'room') if 'val_loss' in r] == [0, 2, 4]


def test_a_failed_save_stops_every_rank(data_dir, tmp_path):
    """Under torchrun, rank 0's failed save stops the other rank too (it does not wait for a collective that never
    comes), and nothing is half written."""
    need = checkpoint_bytes()
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    with tmpfs(tmp_path / 'disk', int(1.3 * need) // 1024) as disk:
        out = disk / 'run'
        p = train(data_dir, out, '--max_iters=4', '--eval_interval=2', '--gradient_accumulation_steps=2',
                  cmd=torchrun, env={'OMP_NUM_THREADS': '1'}, timeout=120)
        assert p.returncode != 0
        errors = [l for l in p.stderr.splitlines() if l.startswith('error:')]
        assert len(errors) == 1 and errors[0].startswith(f"error: cannot write {out / 'ckpt.pt'} (No space left")
        assert errors[0].endswith("the previous one is intact; free some space and resume with --init_from=resume")
        assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl']


def test_no_room_for_a_checkpoint_is_refused_before_any_work(data_dir, tmp_path):
    with tmpfs(tmp_path / 'disk', 64) as disk:
        p = train(data_dir, disk / 'run', '--max_iters=4', '--eval_interval=2')
        one_line(p, f'{disk / "run"} has', f'a checkpoint needs about {checkpoint_bytes():,}')
        assert 'step 0' not in p.stdout and os.listdir(disk / 'run') == []


def test_read_only_and_file_folders_are_one_line(data_dir, tmp_path, val_dir):
    with tmpfs(tmp_path / 'ro', 64, readonly=True) as ro:
        one_line(train(data_dir, ro / 'run'), f'cannot make the output folder {ro / "run"}', 'Read-only file system')
        one_line(train(data_dir, ro), f'cannot write to the output folder {ro}', 'Read-only file system')   # exists
        save(planted_model(), tmp_path / 'm', 1.0)
        p = run('interpret.py', f'--ckpt={tmp_path / "m"}', f'--data={val_dir}', '--simulator=tokens', '--n_openai=40',
                '--n_anthropic=40', '--device=cpu', f'--out={ro / "interp"}', check=False)
        one_line(p, f'cannot make the output folder {ro / "interp"}')
    (tmp_path / 'afile').write_text('not a folder')
    one_line(train(data_dir, tmp_path / 'afile'), f'cannot make the output folder {tmp_path / "afile"}')


def test_interpret_on_a_full_disk_keeps_nothing_half_written(tmp_path, val_dir):
    save(planted_model(), tmp_path / 'm', 1.0)
    with tmpfs(tmp_path / 'disk', 64) as disk:
        p = run('interpret.py', f'--ckpt={tmp_path / "m"}', f'--data={val_dir}', '--simulator=tokens', '--n_openai=40',
                '--n_anthropic=40', '--device=cpu', f'--out={disk / "interp"}', check=False)
        one_line(p, 'records_L0.npz', 'No space left on device')
        assert not [f for f in os.listdir(disk / 'interp') if f.endswith('.tmp') or f == '.lock']


def test_one_run_per_folder(data_dir, tmp_path):
    """Two runs into one folder: the second refuses, naming the process that holds it, and writes nothing; once that
    process is killed (-9: its lock stays), the next run takes the lock over, saying so."""
    out = tmp_path / 'run'
    args = [sys.executable, os.path.join(ROOT, 'train.py'), f'--data_dir={data_dir}', '--dataset=toy',
            f'--out_dir={out}', *TINY, '--batch_size=4', '--max_iters=100000', '--eval_interval=100000']
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / 'log.jsonl').exists() and time.time() < deadline:
        time.sleep(0.1)
    p = train(data_dir, out, '--max_iters=4', '--overwrite=True')
    one_line(p, f'{out} is in use by another run (process {first.pid} on {socket.gethostname()}')
    first.kill()
    first.wait()
    iters = [r['iter'] for r in read_log(out)]
    assert iters == sorted(set(iters)) and iters[0] == 0                               # the first run's alone
    p = train(data_dir, out, '--max_iters=4', '--overwrite=True')
    assert p.returncode == 0 and f'taking over {out / ".lock"}: its process {first.pid} is gone' in p.stdout
    assert [r['iter'] for r in read_log(out) if 'val_loss' in r] == [0, 4] and not (out / '.lock').exists()
