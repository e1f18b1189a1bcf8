"""A small OpenAI-compatible server for the tests: /v1/chat/completions and /v1/completions on 127.0.0.1.

It plays a deterministic explainer (the token with the largest total activation shown: 'the token "X"') and
simulator (10 on that token, 0 elsewhere, with logprobs that match its text), and can be switched to faults."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODELS = {'fake-explainer', 'fake-simulator'}


def escape(text):
    return text.replace('\\', '\\\\').replace('\n', '\\n').replace('\t', '\\t')


class FakeLLM:
    def __init__(self):
        self.faults = set()        # 429_once 500 malformed_once wrong_count no_logprobs no_schema auth vllm
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
                    time.sleep(server.delay)
                    status, answer = server.answer(self.path, body)
                finally:
                    with server.lock:
                        server.inflight -= 1
                data = json.dumps(answer).encode()
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
        if '500' in self.faults:
            return self.error(500, 'internal error')
        if self.once('429_once'):
            return self.error(429, 'rate limited')
        if path.endswith('/chat/completions'):
            return self.chat(body)
        if path.endswith('/completions'):
            return self.completion(body)
        return self.error(404, 'no such endpoint')

    def chat(self, body):
        messages = body['messages']
        user = messages[-1]['content']
        fmt = (body.get('response_format') or {}).get('type')
        if fmt == 'json_schema' and 'no_schema' in self.faults:
            return self.error(400, "response_format of type 'json_schema' is not supported")
        if 'max_tokens' in body and 'no_max_tokens' in self.faults:
            return self.error(400, "Unsupported parameter: 'max_tokens'; use 'max_completion_tokens' instead")
        if 'Complete the sentence' in user:                 # explainer
            totals = {}
            for tok, v in re.findall(r'^(.*)\t(\d+)$', user.split('<start>', 1)[1], flags=re.M):
                totals[tok] = totals.get(tok, 0) + int(v)
            best = max(totals, key=lambda t: (totals[t], t))
            return 200, self.completion_body('chat', f'the token "{best}".', None)
        target = re.search(r'Neuron: finds the token "(.*)"\.\n', user).group(1)
        tokens = [json.loads(m) for m in re.findall(r'^\d+: (".*")$', user, flags=re.M)]
        values = [10 if escape(t) == target else 0 for t in tokens]
        if 'wrong_count' in self.faults:
            values.append(0)
        if self.once('malformed_once'):
            return 200, self.completion_body('chat', '{"activations": [1, 2', None)
        pieces = ['{"activations": ['] + [p for i, v in enumerate(values) for p in ([str(v)] + ([', '] if i < len(values) - 1 else []))] + [']}']
        logprobs = None
        if body.get('logprobs') and 'no_logprobs' not in self.faults:
            logprobs = {'content': [{'token': p, 'logprob': 0.0, 'bytes': None, 'top_logprobs': (
                [{'token': p, 'logprob': -0.01, 'bytes': None}, {'token': 'x', 'logprob': -6.0, 'bytes': None}]
                if p.isdigit() else [])} for p in pieces]}
        return 200, self.completion_body('chat', ''.join(pieces), logprobs)

    def completion(self, body):
        prompt = body['prompt']
        target = re.search(r'It finds the token "(.*)"\.', prompt).group(1)
        pieces, alts = [], []
        for line in prompt.split('\n'):
            if line.endswith('\tunknown'):
                tok = line[:-len('\tunknown')]
                pieces += [tok, '\t', 'unknown', '\n']
                hit = '10' if tok == target else '0'
                alts += [{}, {}, {hit: -0.01, 'unknown': -3.0, 'n': -4.0}, {}]
            else:
                pieces += [line, '\n']
                alts += [{}, {}]
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
