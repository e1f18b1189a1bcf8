"""Models by name from the Hugging Face hub, offline: a hub cache laid out as huggingface_hub lays it out
(models--OWNER--REPO/snapshots/REV/FILE and refs/main), with HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at it."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import read_log, released_crate, run
from model import load_model

REPO = 'JackBAI/CRATE-GPT-12L-Pile-600000steps'


def put(cache, repo, files):
    """Files {name: bytes-writer(path)} into the cache as the snapshot of repo's main branch."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / 'snapshots' / ('a1' * 20)
    snap.mkdir(parents=True)
    (root / 'refs').mkdir()
    (root / 'refs' / 'main').write_text('a1' * 20)
    for name, write in files.items():
        write(snap / name)


def small_gpt2(vocab):
    """transformers' GPT2LMHeadModel, the reference no one here wrote: a small random config, every weight and bias
    drawn at random (a zero bias would hide a wrong transpose)."""
    transformers = pytest.importorskip('transformers', reason='the GPT-2 reference (.ci/run installs it)')
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


def hub_gpt2(cache, ref, name='gpt2'):
    """ref as the hub holds OpenAI's GPT-2: config.json and pytorch_model.bin (its Conv1D weights as they are)."""
    put(cache, f'openai-community/{name}', {
        'config.json': lambda p: p.write_text(json.dumps(ref.config.to_dict())),
        'pytorch_model.bin': lambda p: torch.save(ref.state_dict(), p)})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setattr(c, 'HF_HUB_OFFLINE', True)
    return tmp_path / 'hub'


def test_gpt2_by_name_equals_transformers_forward(cache):
    ref = small_gpt2(vocab=100)
    hub_gpt2(cache, ref)
    ours = load_model('gpt2')
    assert ours.config.activation == 'gelu_tanh' and ours.config.vocab_size == 100 and ours.config.block_size == 64
    idx = torch.randint(0, 100, (3, 40), generator=torch.Generator().manual_seed(1))
    seen = {}
    hooks = [ref.transformer.h[l].mlp.act.register_forward_hook(lambda m, i, o, l=l: seen.__setitem__(l, o))
             for l in range(2)]
    with torch.no_grad():
        want = ref(idx).logits
        logits, _, neurons = ours(idx, targets=idx, return_neurons=True)
    for h in hooks:
        h.remove()
    assert torch.allclose(logits, want, atol=1e-5, rtol=0)
    for l in range(2):                       # the MLP's post-GELU values are the neurons, negative ones too
        assert torch.allclose(neurons[l], seen[l], atol=1e-5, rtol=0) and (neurons[l] < 0).any()


def test_hub_names_load_as_the_local_file_and_a_missing_one_is_one_line(cache, tmp_path):
    sd, args = released_crate()
    local = tmp_path / 'ckpt.pt'
    torch.save({'model': sd, 'model_args': args}, local)
    put(cache, REPO, {'ckpt.pt': lambda p: torch.save({'model': sd, 'model_args': args}, p)})
    put(cache, 'someone/two-files', {'a.pt': lambda p: p.write_bytes(b''), 'b.pt': lambda p: p.write_bytes(b'')})
    want = load_model(str(local)).state_dict()
    for name in (f'hf:{REPO}', f'hf:{REPO}/ckpt.pt'):
        got = load_model(name).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for name, message in ((f'hf:{REPO}/other.pt', 'is not in the hub cache'), ('hf:nobody/nothing', 'not in the hub'),
                          ('hf:someone/two-files', 'holds 2 .pt files: a.pt, b.pt; name one as hf:someone/two-files/FILE'),
                          ('hf:justone', 'write hf:OWNER/REPO')):
        with pytest.raises(ValueError) as e:
            load_model(name)
        assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_the_scripts_take_hub_names(cache, tmp_path):
    """sample.py --ckpt=gpt2, interpret.py --ckpt=hf:..., and train.py --init_from=gpt2 (fine-tuning OpenAI's weights,
    resumed as any run), against the cache as users' runs meet it: through the environment."""
    hub_gpt2(cache, small_gpt2(vocab=50257))
    sd, args = released_crate(T=16)
    put(cache, REPO, {'ckpt.pt': lambda p: torch.save({'model': sd, 'model_args': args}, p)})
    env = {'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(cache)}
    p = run('sample.py', '--ckpt=gpt2', '--start=Once upon a time', '--num_samples=1', '--max_new_tokens=5',
            '--device=cpu', env=env)
    assert 'Once upon a time' in p.stdout
    data = tmp_path / 'data'
    data.mkdir()
    np.random.default_rng(0).integers(0, 64, 80 * 16).astype(np.uint16).tofile(data / 'val.bin')
    os.makedirs(data / 'toy')
    np.random.default_rng(1).integers(0, 64, 4000).astype(np.uint16).tofile(data / 'toy' / 'train.bin')
    np.random.default_rng(2).integers(0, 64, 2000).astype(np.uint16).tofile(data / 'toy' / 'val.bin')
    run('interpret.py', f'--ckpt=hf:{REPO}', f'--data={data}', '--simulator=tokens', '--n_openai=80',
        '--n_anthropic=80', '--device=cpu', env=env, cwd=tmp_path)
    summary = json.load(open(tmp_path / f"out-{REPO.replace('/', '--')}" / 'interp' / 'summary.json'))
    assert summary['model_name'] == 'CRATE' and summary['ckpt'] == f'hf:{REPO}'
    tune = ['--device=cpu', '--compile=False', f'--data_dir={data}', '--dataset=toy', '--block_size=32',
            '--batch_size=2', '--gradient_accumulation_steps=1', '--eval_iters=2', '--eval_interval=1', '--log_interval=1']
    run('train.py', '--init_from=gpt2', '--max_iters=1', '--learning_rate=0', '--min_lr=0', '--warmup_iters=0',
        f'--out_dir={tmp_path / "tune"}', *tune, env=env)
    ckpt = torch.load(tmp_path / 'tune' / 'ckpt.pt', weights_only=True)
    gpt2 = load_model('gpt2').state_dict()
    assert ckpt['pretrained'] == 'gpt2' and ckpt['model_args']['activation'] == 'gelu_tanh'
    assert all(torch.equal(v, gpt2[k][:32] if k == 'wpe.weight' else gpt2[k]) for k, v in ckpt['model'].items())
    run('train.py', '--init_from=resume', '--max_iters=2', f'--out_dir={tmp_path / "tune"}', *tune, env=env)
    assert [r['iter'] for r in read_log(tmp_path / 'tune') if 'loss' in r] == [1, 2]
