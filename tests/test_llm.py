import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import DEAD, PLANT, ROOT, FakeLLM, run

LIVE = '--neurons=1,5,9,20'   # neuron 5 is planted on one token, 9 never fires


def interpret(ckpt, server, out, *args, check=True):
    return run('interpret.py', f'--ckpt={ckpt / "m"}', f'--data={ckpt}', f'--out={out}', '--n_openai=64',
               '--n_anthropic=40', '--device=cpu', '--batch_size=16', f'--base_url={server.url}', '--api_key=x',
               '--explainer_model=fake-explainer', '--simulator_model=fake-simulator', '--max_retries=2', *args,
               check=check)


def neurons(out):
    with open(os.path.join(out, 'neurons.jsonl')) as f:
        return {r['neuron']: r['scores'] for r in map(json.loads, f)}


@pytest.mark.parametrize('simulator, fault', [('chat', None), ('all-at-once', None), ('all-at-once', 'vllm'),
                                              ('chat', 'sentencepiece'), ('all-at-once', 'sentencepiece')])
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


@pytest.mark.parametrize('setup, args, message', [
    ('closed', [], 'cannot reach the explainer server at http://127.0.0.1:'),
    ('auth', [], 'refused the API key'),
    ('model', ['--explainer_model=nope'], "model 'nope' not found at"),
    ('no_logprobs', ['--simulator=all-at-once'], 'returned no prompt logprobs, which --simulator=all-at-once needs'),
])
def test_fatal_errors_are_one_line_with_exit_code_2(ckpt, server, tmp_path, setup, args, message):
    if setup == 'closed':
        server.close()                                   # nothing listens on its port any more
    if setup in ('auth', 'no_logprobs'):
        server.faults = {setup}
    p = interpret(ckpt, server, tmp_path, LIVE, '--protocol=openai', '--simulator=chat', '--max_retries=0', *args,
                  check=False)
    assert p.returncode == 2 and message in p.stderr and 'Traceback' not in p.stderr


def kind_of(body):
    user = body['messages'][-1]['content']
    return ('explanation' if 'Complete the sentence' in user else 'simulation' if '"answers"' not in user else
            'fuzzing' if 'marked tokens' in user else 'detection')


def test_dry_run_plans_each_kind_of_request(ckpt, server, tmp_path):
    """--dry_run asks nothing, and plans what the run then asks: each kind's requests exactly, its prompt tokens within
    5% (the dry run's explanation is a placeholder)."""
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    args = [LIVE, '--protocol=openai', '--simulator=chat', '--scoring=simulation,detection,fuzzing']
    p = interpret(ckpt, server, tmp_path, *args, '--dry_run=True')
    assert server.requests == 0
    planned = {k: (int(r.replace(',', '')), int(t.replace(',', '')))
               for k, r, t in re.findall(r'(\w+): ([\d,]+) requests, ([\d,]+) \+', p.stdout)}
    interpret(ckpt, server, tmp_path, *args)
    sent = {}
    for _, b in server.prompts:
        n = sum(len(enc.encode(m['content'], disallowed_special=())) + 4 for m in b['messages'])
        r, t = sent.get(kind_of(b), (0, 0))
        sent[kind_of(b)] = (r + 1, t + n)
    assert {k: r for k, (r, _) in planned.items()} == {k: r for k, (r, _) in sent.items()}
    assert sent['explanation'][0] == 3 and sent['simulation'][0] == 30    # 3 live neurons, 10 excerpts each
    assert sent['detection'][0] == sent['fuzzing'][0] == 4                # the planted neuron's 20 excerpts, 5 a request
    assert all(abs(planned[k][1] - t) < 0.05 * t for k, (_, t) in sent.items())


@pytest.mark.parametrize('fault', [None, 'unrelated', 'bad_labels'])
def test_detection_and_fuzzing(ckpt, server, tmp_path, fault):
    """The planted neuron's explanation tells its excerpts and its marked tokens: balanced accuracy 1 (and AUC 1 from
    the logprobs); an explanation unrelated to its tokens: 0.5; answers of the wrong length or not 0/1 fail the
    score, counted, and never the run."""
    server.faults = {fault} if fault else set()
    p = interpret(ckpt, server, tmp_path, LIVE, '--protocol=openai', '--simulator=chat',
                  '--scoring=detection,fuzzing', check=fault is None)
    planted = neurons(tmp_path)[PLANT]
    assert set(planted) == {'detection', 'fuzzing'} and 'Traceback' not in p.stderr
    for kind, s in planted.items():
        if fault is None:
            assert s['score'] == s['f1'] == s['auc'] == 1.0 and s['examples'] == 20 and not s['hard']
        elif fault == 'unrelated':
            assert s['score'] == 0.5 and s['auc'] == 0.5
        else:
            assert s['failed'] and s['failure'] == kind and p.returncode == 1
    asked = [b for _, b in server.prompts if kind_of(b) in ('detection', 'fuzzing')]
    assert all(b['temperature'] == 0 or b['temperature'] == 1.0 and b['seed'] > 0 for b in asked)
    sizes = [len(re.findall(r'^\d+: "', b['messages'][-1]['content'], re.M)) for b in asked]
    assert set(sizes) == {5} and all(b['response_format']['json_schema']['schema']['properties']['answers']
                                     ['maxItems'] == 5 for b in asked)
    summary = (tmp_path / 'summary.md').read_text()
    if fault is None:
        assert '| 0 | detection | 100.00 [100.00, 100.00] |' in summary and 'balanced accuracy' in summary
        server.prompts.clear()        # all-at-once's simulator may be a base model: the chat questions go to the explainer
        interpret(ckpt, server, tmp_path / 'b', LIVE, '--protocol=openai', '--simulator=all-at-once',
                  '--scoring=detection')
        assert neurons(tmp_path / 'b')[PLANT]['detection']['score'] == 1.0
        assert {b['model'] for _, b in server.prompts if 'messages' in b and kind_of(b) == 'detection'} == {
            'fake-explainer'}


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
    # the server counts the requests it holds at once (each held 0.15 s): one at a time, or up to the bound
    common = ['--neurons=1,5,20', '--protocol=openai', '--simulator=chat']
    for c in (1, 8):
        server.delay, server.max_inflight = 0.15, 0
        interpret(ckpt, server, tmp_path / str(c), *common, f'--concurrency={c}')
        server.delay = 0.0
        assert server.max_inflight == 1 if c == 1 else 4 <= server.max_inflight <= 8


def test_slow_server_times_out_and_a_rerun_finishes(ckpt, server, tmp_path):
    server.delay = 1.0
    p = interpret(ckpt, server, tmp_path, '--neurons=5,9', '--protocol=openai', '--simulator=chat', '--timeout=0.2',
                  '--max_retries=0', check=False)
    assert p.returncode == 1 and '1 neurons unfinished after server errors (layer 0 neuron 5: APITimeoutError)' in p.stderr
    server.delay = 0.0
    interpret(ckpt, server, tmp_path, '--neurons=5,9', '--protocol=openai', '--simulator=chat')
    assert neurons(tmp_path)[PLANT]['top_and_random']['score'] == pytest.approx(1.0, abs=1e-6)


def test_prompts_have_the_papers_structure(ckpt, server, tmp_path):
    """One excerpt per simulator prompt, after a few-shot block that is the same in every request (first, so a
    server's prefix cache can keep it); the explainer sees few-shot explanations, at temperature 1 and 60 tokens."""
    import prompts as P
    interpret(ckpt, server, tmp_path / 'a', LIVE, '--simulator=all-at-once', '--protocol=openai')
    prompts = [b['prompt'] for _, b in server.prompts if 'prompt' in b]
    head = prompts[0][:prompts[0].index(f'\nNeuron {len(P.FEW_SHOT) + 1}\n')]
    assert all(p.startswith(head) for p in prompts) and all(e in head for e, _ in P.FEW_SHOT)
    assert len(prompts) == 3 * 10                         # 3 live neurons x 10 scoring excerpts, one request each
    for p in prompts:
        test = p[len(head):]
        assert test.count('<start>') == 1 and 'Explanation: the main thing this neuron does is find the token' in test
        assert 1 <= test.count('\tunknown\n') <= 64 and test.endswith('<end>\n')
    chats = [b for _, b in server.prompts if 'messages' in b]
    explainer = [b for b in chats if 'Complete the sentence' in b['messages'][-1]['content']]
    assert all(b['temperature'] == 1.0 and b['max_tokens'] == 60 for b in explainer)
    assert all(len(b['messages']) == 2 + 2 * len(P.FEW_SHOT) for b in explainer)     # system, few-shot pairs, ask
    server.prompts.clear()
    interpret(ckpt, server, tmp_path / 'c', LIVE, '--simulator=chat', '--protocol=openai')
    sims = [b['messages'] for p, b in server.prompts if 'Complete the sentence' not in b['messages'][-1]['content']]
    assert len(sims) == 30 and all(m[:-1] == sims[0][:-1] for m in sims)              # the same few-shot turns
    assert all(m[-1]['content'].count('Tokens:') == 1 for m in sims)


def test_a_template_without_a_system_role_gets_the_instructions_in_the_first_turn(ckpt, server, tmp_path):
    import prompts as P
    server.faults = {'no_system'}
    p = interpret(ckpt, server, tmp_path, LIVE, '--simulator=chat', '--protocol=openai')
    assert neurons(tmp_path)[PLANT]['top_and_random']['score'] == pytest.approx(1.0, abs=1e-6)
    sent = [b['messages'] for _, b in server.prompts]
    with_system = [m for m in sent if m[0]['role'] == 'system']
    assert len(with_system) == 2                           # the first request of each role, then never again
    assert f'LLM: {len(sent) - 2} requests' in p.stdout     # the refused ones are not answers
    assert all(m[0]['role'] == 'user' and m[0]['content'].startswith(P.INSTRUCTIONS) for m in sent if m not in with_system)


@pytest.mark.parametrize('fault', ['no_digit_some', 'no_digit_many'])
def test_a_slot_without_a_digit_is_counted_not_read_as_zero(ckpt, server, tmp_path, fault):
    server.faults = {fault}
    p = interpret(ckpt, server, tmp_path, LIVE, '--simulator=all-at-once', '--protocol=openai', check=False)
    assert p.returncode == (0 if fault == 'no_digit_some' else 1)          # 1: no neuron could be scored
    planted = neurons(tmp_path)[PLANT]['top_and_random']
    layer = json.load(open(tmp_path / 'summary.json'))['methods']['top_and_random']['layers']['0']
    if fault == 'no_digit_some':                           # the first slot of each of the 10 excerpts
        assert planted['score'] == pytest.approx(1.0, abs=1e-6) and planted['no_digit'] == 10
        assert layer['no_digit_slots'] >= 10 and layer['failed'] == 0
    else:                                                  # every other slot: over --max_no_digit
        assert planted['failed'] and planted['score'] is None and planted['failure'].startswith('no digit among the top-k')
        assert layer['failed'] >= 1


def sentencepiece_answer(values):
    """A chat answer's logprobs as a SentencePiece tokenizer gives them: '10' is '1' then '0'."""
    s = FakeLLM.__new__(FakeLLM)
    s.faults = {'sentencepiece'}
    content = []
    for i, v in enumerate(values):
        digits = s.number(str(v))
        content.append({'token': digits[0], 'logprob': 0.0, 'top_logprobs': [{'token': digits[0], 'logprob': -0.05},
                                                                            {'token': '2', 'logprob': -3.0}]})
        if len(digits) == 2:
            content.append({'token': '0', 'logprob': 0.0, 'top_logprobs': [{'token': '0', 'logprob': -0.01},
                                                                          {'token': ',', 'logprob': -5.0}]})
        if i < len(values) - 1:
            content.append({'token': ', ', 'logprob': 0.0, 'top_logprobs': []})
    content = [{'token': '{"activations": [', 'logprob': 0.0, 'top_logprobs': []}] + content + \
        [{'token': ']}', 'logprob': 0.0, 'top_logprobs': []}]
    from llm import answer
    text = ''.join(c['token'] for c in content)
    return answer({'choices': [{'message': {'content': text}, 'logprobs': {'content': content}}]})[1]


def test_ten_as_two_tokens_reads_as_ten():
    import interpret as I
    got = I.expected_from_logprobs(sentencepiece_answer([10, 0, 5]), 3)
    assert got[0] == pytest.approx(10, abs=0.5) and got[1] == pytest.approx(0.1, abs=0.2) and got[2] == pytest.approx(5, abs=0.2)
    assert got[0] > got[2] > got[1]                        # monotone (it read 0.95, 0.05, 4.9)
    one = I.expected_from_logprobs(sentencepiece_answer([1]), 1)[0]
    assert one == pytest.approx(1, abs=0.1)                # '1' then the end: 1, not 10


def test_all_at_once_reads_ten_whichever_way_the_server_writes_it(server, tmp_path):
    import asyncio

    import interpret as I
    from llm import LLM
    toks = ['a', '(', 'unknown', '\t', 'b', '(']            # the word unknown and a tab are tokens, not slots
    for fault, requests in ((set(), 1), ({'sentencepiece'}, 2)):
        server.faults, server.requests = fault, 0
        folder = tmp_path / ('sentencepiece' if fault else 'plain')       # its own answer cache
        folder.mkdir()
        llm = LLM(str(folder), server.url, 'fake-explainer', 'fake-simulator', api_key='x')
        preds, hard, no_digit = asyncio.run(I.simulate_all_at_once(llm, 'the token "("', toks))
        assert preds.tolist() == pytest.approx([0, 10, 0, 0, 0, 10], abs=0.1) and no_digit == 0 and not hard
        assert llm.ten_split is bool(fault) and server.requests == requests        # a '1'-filled prompt for the 10s


def test_clean_explanation_strips_the_lead_in_and_a_pair_of_quotes_only():
    from prompts import clean_explanation as clean
    assert clean('the word "the"') == 'the word "the"' and clean('neurons of the eye') == 'neurons of the eye'
    assert clean('"names of flowers".') == 'names of flowers'
    assert clean('the main thing this neuron does is find "x" and "y"') == '"x" and "y"'
    assert clean('find dates\nmore') == 'dates' and len(clean('a' * 5000)) == 300
    for said in ('The neuron does is find dates', 'the neuron detects dates.', 'This neuron responds to dates',
                 "the neuron's main job is to find dates", 'Neuron: dates'):   # what small models wrote
        assert clean(said) == 'dates', said


# What the client promises, fault by fault (the test server's faults): the planted neuron's Top-and-Random score is
# 'scored' (1.0, as without the fault), 'hard' (1.0, read from the integers without logprobs), the name of what
# failed (counted as failed, nothing of it cached, not finished), or 'unfinished' (a server error). No fault crashes
# the run, and what failed or was left unfinished the same command asks again (checked once for each kind).
FAULTS = [('429_once', 'scored'), ('malformed_once', 'scored'), ('no_schema', 'scored'), ('no_max_tokens', 'scored'),
          ('schema_500', 'scored'), ('too_long_once', 'scored'), ('weird_logprobs', 'scored'),
          ('malformed_at_t0', 'scored'), ('no_logprobs', 'hard'), ('wrong_count', 'simulation'),
          ('malformed_always', 'simulation'), ('echo_indices', 'simulation'), ('contradict', 'simulation'),
          ('not_json', 'explanation'), ('no_choices', 'explanation'), ('500', 'unfinished')]


def simulations(server):
    return [b for _, b in server.prompts if 'messages' in b and kind_of(b) == 'simulation']


@pytest.mark.parametrize('fault, outcome', FAULTS)
def test_no_answer_crashes_a_run_or_is_cached_as_good(ckpt, server, tmp_path, fault, outcome):
    server.faults = {fault}
    p = interpret(ckpt, server, tmp_path, LIVE, '--protocol=openai', '--simulator=chat', check=False)
    assert 'Traceback' not in p.stderr
    if outcome in ('scored', 'hard'):
        planted = neurons(tmp_path)[PLANT]['top_and_random']
        assert p.returncode == 0 and planted['score'] == pytest.approx(1.0, abs=1e-6)
        assert planted['hard'] is (outcome == 'hard')
    elif outcome == 'unfinished':
        assert p.returncode == 1 and '3 neurons unfinished after server errors' in p.stderr
    else:
        assert p.returncode == 1 and 'error: no neuron could be scored' in p.stderr     # nothing scored: no success
        planted = neurons(tmp_path)[PLANT]['top_and_random']
        assert planted['failed'] and planted['score'] is None and planted['failure'] == outcome
        layer = json.load(open(tmp_path / 'summary.json'))['methods']['top_and_random']['layers']['0']
        assert (layer['failed'], layer['scored'], layer['dead']) == (3, 0, 1)
        assert '| 0 | top_and_random | – | – | 0 | 0 | 1 | 3 |' in p.stdout
        assert [json.loads(l)['neuron'] for l in open(tmp_path / 'scores.jsonl')] == [DEAD]
        cached = [json.loads(l)['response']['choices'][0]['message']['content'] for l in open(tmp_path / 'llm_cache.jsonl')]
        assert all(c.startswith('the token') for c in cached) and (cached or outcome == 'explanation')
    if fault == 'schema_500':         # the probe's one 500 (no client retries), then a JSON object with the schema
        formats = [(b.get('response_format') or {}).get('type') for b in simulations(server)]
        assert formats[:1] == ['json_schema'] and set(formats[1:]) == {'json_object'}
        values = simulations(server)[-1]['response_format']['schema']['properties']['activations']
        assert values['maxItems'] > 1 and values['items']['enum'] == list(range(11))    # llama-cpp-python enforces both
    if fault == 'malformed_at_t0':    # a deterministic server repeats itself: a retry goes at temperature 1, seed 1
        assert {(b['temperature'], b['seed']) for b in simulations(server)} == {(0, 0), (1.0, 1)}
    if fault.endswith('_once'):
        assert server.fired == {fault}
    if fault in ('wrong_count', 'not_json', '500'):             # the same command asks for them again
        server.faults = set()
        interpret(ckpt, server, tmp_path, LIVE, '--protocol=openai', '--simulator=chat')
        assert neurons(tmp_path)[PLANT]['top_and_random']['score'] == pytest.approx(1.0, abs=1e-6)


def test_timeouts_lower_the_requests_in_flight(ckpt, server, tmp_path):
    """A server that computes one request at a time: queued requests time out, interpret.py halves the requests
    in flight and says so; what did not finish, the same command finishes."""
    server.faults, server.delay = {'serial'}, 0.06
    common = ['--neurons=5,', '--protocol=openai', '--simulator=chat', '--concurrency=16', '--max_retries=0']
    p = interpret(ckpt, server, tmp_path, *common, '--timeout=0.4', check=False)
    assert 'in flight from now on' in p.stderr and 'Traceback' not in p.stderr
    server.delay = 0.0
    interpret(ckpt, server, tmp_path, *common)
    assert neurons(tmp_path)[PLANT]['top_and_random']['score'] == pytest.approx(1.0, abs=1e-6)


def test_small_things(ckpt, server, tmp_path):
    server.faults = {'long_explanation'}                       # a 1 MB explanation is cut, not sent on
    interpret(ckpt, server, tmp_path, LIVE, '--simulator=chat', '--protocol=openai')
    assert len(neurons(tmp_path)[PLANT]['top_and_random']['explanation']) <= 300
    assert max(len(json.dumps(b)) for _, b in server.prompts) < 100_000
    cache = tmp_path / 'llm_cache.jsonl'                         # a torn last line does not swallow the next record
    with open(cache, 'a') as f:
        f.write('{"key": "torn')
    server.faults = set()
    p = interpret(ckpt, server, tmp_path, LIVE, '--simulator=chat', '--protocol=openai', '--seed=1')  # new requests
    assert 'skipping a torn line' in p.stderr
    lines = cache.read_text().splitlines()
    assert sum(1 for l in lines if l.startswith('{"key": "torn')) == 1 and all(json.loads(l) for l in lines[-3:])
    for script in ('interpret.py', 'train.py', 'sample.py'):
        p = run(script, '--help')
        assert p.returncode == 0 and '--seed=' in p.stdout and 'options' in p.stdout


def test_ctrl_c_is_one_line(ckpt, server, tmp_path):
    interpret(ckpt, server, tmp_path, '--neurons=5,', '--protocol=openai', '--simulator=chat', '--dry_run=True')
    server.delay = 2.0
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'interpret.py'), f'--ckpt={ckpt / "m"}', f'--data={ckpt}',
                             f'--out={tmp_path}', '--n_openai=64', '--n_anthropic=40', '--device=cpu', '--batch_size=16',
                             f'--base_url={server.url}', '--api_key=x', '--explainer_model=fake-explainer',
                             '--neurons=5,', '--protocol=openai', '--simulator=chat'],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while server.requests == 0 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and 'Traceback' not in err and 'interrupted' in err
