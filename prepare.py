"""
Text -> data/<name>/train.bin and val.bin: flat uint16 GPT-2 tokens (tiktoken 'gpt2'), each document followed
by <|endoftext|> (50256), and meta.json, written last.

    python prepare.py                                    # the Pile (the paper's data), streamed from the hub
    python prepare.py --dataset=tinystories
    python prepare.py --files='notes/*.txt' --files='papers/*.jsonl' --name=mine --train_tokens=all
"""

import glob
import hashlib
import itertools
import json
import os
import shutil
import socket
import sys
import time
from types import SimpleNamespace

import numpy as np

from configurator import configure, fail, script_defaults

# -----------------------------------------------------------------------------------------------------------
dataset = 'pile'             # pile, fineweb-edu or tinystories (streamed from the hub); ignored with --files
files = []                   # local .txt, .jsonl/.json or .parquet files instead: a glob, repeatable
name = ''                    # output name: data/<name>/ (default: the dataset, or 'local' with --files)
out_dir = ''                 # output folder (default data/<name>)
train_tokens = None          # token budget for train.bin, or 'all' (default: the dataset's, below)
val_tokens = None            # token budget for val.bin, or 'all'
val_fraction = 0.01          # share of documents held out for val, by a hash of each (local files, FineWeb-Edu)
split_by = 'file'            # .txt: a document is a 'file' or a 'paragraph'
text_field = 'text'          # the text field of .jsonl/.json/.parquet records
num_proc = os.cpu_count()    # tokenizer threads
force = False                # redo a finished output
# -----------------------------------------------------------------------------------------------------------
OPTIONS = script_defaults(globals())

EOT = 50256
HUB = {  # name: (hub path, config, train split, val split or None to hold out by hash, default budgets)
    # 30B: the paper's schedule (295B tokens) then passes over it about 10 times; 'all' is about one pass (README)
    'pile': ('monology/pile-uncopyrighted', None, 'train', 'validation', (30_000_000_000, 10_000_000)),
    'fineweb-edu': ('HuggingFaceFW/fineweb-edu', 'sample-10BT', 'train', None, (3_000_000_000, 10_000_000)),
    'tinystories': ('roneneldan/TinyStories', None, 'train', 'validation', (600_000_000, 10_000_000)),
}
BATCH_CHARS = 4_000_000  # text tokenized per batch: bounds memory, keeps every thread busy


class PrepareError(Exception):
    pass


class Offline(PrepareError):
    """The hub cannot be reached; prepare() completes the hint with the output's name."""


def parse_args(argv):
    """The options, with argv's config files and --key=value applied (configurator.py)."""
    return SimpleNamespace(**configure(OPTIONS, argv))


def gpt2_tokenizer():
    """tiktoken's GPT-2 BPE; it downloads its files once, or reads them from TIKTOKEN_CACHE_DIR."""
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:
        raise PrepareError(f"cannot load the GPT-2 tokenizer ({type(e).__name__}): tiktoken downloads its files once; "
                           f"offline, point TIKTOKEN_CACHE_DIR at a folder that holds them")


def budget(value, default):
    if value is None:
        return default
    if value == 'all':
        return None
    try:
        n = int(float(value))
    except ValueError:
        raise PrepareError(f"token budget {value!r} is not a number; use e.g. 1e9 or 'all'")
    if n <= 0:
        raise PrepareError(f"token budget must be positive, got {value}")
    return n


def is_val(text, fraction):
    """A stable choice by content: a document stays in its split when other files are added."""
    h = int.from_bytes(hashlib.blake2b(text.encode('utf-8'), digest_size=8).digest(), 'little')
    return h < fraction * 2 ** 64


# --- sources: iterables of document texts ------------------------------------------------------------------

def expand(globs):
    files = []
    for g in globs:
        found = sorted(glob.glob(os.path.expanduser(g), recursive=True))
        if not found:
            raise PrepareError(f"--files={g!r} matches no file")
        files += [f for f in found if os.path.isfile(f)]
    for f in files:
        if not f.endswith(('.txt', '.jsonl', '.json', '.parquet')):
            raise PrepareError(f"{f}: unsupported file type; use .txt, .jsonl, .json or .parquet")
    return list(dict.fromkeys(files))


def field(record, key, where, skipped):
    """The record's text; a null or non-string text is skipped and counted in skipped (where the first was)."""
    if not isinstance(record, dict) or key not in record:
        raise PrepareError(f"{where} has no field {key!r}; name the text field with --text_field")
    text = record[key]
    if not isinstance(text, str):
        skipped['n'] += 1
        skipped.setdefault('first', f"{where} ({type(text).__name__})")
        return ''
    return text


def lines(f):
    """A text file's lines, streamed, strictly UTF-8: a Latin-1 or binary file is refused, not tokenized as garbage."""
    with open(f, encoding='utf-8') as fh:
        i = 0
        try:
            for i, line in enumerate(fh, 1):
                if '\x00' in line:
                    raise PrepareError(f"{f} line {i} holds NUL bytes: a binary file, not text; leave it out")
                yield line
        except UnicodeDecodeError as e:
            raise PrepareError(f"{f} is not UTF-8 text (byte {e.object[e.start]:#04x} in line {i + 1}): convert it, "
                               f"e.g. with iconv -f latin1 -t utf-8, or leave it out")


def local_documents(files, split_by, text_field, skipped):
    """The documents of local files, in order. skipped counts records whose text is null or not a string."""
    for f in files:
        if f.endswith('.txt'):
            if split_by == 'file':
                yield ''.join(lines(f))
                continue
            para = []
            for line in itertools.chain(lines(f), ['\n']):
                if line.strip():
                    para.append(line)
                elif para:
                    yield ''.join(para).strip('\n')
                    para = []
        elif f.endswith('.parquet'):
            import pyarrow.parquet as pq
            pf = pq.ParquetFile(f)
            if text_field not in pf.schema_arrow.names:
                raise PrepareError(f"{f} has no field {text_field!r}; name the text field with --text_field")
            row = 0
            for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    yield field({text_field: text}, text_field, f"{f} row {row}", skipped)
                    row += 1
        else:  # .jsonl, or .json holding either JSON lines or one array of records
            with open(f, encoding='utf-8', errors='replace') as fh:
                array = fh.read(1) == '['
            if array:
                try:
                    records = json.loads(''.join(lines(f)))
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{f} line {e.lineno}: not valid JSON ({e.msg}); fix or remove it")
                for i, rec in enumerate(records):
                    yield field(rec, text_field, f"{f} record {i}", skipped)
                continue
            for i, line in enumerate(lines(f), 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise PrepareError(f"{f} line {i}: not valid JSON ({e.msg}); fix or remove the line")
                    yield field(rec, text_field, f"{f} line {i}", skipped)


def in_turn(files, split_by, text_field, skipped, at_once=256):
    """The documents of all files, one from each in turn (at most at_once files open together), so that a budget
    that stops early draws on every file, not on the first ones."""
    for i in range(0, len(files), at_once):
        each = [local_documents([f], split_by, text_field, skipped) for f in files[i:i + at_once]]
        while each:
            for docs in list(each):
                try:
                    yield next(docs)
                except StopIteration:
                    each.remove(docs)


def hub_documents(name, split):
    """Stream one split of a hub dataset's records; nothing is downloaded beyond what is read."""
    import datasets
    path, config, *_ = HUB[name]
    direct = not any(os.environ.get(k) for k in ('HF_HUB_OFFLINE', 'HTTPS_PROXY', 'https_proxy'))
    if direct:      # one try, at once: the hub client would retry a dead network five times (about 30 s)
        try:
            socket.create_connection(('huggingface.co', 443), timeout=5).close()
        except OSError as e:
            raise Offline(f"cannot reach the Hugging Face hub for {path} ({e.strerror or type(e).__name__}); "
                          f"without the network prepare your own text instead: python prepare.py "
                          f"--files='docs/*.txt' --split_by=paragraph")
    try:
        ds = datasets.load_dataset(path, config, split=split, streaming=True)
        it = iter(ds)
        first = next(it)
    except (ConnectionError, OSError) as e:
        raise Offline(f"cannot reach the Hugging Face hub for {path} ({type(e).__name__}); without the network "
                      f"prepare your own text instead: python prepare.py --files='docs/*.txt' --split_by=paragraph")
    return itertools.chain([first], it)


# --- the writer ----------------------------------------------------------------------------------------------

def tokenize_into(docs, route, budgets, out_dir, num_proc, counts):
    """Tokenize docs in parallel batches and append them to out_dir/<split>.bin.tmp, each followed by EOT.
    route(text) names a document's split; budgets {split: tokens or None} names the splits this pass fills.
    Stops as soon as every split is full; the last document is cut to make the budget exact."""
    from tqdm import tqdm
    enc = gpt2_tokenizer()
    files = {s: open(os.path.join(out_dir, f'{s}.bin.tmp'), 'ab') for s in budgets}
    room = lambda s: float('inf') if budgets[s] is None else budgets[s] - counts[s]['tokens']
    total = None if None in budgets.values() else sum(budgets.values())
    bar = tqdm(total=total, unit='tok', unit_scale=True, desc=', '.join(budgets), file=sys.stderr, mininterval=1)
    t0, nbytes = time.time(), 0
    try:
        docs = iter(docs)
        while any(room(s) > 0 for s in budgets):
            batch, size = [], 0
            for text in docs:
                s = route(text)
                if s in budgets and room(s) > 0 and text:
                    batch.append((s, text))
                    size += len(text)
                    if size >= BATCH_CHARS:
                        break
            if not batch:
                break
            nbytes += sum(len(t.encode('utf-8')) for _, t in batch)
            tokens = enc.encode_ordinary_batch([t for _, t in batch], num_threads=num_proc)
            for s in budgets:
                docs_s = [tok + [EOT] for (si, _), tok in zip(batch, tokens) if si == s]
                if not docs_s or room(s) <= 0:
                    continue
                arr = np.fromiter(itertools.chain.from_iterable(docs_s), dtype=np.uint16)
                arr = arr[:int(min(room(s), len(arr)))]
                arr.tofile(files[s])
                sizes = np.array([len(d) for d in docs_s])
                counts[s]['documents'] += int((np.cumsum(sizes) - sizes < len(arr)).sum())  # begun before the cut
                counts[s]['tokens'] += len(arr)
                bar.update(len(arr))
            bar.set_postfix_str(f"{nbytes / 1e6 / (time.time() - t0):.1f} MB/s")
    finally:
        bar.close()
        for fh in files.values():
            fh.close()
    return nbytes


def check_token_files(data_path, block_size, vocab_size=None):
    """What is wrong, in one line (None: nothing), with data_path's train.bin and val.bin for a model of this block
    size and vocabulary: missing, not whole uint16 tokens, too short, or (given vocab_size) an id beyond the
    vocabulary (the vocabulary prepare.py names in meta.json, else found by a scan)."""
    parent, name = os.path.split(os.path.normpath(data_path))
    where = '' if os.path.normpath(parent) == 'data' else f" --out_dir={data_path}"
    for split in ('train', 'val'):
        f = os.path.join(data_path, f'{split}.bin')
        if not os.path.exists(f):
            make = f"--dataset={name}" if name in HUB else f"--files='docs/*.txt' --name={name}"
            return f"{f} not found: make it with `python prepare.py {make}{where}`"
        size = os.path.getsize(f)
        if size % 2:
            return f"{f} has an odd number of bytes ({size:,}), so it is not a file of uint16 tokens; remake it"
        if size // 2 < block_size + 2:
            return (f"{f} holds {size // 2} tokens, fewer than block_size + 2 = {block_size + 2}; prepare more "
                    f"data or lower block_size")
    if vocab_size is None:
        return None
    meta = os.path.join(data_path, 'meta.json')
    if os.path.exists(meta):
        with open(meta) as f:
            found = [(meta, json.load(f).get('vocab_size', 1) - 1)]
    else:
        data = [np.memmap(os.path.join(data_path, f'{s}.bin'), dtype=np.uint16, mode='r') for s in ('train', 'val')]
        found = [(d.filename, max(int(d[i:i + 2**24].max()) for i in range(0, len(d), 2**24))) for d in data]
    for f, largest in found:
        if largest >= vocab_size:
            return (f"{f} holds token id {largest} but the model's vocabulary is {vocab_size} (vocab_size); "
                    f"tokenize the data with prepare.py (GPT-2 ids, below 50257) or raise vocab_size")
    return None


def prepare(args, hub_docs=hub_documents):
    """Make the output folder's train.bin, val.bin and meta.json; hub_docs(name, split) yields texts."""
    name = args.name or ('local' if args.files else args.dataset)
    out_dir = args.out_dir or os.path.join('data', name)
    if args.files:
        files = expand(args.files)
        defaults, source = (None, None), {'files': files}
    else:
        if args.dataset not in HUB:
            raise PrepareError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(HUB)} or pass --files")
        defaults, source = HUB[args.dataset][4], {'hub': HUB[args.dataset][0], 'config': HUB[args.dataset][1]}
    budgets = {'train': budget(args.train_tokens, defaults[0]), 'val': budget(args.val_tokens, defaults[1])}
    if args.num_proc < 1:
        raise PrepareError(f"--num_proc must be at least 1, got {args.num_proc}")
    if args.split_by not in ('file', 'paragraph'):
        raise PrepareError(f"--split_by={args.split_by}: use 'file' or 'paragraph'")
    if not 0 < args.val_fraction < 1:
        raise PrepareError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")

    settings = {'source': source, 'budgets': budgets, 'val_fraction': args.val_fraction, 'split_by': args.split_by,
                'text_field': args.text_field}
    meta_path = os.path.join(out_dir, 'meta.json')
    if os.path.exists(meta_path) and not args.force:
        with open(meta_path) as f:
            if json.load(f).get('settings') == settings:
                print(f"{out_dir} is already prepared with these settings; nothing to do (--force to redo)")
                return None
    # disk: two bytes a token; a local source needs at most about as many bytes as its text
    need = 2 * sum(b for b in budgets.values() if b is not None)
    if args.files and None in budgets.values():
        need += sum(os.path.getsize(f) for f in files)
    there = out_dir
    while not os.path.isdir(there):      # the folder may not exist yet: its nearest existing parent's disk
        there = os.path.dirname(there) or '.'
    free = shutil.disk_usage(there).free
    if need > free:
        raise PrepareError(f"{out_dir} has {free / 1e9:.1f} GB free but the budget needs about {need / 1e9:.1f} GB; "
                           f"free space or lower --train_tokens")

    gpt2_tokenizer()  # fail here, before any file is touched
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tmp = {s: os.path.join(out_dir, f'{s}.bin.tmp') for s in ('train', 'val')}
    counts = {s: {'tokens': 0, 'documents': 0} for s in ('train', 'val')}
    skipped = {'n': 0}    # records whose text is null or not a string: skipped, counted, reported
    t0 = time.time()
    try:
        for f in tmp.values():
            open(f, 'wb').close()
        if args.files:
            docs = in_turn(files, args.split_by, args.text_field, skipped)
            route = lambda text: 'val' if is_val(text, args.val_fraction) else 'train'
            nbytes = tokenize_into(docs, route, budgets, out_dir, args.num_proc, counts)
        else:
            _, _, train_split, val_split, _ = HUB[args.dataset]
            texts = lambda split: (field(rec, 'text', f"{args.dataset} {split} record {i}", skipped)
                                   for i, rec in enumerate(hub_docs(args.dataset, split)))
            if val_split:
                nbytes = tokenize_into(texts(val_split), lambda t: 'val', {'val': budgets['val']},
                                       out_dir, args.num_proc, counts)
                nbytes += tokenize_into(texts(train_split), lambda t: 'train',
                                        {'train': budgets['train']}, out_dir, args.num_proc, counts)
            else:
                route = lambda text: 'val' if is_val(text, args.val_fraction) else 'train'
                nbytes = tokenize_into(texts(train_split), route, budgets, out_dir, args.num_proc, counts)
        for s in ('train', 'val'):
            if counts[s]['tokens'] == 0:
                hint = (" (every document went to train: add documents, use --split_by=paragraph or raise "
                        "--val_fraction)" if s == 'val' and counts['train']['tokens'] else "")
                raise PrepareError(f"the {s} split is empty: the source gave it no text{hint}")
        # finished: swap the new files in, meta.json last so that it only ever describes complete files
        if os.path.exists(meta_path):
            os.remove(meta_path)
        for s in ('train', 'val'):
            os.replace(tmp[s], os.path.join(out_dir, f'{s}.bin'))
    except Offline as e:        # local text under its own name, not the dataset's
        where = f" --out_dir={args.out_dir}" if args.out_dir else ""
        raise PrepareError(f"{e} --name={args.name or 'mytext'}{where}")
    finally:
        for f in tmp.values():
            if os.path.exists(f):
                os.remove(f)
        if created and not os.listdir(out_dir):   # a failed first run leaves no empty folder behind
            os.rmdir(out_dir)
    seconds = time.time() - t0
    meta = {'settings': settings, 'tokenizer': 'gpt2', 'vocab_size': 50257, 'eot_token': EOT, 'dtype': 'uint16',
            'splits': counts, 'skipped_records': skipped['n'], 'text_bytes': nbytes, 'seconds': round(seconds, 2),
            'num_proc': args.num_proc, 'command': ' '.join(['python', 'prepare.py'] + sys.argv[1:])}
    with open(meta_path + '.tmp', 'w') as f:
        json.dump(meta, f, indent=2)
    os.replace(meta_path + '.tmp', meta_path)
    print(f"wrote {out_dir}: train {counts['train']['tokens']:,} tokens ({counts['train']['documents']:,} documents), "
          f"val {counts['val']['tokens']:,} tokens ({counts['val']['documents']:,} documents); "
          f"{nbytes / 1e6:.1f} MB of text in {seconds:.1f} s = "
          f"{nbytes / 1e6 / seconds / args.num_proc:.2f} MB/s per core")
    if skipped['n']:
        print(f"skipped {skipped['n']:,} records whose text is null or not a string (the first: {skipped['first']})")
    for s, n in budgets.items():          # a split the source could not fill: say so, and why
        if n is not None and counts[s]['tokens'] < n:
            why = (f"--val_fraction={args.val_fraction} holds out that share of the documents; raise it for more"
                   if s == 'val' and (args.files or not HUB[args.dataset][3]) else "the source holds no more")
            print(f"note: {s}.bin has {counts[s]['tokens']:,} tokens, short of its budget of {n:,}: {why}")
    return meta


if __name__ == '__main__':
    try:
        prepare(parse_args(sys.argv[1:]))
    except PrepareError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted: nothing was finished, no meta.json written", file=sys.stderr)
        sys.exit(130)
