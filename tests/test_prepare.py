import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare as P
from conftest import run

EOT = 50256


def docs_of(folder, split):
    """The documents in a .bin, decoded: EOT-separated runs of tokens."""
    enc = P.gpt2_tokenizer()
    toks = np.fromfile(os.path.join(folder, f'{split}.bin'), dtype=np.uint16).tolist()
    out, cur = [], []
    for t in toks:
        if t == EOT:
            out.append(enc.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert not cur, 'a complete output ends with <|endoftext|>'
    return out


def make_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'while', 'dogs', 'ran', 'über', '<|endoftext|>', 'naïve', '42']
    return [' '.join(rng.choice(words, size=rng.integers(3, 30))).capitalize() + '.' for _ in range(n)]


def prep(*argv, hub_docs=P.hub_documents):
    return P.prepare(P.parse_args(list(argv)), hub_docs=hub_docs)


@pytest.fixture
def sources(tmp_path):
    docs = make_docs(120)
    d = tmp_path / 'src'
    d.mkdir()
    for i, text in enumerate(docs[:40]):                       # .txt, one document per file
        (d / f'{i:03d}.txt').write_text(text)
    with open(d / 'b.jsonl', 'w') as f:                        # .jsonl
        for text in docs[40:80]:
            f.write(json.dumps({'text': text, 'id': 1}) + '\n')
    pq.write_table(pa.table({'text': docs[80:110]}), d / 'c.parquet')
    (d / 'd.json').write_text(json.dumps([{'text': t} for t in docs[110:]]))  # .json array
    return d, docs


def test_local_files_round_trip_and_split(sources, tmp_path):
    d, docs = sources
    out = tmp_path / 'out'
    meta = prep(f'--files={d / "*.txt"}', f'--files={d / "*.jsonl"}', f'--files={d / "*.parquet"}', f'--files={d / "*.json"}',
                f'--out_dir={out}', '--val_fraction=0.3', '--train_tokens=all', '--val_tokens=all')
    train, val = docs_of(out, 'train'), docs_of(out, 'val')
    assert sorted(train + val) == sorted(docs)                 # every document, exactly, once
    assert not set(train) & set(val) and 10 < len(val) < 60
    assert all(P.is_val(t, 0.3) for t in val) and not any(P.is_val(t, 0.3) for t in train)
    assert meta['splits']['train']['documents'] == len(train) and meta['splits']['val']['documents'] == len(val)
    assert meta['splits']['train']['tokens'] == os.path.getsize(out / 'train.bin') // 2
    first = (out / 'train.bin').read_bytes()
    prep(f'--files={d / "*.txt"}', f'--files={d / "*.jsonl"}', f'--files={d / "*.parquet"}', f'--files={d / "*.json"}',
         f'--out_dir={out}', '--val_fraction=0.3', '--train_tokens=all', '--val_tokens=all', '--force=True')
    assert (out / 'train.bin').read_bytes() == first           # deterministic
    assert sorted(os.listdir(out)) == ['meta.json', 'train.bin', 'val.bin']


def test_a_split_short_of_its_budget_says_why(sources, tmp_path, capsys):
    d, _ = sources
    meta = prep(f'--files={d / "*.txt"}', f'--out_dir={tmp_path / "o"}', '--val_fraction=0.3', '--val_tokens=100000')
    val = meta['splits']['val']['tokens']
    assert 0 < val < 100000
    assert (f"note: val.bin has {val:,} tokens, short of its budget of 100,000: --val_fraction=0.3 holds out that "
            f"share of the documents; raise it for more") in capsys.readouterr().out


def test_a_budget_draws_on_every_file(tmp_path):
    """Three files and a train budget a third of their text: every file gives documents, not the first alone."""
    for name in 'abc':
        (tmp_path / f'{name}.txt').write_text('\n\n'.join(f'{name} paragraph {i}' for i in range(60)))
    prep(f'--files={tmp_path / "*.txt"}', '--split_by=paragraph', f'--out_dir={tmp_path / "o"}', '--train_tokens=200',
         '--val_tokens=all', '--val_fraction=0.1')
    assert {d[0] for d in docs_of(tmp_path / 'o', 'train')} == {'a', 'b', 'c'}


def test_split_is_stable_when_files_are_added(sources, tmp_path):
    d, docs = sources
    prep(f'--files={d / "0[0-1]*.txt"}', f'--out_dir={tmp_path / "a"}', '--val_fraction=0.3')
    prep(f'--files={d / "*.txt"}', f'--out_dir={tmp_path / "b"}', '--val_fraction=0.3')
    assert set(docs_of(tmp_path / 'a', 'val')) <= set(docs_of(tmp_path / 'b', 'val'))
    assert set(docs_of(tmp_path / 'a', 'train')) <= set(docs_of(tmp_path / 'b', 'train'))


def test_paragraph_split(tmp_path):
    paras = ['First para\nline two.'] + [f'Paragraph {i}.' for i in range(10)]
    (tmp_path / 'a.txt').write_text('\n\n\n'.join(paras[:2]) + '\n  \n' + '\n\n'.join(paras[2:]) + '\n')
    out = tmp_path / 'o'
    prep(f'--files={tmp_path / "a.txt"}', '--split_by=paragraph', f'--out_dir={out}', '--val_fraction=0.5')
    assert sorted(docs_of(out, 'train') + docs_of(out, 'val')) == sorted(paras)


def test_budgets_are_exact(sources, tmp_path):
    d, _ = sources
    meta = prep(f'--files={d / "*.jsonl"}', f'--files={d / "*.txt"}', f'--out_dir={tmp_path / "o"}',
                '--train_tokens=137', '--val_tokens=61', '--val_fraction=0.3')
    assert os.path.getsize(tmp_path / 'o' / 'train.bin') == 2 * 137
    assert os.path.getsize(tmp_path / 'o' / 'val.bin') == 2 * 61
    assert meta['splits']['train']['tokens'] == 137 and meta['splits']['val']['tokens'] == 61


def fake_hub(streams, stop_after=None):
    """An in-memory stand-in for the hub's streaming reader: {split: [texts]}, yielded as records."""
    def hub_docs(name, split):
        for i, text in enumerate(streams[split]):
            if stop_after is not None and i == stop_after:
                raise KeyboardInterrupt
            yield {'text': text}
    return hub_docs


def test_hub_with_its_own_validation_split(tmp_path):
    train, val = make_docs(200, 1), make_docs(50, 2)
    out = tmp_path / 'pile'
    meta = prep('--dataset=pile', f'--out_dir={out}', '--train_tokens=all', '--val_tokens=300',
                hub_docs=fake_hub({'train': train, 'validation': val}))
    assert docs_of(out, 'train') == train
    assert os.path.getsize(out / 'val.bin') == 600 and meta['settings']['source']['hub'] == 'monology/pile-uncopyrighted'
    got = np.fromfile(out / 'val.bin', dtype=np.uint16)
    enc = P.gpt2_tokenizer()
    want = [t for text in val for t in enc.encode_ordinary(text) + [EOT]][:300]
    assert got.tolist() == want                                # streamed in order, cut to the token


def test_hub_without_validation_split_holds_out_by_hash(tmp_path):
    docs = make_docs(300, 3)
    out = tmp_path / 'fw'
    prep('--dataset=fineweb-edu', f'--out_dir={out}', '--train_tokens=all', '--val_tokens=all',
         '--val_fraction=0.2', hub_docs=fake_hub({'train': docs}))
    assert sorted(docs_of(out, 'train') + docs_of(out, 'val')) == sorted(docs)
    assert all(P.is_val(t, 0.2) for t in docs_of(out, 'val'))


def test_interrupted_run_leaves_nothing_half_written(tmp_path):
    out = tmp_path / 'ts'
    with pytest.raises(KeyboardInterrupt):
        prep('--dataset=tinystories', f'--out_dir={out}', '--val_tokens=all',
             hub_docs=fake_hub({'train': make_docs(100), 'validation': make_docs(100)}, stop_after=50))
    assert not out.exists()                                     # not even an empty folder
    prep('--dataset=tinystories', f'--out_dir={out}', hub_docs=fake_hub({'train': make_docs(9), 'validation': make_docs(9, 1)}))
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    with pytest.raises(KeyboardInterrupt):                      # an interrupted redo keeps the finished data
        prep('--dataset=tinystories', f'--out_dir={out}', '--force=True',
             hub_docs=fake_hub({'train': make_docs(100), 'validation': make_docs(100)}, stop_after=50))
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_rerun_does_nothing_unless_forced(sources, tmp_path, capsys):
    d, _ = sources
    args = [f'--files={d / "*.jsonl"}', f'--out_dir={tmp_path / "o"}', '--val_fraction=0.3']
    assert prep(*args) is not None
    assert prep(*args) is None and 'already prepared' in capsys.readouterr().out
    assert prep(*args, '--force=True') is not None
    assert prep(*args, '--val_fraction=0.4') is not None       # other settings: redone


@pytest.mark.parametrize('make, argv, message', [
    (None, ['--dataset=wikipedia'], "unknown dataset 'wikipedia'; choose one of pile, fineweb-edu, tinystories"),
    (None, ['--files=nowhere/*.txt'], "--files='nowhere/*.txt' matches no file"),
    ({'a.jsonl': '{"body": "x"}\n'}, ['--files={d}/a.jsonl'], "a.jsonl line 1 has no field 'text'"),
    ({'a.txt': ''}, ['--files={d}/a.txt'], 'the train split is empty'),
    ({'a.txt': 'one document'}, ['--files={d}/a.txt', '--val_fraction=0.001'], 'the val split is empty'),
    ({'a.txt': 'x'}, ['--files={d}/a.txt', '--train_tokens=1e15'], 'GB free but the budget needs about'),
    ({'a.csv': 'x'}, ['--files={d}/a.csv'], 'unsupported file type'),
    (None, ['--dataset=tinystories'], "cannot reach the Hugging Face hub for roneneldan/TinyStories"),
    (None, ['--dataset=tinystories'], "python prepare.py --files='docs/*.txt' --split_by=paragraph --name=mytext"),
    (None, ['--dataset=tinystories', '--name=mine'], "python prepare.py --files='docs/*.txt' --split_by=paragraph --name=mine"),
    ({'a.jsonl': '{"text": "fine"}\n\n{"text": "cut\n'}, ['--files={d}/a.jsonl'], 'a.jsonl line 3: not valid JSON'),
    ({'a.json': '[{"text": "x"},\n {"text": }]'}, ['--files={d}/a.json'], 'a.json line 2: not valid JSON'),
    ({'a.txt': b'caf\xe9 au lait\n'}, ['--files={d}/a.txt'], 'a.txt is not UTF-8 text (byte 0xe9 in line 1)'),
    ({'a.txt': b'ok\n\x7fELF\x00\x01\x02'}, ['--files={d}/a.txt'], 'a.txt line 2 holds NUL bytes: a binary file'),
])
def test_errors_are_one_line_with_exit_code_2(tmp_path, make, argv, message):
    for name, text in (make or {}).items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / 'out'
    p = run('prepare.py', *[a.replace('{d}', str(tmp_path)) for a in argv], f'--out_dir={out}', check=False,
            env={'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'})
    assert p.returncode == 2 and message in p.stderr, p.stderr
    lines = [l for l in re.split('[\r\n]', p.stderr) if l.strip() and 'tok/s' not in l]  # less the progress bar
    assert len(lines) == 1 and lines[0].startswith('error: ')
    assert not out.exists() or os.listdir(out) == []


def test_records_without_text_are_skipped_and_counted(tmp_path):
    rows = [{'text': 'a first document'}, {'text': None}, {'text': 5}, {'text': 'a second document'}]
    (tmp_path / 'a.jsonl').write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
    pq.write_table(pa.table({'text': ['a third document', None]}), tmp_path / 'b.parquet')
    out = tmp_path / 'out'
    p = run('prepare.py', f'--files={tmp_path / "a.jsonl"}', f'--files={tmp_path / "b.parquet"}', f'--out_dir={out}',
            '--val_fraction=0.5', '--train_tokens=all', '--val_tokens=all')
    assert f"skipped 3 records whose text is null or not a string (the first: {tmp_path / 'a.jsonl'} line 2 (NoneType))" in p.stdout
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['skipped_records'] == 3
    assert sorted(docs_of(out, 'train') + docs_of(out, 'val')) == ['a first document', 'a second document',
                                                                   'a third document']
