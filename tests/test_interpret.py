import json
import os
import re
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import interpret as I
import report as R
from bench import record_bytes
from conftest import DEAD, PLANT, TOKEN, planted_model, run, save
from model import ModelConfig, Transformer
from sae import SparseAutoencoder


ARGS = ['--simulator=tokens', '--n_openai=64', '--n_anthropic=40', '--device=cpu', '--batch_size=16']


def neurons_of(folder):
    with open(os.path.join(folder, 'neurons.jsonl')) as f:
        return {r['neuron']: r for r in map(json.loads, f)}


def test_planted_neuron_scores_one_and_dead_neuron_is_reported(val_dir, tmp_path):
    model = planted_model()
    x = torch.from_numpy(np.fromfile(val_dir / 'val.bin', dtype=np.uint16)[:32 * 8].astype(np.int64)).view(8, 32)
    _, _, (a,) = model(x, return_neurons=True)
    assert torch.equal(a[..., PLANT] > 0, x == TOKEN) and (a[..., DEAD] == 0).all()    # the plant works
    save(model, tmp_path / 'm', 3.21)
    run('interpret.py', f'--ckpt={tmp_path / "m"}', f'--data={val_dir}', *ARGS, '--scoring=simulation,detection,fuzzing')
    rows = neurons_of(tmp_path / 'm' / 'interp')
    assert len(rows) == 256
    for method in ('top_and_random', 'random_only', 'anthropic', 'detection', 'fuzzing'):
        assert rows[DEAD]['scores'][method]['dead']
        assert rows[PLANT]['scores'][method]['score'] == pytest.approx(1.0, abs=1e-9)     # the baseline's, too
    summary = json.load(open(tmp_path / 'm' / 'interp' / 'summary.json'))
    assert summary['val_loss'] == 3.21 and summary['simulator_label'].startswith('token-lookup baseline')
    stats = summary['stats']['0']
    assert stats['neurons'] == 256 and stats['dead'] >= 1 and 0.3 < stats['zero_fraction'] < 1
    assert stats['l0'] == pytest.approx(256 * (1 - stats['zero_fraction']), abs=0.02)
    layer = summary['methods']['top_and_random']['layers']['0']
    assert layer['dead'] >= 1 and layer['scored'] + layer['dead'] + layer['undefined'] == 256
    report = open(tmp_path / 'm' / 'interp' / 'report.html').read()
    assert report.count('<details data-best=') == 256 and 'token-lookup baseline' in report
    assert all(f'neuron {n}:' in report for n in rows)
    # recording again with the same settings reuses the records
    p = run('interpret.py', f'--ckpt={tmp_path / "m"}', f'--data={val_dir}', *ARGS, '--scoring=simulation,detection,fuzzing')
    assert 'using the records' in p.stdout and neurons_of(tmp_path / 'm' / 'interp') == rows


class Planted(torch.nn.Module):
    """A stand-in model whose one layer's neurons at stream position p are row p of a table: token p is position p."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.config = ModelConfig(n_layer=1, n_embd=table.shape[1], n_head=1, overcomplete=1)

    def forward(self, x, return_neurons=False):
        return None, None, [self.table[x]]


def oracle(v, P, before, after, T=None):
    """Brute force over one neuron's values v on the stream's first P positions: positions ranked high to low, ties
    by position; each position's rank, or, for a tie, the ranks its value shares; and the excerpt around a position."""
    v = v[:P]
    ranked = sorted(range(P), key=lambda p: (-v[p], p))
    first = {}
    for r, p in enumerate(ranked):
        first.setdefault(v[p], r)
    shared = {x: (first[x], first[x] + int((v == x).sum())) for x in first}     # [first rank, last rank + 1)

    def excerpt(p):
        w = np.arange(p - before, p + after)
        keep = (w >= 0) & (w < P) & ((w // T == p // T) if T else True)
        return np.where(keep, v[np.clip(w, 0, P - 1)], np.nan)
    return ranked, shared, excerpt


def check_records(rec, v, P, protocol, T=None):
    """One neuron's records against the oracle: the top 50 exactly (ties by position), 50 distinct random positions,
    every band item's rank in its band (a tied value may take any rank it shares), and every excerpt."""
    before, after = I.WINDOW[protocol]
    ranked, shared, excerpt = oracle(v, P, before, after, T)
    pos = rec['pos']
    assert list(pos[:50]) == ranked[:50]
    assert len(set(pos[50:100].tolist())) == 50 and (pos[50:100] < P).all()
    if protocol == 'anthropic':
        edges = [P * b // 12 for b in range(13)]
        for b in range(1, 12):
            band = pos[100 + 20 * (b - 1):100 + 20 * b]
            assert len(set(band.tolist())) == 20
            for p in band:
                lo, hi = shared[v[p]]
                assert lo < edges[b + 1] and hi > edges[b], (b, p, lo, hi)
    for p, acts in zip(pos, rec['acts']):
        np.testing.assert_array_equal(acts, excerpt(p))


def crowded_model():
    """A small trained-looking CRATE whose layer 0 neurons 0-2 are replaced by values crowded into a narrow range
    (0.2% to 20% wide) with exact repeats: where binned ranks failed."""
    torch.manual_seed(1)
    model = Transformer(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=64)).eval()

    def crowd(a):
        a = a.clone()
        for j, width in enumerate((0.002, 0.02, 0.2)):
            a[..., j] = 0.05 * (1 + width * torch.sigmoid(a[..., j + 3]))
        a[..., 2] = torch.round(a[..., 2] * 200) / 200                          # a few exact values, many ties
        return a
    model.blocks[0].ffn.register_forward_hook(lambda m, i, o: (o[0], crowd(o[1])))
    return model


def test_records_equal_brute_force_and_do_not_depend_on_batch_size(val_dir):
    model = crowded_model()
    seqs = I.read_stream(str(val_dir), 64, 32)
    P = seqs.size
    with torch.no_grad():
        full = [torch.cat([model(torch.from_numpy(s[None]), return_neurons=True)[2][l][0] for s in seqs]).numpy()
                for l in range(2)]
    cols = {0: [0, 1, 2, 3, 63], 1: [1, 2]}
    sizes = {'openai': 64, 'anthropic': 40}
    records = {b: I.record(model, seqs, sizes, [0, 1], cols, 'cpu', nullcontext(), batch_size=b) for b in (3, 8)}
    for l in (0, 1):
        for n, j in enumerate(cols[l]):
            for protocol, n_seq in sizes.items():
                one = {k: a[n] for k, a in records[3][0][protocol][l].items()}
                check_records(one, full[l][:, j], n_seq * 32, protocol)
        stats = records[3][1][l]
        assert stats['tokens'] == P and stats['nonzero'] == (full[l] > 0).sum()   # over every neuron
    for p in sizes:                                          # byte for byte, whatever the batch size
        for l in (0, 1):
            for k in ('pos', 'win', 'acts'):
                np.testing.assert_array_equal(records[3][0][p][l][k], records[8][0][p][l][k])
    # excerpts cut at the edges of the sequence the model saw
    cut = I.record(model, seqs, sizes, [0], cols, 'cpu', nullcontext(), within_sequence=True)[0]
    for p, n_seq in sizes.items():
        check_records({k: a[1] for k, a in cut[p][0].items()}, full[0][:, 1], n_seq * 32, p, T=32)


def test_band_items_are_exact_on_planted_values():
    """Planted values through the recording, against the exact ranking: distinct values 0.1% apart (one histogram
    bin held hundreds), a neuron that is 80% exact zeros, whose tied items come from the whole stream, and a signed
    one (a GELU's). Excerpts cross batch edges."""
    P, T = 1920, 32
    rng = np.random.default_rng(0)
    crowded = 1 + rng.permutation(P) / P * 1e-3
    sparse = np.where(rng.random(P) < 0.2, rng.exponential(1, P), 0)
    signed = rng.normal(0, 1, P)
    table = torch.tensor(np.stack([crowded, sparse, signed], 1), dtype=torch.float32)
    stream = np.arange(P).reshape(-1, T)
    rec = I.record(Planted(table), stream, {'anthropic': P // T}, [0], {0: [0, 1, 2]}, 'cpu', nullcontext(),
                   batch_size=3)[0]['anthropic'][0]                      # batches of 96 positions
    for n in range(3):
        check_records({k: a[n] for k, a in rec.items()}, table[:, n].numpy(), P, 'anthropic')
    zeros = rec['pos'][1, 100 + 20 * 3:]                                    # bands 4..11 lie in the zeros
    assert (table[zeros, 1] == 0).all() and zeros.max() - zeros.min() > 0.8 * P
    assert sum(a.nbytes for a in rec.values()) == record_bytes({'anthropic': P // T}, T, {0: [0, 1, 2]}, 3)[1]
    # a window at the very start is clipped
    assert (I.window_positions(np.array([3]), 'openai', P)[0][:29] == -1).all()
    assert (I.window_positions(np.array([P - 2]), 'anthropic', P)[0] == [P - 6, P - 5, P - 4, P - 3, P - 2, P - 1, -1, -1]).all()


def test_scoring_sets_have_the_papers_sizes():
    _, expl, score = I.SETS['top_and_random']
    assert expl == [0, 2, 4, 6, 8] and score == [1, 3, 5, 7, 9, 50, 52, 54, 56, 58]
    assert I.SETS['random_only'][2] == [50, 52, 54, 56, 58] and I.SETS['random_only'][1] == expl
    _, expl, score = I.SETS['anthropic']
    assert len(expl) == 15 + 22 + 5 and len(score) == 10 + 22 + 5 + 10
    assert expl[15:17] == [100, 101] and expl[-5:] == [50, 51, 52, 53, 54]
    assert score[10:12] == [102, 103] and score[32:37] == [55, 56, 57, 58, 59] and score[-1] == 'ooc:34'
    toks = np.arange(320 * 8).reshape(1, 320, 8)
    rec = {'anthropic_tokens': toks, 'anthropic_acts': toks.astype(np.float32)}
    (t, a), = I.excerpts(rec, 'anthropic', ['ooc:25'], 0)
    assert t == [25 * 8 + 3, 25 * 8 + 4, 25 * 8 + 5]                     # the peak and one token each side


def test_detection_excerpts_are_drawn_as_the_readme_says():
    """Activating: a value that quantises to 1 or more (>= m / 10), one from each tenth (by peak) of the top excerpts
    the explainer did not see and the random excerpts that activate; non-activating: random excerpts below m / 10
    throughout; fewer than 5 of either kind: undefined."""
    acts = np.zeros((1, 100, 64), dtype=np.float32)
    acts[0, :50, 32] = 10 - 0.1 * np.arange(50)          # the top 50, peaks 10 down to 5.1
    acts[0, 50:80] = 0.5                                  # 30 random excerpts that never reach m / 10 = 1
    acts[0, 80:, 10] = np.linspace(1.0, 3.0, 20)          # 20 random excerpts that do
    rec = {'openai_tokens': np.ones((1, 100, 64), dtype=np.int32), 'openai_acts': acts}
    examples = I.classifier_examples(rec, 0, 10.0, np.random.default_rng(0))
    peaks = {label: sorted(a.max() for _, a, l in examples if l == label) for label in (0, 1)}
    assert len(peaks[0]) == len(peaks[1]) == 10 and peaks[0] == [0.5] * 10
    assert peaks[1][0] < 1.5 and peaks[1][-1] > 9 and all(p >= 1 for p in peaks[1])   # from every quantile
    assert [l for *_, l in examples] != [1] * 10 + [0] * 10                              # shuffled
    acts[0, 54:80] = 2.0                                  # only 4 non-activating excerpts left
    assert I.classifier_examples(rec, 0, 10.0, np.random.default_rng(0)) is None
    marks = I.fuzzing_marks([([1] * 4, np.array([0.0, 1.0, 0.3, 0.2]), 1), ([1] * 4, np.zeros(4), 0)],
                            np.random.default_rng(0))
    assert marks[0].tolist() == [False, True, True, False] and marks[1].sum() == 2     # >= 0.3 of the peak; as many
    ba, f1, auc = I.balanced_accuracy([1, 1, 0, 0, 0, 0], [(1, .9), (0, .4), (0, .2), (1, .6), (0, .1), (0, .1)])
    assert ba == pytest.approx((1 / 2 + 3 / 4) / 2) and f1 == pytest.approx(0.5) and auc == pytest.approx(7 / 8)


def test_quantize_and_pooled_pearson():
    assert I.quantize(np.array([-1.0, 0.0, 0.49, 0.5, 0.99, 1.0]), 1.0).tolist() == [0, 0, 4, 5, 9, 10]
    x = [np.array([1.0, 2.0, 0.0]), np.array([5.0, 0.0])]
    y = [np.array([0.5, 2.5, 0.0]), np.array([4.0, 1.0])]
    want = np.corrcoef(np.concatenate(x), np.concatenate(y))[0, 1]
    assert I.pearson(np.concatenate(x), np.concatenate(y)) == pytest.approx(want, rel=1e-12)
    assert I.pearson([1, 2, 3], [2, 4, 6.5]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1])
    assert I.pearson([1, 1, 1], [1, 2, 3]) is None and I.pearson([1, 2, 3], [0, 0, 0]) is None
    s = R.summarize({0: [{'dead': False, 'score': 0.5}, {'dead': False, 'score': 0.1, 'hard': True},
                         {'dead': False, 'score': None, 'failed': True}, {'dead': True, 'score': None}],
                     1: [{'dead': False, 'score': 0.2, 'no_digit': 3}]}, n_layer=2)
    assert s['layers'][0] == {'mean': pytest.approx(30.0), 'std': pytest.approx(20.0), 'scored': 2, 'undefined': 0,
                              'dead': 1, 'failed': 1, 'hard': 1, 'no_digit_slots': 0,     # failed is not undefined
                              'ci': [10.0, 50.0]}                                         # resamples: 10, 30 or 50
    assert s['model']['ci'] == [15.0, 35.0] and s['model']['ci_excl_last'] == [10.0, 50.0]
    assert s['layers'][1]['no_digit_slots'] == 3
    assert s['model']['mean'] == pytest.approx(25.0) and s['model']['var'] == pytest.approx(25.0)
    assert s['model']['mean_excl_last'] == pytest.approx(30.0)


def test_excl_last_leaves_out_the_models_last_layer_only():
    six = {l: [{'dead': False, 'score': 0.1 * (l + 1)}] for l in range(5)}        # a 6L model, layers 0-4 evaluated
    assert R.summarize(six, n_layer=6)['model']['mean_excl_last'] == pytest.approx(30.0)   # all five layers
    assert R.summarize(six, n_layer=5)['model']['mean_excl_last'] == pytest.approx(25.0)   # layer 4 is the last


def test_report_plots_the_training_log(val_dir, tmp_path):
    save(planted_model(), tmp_path / 'm', 1.0)
    with open(tmp_path / 'm' / 'log.jsonl', 'w') as f:
        for it, loss, zf in ((0, 6.0, 0.5), (10, 4.0, 0.7), (20, 3.0, 0.8)):
            f.write(json.dumps({'iter': it, 'train_loss': loss, 'val_loss': loss + 0.1,
                                'sparsity': [{'zero_fraction': zf, 'l0': 1.0, 'dead': 0}]}) + '\n')
            f.write(json.dumps({'iter': it + 1, 'loss': loss}) + '\n')
    run('interpret.py', f'--ckpt={tmp_path / "m"}', f'--data={val_dir}', f'--neurons={PLANT}', *ARGS, '--protocol=openai')
    page = (tmp_path / 'm' / 'interp' / 'report.html').read_text()
    assert page.count('<polyline') == 3 and 'layer 0' in page and "zero fraction" in page   # train, val; layer 0
    zero_line = re.search(r'<polyline[^>]*points="([^"]*)"><title>layer 0</title>', page).group(1)
    ys = [float(p.split(',')[1]) for p in zero_line.split()]
    assert len(ys) == 3 and ys[0] > ys[1] > ys[2]                   # rising zero fraction: lower on the page
    assert 'id="sort"' in page and f'data-neuron="{PLANT}" data-kind="scored"' in page     # sorting, filtering
    zero_axis = page[page.index("zero fraction"):]
    assert '>0</text>' in zero_axis and '>1</text>' in zero_axis     # 0 to 1 on every page, whatever the data


def test_compare_two_runs(val_dir, tmp_path):
    torch.manual_seed(2)
    for name, args, loss in (('crate', {}, 4.0), ('gpt2', dict(attn='mha', ffn='mlp', bias=False), 3.5)):
        save(Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=64, **args)),
             tmp_path / name, loss)
        run('interpret.py', f'--ckpt={tmp_path / name}', f'--data={val_dir}', '--neurons=random:12', *ARGS)
    p = run('interpret.py', '--compare', str(tmp_path / 'crate' / 'interp'), str(tmp_path / 'gpt2' / 'interp'))
    rows = [l for l in p.stdout.splitlines() if l.startswith(('| crate |', '| gpt2 |'))]   # runs by name
    assert len(rows) == 2 and '| CRATE | 1 | 4.000 |' in rows[0] and '| GPT-2 | 1 | 3.500 |' in rows[1]
    assert p.stdout.startswith('simulator: token-lookup baseline, not the LLM metric\n')   # said once
    assert max(map(len, rows)) < 130
    page = (tmp_path / 'crate' / 'compare.html').read_text()            # beside the first run's interp folder
    assert f"wrote {tmp_path / 'crate' / 'compare.html'}" in p.stdout
    assert page.count('<rect x=') == 2 * 3 and 'crate (CRATE, 1 layers)' in page and 'gpt2 (GPT-2, 1 layers)' in page
    for row, n in zip(rows, ('crate', 'gpt2')):     # each layer's zero fraction, last
        zero = json.load(open(tmp_path / n / 'interp' / 'summary.json'))['stats']['0']['zero_fraction']
        assert row.endswith(f'| {zero:.2f} |')
    s = [json.load(open(tmp_path / n / 'interp' / 'summary.json'))['methods']['random_only']['model']['mean']
         for n in ('crate', 'gpt2')]
    assert f"random_only: difference {s[0] - s[1]:+.2f} [" in p.stdout
    assert f"relative {100 * (s[0] / s[1] - 1):+.0f}% [" in p.stdout or s[1] <= 0
    cis = [json.load(open(tmp_path / n / 'interp' / 'summary.json'))['methods']['random_only']['model']['ci']
           for n in ('crate', 'gpt2')]
    for row, mean, ci in zip(rows, s, cis):     # every figure with its interval, which holds the mean
        assert f"{mean:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" in row and ci[0] <= mean <= ci[1]
    lo, hi = map(float, re.search(r'random_only: difference [+-][\d.]+ \[([+-][\d.]+), ([+-][\d.]+)\]', p.stdout).groups())
    assert lo <= s[0] - s[1] <= hi
    assert len(neurons_of(tmp_path / 'crate' / 'interp')) == 12
    swapped = R.compare([str(tmp_path / 'gpt2' / 'interp') + '/', str(tmp_path / 'crate' / 'interp')])
    pair = lambda text: text[text.index('\nCRATE '):].split(':', 1)[1].split('\nwrote ')[0]   # the same pair,
    # whatever the order
    assert pair(swapped) == pair(p.stdout.rstrip('\n'))


def test_compare_joins_one_sae_per_layer_into_one_run(val_dir, tmp_path):
    """The paper's GPT-2 + SAE row at 2 layers: the SAEs on layers 0 and 1, joined by '+', are one run whose layer l
    is the SAE on base layer l, its mean the mean of the two layers' means."""
    torch.manual_seed(3)
    save(Transformer(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=64, attn='mha', ffn='mlp')),
         tmp_path / 'gpt2', 3.5)
    for l in (0, 1):
        sae = SparseAutoencoder(64, 128)
        torch.save({'model': sae.state_dict(), 'model_args': {},
                    'sae': {'base': str(tmp_path / 'gpt2'), 'layer': l, 'n_features': 128, 'l1': 1e-3}},
                   tmp_path / f'sae{l}.pt')
        run('interpret.py', f'--ckpt={tmp_path / f"sae{l}.pt"}', f'--data={val_dir}', f'--out={tmp_path / f"i{l}"}', *ARGS)
    means = [json.load(open(tmp_path / f'i{l}' / 'summary.json'))['methods']['top_and_random']['model']['mean']
             for l in (0, 1)]
    p = run('interpret.py', '--compare', f'{tmp_path / "i0"}+{tmp_path / "i1"}')
    row = next(l for l in p.stdout.splitlines() if l.startswith('| i0+i1 |'))
    assert '| GPT-2 + SAE | 2 | – |' in row and f'| {(means[0] + means[1]) / 2:.2f} [' in row
    p = run('interpret.py', '--compare', f'{tmp_path / "i0"}+{tmp_path / "i0"}', check=False)
    assert p.returncode == 2 and "'+' joins SAEs on different layers of one model" in p.stderr


def test_bootstrap_interval_covers_the_mean_at_its_nominal_rate():
    """Neuron scores drawn from a known skewed distribution (mean 0.3): the 95% interval of the mean over two
    layers of 100 neurons each holds the true mean about 95% of the time."""
    rng = np.random.default_rng(0)
    hits, trials = 0, 300
    for t in range(trials):
        per_layer = {l: [{'score': float(x), 'dead': False} for x in rng.beta(2, 14 / 3, 100)] for l in (0, 1)}
        lo, hi = R.interval(R.bootstrap(per_layer, [0, 1], key=t))
        hits += lo <= 30.0 <= hi
    assert 0.91 <= hits / trials <= 0.985, hits / trials
    s = R.summarize({0: [{'score': 0.5, 'dead': False}, {'score': 0.1, 'dead': False}, {'score': None, 'dead': True}]}, 1)
    assert s['layers'][0]['ci'] == [10.0, 50.0] and s['model']['ci'] == [10.0, 50.0] and s['model']['ci_excl_last'] is None


def test_recording_benchmark_reports_the_records_it_makes(val_dir, tmp_path):
    save(planted_model(), tmp_path / 'm', 1.0)
    p = run('bench.py', '--what=record', f'--ckpt={tmp_path / "m"}', f'--data={val_dir}', '--n_openai=100',
            '--n_anthropic=40', '--device=cpu', '--batch_size=4')
    assert 'recording openai 100 x 32, anthropic 40 x 32 tokens, batch_size=4, 256 neurons in 1 layer(s)' in p.stdout
    assert 'forward = one plain pass over 100 x 32 tokens' in p.stdout
    rounds = re.findall(r'round \d: forward ([\d.e-]+) s \([\d,]+ tok/s\), recording ([\d.e-]+) s = ([\d.]+)x forward', p.stdout)
    assert len(rounds) == 3 and all(float(x) > 1.0 for _, _, x in rounds)   # it runs the forward 1.4 times, and more
    # the records' size it states is that of the records the recording makes with these settings
    stream = I.read_stream(str(val_dir), 100, 32)
    records, _ = I.record(planted_model(), stream, {'openai': 100, 'anthropic': 40}, [0], {0: list(range(256))}, 'cpu',
                          nullcontext(), batch_size=4)
    made = sum(a.nbytes for by_layer in records.values() for a in by_layer[0].values())
    assert f'records {made:,} bytes' in p.stdout
    assert not (tmp_path / 'm' / 'interp').exists()


def test_errors(val_dir, tmp_path):
    p = run('interpret.py', '--compare', str(tmp_path / 'nothing'), check=False)
    assert p.returncode == 2 and 'summary.json not found' in p.stderr
    save(planted_model(), tmp_path / 'm', 1.0)
    p = run('interpret.py', f'--ckpt={tmp_path / "m"}', f'--data={tmp_path}', check=False)
    assert p.returncode == 2 and 'val.bin not found' in p.stderr
    for layers, neurons, message in (('3', 'all', "--layers=3: give 'all' or layer numbers 0..0 separated by commas"),
                                     ('x', 'all', "--layers=x: give 'all' or layer numbers 0..0"),
                                     ('all', 'abc', "--neurons=abc: give 'all', neuron numbers 0..255 separated by"),
                                     ('all', '256', '--neurons=256: give'),
                                     ('all', 'random:0', 'write random:K with K from 1'),
                                     ('all', 'random:x', 'write random:K')):
        with pytest.raises(I.InterpretError) as e:
            I.pick_neurons(planted_model().config, layers, neurons, 0)
        assert message in str(e.value) and '\n' not in str(e.value)
    for arg, message in (('--n_openai=0', '--n_openai=0 must be at least 1'),     # the script's way: one line, exit 2
                         ('--device=cuda:99' if torch.cuda.is_available() else '--device=cuda', 'GPU')):
        p = run('interpret.py', f'--ckpt={tmp_path / "m"}', f'--data={val_dir}', arg, check=False)
        assert p.returncode == 2 and message in p.stderr and p.stderr.count('\n') == 1, p.stderr
    p = run('interpret.py', f'--ckpt={tmp_path / "m"}', f'--data={val_dir}', '--n_openai=64', '--n_anthropic=20',
            check=False)
    assert p.returncode == 2 and 'and 20 sequences of 32 hold 640: raise --n_anthropic to 30' in p.stderr
    # too little data for the Anthropic protocol: raising --n_anthropic cannot help, so the message says what can
    (tmp_path / 'short').mkdir()
    np.fromfile(val_dir / 'val.bin', dtype=np.uint16)[:20 * 32].tofile(tmp_path / 'short' / 'val.bin')
    p = run('interpret.py', f'--ckpt={tmp_path / "m"}', f'--data={tmp_path / "short"}', check=False)
    assert p.returncode == 2 and 'val.bin holds no more: prepare more validation text, or use --protocol=openai' in p.stderr
    assert not (tmp_path / 'm' / 'interp').exists()


def test_neuron_forms_and_a_stream_shorter_than_asked(val_dir, tmp_path):
    save(planted_model(), tmp_path / 'm', 1.0)
    p = run('interpret.py', f'--ckpt={tmp_path / "m"}', f'--data={val_dir}', f'--neurons={PLANT}', *ARGS,
            '--n_openai=600', '--protocol=openai')
    assert f'note: {val_dir}/val.bin holds 100 sequences of 32 tokens, so --n_openai=600 uses 100' in p.stderr
    folder = tmp_path / 'm' / 'interp'
    assert set(neurons_of(folder)) == {PLANT}                  # '--neurons=5' is neuron 5, not 5 random ones
    assert json.loads((folder / 'summary.json').read_text())['settings']['n_openai'] == 100
    assert '100 / 40 sequences of 32 tokens' in (folder / 'report.html').read_text()
    assert '100 / 40 sequences of 32 tokens' in (folder / 'summary.md').read_text()
    run('interpret.py', f'--ckpt={tmp_path / "m"}', f'--data={val_dir}', '--neurons=random:3', *ARGS,
        '--protocol=openai', f'--out={tmp_path / "r"}')
    assert len(neurons_of(tmp_path / 'r')) == 3


def test_a_band_of_zeros_draws_from_the_whole_stream(val_dir, tmp_path):
    """The planted neuron is 0 on 63 of 64 tokens, so every band below the top twelfth is a band of ties: its
    items must come from all over the stream (ranked in stream order, each band held one twelfth of it)."""
    save(planted_model(), tmp_path / 'm', 3.0)
    run('interpret.py', f'--ckpt={tmp_path / "m"}', f'--data={val_dir}', f'--neurons={PLANT},', *ARGS,
        '--protocol=anthropic')
    rec = np.load(tmp_path / 'm' / 'interp' / 'records_L0.npz')
    P = 40 * 32
    bands = rec['anthropic_pos'][0, I.TOP + I.RAND:].reshape(I.BANDS, I.BAND_ITEMS)
    assert (rec['anthropic_acts'][0, I.TOP + I.RAND:, I.WINDOW['anthropic'][0]] == 0).all()   # all ties
    for band in bands:
        assert band.max() - band.min() > 0.6 * P, band

