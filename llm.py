"""
Talking to an OpenAI-compatible server (vLLM, llama.cpp's server, OpenAI's API): how interpret.py's questions are
asked, not what they are.

- Every usable answer is cached in <out>/llm_cache.jsonl, keyed by the whole request: a re-run asks nothing twice.
  Only answers that passed their check are cached; a torn last line (a killed run) is skipped.
- Requests in flight are bounded (--concurrency); when requests time out the bound halves (a local server that
  works one request at a time queues them until they time out).
- The client retries 408/429/5xx itself (--max_retries); an answer that cannot be used (malformed, inconsistent,
  refused for this request only) is a BadAnswer: asked again with another seed (ask()), then the neuron fails and
  the next run asks again. No answer fails the run; an unreachable server, a refused key or an unknown model do.
- Servers differ, and each role's first request goes alone to learn how this one does: max_tokens or
  max_completion_tokens; whether its chat template takes a system turn; json_schema, json_object or plain text for
  the simulator's answer (llama.cpp's server answers json_schema with HTTP 500, so the first request goes without
  the client's retries; llama-cpp-python enforces a schema sent with json_object); chat logprobs or none.
- Logprobs: a chat answer's tokens come with their top_logprobs (answer), the all-at-once simulator's prompt with
  its own, from an echo (OpenAI's legacy completions, llama.cpp) or vLLM's prompt_logprobs, aligned to the prompt
  by character offsets (prompt_tokens); only finite alternatives <= 0 pass. prompts.py reads values from them.
"""

import asyncio
import hashlib
import json
import math
import os
import sys


def list_schema(key, n, top):
    """The JSON schema of {key: [n integers from 0 to top]}. The values are also an enum: llama-cpp-python's grammar
    enforces an enum, not minimum and maximum (SmolLM2 answered detection with [1, 0, 2, 3, 4] without it)."""
    return {'type': 'object', 'additionalProperties': False, 'required': [key], 'properties': {key: {
        'type': 'array', 'minItems': n, 'maxItems': n,
        'items': {'type': 'integer', 'minimum': 0, 'maximum': top, 'enum': list(range(top + 1))}}}}


class LLMError(Exception):
    """A server that cannot be used at all (unreachable, a refused key, an unknown model): the run stops."""


class BadAnswer(Exception):
    """An answer that cannot be used (malformed, inconsistent, refused for this request only): it fails that
    request, after bounded retries the neuron, never the run, and it is not cached."""


def valid_alternatives(alts):
    """{token: logprob} of an answer's alternatives that are what logprobs must be: a string and a finite
    number <= 0 (anything else, a server's NaN, 1e308 or a string, is dropped)."""
    if isinstance(alts, list):
        alts = {a.get('token'): a.get('logprob') for a in alts if isinstance(a, dict)}
    if not isinstance(alts, dict):
        return {}
    return {t: float(lp) for t, lp in alts.items() if isinstance(t, str) and isinstance(lp, (int, float))
            and not isinstance(lp, bool) and math.isfinite(lp) and lp <= 1e-6}


def answer(r):
    """The text of a chat answer and its tokens, each with its valid alternatives {token: logprob} (None where the
    server sent no logprobs)."""
    try:
        choice = r['choices'][0]
        text = choice['message'].get('content')
    except (KeyError, IndexError, TypeError, AttributeError):
        raise BadAnswer('no message in the answer')
    logprobs = choice.get('logprobs')
    content = logprobs.get('content') if isinstance(logprobs, dict) else None
    if not content:
        return text, None
    if not isinstance(content, list) or not all(isinstance(c, dict) for c in content) or ''.join(
            str(c.get('token', '')) for c in content) != text:
        raise BadAnswer('the logprobs do not spell the answer')
    return text, [(str(c.get('token', '')), valid_alternatives(c.get('top_logprobs') or [])) for c in content]


def prompt_tokens(choice, prompt):
    """[(start offset, token text, {alternative: logprob})] of the prompt's tokens, from an echo (tokens,
    top_logprobs, text_offset) or vLLM's prompt_logprobs; None when they cannot be aligned with the prompt."""
    lp = choice.get('logprobs') or {}
    if lp.get('tokens') and lp.get('top_logprobs') is not None:
        toks, alts = lp['tokens'], lp['top_logprobs']
        offsets = lp.get('text_offset') or []
        if len(offsets) != len(toks):
            offsets, pos = [], 0
            for t in toks:
                offsets.append(pos)
                pos += len(t or '')
        if not ''.join(t or '' for t in toks).startswith(prompt):
            return None
        return [(o, t or '', valid_alternatives(a)) for o, t, a in zip(offsets, toks, alts) if o < len(prompt)]
    if choice.get('prompt_logprobs'):      # vLLM: per position {token_id: {logprob, rank, decoded_token}}, the
        entries = [valid_alternatives({v.get('decoded_token'): v.get('logprob') for v in e.values()})  # the prompt's
                   for e in choice['prompt_logprobs'] if e is not None]                    # own token among them
        for start in range(len(prompt)):     # where the first token ends: the offset the rest aligns from
            out, pos = [], start
            for alts in entries:
                match = max((t for t in alts if t and prompt.startswith(t, pos)), key=len, default=None)
                if match is None:
                    break
                out.append((pos, match, alts))
                pos += len(match)
            if pos >= len(prompt):
                return out
        return None
    raise LLMError("the simulator server returned no prompt logprobs, which --simulator=all-at-once needs; "
                         "use --simulator=chat or --simulator=tokens")


def at_offsets(tokens, offsets):
    """For each character offset, the (text, alternatives) of the prompt token that starts there, else None."""
    by_start = {o: (t, a) for o, t, a in tokens}
    return [by_start.get(o) for o in offsets]


class LLM:
    """The two LLM roles, with a cache of every usable answer in llm_cache.jsonl (re-runs make no requests), a
    bound on the requests in flight that halves when requests time out, and the fallbacks servers need, learned
    from each role's first request, which goes alone."""

    def __init__(self, folder, base_url, explainer_model, simulator_model='', simulator_base_url='', api_key='',
                 concurrency=16, max_retries=3, timeout=120.0, top_logprobs=5, bad_answer_retries=2, seed=0):
        import openai
        self.openai = openai
        self.cache_path = os.path.join(folder, 'llm_cache.jsonl')
        self.cache = {}
        if os.path.exists(self.cache_path):
            with open(self.cache_path) as f:
                text = f.read()
            for i, line in enumerate(text.split('\n')):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    self.cache[item['key']] = item['response']
                except (json.JSONDecodeError, KeyError, TypeError):
                    print(f"warning: skipping a torn line {i + 1} of {self.cache_path}", file=sys.stderr)
            if text and not text.endswith('\n'):        # a torn last line: the next record starts on its own line
                with open(self.cache_path, 'a') as f:
                    f.write('\n')
        self.cache_file = open(self.cache_path, 'a')
        url = base_url or os.environ.get('OPENAI_BASE_URL', '')
        key = api_key or os.environ.get('OPENAI_API_KEY', '') or 'none'
        if not url:
            raise LLMError("--simulator=chat or all-at-once needs a server: pass --base_url (or set OPENAI_BASE_URL), "
                             "or use --simulator=tokens for the offline baseline")
        self.urls = {'explainer': url, 'simulator': simulator_base_url or url}
        self.models = {'explainer': explainer_model, 'simulator': simulator_model or explainer_model}
        for role, name in self.models.items():
            if not name:
                raise LLMError(f"name the {role} model with --explainer_model (and --simulator_model if it differs)")
        self.clients = {role: openai.AsyncOpenAI(base_url=u, api_key=key, max_retries=max_retries, timeout=timeout)
                        for role, u in self.urls.items()}
        self.limit, self.active, self.slots = concurrency, 0, asyncio.Condition()
        self.seed, self.retries, self.top_logprobs = seed, bad_answer_retries, top_logprobs
        self.requests = self.cached = self.prompt_tokens = self.completion_tokens = 0
        self.fmt = 'json_schema'              # json_schema -> json_object -> text, as far as the server goes
        self.limit_param = 'max_tokens'       # or max_completion_tokens, when a server refuses max_tokens
        self.logprobs = True
        self.system_role = {'explainer': True, 'simulator': True}   # False: its chat template rejects a system turn
        self.ten_split = None                 # all-at-once: does the simulator write 10 as '1' then '0'?
        self.probing = {'explainer': False, 'simulator': False}
        self.probed = {'explainer': asyncio.Event(), 'simulator': asyncio.Event()}

    async def slot(self):
        async with self.slots:
            await self.slots.wait_for(lambda: self.active < self.limit)
            self.active += 1

    async def release(self):
        async with self.slots:
            self.active -= 1
            self.slots.notify_all()

    async def call(self, role, endpoint, attempt, check, bare=False, **request):
        """check(response) -> what the caller needs, or BadAnswer. Only an answer that passed is cached. bare: without
        the client's retries."""
        request['model'] = self.models[role]
        key = json.dumps([self.urls[role], endpoint, request, attempt], sort_keys=True)
        key = hashlib.sha256(key.encode()).hexdigest()
        if key in self.cache:
            try:
                value = check(self.cache[key])
                self.cached += 1
                return value
            except BadAnswer:
                del self.cache[key]                     # an older run's answer that no longer passes: ask again
        client = self.clients[role].with_options(max_retries=0) if bare else self.clients[role]
        api = client.chat.completions if endpoint == 'chat' else client.completions
        extra = request.pop('extra_body', None)
        for tries in range(2):
            await self.slot()
            try:
                response = (await api.create(**request, **({'extra_body': extra} if extra else {}))).model_dump()
                break
            except self.openai.APITimeoutError:
                if self.limit > 1:                      # queued at a server that works one request at a time?
                    self.limit = max(1, self.limit // 2)
                    print(f"warning: requests to the {role} server time out; {self.limit} in flight from now on "
                          f"(a local server: --concurrency=1 or a longer --timeout)", file=sys.stderr)
                if tries:
                    raise                               # slow, not unreachable: the neuron is left for a re-run
            except self.openai.APIConnectionError:
                raise LLMError(f"cannot reach the {role} server at {self.urls[role]}; start it or fix --base_url")
            except self.openai.AuthenticationError:
                raise LLMError(f"the {role} server at {self.urls[role]} refused the API key; set --api_key or "
                               f"OPENAI_API_KEY")
            except self.openai.NotFoundError:
                raise LLMError(f"model {self.models[role]!r} not found at {self.urls[role]}; check --{role}_model")
            except self.openai.APIStatusError:
                raise                                   # the caller decides: a feature, this request, or the server
            except (self.openai.APIError, ValueError, TypeError, AttributeError) as e:
                raise BadAnswer(f"unreadable answer ({type(e).__name__})")   # not JSON, or not the protocol's shape
            finally:
                await self.release()
        if extra:
            request['extra_body'] = extra
        self.requests += 1
        usage = response.get('usage') if isinstance(response.get('usage'), dict) else {}
        self.prompt_tokens += usage.get('prompt_tokens') or 0
        self.completion_tokens += usage.get('completion_tokens') or 0
        value = check(response)
        self.cache[key] = response
        try:
            self.cache_file.write(json.dumps({'key': key, 'response': response}) + '\n')
            self.cache_file.flush()
        except OSError as e:          # a full disk: stop, keeping what is finished
            raise LLMError(f"cannot write {self.cache_path} ({e.strerror}); finished neurons are kept: free some "
                           f"space and run the same command again")
        return value

    async def ask(self, role, messages, check, schema=None, **request):
        """check(a chat answer), asked again while the answer is bad, bad_answer_retries times, each time with another
        seed (and temperature 1 where it was 0: a deterministic server would repeat itself); None after that."""
        for attempt in range(self.retries + 1):
            again = {'seed': self.seed + attempt}
            if attempt and request.get('temperature') == 0:
                again['temperature'] = 1.0
            try:
                return await self.chat(role, messages, check, attempt, schema, **{**request, **again})
            except BadAnswer:
                continue
        return None

    async def chat(self, role, messages, check, attempt=0, schema=None, **request):
        """A chat request; messages(system_role) builds the turns; schema=(key, n, top) asks for {key: [n integers
        0..top]} in the best format the server takes. A role's first request goes alone, the others waiting for it:
        what it learns about the server (max_tokens, a system turn, response formats, logprobs) they use."""
        if not self.probed[role].is_set():
            if self.probing[role]:
                await self.probed[role].wait()
            else:
                self.probing[role] = True
                try:
                    return await self.chat_once(role, messages, check, attempt, schema, True, request)
                finally:
                    self.probed[role].set()
        return await self.chat_once(role, messages, check, attempt, schema, False, request)

    async def chat_once(self, role, messages, check, attempt, schema, probe, request):
        bare = probe                  # the probe goes without the client's retries: a refused format answers at once
        while True:
            req, limit, system = dict(request), self.limit_param, self.system_role[role]
            fmt, logprobs = self.fmt, self.logprobs
            if limit != 'max_tokens' and 'max_tokens' in req:
                req[limit] = req.pop('max_tokens')
            if schema is not None:
                if fmt == 'json_schema':
                    req['response_format'] = {'type': 'json_schema', 'json_schema': {
                        'name': schema[0], 'strict': True, 'schema': list_schema(*schema)}}
                elif fmt == 'json_object':
                    req['response_format'] = {'type': 'json_object', 'schema': list_schema(*schema)}
                if logprobs:
                    req.update(logprobs=True, top_logprobs=20)
            try:
                return await self.call(role, 'chat', attempt, check, bare, messages=messages(system), **req)
            except (self.openai.BadRequestError, self.openai.InternalServerError) as e:
                text = str(e).lower()
                now = (self.limit_param, self.system_role[role], self.fmt, self.logprobs)
                if (limit, system, fmt, logprobs) != now:
                    continue                            # another request changed a setting meanwhile: send again
                refused = isinstance(e, self.openai.BadRequestError)
                if refused and 'max_tokens' in text and limit == 'max_tokens':
                    self.limit_param = 'max_completion_tokens'
                elif refused and 'system' in text and system:
                    self.system_role[role] = False
                elif refused and 'logprob' in text and schema is not None and logprobs:
                    self.logprobs = False
                elif schema is not None and fmt != 'text' and (not refused and probe or refused and any(
                        w in text for w in ('response_format', 'schema', 'json', 'grammar'))):
                    # llama.cpp's server answers json_schema with a 500: on the probe a 500 is the format's; a 400
                    # is the format's only where it names it (a prompt too long for the context is this one's)
                    self.fmt = {'json_schema': 'json_object', 'json_object': 'text'}[fmt]
                elif refused:
                    raise BadAnswer(f"the server refused this request ({str(e)[:120]})")   # e.g. too long
                elif bare:
                    bare = False                        # a server error: from now on the client retries it
                else:
                    raise                               # a server error: the neuron is left for a re-run
            except self.openai.APIStatusError:
                if not bare:
                    raise                               # the caller decides
                bare = False                            # 408, 409, 429 to the probe: the client retries them

    async def prompt_logprobs(self, prompt):
        """The prompt's echoed tokens with their top-k alternatives (an echo is not resampled: no retries)."""
        k = self.top_logprobs

        def check(r):
            try:
                tokens = prompt_tokens(r['choices'][0], prompt)
            except (KeyError, IndexError, TypeError, AttributeError):
                raise BadAnswer('no choices in the answer')
            if tokens is None:
                raise BadAnswer("the echoed tokens do not spell the prompt")
            return tokens
        return await self.call('simulator', 'completions', 0, check, prompt=prompt, max_tokens=1, temperature=0,
                               echo=True, logprobs=k, extra_body={'prompt_logprobs': k})
