import math
import re

import pytest
import torch

from conftest import TINY, read_log, run
from model import load_model
from sae import SparseAutoencoder, loss_recovered


def test_sae_loss_is_the_authors_and_the_decoder_stays_unit_norm():
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 32)
    x = torch.relu(torch.randn(50, 8))
    x_hat, f = sae(x)
    # arthursae loss_fn, l2_loss_form='normalize', l1_loss_form='l1': squared error over ||x||, meaned over tokens
    # and inputs alike; |f| summed over features, meaned over tokens
    recon = sum(((x_hat[t, i] - x[t, i]) ** 2 / x[t].norm()).item() for t in range(50) for i in range(8)) / (50 * 8)
    l1 = sum(f[t].abs().sum().item() for t in range(50)) / 50
    assert sae.loss(x, x_hat, f, 1e-2).item() == pytest.approx(recon + 1e-2 * l1, rel=1e-5)
    torch.testing.assert_close(f, torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc))
    torch.testing.assert_close(x_hat, f @ sae.W_dec.T + sae.b_dec)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    sae.loss(x, x_hat, f, 1e-2).backward()
    sae.remove_parallel_grad_()
    assert (sae.W_dec.grad * sae.W_dec).sum(0).abs().max() < 1e-6      # no component along the columns
    opt.step()
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(32))


def test_sae_init_is_the_authors():
    torch.manual_seed(1)
    sae = SparseAutoencoder(512, 8192)
    bound = math.sqrt(6 / 8192)                        # kaiming_uniform_ on their (d_in, d_sae) W_enc: fan_in = d_sae
    assert bound * 0.99 < sae.W_enc.abs().max() <= bound
    assert sae.W_enc.std().item() == pytest.approx(bound / math.sqrt(3), rel=1e-2)
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(8192))
    assert not torch.allclose(sae.W_enc.T / sae.W_enc.norm(dim=1), sae.W_dec)      # encoder and decoder independent
    assert (sae.b_enc == 0).all() and (sae.b_dec == 0).all()


def test_loss_recovered_on_the_papers_numbers():
    assert loss_recovered(3.50, 3.77, 9.24) == pytest.approx(0.9530, abs=1e-4)
    assert loss_recovered(2.0, 2.0, 5.0) == 1.0 and loss_recovered(2.0, 5.0, 5.0) == 0.0


@pytest.fixture(scope='module')
def base(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('base')
    run('train.py', f'--data_dir={data_dir}', '--dataset=toy', f'--out_dir={out}', *TINY, '--attn=mha', '--ffn=mlp',
        '--bias=False', '--max_iters=60', '--eval_interval=60', '--batch_size=8')
    return out


def train_sae(data_dir, base, out, *args, **kw):
    return run('sae.py', 'config/sae_gpt2_1l.py', f'--base={base}', f'--data_dir={data_dir}', '--dataset=toy',
               f'--out_dir={out}', '--block_size=32', '--batch_size=8', '--device=cpu', '--eval_iters=4',
               '--log_interval=1', '--expansion=2', '--buffer=1024', '--resample_seqs=24', '--warmup_iters=10',
               *args, **kw)


def test_sae_training_lowers_the_error_and_l1_sets_the_sparsity(data_dir, base, tmp_path):
    results = {}
    for l1 in (1e-4, 3e-2):
        out = tmp_path / str(l1)
        p = train_sae(data_dir, base, out, f'--l1={l1}', '--max_iters=120', '--eval_interval=60',
                      '--learning_rate=3e-3', '--min_lr=3e-4', '--resample_at=50,100', '--resample_window=20')
        evals = [r for r in read_log(out) if 'recon_error' in r]
        assert [r['iter'] for r in evals] == [0, 60, 120]
        assert evals[-1]['recon_error'] < 0.5 * evals[0]['recon_error']
        resampled = re.findall(r'iter (\d+): resampled (\d+) dead features .* since iter (\d+)', p.stdout)
        assert [(t, since) for t, _, since in resampled] == [('50', '30'), ('100', '80')]
        assert int(resampled[0][1]) > 0                                   # features were replaced
        lr = {r['iter']: r['lr'] for r in read_log(out) if 'lr' in r}   # the lr of the step that ended at iter
        assert lr[1] == pytest.approx(3e-4) and lr[11] == lr[50] == pytest.approx(3e-3)
        assert lr[51] == pytest.approx(3e-4) and lr[56] == pytest.approx(3e-4 + 2.7e-3 * (1 - math.cos(math.pi / 2)) / 2)
        last = evals[-1]
        assert last['lm_loss_zero'] > last['lm_loss_clean']
        assert last['loss_recovered'] == pytest.approx(loss_recovered(last['lm_loss_clean'], last['lm_loss_spliced'],
                                                                      last['lm_loss_zero']))
        results[l1] = last
        sae = load_model(str(out)).sae
        torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(sae.W_dec.shape[1]))
    assert results[3e-2]['l0'] < 0.7 * results[1e-4]['l0']                # more l1, fewer active features
    assert results[1e-4]['recon_error'] < results[3e-2]['recon_error']


def test_sae_resume_is_exact(data_dir, base, tmp_path):
    # 4 steps a buffer fill: the resume rebuilds fill 0 from the checkpoint, then draws fill 1 as the full run did;
    # firing counted from iter 3 (window 3) crosses the checkpoint at iter 4 into the resampling at iter 6
    args = ['--max_iters=8', '--eval_interval=4', '--resample_at=2,6', '--resample_window=3']
    train_sae(data_dir, base, tmp_path / 'full', *args)
    train_sae(data_dir, base, tmp_path / 'part', '--max_iters=4', '--eval_interval=4', '--resample_at=2,6',
              '--resample_window=3')
    p = train_sae(data_dir, base, tmp_path / 'part', *args, '--init_from=resume')
    assert 'iter 6: resampled' in p.stdout
    full = {r['iter']: r['loss'] for r in read_log(tmp_path / 'full') if 'loss' in r}
    part = {r['iter']: r['loss'] for r in read_log(tmp_path / 'part') if 'loss' in r}
    assert full == part and len(full) == 8


def test_interpret_and_steer_through_the_sae(data_dir, base, tmp_path):
    out = tmp_path / 'sae'
    train_sae(data_dir, base, out, '--max_iters=30', '--eval_interval=30', '--learning_rate=3e-3')
    run('interpret.py', f'--ckpt={out}', f'--data={data_dir}/toy', '--simulator=tokens', '--n_openai=60',
        '--n_anthropic=40', '--device=cpu')
    import json
    summary = json.load(open(out / 'interp' / 'summary.json'))
    assert summary['model_name'] == 'GPT-2 + SAE' and summary['model']['n_features'] == 256
    assert sum(1 for _ in open(out / 'interp' / 'neurons.jsonl')) == 256
    layer = summary['methods']['top_and_random']['layers']['0']
    assert layer['scored'] + layer['dead'] + layer['undefined'] == 256 and layer['scored'] > 0
    kl = {}
    crate = tmp_path / 'crate'
    run('train.py', f'--data_dir={data_dir}', '--dataset=toy', f'--out_dir={crate}', *TINY, '--max_iters=10',
        '--eval_interval=10', '--batch_size=4')
    for name, ckpt in (('sae', out), ('crate', crate)):
        p = run('sample.py', f'--ckpt={ckpt}', '--device=cpu', '--start=1 2 3 4 5', '--steer=0:7:20', '--show_next=3',
                '--num_samples=0')
        kl[name] = float(re.search(r'nothing steered\) = (\S+) nats', p.stdout).group(1))
    assert kl['crate'] == 0.0 and kl['sae'] > 0
    p = run('sample.py', f'--ckpt={out}', '--device=cpu', '--steer=1:7:20', check=False)
    assert p.returncode == 2 and 'this SAE reads layer 0' in p.stderr
