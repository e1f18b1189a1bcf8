"""
What interpret.py writes after scoring, and the table that compares runs:

    summary.json / summary.md   each scoring method's mean score x 100 per layer and over the layers, with 95%
                                bootstrap intervals over neurons
    report.html                 the same, histograms of r, the training curves from the checkpoint's log.jsonl, and
                                each neuron's explanation with its true and simulated activations
    python interpret.py --compare RUN/interp ...   the runs side by side, and CRATE - GPT-2 at each depth
"""

import html
import json
import math
import os
import zlib

import numpy as np

# --- the statistics: means over neurons and layers, and their bootstrap intervals ----------------------------------

BOOT = 2000                  # bootstrap replicates for the 95% intervals
UNITS = 'simulation scores are Pearson r x 100, detection and fuzzing scores balanced accuracy x 100 (50: chance)'
COLUMNS = {'top_and_random': 'Top-and-Random', 'random_only': 'Random-only', 'anthropic': 'Anthropic',
           'detection': 'Detection', 'fuzzing': 'Fuzzing'}


def columns(summaries):
    """The paper's three methods, then detection and fuzzing where any run has them."""
    return [c for c in COLUMNS if c in ('top_and_random', 'random_only', 'anthropic')
            or any(c in s['methods'] for s in summaries)]


def defined_scores(items):
    return [s['score'] for s in items if not s['dead'] and s['score'] is not None]


def bootstrap(per_layer_scores, layers, key=0):
    """BOOT replicates of the mean over `layers` of each layer's mean score x100, the neurons resampled with
    replacement within each layer (seeded by key); None where no layer has a score."""
    rng = np.random.default_rng([BOOT, key])
    reps = [100 * np.asarray(s)[rng.integers(0, len(s), (BOOT, len(s)))].mean(1)
            for s in (defined_scores(per_layer_scores[l]) for l in layers) if s]
    return np.mean(reps, 0) if reps else None


def interval(reps):
    """The 95% percentile interval of bootstrap replicates, or None."""
    return None if reps is None else [float(np.percentile(reps, 2.5)), float(np.percentile(reps, 97.5))]


def summarize(per_layer_scores, n_layer):
    """{layer: [score or None]} -> per layer mean/std x100 and counts, and the model's mean and population
    variance across layers, with and without the model's last layer (n_layer - 1, where it was evaluated); each
    mean with its 95% bootstrap interval over neurons."""
    layers_out = {}
    for l, items in per_layer_scores.items():
        scored = defined_scores(items)
        layers_out[l] = {'mean': 100 * float(np.mean(scored)) if scored else None,
                         'ci': interval(bootstrap(per_layer_scores, [l])),
                         'std': 100 * float(np.std(scored)) if scored else None,
                         'scored': len(scored),   # undefined: a constant side; failed: no usable answer
                         'undefined': sum(1 for s in items
                                          if not s['dead'] and s['score'] is None and not s.get('failed')),
                         'dead': sum(1 for s in items if s['dead']), 'failed': sum(1 for s in items if s.get('failed')),
                         'hard': sum(1 for s in items if s.get('hard')),
                         'no_digit_slots': sum(s.get('no_digit', 0) for s in items)}
    means = [v['mean'] for v in layers_out.values() if v['mean'] is not None]
    but_last = [l for l in per_layer_scores if l != n_layer - 1]
    all_but_last = [layers_out[l]['mean'] for l in but_last if layers_out[l]['mean'] is not None]
    model = {'mean': float(np.mean(means)) if means else None,
             'ci': interval(bootstrap(per_layer_scores, list(per_layer_scores))),
             'var': float(np.var(means)) if means else None,
             'mean_excl_last': float(np.mean(all_but_last)) if all_but_last else None,
             'ci_excl_last': interval(bootstrap(per_layer_scores, but_last)),
             'var_excl_last': float(np.var(all_but_last)) if all_but_last else None}
    return {'layers': layers_out, 'model': model}


# --- the reports ---------------------------------------------------------------------------------------------------

def fmt(v, ci=None):
    """A score x100 with two decimals, '–' for none, and its 95% interval where given."""
    if v is None:
        return '–'
    return f'{v:.2f}' + (f' [{ci[0]:.2f}, {ci[1]:.2f}]' if ci else '')


def markdown(summary):
    lines = [f"# {summary['model_name']} ({summary['simulator_label']})", '',
             f"validation loss {summary['val_loss']}; {summary['settings']['n_openai']} / "
             f"{summary['settings']['n_anthropic']} sequences of {summary['settings']['seq_len']} tokens (OpenAI / "
             f"Anthropic); {UNITS}", '',
             '| layer | method | mean [95% interval] | std | scored | undefined | dead | failed | hard '
             '| no-digit slots |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for l in summary['layer_ids']:
        for method, s in summary['methods'].items():
            v = s['layers'][str(l)]
            lines.append(f"| {l} | {method} | {fmt(v['mean'], v.get('ci'))} | {fmt(v['std'])} | {v['scored']} | "
                         f"{v['undefined']} | "
                         f"{v['dead']} | {v['failed']} | {v['hard']} | {v['no_digit_slots']} |")
    deep = summary['model']['n_layer'] >= 6        # the paper leaves the last layer out at 6 and 12 layers
    lines += ['', '| method | mean over layers [95% interval] | variance of the layer means |'
              + (' mean without the last layer | its variance |' if deep else ''),
              '| --- | --- | --- |' + (' --- | --- |' if deep else '')]
    for method, s in summary['methods'].items():
        m = s['model']
        lines.append(f"| {method} | {fmt(m['mean'], m.get('ci'))} | {fmt(m['var'])} |"
                     + (f" {fmt(m['mean_excl_last'], m.get('ci_excl_last'))} | {fmt(m['var_excl_last'])} |"
                        if deep else ''))
    return '\n'.join(lines) + '\n'


def shade(toks, vals, top, decode, kind):
    """Tokens shaded in 11 steps by value / top; kind 'a' (true, with the value on hover) or 's' (simulated)."""
    spans = []
    for t, v in zip(toks, vals):
        level = 0 if not top or not v > 0 else min(10, round(10 * v / top))
        text = html.escape(decode([t])).replace(chr(10), '⏎')
        spans.append(f'<span class={kind}{level} title="{v:.3g}">{text}</span>' if kind == 'a' and level else
                     f'<span class={kind}{level}>{text}</span>' if level else text)
    return ''.join(spans)


def histogram_svg(scores, width=300, height=60, bins=20):
    counts, edges = np.histogram([s for s in scores if s is not None], bins=bins, range=(-1, 1))
    top = max(1, counts.max())
    bars = ''.join(f'<rect x="{i * width / bins:.1f}" y="{height - c / top * height:.1f}" '
                   f'width="{width / bins - 1:.1f}" height="{c / top * height:.1f}" fill="#4a7">'
                   f'<title>{edges[i]:.1f}..{edges[i + 1]:.1f}: {c}</title></rect>'
                   for i, c in enumerate(counts))
    return (f'<svg width="{width}" height="{height + 14}"><line x1="{width / 2}" y1="0" x2="{width / 2}" y2="{height}" '
            f'stroke="#999"/>{bars}<text x="0" y="{height + 12}" font-size="10">-1</text><text x="{width - 10}" '
            f'y="{height + 12}" font-size="10">1</text></svg>')


COLORS = ['#d62', '#26d', '#2a4', '#a2a', '#999', '#d92', '#2aa', '#666']


def ticks(lo, hi, n=5):
    """About n round values from lo to hi, for an axis."""
    step = 10 ** math.floor(math.log10((hi - lo) / n or 1))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def lines_svg(series, title, y_range, width=760, height=240):
    """A line chart of {name: [(x, y)]} with ticks on both axes and a legend below; y_range is fixed by the caller,
    so that two runs' pages show the same scale."""
    points = [p for s in series.values() for p in s]
    if not points:
        return ''
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    (y0, y1), left, top, w, h = y_range, 50, 10, width - 60, height - 40
    sx = lambda x: left + (x - x0) / ((x1 - x0) or 1) * w
    sy = lambda y: top + (y1 - y) / ((y1 - y0) or 1) * h
    axes = ''.join(f'<line x1="{left}" x2="{left + w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{sy(y) + 3:.1f}" font-size="11" text-anchor="end">{y:g}</text>'
                   for y in ticks(y0, y1))
    axes += ''.join(f'<text x="{sx(x):.1f}" y="{top + h + 14}" font-size="11" text-anchor="middle">{x:g}</text>'
                    for x in ticks(x0, x1))
    paths = ''.join(f'<polyline fill="none" stroke-width="1.5" stroke="{COLORS[i % len(COLORS)]}" points="'
                    + ' '.join(f'{sx(x):.1f},{sy(y):.1f}' for x, y in pts)
                    + f'"><title>{html.escape(name)}</title></polyline>'
                    for i, (name, pts) in enumerate(series.items()) if pts)
    legend = ' '.join(f'<span style="color:{COLORS[i % len(COLORS)]}">&#9644; {html.escape(name)}</span>'
                      for i, name in enumerate(series))
    return (f'<figure><figcaption>{html.escape(title)}</figcaption><svg width="{width}" height="{height}">'
            f'{axes}<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>{paths}'
            f'<text x="{left + w}" y="{height - 4}" font-size="11" text-anchor="end">iteration</text></svg>'
            f'<div style="font-size:12px">{legend}</div></figure>')


def training_log(ckpt_path):
    """train.py's log.jsonl beside a checkpoint, as a list of records ([] where there is none)."""
    path = os.path.join(ckpt_path if os.path.isdir(ckpt_path) else os.path.dirname(ckpt_path), 'log.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, filter(str.strip, f))]


def training_svg(ckpt_path):
    """The loss (every logged training step, and each evaluation's validation loss) and each layer's zero fraction
    over the iterations, from the checkpoint's log.jsonl. The zero fraction is on 0 to 1, the loss from 0."""
    log = training_log(ckpt_path)
    if not log:
        return ''
    loss = {'training loss (each logged step)': [(r['iter'], r['loss']) for r in log if 'loss' in r],
            'validation loss (each evaluation)': [(r['iter'], r['val_loss']) for r in log if 'val_loss' in r]}
    loss = {k: v for k, v in loss.items() if v}
    evals = [r for r in log if 'sparsity' in r]
    layers = len(evals[-1]['sparsity']) if evals else 0
    zero = {f'layer {l}': [(r['iter'], r['sparsity'][l]['zero_fraction']) for r in evals] for l in range(layers)}
    top = max((y for v in loss.values() for _, y in v), default=1)
    return ('<h2>Training</h2>' + lines_svg(loss, 'loss over iterations', (0, math.ceil(top)))
            + (lines_svg(zero, "the neurons' zero fraction (values not > 0) on the validation slice", (0, 1))
               if layers else ''))


# report.html's neuron lists, re-sorted and filtered in the browser
SORTING = ('<script>function arrange() {'
           'const by = document.getElementById("sort").value, show = document.getElementById("show").value;'
           'for (const box of document.querySelectorAll(".neurons")) {'
           '  const items = [...box.children].sort((a, b) => by == "best" ? b.dataset.best - a.dataset.best'
           '                                                          : a.dataset.neuron - b.dataset.neuron);'
           '  for (const d of items) { box.appendChild(d); d.hidden = show != "all" && d.dataset.kind != show; }'
           '}}</script>')


def write_report(folder, summary, neuron_rows, decode):
    deep = summary['model']['n_layer'] >= 6
    title = f"{summary['model_name']} — neuron interpretability ({summary['simulator_label']})"
    parts = [f'<!doctype html><meta charset="utf-8"><title>{html.escape(title)}</title><style>'
             'body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}'
             'td,th{border:1px solid #ccc;padding:2px 6px}.ex{font-family:monospace;white-space:pre-wrap;margin:2px 0}'
             'details{margin:2px 0}'
             + ''.join(f'.a{i}{{background:rgba(255,120,0,{i / 10})}}.s{i}{{background:rgba(0,120,255,{i / 10})}}'
                       for i in range(1, 11)) + '</style>', f'<h1>{html.escape(title)}</h1>',
             f'<p>checkpoint {html.escape(summary["ckpt"])}, validation loss {summary["val_loss"]}, '
             f'{summary["settings"]["n_openai"]} / {summary["settings"]["n_anthropic"]} sequences of '
             f'{summary["settings"]["seq_len"]} tokens (OpenAI / Anthropic); {UNITS}.</p>',
             '<p>In the excerpts below, <span class=a6>orange</span> shading is the neuron\'s true activation and '
             '<span class=s6>blue</span> the simulator\'s prediction, darker for stronger (0 to 10); &#9166; is a '
             'newline token. A layer\'s top-activation token concentration is, averaged over its neurons, the share '
             'of a neuron\'s top 50 excerpts that peak on its most common token (1: always the same token).</p>',
             '<table><tr><th>method</th><th>mean over layers [95% interval]</th><th>variance of the layer means</th>'
             + ('<th>without the last layer (as the paper at 6 and 12 layers)</th>' if deep else '') + '</tr>']
    for method, s in summary['methods'].items():
        m = s['model']
        parts.append(f"<tr><td>{method}</td><td>{fmt(m['mean'], m.get('ci'))}</td><td>{fmt(m['var'])}</td>"
                     + (f"<td>{fmt(m['mean_excl_last'], m.get('ci_excl_last'))}</td>" if deep else '') + '</tr>')
    parts.append('</table>' + training_svg(summary['ckpt']))
    parts.append('<p>Neurons in each layer: sort by <select id="sort" onchange="arrange()"><option value="best">best '
                 'score</option><option value="neuron">number</option></select> show <select id="show" '
                 'onchange="arrange()"><option>all</option><option>scored</option><option>undefined</option>'
                 '<option>dead</option></select></p>')
    for l in summary['layer_ids']:
        parts.append(f'<h2>Layer {l}</h2><table><tr><th>method</th><th>mean</th><th>std</th><th>scored</th>'
                     f'<th>undefined</th><th>dead</th><th>failed</th><th>hard</th><th>distribution of scores</th></tr>')
        for method, s in summary['methods'].items():
            v = s['layers'][str(l)]
            scores = [r['scores'][method]['score'] for r in neuron_rows if r['layer'] == l and method in r['scores']]
            parts.append(f"<tr><td>{method}</td><td>{fmt(v['mean'], v.get('ci'))}</td><td>{fmt(v['std'])}</td>"
                         f"<td>{v['scored']}</td><td>{v['undefined']}"
                         f"</td><td>{v['dead']}</td><td>{v['failed']}</td><td>{v['hard']}</td><td>{histogram_svg(scores)}"
                         f"</td></tr>")
        st = summary['stats'].get(str(l), {})
        parts.append(f"</table><p>fraction of zero activations {st.get('zero_fraction', '–')}, mean L0 per token "
                     f"{st.get('l0', '–')}, dead neurons {st.get('dead', '–')} of {st.get('neurons', '–')}, "
                     f"top-activation token concentration {st.get('top_token_concentration', '–')}</p>")
        parts.append('<div class="neurons">')
        for r in sorted((r for r in neuron_rows if r['layer'] == l), key=lambda r: -(r['best'] or -2)):
            sc = ', '.join(f"{k} " + ('dead' if v['dead'] else '–' if v['score'] is None else f"{100 * v['score']:.1f}")
                           for k, v in r['scores'].items())
            expl = next((v['explanation'] for v in r['scores'].values() if v.get('explanation')), 'dead')
            body = []
            for method, v in r['scores'].items():
                if method == 'random_only':
                    continue          # its excerpts are among top_and_random's
                for toks, a, p in v.get('show', []):
                    body.append(f'<div class="ex"><b>{method}</b> true: {shade(toks, a, v["max_act"], decode, "a")}'
                                f'<br>simulated: {shade(toks, p, 10, decode, "s")}</div>')
            kind = ('dead' if all(v['dead'] for v in r['scores'].values()) else
                    'scored' if r['best'] is not None else 'undefined')
            parts.append(f'<details data-best="{r["best"] if r["best"] is not None else -2}" '
                         f'data-neuron="{r["neuron"]}" data-kind="{kind}"><summary>neuron {r["neuron"]}: {sc} — '
                         f'{html.escape(expl)}</summary>{"".join(body)}</details>')
        parts.append('</div>')
    parts.append(SORTING)
    with open(os.path.join(folder, 'report.html'), 'w', encoding='utf-8') as f:
        f.write(''.join(parts))


def read_run(folder):
    """An interp folder's summary.json, and its neurons' scores {method: {layer: [score]}} from neurons.jsonl."""
    path = os.path.join(folder, 'summary.json')
    if not os.path.exists(path):
        raise ValueError(f"{path} not found: run interpret.py on that checkpoint first")
    with open(path) as fh:
        s = json.load(fh)
    per_method = {}
    with open(os.path.join(folder, 'neurons.jsonl')) as fh:
        for row in map(json.loads, fh):
            for m, sc in row['scores'].items():
                per_method.setdefault(m, {l: [] for l in s['layer_ids']})[row['layer']].append(sc)
    return s, per_method


def sae_layers(folders):
    """Several SAEs, one per layer of one model (interp folders joined by '+'), read as one run whose layer l is the
    SAE on base layer l: the paper's GPT-2 + SAE row at 2 layers and more."""
    runs = [read_run(f) for f in folders]
    layers = [s['model'].get('base_layer') for s, _ in runs]
    first = runs[0][0]
    if None in layers or len(set(layers)) < len(layers) or len({(s['model']['base_name'], s['simulator_label'],
                                                                   tuple(sorted(p))) for s, p in runs}) > 1:
        raise ValueError(f"{'+'.join(folders)}: '+' joins SAEs on different layers of one model, scored by one "
                         f"simulator on the same protocols; give any other run as a folder of its own")
    per_method = {m: {l: p[m][0] for l, (_, p) in zip(layers, runs)} for m in runs[0][1]}
    n = max(layers) + 1
    s = {**first, 'model': {**first['model'], 'n_layer': n}, 'layer_ids': sorted(layers),
         'stats': {str(l): r[0]['stats']['0'] for l, r in zip(layers, runs)},
         'methods': {m: summarize(v, n) for m, v in per_method.items()}}
    return s, per_method


def run_name(folder):
    """A run's name for the table: its folder's, or for <run>/interp the run's; SAE folders joined by '+' alike."""
    parts = [os.path.normpath(f) for f in folder.split('+')]
    return '+'.join(os.path.basename(os.path.dirname(p)) if os.path.basename(p) == 'interp' else os.path.basename(p)
                    for p in parts)


def compare(folders, page=None):
    """The paper-style table for several runs side by side, each figure with its 95% bootstrap interval over neurons
    and each layer's zero fraction (the share of its neurons' values that are not > 0, over the recorded tokens),
    and CRATE - GPT-2 at each depth: the difference and the relative improvement, each with its interval (the two
    runs' neurons resampled independently, from their neurons.jsonl). A folder may be SAEs' folders joined by '+'
    (see sae_layers). With page, compare_html writes the comparison there too."""
    runs = [(f, *(read_run(f) if os.path.exists(f) or '+' not in f else sae_layers(f.split('+')))) for f in folders]
    if page:
        compare_html([(run_name(f), s) for f, s, _ in runs], page)
    cols = columns([s for _, s, _ in runs])

    def figure(s, method):   # (mean, interval); the paper leaves out the last layer at 6L and 12L
        m = s['methods'].get(method, {}).get('model', {})
        if s['model']['n_layer'] >= 6:
            return m.get('mean_excl_last'), m.get('ci_excl_last')
        return m.get('mean'), m.get('ci')

    def replicates(f, s, per_layer):    # seeded by the folder's name: a pair's figures do not depend on the others
        n = s['model']['n_layer']
        return bootstrap(per_layer, [l for l in per_layer if n < 6 or l != n - 1],
                         key=zlib.crc32(os.path.normpath(f).encode()))

    labels = {s['simulator_label'] for _, s, _ in runs}
    one = labels.pop() if len(labels) == 1 else None           # said once above the table, or per row
    lines = ([f"simulator: {one}", ''] if one else []) + [
        '| run | model | layers | val loss |' + ('' if one else ' simulator |')
        + ''.join(f' {COLUMNS[c]} |' for c in cols) + ' zero fraction |', '|' + ' --- |' * (5 + len(cols) + (not one))]
    for f, s, _ in runs:
        zeros = ', '.join(f"{s['stats'][str(l)]['zero_fraction']:.2f}" for l in s['layer_ids'])   # per layer
        loss = '–' if s['val_loss'] is None else f"{s['val_loss']:.3f}"
        lines.append(f"| {run_name(f)} | {s['model_name']} | {s['model']['n_layer']} | {loss} | "
                     + ('' if one else f"{s['simulator_label']} | ")
                     + ' | '.join(fmt(*figure(s, c)) for c in cols) + f' | {zeros} |')
    pairs = [(a, b) for a in runs for b in runs if a[1]['model_name'] == 'CRATE' and b[1]['model_name'] == 'GPT-2'
             and a[1]['model']['n_layer'] == b[1]['model']['n_layer']]
    for (fa, a, sa), (fb, b, sb) in pairs:
        lines.append(f"\nCRATE {run_name(fa)} - GPT-2 {run_name(fb)} (95% intervals, bootstrap over neurons):")
        for c in cols:
            x, y = figure(a, c)[0], figure(b, c)[0]
            if x is None or y is None:
                lines.append(f"- {c}: –")
                continue
            rx, ry = replicates(fa, a, sa[c]), replicates(fb, b, sb[c])
            lo, hi = interval(rx - ry)
            rel = '–'
            if y > 0 and (ry > 0).all():
                rlo, rhi = interval(rx / ry - 1)
                rel = f"{100 * (x / y - 1):+.0f}% [{100 * rlo:+.0f}%, {100 * rhi:+.0f}%]"
            lines.append(f"- {c}: difference {x - y:+.2f} [{lo:+.2f}, {hi:+.2f}], relative {rel}")
    return '\n'.join(lines)


def write_all(folder, summary, rows, decode):
    """neurons.jsonl (every neuron's scores and explanations), summary.json, summary.md and report.html in folder;
    returns summary.md's text."""
    with open(os.path.join(folder, 'neurons.jsonl'), 'w') as f:
        for r in rows:
            slim = {k: {kk: vv for kk, vv in v.items() if kk != 'show'} for k, v in r['scores'].items()}
            row = {'layer': r['layer'], 'neuron': r['neuron'], 'simulator': summary['simulator'], 'scores': slim}
            f.write(json.dumps(row) + '\n')
    with open(os.path.join(folder, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    md = markdown(summary)
    with open(os.path.join(folder, 'summary.md'), 'w') as f:
        f.write(md)
    write_report(folder, summary, rows, decode)
    return md


def compare_html(runs, path):
    """The comparison as a page: each method's mean and 95% interval per run (runs: [(name, summary)]), side by side on
    one axis, and the runs' validation loss and zero fraction over training on shared axes."""
    methods, w, h, left = columns([s for _, s in runs]), 760, 260, 50
    slot = (w - left) / len(methods)
    bar = (slot - 20) / len(runs)
    sy = lambda v: 10 + (100 - v) / 100 * (h - 40)            # scores (r x 100) on 0 to 100
    shapes = ''.join(f'<line x1="{left}" x2="{w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{sy(y) + 3:.1f}" font-size="11" text-anchor="end">{y}</text>'
                     for y in range(0, 101, 20))
    for i, method in enumerate(methods):
        shapes += (f'<text x="{left + i * slot + slot / 2:.1f}" y="{h - 12}" font-size="12" text-anchor="middle">'
                   f'{method}</text>')
        for j, (name, s) in enumerate(runs):
            m = s['methods'].get(method, {}).get('model', {})
            if m.get('mean') is None:
                continue
            x, color = left + i * slot + 10 + j * bar, COLORS[j % len(COLORS)]
            lo, hi = m.get('ci') or (m['mean'], m['mean'])
            shapes += (f'<rect x="{x:.1f}" y="{sy(max(m["mean"], 0)):.1f}" width="{bar - 4:.1f}" '
                       f'height="{sy(0) - sy(max(m["mean"], 0)):.1f}" fill="{color}" opacity="0.7">'
                       f'<title>{html.escape(name)}: {fmt(m["mean"], m.get("ci"))}</title></rect>'
                       f'<line x1="{x + bar / 2 - 2:.1f}" x2="{x + bar / 2 - 2:.1f}" y1="{sy(lo):.1f}" '
                       f'y2="{sy(hi):.1f}" stroke="#000"/>')
    legend = ' '.join(f'<span style="color:{COLORS[j % len(COLORS)]}">&#9644; {html.escape(name)} '
                      f'({html.escape(s["model_name"])}, {s["model"]["n_layer"]} layers)</span>'
                      for j, (name, s) in enumerate(runs))
    logs = {name: training_log(s['ckpt']) for name, s in runs}
    loss = {name: [(r['iter'], r['val_loss']) for r in log if 'val_loss' in r] for name, log in logs.items()}
    zero = {}
    for name, log in logs.items():
        evals = [r for r in log if 'sparsity' in r]
        for l in range(len(evals[-1]['sparsity']) if evals else 0):
            zero[f'{name}, layer {l}'] = [(r['iter'], r['sparsity'][l]['zero_fraction']) for r in evals]
    top = max((y for v in loss.values() for _, y in v), default=1)
    labels = sorted({s['simulator_label'] for _, s in runs})
    page = (f'<!doctype html><meta charset="utf-8"><title>comparison</title><body style="font-family:sans-serif;'
            f'max-width:1100px;margin:auto"><h1>{html.escape(" vs ".join(n for n, _ in runs))}</h1>'
            f'<p>simulator: {html.escape("; ".join(labels))}. Each bar is a run\'s mean score over layers ({UNITS}; '
            f'at 6 layers and more without the last, as the paper), its line the 95% bootstrap interval over '
            f'neurons.</p><svg width="{w}" height="{h}">{shapes}</svg><div style="font-size:12px">{legend}</div>'
            f'<h2>Training</h2>' + lines_svg(loss, 'validation loss over iterations', (0, math.ceil(top)))
            + lines_svg(zero, "the neurons' zero fraction on the validation slice", (0, 1)) + '</body>')
    with open(path, 'w') as f:
        f.write(page)
