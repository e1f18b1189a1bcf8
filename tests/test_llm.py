import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, run
from llm_server import FakeLLM
from test_interpret import DEAD, PLANT, planted_model, save

LIVE = '--neurons=1,5,9,20'   # neuron 5 is planted on one token, 9 never fires


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp('llm')
    np.random.default_rng(0).integers(0, 64, 100 * 32).astype(np.uint16).tofile(d / 'val.bin')
    save(planted_model(), d / 'm', 2.5)
    return d


@pytest.fixture
def server():
    s = FakeLLM()
    yield s
    s.close()


def interpret(ckpt, server, out, *args, check=True):
    return run('interpret.py', f'--ckpt={ckpt / "m"}', f'--data={ckpt}', f'--out={out}', '--n_openai=64',
               '--n_anthropic=40', '--device=cpu', '--batch_size=16', f'--base_url={server.url}', '--api_key=x',
               '--explainer_model=fake-explainer', '--simulator_model=fake-simulator', '--max_retries=2', *args,
               check=check)


def neurons(out):
    with open(os.path.join(out, 'neurons.jsonl')) as f:
        return {r['neuron']: r['scores'] for r in map(json.loads, f)}


@pytest.mark.parametrize('simulator, fault', [('chat', None), ('all-at-once', None), ('all-at-once', 'vllm')])
def test_planted_neuron_scores_one_through_an_llm(ckpt, server, tmp_path, simulator, fault):
    server.faults = {fault} if fault else set()
    p = interpret(ckpt, server, tmp_path, LIVE, f'--simulator={simulator}')
    rows = neurons(tmp_path)
    planted = rows[PLANT]
    assert planted['top_and_random']['explanation'] == 'the token "("'            # GPT-2 token 7 is '('
    for method in ('top_and_random', 'anthropic'):
        assert planted[method]['score'] == pytest.approx(1.0, abs=1e-6)
        assert planted[method]['hard'] is False
    assert all(rows[DEAD][m]['dead'] for m in rows[DEAD])
    first = server.requests
    assert first > 0 and f'LLM: {first} requests' in p.stdout
    p = interpret(ckpt, server, tmp_path, LIVE, f'--simulator={simulator}')     # again: everything from the cache
    assert server.requests == first and 'LLM: 0 requests' in p.stdout and neurons(tmp_path) == rows


def test_chat_survives_server_faults(ckpt, server, tmp_path):
    server.faults = {'no_schema', '429_once', 'malformed_once', 'no_max_tokens'}
    interpret(ckpt, server, tmp_path, LIVE, '--protocol=openai', '--simulator=chat')
    assert neurons(tmp_path)[PLANT]['top_and_random']['score'] == pytest.approx(1.0, abs=1e-6)
    assert server.fired == {'429_once', 'malformed_once'}


def test_without_logprobs_predictions_are_the_integers_marked_hard(ckpt, server, tmp_path):
    server.faults = {'no_logprobs'}
    interpret(ckpt, server, tmp_path, LIVE, '--protocol=openai', '--simulator=chat')
    planted = neurons(tmp_path)[PLANT]['top_and_random']
    assert planted['hard'] is True and planted['score'] == pytest.approx(1.0, abs=1e-9)
    p = interpret(ckpt, server, tmp_path / 'b', LIVE, '--protocol=openai', '--simulator=all-at-once', check=False)
    assert p.returncode == 2 and 'returned no prompt logprobs' in p.stderr and '--simulator=chat' in p.stderr


def test_wrong_answers_are_failed_simulations_not_zeros(ckpt, server, tmp_path):
    server.faults = {'wrong_count'}
    interpret(ckpt, server, tmp_path, LIVE, '--protocol=openai', '--simulator=chat', '--bad_answer_retries=1')
    planted = neurons(tmp_path)[PLANT]['top_and_random']
    assert planted['failed'] and planted['score'] is None and planted['failure'] == 'simulation'
    summary = json.load(open(tmp_path / 'summary.json'))
    layer = summary['methods']['top_and_random']['layers']['0']
    assert layer['failed'] == 3 and layer['scored'] == 0 and layer['dead'] == 1


def test_server_errors_leave_neurons_unfinished_and_a_rerun_finishes(ckpt, server, tmp_path):
    server.faults = {'500'}
    p = interpret(ckpt, server, tmp_path, LIVE, '--protocol=openai', '--simulator=chat', check=False)
    assert p.returncode == 1 and '3 neurons unfinished after server errors' in p.stderr
    server.faults = set()
    interpret(ckpt, server, tmp_path, LIVE, '--protocol=openai', '--simulator=chat')
    assert neurons(tmp_path)[PLANT]['top_and_random']['score'] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize('setup, args, message', [
    ('closed', [], 'cannot reach the explainer server at http://127.0.0.1:'),
    ('auth', [], 'refused the API key'),
    ('model', ['--explainer_model=nope'], "model 'nope' not found at"),
])
def test_fatal_errors_are_one_line_with_exit_code_2(ckpt, server, tmp_path, setup, args, message):
    if setup == 'closed':
        server.close()                                   # nothing listens on its port any more
    if setup == 'auth':
        server.faults = {'auth'}
    p = interpret(ckpt, server, tmp_path, LIVE, '--protocol=openai', '--simulator=chat', '--max_retries=0', *args,
                  check=False)
    assert p.returncode == 2 and message in p.stderr and 'Traceback' not in p.stderr


def test_dry_run_counts_the_requests(ckpt, server, tmp_path):
    p = interpret(ckpt, server, tmp_path, LIVE, '--protocol=openai', '--simulator=chat', '--dry_run=True')
    assert server.requests == 0
    planned = int(p.stdout.split('about ')[1].split(' requests')[0].replace(',', ''))
    interpret(ckpt, server, tmp_path, LIVE, '--protocol=openai', '--simulator=chat')
    assert planned == server.requests == 3 * (1 + 10)      # 3 live neurons: an explanation and 10 excerpts each


def test_interrupted_run_resumes_with_identical_results(ckpt, server, tmp_path):
    common = [LIVE.replace('1,5,9,20', '1,2,3,4,5,6,7,8,9,20'), '--protocol=openai', '--simulator=chat']
    interpret(ckpt, server, tmp_path / 'whole', *common)
    interpret(ckpt, server, tmp_path / 'cut', *common, '--dry_run=True')        # records only
    server.delay = 0.05
    cmd = [sys.executable, os.path.join(ROOT, 'interpret.py'), f'--ckpt={ckpt / "m"}', f'--data={ckpt}',
           f'--out={tmp_path / "cut"}', '--n_openai=64', '--n_anthropic=40', '--device=cpu', '--batch_size=16',
           f'--base_url={server.url}', '--api_key=x', '--explainer_model=fake-explainer',
           '--simulator_model=fake-simulator', '--concurrency=2', *common]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scores = tmp_path / 'cut' / 'scores.jsonl'
    deadline = time.time() + 120
    while time.time() < deadline and (not scores.exists() or len(scores.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(scores.read_text().splitlines())
    assert 3 <= done < 10                                                    # killed part-way
    server.delay = 0.0
    p = interpret(ckpt, server, tmp_path / 'cut', *common)
    assert f'resuming: {done} neurons already scored' in p.stdout
    assert neurons(tmp_path / 'cut') == neurons(tmp_path / 'whole')


def test_requests_run_concurrently(ckpt, server, tmp_path):
    common = ['--neurons=1,5,20', '--protocol=openai', '--simulator=chat']
    times = {}
    for c in (1, 8):
        interpret(ckpt, server, tmp_path / str(c), *common, '--dry_run=True')   # record first: time only the LLM part
        server.delay, server.max_inflight = 0.15, 0
        t0 = time.time()
        interpret(ckpt, server, tmp_path / str(c), *common, f'--concurrency={c}')
        times[c] = time.time() - t0
        server.delay = 0.0
        assert server.max_inflight == 1 if c == 1 else 4 <= server.max_inflight <= 8
    assert times[1] - times[8] > 0.5 * 33 * 0.15       # serially: 33 requests of 0.15 s


def test_slow_server_times_out_and_a_rerun_finishes(ckpt, server, tmp_path):
    server.delay = 1.0
    p = interpret(ckpt, server, tmp_path, '--neurons=5,9', '--protocol=openai', '--simulator=chat', '--timeout=0.2',
                  '--max_retries=0', check=False)
    assert p.returncode == 1 and '1 neurons unfinished after server errors (layer 0 neuron 5: APITimeoutError)' in p.stderr
    server.delay = 0.0
    interpret(ckpt, server, tmp_path, '--neurons=5,9', '--protocol=openai', '--simulator=chat')
    assert neurons(tmp_path)[PLANT]['top_and_random']['score'] == pytest.approx(1.0, abs=1e-6)
