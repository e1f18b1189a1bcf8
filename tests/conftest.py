"""Shared helpers of the tests: running a script as a user would, small data, checkpoints built by hand, and a
local server speaking the OpenAI protocol."""

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import ModelConfig, Transformer  # noqa: E402  (the project's root is on the path only now)

# a model small enough that a training step takes milliseconds on one CPU core
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--vocab_size=1024', '--dropout=0.0',
        '--device=cpu', '--compile=False', '--eval_iters=2', '--gradient_accumulation_steps=1', '--warmup_iters=5', '--learning_rate=3e-3']


def markov_tokens(n, seed):
    """A learnable stream: t' = (5t + 3) mod 64, with a random token 10% of the time."""
    rng = np.random.default_rng(seed)
    out, t = np.empty(n, dtype=np.uint16), 0
    for i in range(n):
        t = (5 * t + 3) % 64 if rng.random() > 0.1 else int(rng.integers(64))
        out[i] = t
    return out


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    os.makedirs(root / 'toy')
    markov_tokens(20000, 0).tofile(root / 'toy' / 'train.bin')
    markov_tokens(4000, 1).tofile(root / 'toy' / 'val.bin')
    return str(root)


@pytest.fixture(scope='session')
def val_dir(tmp_path_factory):
    """A val.bin of 100 sequences of 32 random tokens below 64 (the planted model's vocabulary)."""
    d = tmp_path_factory.mktemp('val')
    np.random.default_rng(0).integers(0, 64, 100 * 32).astype(np.uint16).tofile(d / 'val.bin')
    return d


def run(script, *args, check=True, env=None, cmd=None, timeout=600, cwd=ROOT):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    p = subprocess.run((cmd or [sys.executable]) + [os.path.join(ROOT, script), *args], cwd=cwd,
                       capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


# --- checkpoints built by hand --------------------------------------------------------------------------------------

PLANT, DEAD = 5, 9        # neuron 5 fires exactly on token 7; neuron 9 never fires
TOKEN = 7


def planted_model():
    """A 1-layer GPT-2 (ReLU MLP) whose MLP neuron PLANT fires on token TOKEN and nowhere else: attention writes
    nothing, position embeddings are zero and token embeddings are orthogonal, so LN2's input is the token's own
    embedding and one hidden unit can threshold on it."""
    torch.manual_seed(0)
    cfg = ModelConfig(attn='mha', ffn='mlp', bias=True, n_layer=1, n_head=2, n_embd=64, block_size=32, vocab_size=64)
    model = Transformer(cfg)
    with torch.no_grad():
        model.wte.weight.copy_(torch.linalg.qr(torch.randn(64, 64))[0] * 3)
        model.wpe.weight.zero_()
        blk = model.blocks[0]
        blk.attn.c_proj.weight.zero_()
        blk.attn.c_proj.bias.zero_()
        x = blk.ln_2(model.wte.weight)                       # what the MLP sees for each token
        blk.ffn.c_fc.weight[PLANT] = x[TOKEN] / x[TOKEN].norm()
        blk.ffn.c_fc.bias[PLANT] = -0.5 * x[TOKEN].norm()    # own token: +0.5|x|; others about 0 - 0.5|x|
        blk.ffn.c_fc.weight[DEAD] = 0
        blk.ffn.c_fc.bias[DEAD] = -1
    return model


def save(model, path, val_loss):
    os.makedirs(path, exist_ok=True)
    torch.save({'model': model.state_dict(), 'model_args': vars(model.config), 'best_val_loss': val_loss},
               os.path.join(path, 'ckpt.pt'))


def released_crate(n_layer=2, d=16, heads=2, T=8, V=64, seed=7):
    """A state dict in the authors' format (crate_overcomplete.py's names, torch.compile's prefix, the causal-mask
    buffer), with model_args as their train.py records them: bias=False, although their CRATE has biases."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3
    sd = {'transformer.wte.weight': r(V, d), 'transformer.wpe.weight': r(T, d),
          'transformer.ln_f.weight': 1 + r(d), 'transformer.ln_f.bias': r(d)}
    for i in range(n_layer):
        p = f'transformer.h.{i}.'
        sd.update({p + 'prenorm_1.weight': 1 + r(d), p + 'prenorm_1.bias': r(d), p + 'attn.c_attn.weight': r(d, d),
                   p + 'attn.c_proj.weight': r(d, d), p + 'attn.c_proj.bias': r(d), p + 'prenorm_2.weight': 1 + r(d),
                   p + 'prenorm_2.bias': r(d), p + 'ista.weight': r(4 * d, d),
                   p + 'attn.bias': torch.tril(torch.ones(T, T)).view(1, 1, T, T)})
    sd['lm_head.weight'] = sd['transformer.wte.weight']
    args = dict(n_layer=n_layer, n_head=heads, n_embd=d, block_size=T, bias=False, vocab_size=V, dropout=0.0)
    return {'_orig_mod.' + k: v for k, v in sd.items()}, args


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp('llm')
    np.random.default_rng(0).integers(0, 64, 100 * 32).astype(np.uint16).tofile(d / 'val.bin')
    save(planted_model(), d / 'm', 2.5)
    return d


# --- a small OpenAI-compatible server -------------------------------------------------------------------------------
# A small OpenAI-compatible server for the tests: /v1/chat/completions and /v1/completions on 127.0.0.1.
#
# It plays a deterministic explainer (the token with the largest total activation shown: 'the token "X"') and
# simulator (10 on that token, 0 elsewhere, with logprobs that match its text), and can be switched to faults. It
# logs every prompt (self.prompts: (path, body)). With 'sentencepiece' it writes numbers digit by digit, as Llama's
# and Mistral's tokenizers do: 10 is '1' then '0'.

MODELS = {'fake-explainer', 'fake-simulator'}


def escape(text):
    return text.replace('\\', '\\\\').replace('\n', '\\n').replace('\t', '\\t')


class FakeLLM:
    def __init__(self):
        self.faults = set()        # 429_once 500 malformed_once wrong_count no_logprobs no_schema auth vllm
        #                            sentencepiece no_system no_digit_some no_digit_many schema_500 too_long_once
        #                            weird_logprobs malformed_always not_json no_choices echo_indices contradict
        #                            malformed_at_t0 serial long_explanation unrelated bad_labels
        self.serial = threading.Lock()
        self.prompts = []
        self.delay = 0.0
        self.requests = 0
        self.inflight = self.max_inflight = 0
        self.fired = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
                with server.lock:
                    server.requests += 1
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    with (server.serial if 'serial' in server.faults else contextlib.nullcontext()):
                        time.sleep(server.delay)          # 'serial': one request at a time, as llama.cpp's server
                        status, answer = server.answer(self.path, body)
                finally:
                    with server.lock:
                        server.inflight -= 1
                data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header('Content-Type', 'application/json')
                    self.send_header('Content-Length', str(len(data)))
                    self.send_header('retry-after-ms', '10')
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass   # the client was killed mid-answer (the resume test does that)

        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/v1'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        if self.httpd.socket.fileno() != -1:   # once only: shutdown() would wait forever the second time
            self.httpd.shutdown()
            self.httpd.server_close()

    def once(self, fault):
        with self.lock:
            if fault in self.faults and fault not in self.fired:
                self.fired.add(fault)
                return True
        return False

    @staticmethod
    def error(status, message, code=None):
        return status, {'error': {'message': message, 'type': 'invalid_request_error', 'code': code}}

    def answer(self, path, body):
        if 'auth' in self.faults:
            return self.error(401, 'Incorrect API key provided', 'invalid_api_key')
        if body.get('model') not in MODELS:
            return self.error(404, f"The model `{body.get('model')}` does not exist", 'model_not_found')
        with self.lock:
            self.prompts.append((path, body))
        if '500' in self.faults:
            return self.error(500, 'internal error')
        if self.once('429_once'):
            return self.error(429, 'rate limited')
        if 'not_json' in self.faults:
            return 200, b'<html>upstream proxy error</html>'
        if 'no_choices' in self.faults:
            return 200, {'id': 'x', 'object': 'chat.completion', 'created': 0, 'model': 'fake'}
        if path.endswith('/chat/completions'):
            return self.chat(body)
        if path.endswith('/completions'):
            return self.completion(body)
        return self.error(404, 'no such endpoint')

    def number(self, v):
        """A value's tokens: '10' is two tokens under 'sentencepiece'."""
        return list(v) if 'sentencepiece' in self.faults else [v]

    def chat(self, body):
        messages = body['messages']
        if 'no_system' in self.faults and any(m['role'] == 'system' for m in messages):
            return self.error(400, "Conversation roles must alternate user/assistant/user/assistant/... "
                                   "(system role not supported by this template)")
        user = messages[-1]['content']
        fmt = (body.get('response_format') or {}).get('type')
        if fmt == 'json_schema' and 'no_schema' in self.faults:
            return self.error(400, "response_format of type 'json_schema' is not supported")
        if fmt == 'json_schema' and 'schema_500' in self.faults:       # llama.cpp's server as shipped
            return self.error(500, "Internal Server Error")
        if 'Complete the sentence' not in user and self.once('too_long_once'):
            return self.error(400, "This model's maximum context length is 4096 tokens; your messages had 5012")
        if 'max_tokens' in body and 'no_max_tokens' in self.faults:
            return self.error(400, "Unsupported parameter: 'max_tokens'; use 'max_completion_tokens' instead")
        if 'Complete the sentence' in user:                 # explainer
            totals = {}
            for tok, v in re.findall(r'^(.*)\t(\d+)$', user.split('<start>', 1)[1], flags=re.M):
                totals[tok] = totals.get(tok, 0) + int(v)
            best = '§' if 'unrelated' in self.faults else max(totals, key=lambda t: (totals[t], t))
            tail = ' and ' + 'very ' * 200_000 if 'long_explanation' in self.faults else ''
            return 200, self.completion_body('chat', f'the token "{best}"{tail}.', None)
        target = re.search(r'^Explanation: the main thing this neuron does is find the token "(.*)"', user, re.M).group(1)
        tokens = [json.loads(m) for m in re.findall(r'^\d+: (".*")$', user, flags=re.M)]
        if 'Reply with {"answers"' in user:              # detection: is the token in the excerpt; fuzzing: is every
            fuzzing = 'marked tokens' in user            # marked span made of it
            key = 'answers'
            values = [int(all(s.replace(target, '') == '' for s in re.findall(r'<<(.*?)>>', escape(t)))) if fuzzing
                      else int(target in escape(t)) for t in tokens]
            if 'bad_labels' in self.faults:
                values = values[1:] + [2]
        else:
            key, values = 'activations', [10 if escape(t) == target else 0 for t in tokens]
        if 'wrong_count' in self.faults:
            values.append(0)
        if self.once('malformed_once') or 'malformed_always' in self.faults or (
                'malformed_at_t0' in self.faults and body.get('temperature') == 0):
            return 200, self.completion_body('chat', '{"activations": [1, 2', None)
        if 'echo_indices' in self.faults:                # the listing's indices, no brackets, no JSON
            return 200, self.completion_body('chat', ' '.join(str(i) for i in range(len(tokens))), None)
        pieces, alts = ['{"' + key + '": ['], [[]]
        for i, v in enumerate(values):
            digits = self.number(str(v))
            pieces += digits
            top = self.number('0' if v else '10')[0] if 'contradict' in self.faults else digits[0]
            alts += [[{'token': top, 'logprob': -0.01, 'bytes': None}, {'token': 'x', 'logprob': -6.0, 'bytes': None}]]
            if 'weird_logprobs' in self.faults:          # SmolLM2's superscripts, an overflow, a string, a NaN
                alts[-1] += [{'token': '³', 'logprob': -2.0}, {'token': '²', 'logprob': 1e308},
                             {'token': '7', 'logprob': 'x'}, {'token': '8', 'logprob': float('nan')}]
            if len(digits) == 2:   # after the '1' of a 10: '0' far more likely than an ending
                alts += [[{'token': '0', 'logprob': -0.01, 'bytes': None}, {'token': ',', 'logprob': -6.0, 'bytes': None}]]
            if i < len(values) - 1:
                pieces.append(', ')
                alts.append([])
        pieces.append(']}')
        alts.append([])
        logprobs = None
        if body.get('logprobs') and 'no_logprobs' not in self.faults:
            logprobs = {'content': [{'token': p, 'logprob': 0.0, 'bytes': None, 'top_logprobs': a}
                                    for p, a in zip(pieces, alts)]}
        return 200, self.completion_body('chat', ''.join(pieces), logprobs)

    def completion(self, body):
        """Echo the prompt's tokens: each activation line is token, tab, value tokens, newline. After the last
        explanation (the neuron under test), a slot predicts 10 on the target token and 0 elsewhere; a '1' in a
        slot is followed by '0' on the target (10) and by the newline elsewhere."""
        prompt = body['prompt']
        target = re.findall(r'^Explanation: the main thing this neuron does is find the token "(.*)"', prompt, re.M)[-1]
        test_part = prompt.rindex('Explanation: ')
        pieces, alts, pos, slot = [], [], 0, 0
        lines = prompt.split('\n')
        for n, line in enumerate(lines):
            newline = ['\n'] if n < len(lines) - 1 else []
            if '\t' not in line:
                pieces += ([line] if line else []) + newline           # no empty tokens, as no tokenizer has them
                alts += ([{}] if line else []) + [{}] * len(newline)
                pos += len(line) + len(newline)
                continue
            tok, val = line.rsplit('\t', 1)
            value = self.number(val) if val != 'unknown' else ['unknown']
            pieces += [tok, '\t'] + value + newline
            alt = [{}, {}] + [{}] * len(value) + [{}] * len(newline)
            if pos > test_part:
                hit = tok == target
                if val == 'unknown':
                    top = self.number('10')[0] if hit else '0'
                    alt[2] = {top: -0.01, 'unknown': -3.0, 'n': -4.0}
                    if ('no_digit_some' in self.faults and slot == 0) or ('no_digit_many' in self.faults and slot % 2):
                        alt[2] = {'unknown': -0.1, 'n': -2.3, 'x': -4.0}
                    slot += 1
                elif val == '1' and len(alt) > 3:          # the token after a '1': '0' (it is 10) or the newline
                    alt[3] = {'0': -0.01, '\n': -5.0} if hit else {'\n': -0.01, '0': -6.0}
            alts += alt
            pos += len(line) + len(newline)
            if pos <= test_part:
                slot = 0
        if 'no_logprobs' in self.faults:
            choice = {'text': '', 'index': 0, 'finish_reason': 'length', 'logprobs': None}
        elif 'vllm' in self.faults:
            entries = [None] + [{str(i): {'logprob': v, 'rank': r + 1, 'decoded_token': t}
                                 for i, (r, (t, v)) in enumerate(enumerate(a.items()))} | {'999': {'logprob': -1.0, 'rank': 9, 'decoded_token': p}}
                                for p, a in list(zip(pieces, alts))[1:]]
            choice = {'text': '', 'index': 0, 'finish_reason': 'length', 'logprobs': None, 'prompt_logprobs': entries}
        else:
            choice = {'text': '', 'index': 0, 'finish_reason': 'length',
                      'logprobs': {'tokens': pieces, 'token_logprobs': [None] + [0.0] * (len(pieces) - 1),
                                   'top_logprobs': [None] + alts[1:], 'text_offset': []}}
        return 200, {'id': 'cmpl-1', 'object': 'text_completion', 'created': 0, 'model': body['model'],
                     'choices': [choice], 'usage': {'prompt_tokens': len(pieces), 'completion_tokens': 1, 'total_tokens': len(pieces) + 1}}

    @staticmethod
    def completion_body(kind, content, logprobs):
        return {'id': 'chatcmpl-1', 'object': 'chat.completion', 'created': 0, 'model': 'fake',
                'choices': [{'index': 0, 'finish_reason': 'stop', 'logprobs': logprobs,
                             'message': {'role': 'assistant', 'content': content}}],
                'usage': {'prompt_tokens': 10, 'completion_tokens': 5, 'total_tokens': 15}}


@pytest.fixture
def server():
    s = FakeLLM()
    yield s
    s.close()
