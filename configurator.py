"""
The command line shared by train.py, sample.py, interpret.py and bench.py:

    python script.py [config/x.py ...] [--key=value ...]

A script's options are its module-level names of plain types (the defaults at its top). A config file is Python
assignments; a --key=value is read as a Python literal, else as text. Every key must be one of the script's options,
with a value of the option's type; a list option collects repeated flags (--steer=a --steer=b).
Every error a user can cause ends the same way: fail(), one line on stderr, exit code 2.
Also here, because all scripts choose them the same way: the device and the autocast context. (torch is imported
inside those functions only, so that prepare.py, which needs no torch, starts at once.)
"""

import ast
import atexit
import json
import os
import shutil
import socket
import sys
import traceback
from contextlib import nullcontext


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def script_defaults(scope):
    """The options of a script: its module-level names of plain types, in order (defaults at the top)."""
    return {k: v for k, v in scope.items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str, list, type(None)))}


def typed(key, value, default):
    """value as the type of default (an int is a float where a float is wanted; a tuple or text is a list)."""
    kind = type(default)
    if default is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list and isinstance(value, (str, tuple)):
        return list(value) if isinstance(value, tuple) else [value]
    raise TypeError(f"{key} must be {kind.__name__} (default {default!r}), got {value!r}")


def config_file(path):
    """The plain-typed assignments of a config file, [(key, value)]; an error names the file and line."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path} not found (configs are in config/, e.g. config/crate_1l.py)")
    scope = {}
    try:
        exec(compile(open(path).read(), path, 'exec'), scope)
    except SyntaxError as e:
        raise ValueError(f"config file {path} line {e.lineno}: {e.msg}")
    except Exception as e:
        line = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path][-1:] or ['?']
        raise ValueError(f"config file {path} line {line[0]}: {type(e).__name__}: {e}")
    return [(k, v) for k, v in scope.items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str, list, tuple, type(None)))]


def configure(defaults, argv):
    """defaults: {key: value}; argv: config files and --key=value. Returns the merged, type-checked dict."""
    if any(a in ('--help', '-h') for a in argv):
        print((sys.modules['__main__'].__doc__ or '').strip() +
              '\n\noptions (--key=value; a config file of assignments sets them too):')
        for k, v in defaults.items():
            print(f"  --{k}={v!r}")
        sys.exit(0)
    cfg, repeated = dict(defaults), set()
    try:
        for arg in argv:
            if not arg.startswith('--'):
                items = config_file(arg)
            elif '=' not in arg:
                raise ValueError(f"{arg}: write overrides as --key=value")
            else:
                k, raw = arg[2:].split('=', 1)
                if isinstance(defaults.get(k), str):
                    v = raw                                  # a text option takes the text as written
                elif isinstance(defaults.get(k), list):
                    v = cfg[k] + [raw] if k in repeated else [raw]
                    repeated.add(k)
                else:
                    try:
                        v = ast.literal_eval(raw)
                    except (ValueError, SyntaxError):
                        v = raw
                items = [(k, v)]
            for k, v in items:
                if k not in defaults:
                    raise ValueError(f"unknown option {k!r} in {arg}; known: {', '.join(sorted(defaults))}")
                cfg[k] = typed(k, v, defaults[k])
    except (ValueError, TypeError) as e:
        fail(str(e))
    return cfg


def pick_device(device):
    """'auto' is CUDA, else MPS, else the CPU; a device asked for by name must be here (ValueError otherwise)."""
    import torch
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    kind = device.split(':')[0]
    if kind == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"--device={device} but this torch sees no CUDA GPU (torch {torch.__version__}); "
                         f"use --device=cpu, or install a CUDA build of torch on a machine with a GPU")
    if kind == 'cuda' and device[5:].isdigit() and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device={device} but there are {torch.cuda.device_count()} GPU(s), numbered from 0")
    if kind == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f"--device={device} but MPS is not available here; use --device=cpu")
    if kind not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f"--device={device}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return device


def mixed_precision(device, dtype):
    """The context a forward pass runs in: mixed precision in dtype, or nothing for float32."""
    import torch
    if dtype == 'float32':
        return nullcontext()
    dtypes = {'bfloat16': torch.bfloat16, 'float16': torch.float16}
    return torch.autocast(device_type=device.split(':')[0], dtype=dtypes[dtype])


def peak_flops(device, dtype, peak_tflops=0.0):
    """Dense peak FLOP/s of the device for this dtype (for MFU), peak_tflops if given, or None when unknown."""
    import torch
    if peak_tflops:
        return peak_tflops * 1e12
    if not device.startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, tf32 in (('H100', 989e12, 494.5e12), ('H200', 989e12, 494.5e12), ('H20', 148e12, 74e12),
                            ('A100', 312e12, 156e12), ('A10', 125e12, 62.5e12), ('L4', 121e12, 60e12)):
        if key in name:
            return tf32 if dtype == 'float32' else half
    return None


def held_run(out_dir, init_from, overwrite):
    """The files of an earlier run in out_dir that a fresh run would replace: refused unless overwrite is set."""
    held = [f for f in ('ckpt.pt', 'log.jsonl') if os.path.exists(os.path.join(out_dir, f))]
    if init_from != 'resume' and held and not overwrite:
        fail(f"{out_dir} already holds a run ({', '.join(held)}): continue it with --init_from=resume, train into "
             f"another --out_dir, or replace it with --overwrite=True")
    return held if init_from != 'resume' else []


def start_run_folder(out_dir, held, resume_iter=None):
    """In out_dir, claimed (claim_folder): remove a killed save's partial checkpoint and an overwritten run's files,
    and on resume cut log.jsonl back to the checkpoint's iteration (a killed run's later lines are redone). Says what
    it did."""
    ckpt_path, log_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'log.jsonl')
    if os.path.exists(ckpt_path + '.tmp'):
        os.remove(ckpt_path + '.tmp')
        print(f"removed {ckpt_path}.tmp, a partial checkpoint a killed run left")
    for f in held:
        os.remove(os.path.join(out_dir, f))
    if held:
        print(f"--overwrite=True: removed the earlier run's {' and '.join(held)} from {out_dir}")
    if resume_iter is not None:
        lines = open(log_path).readlines() if os.path.exists(log_path) else []
        kept = [l for l in lines if l.endswith('\n') and json.loads(l).get('iter', 0) <= resume_iter]  # a cut line
        with open(log_path + '.tmp', 'w') as f:                                                         # goes too
            f.writelines(kept)
        os.replace(log_path + '.tmp', log_path)
        dropped = f"; dropped {len(lines) - len(kept)} log line(s) after it" if len(kept) < len(lines) else ""
        print(f"resuming from iteration {resume_iter} of {ckpt_path}{dropped}")


def claim_folder(folder, need_bytes=0):
    """One run per output folder: make it, check that it can be written and has room for need_bytes, and take its
    lock (folder/.lock, holding host and PID, removed at exit). A lock whose process is gone (a killed run) is taken
    over, saying so; a live one, or one from another host, is a one-line refusal. Before anything else is written."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        fail(f"cannot make the output folder {folder}: {e.strerror}; choose another one")
    lock, me = os.path.join(folder, '.lock'), f"{socket.gethostname()} {os.getpid()}"
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            holder = open(lock).read().split()
            host, pid = (holder + ['?', '0'])[:2]
            if attempt or host != socket.gethostname() or not pid.isdigit() or alive(int(pid)):
                fail(f"{folder} is in use by another run (process {pid} on {host}, its lock {lock}); wait for it, "
                     f"choose another folder, or delete the lock if that process is gone")
            print(f"taking over {lock}: its process {pid} is gone (a killed run)")
            os.remove(lock)
        except OSError as e:
            fail(f"cannot write to the output folder {folder}: {e.strerror}; choose a writable one")
    os.write(fd, me.encode())
    os.close(fd)
    atexit.register(release_folder, folder)
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        fail(f"{folder} has {free:,} bytes free and a checkpoint needs about {need_bytes:,}; free some space or choose "
             f"another folder")


def checkpoint_bytes(parameters):
    """About what a checkpoint of these parameters takes: fp32 weights and Adam's two moments, and 10%."""
    return int(1.1 * 12 * sum(p.numel() for p in parameters))


def release_folder(folder):
    """Remove the folder's lock if this process holds it (at exit; by hand before os._exit)."""
    lock = os.path.join(folder, '.lock')
    if os.path.exists(lock) and open(lock).read() == f"{socket.gethostname()} {os.getpid()}":
        os.remove(lock)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def write_safely(path, write):
    """write(tmp) then rename tmp to path, so that a kill never leaves a broken file. Returns None, or the one-line
    reason it failed (a full disk, say); the temporary file is then removed and the previous file is intact."""
    tmp = path + '.tmp'
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:      # torch.save reports a full disk as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(path) or '.').free
        if isinstance(e, OSError) and e.strerror:
            reason = e.strerror
        else:       # torch.save's own words for a full disk are "unexpected pos ..."
            reason = 'No space left on device' if free < 2**20 else str(e).splitlines()[0][:120]
        return f"cannot write {path} ({reason}; {free:,} bytes free); the previous one is intact"
    return None
