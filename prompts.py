"""
The text the LLM reads, and how its answers are read (JSON lists, and values from logprobs): interpret.py says what
it asks and when, llm.py how.

The explainer and the simulators follow the structure of OpenAI's automated-interpretability as the paper ran it
(instructions, a fixed block of few-shot example neurons, then the neuron under test); detection and fuzzing follow
Paulo et al. 2024 (given the explanation, a 0/1 answer for each of a few excerpts). The wording and the examples are
this project's own. The few-shot block comes first and is the same in every request, so that a server's prefix cache
can reuse it. Counts are never written where a small model could copy them as values: a schema fixes them instead.
"""

import json
import math
import re

EXPLANATION_PREFIX = 'the main thing this neuron does is find'
INSTRUCTIONS = (
    "We study single neurons inside a language model. Each neuron responds to some particular thing in a short "
    "text. Its activation on each token is written as token<TAB>activation, an integer from 0 (silent) to 10 "
    "(strongest); most activations are 0.")
EXPLAINER_TASK = (" Read the excerpts a neuron responds to and say, in a short phrase, what it responds to. Look at "
                  "which tokens fire and at what surrounds them; prefer a precise phrase to a general one.")
SIMULATOR_TASK = (" Given a neuron's explanation, predict its activation on each token; \"unknown\" marks an "
                  "activation to predict.")
CHAT_SIMULATOR_TASK = (" Given a neuron's explanation and a list of tokens, answer with the activation of each token "
                       "as JSON only: {\"activations\": [one integer per token]}.")
DETECTION_TASK = (" Given a neuron's explanation and some numbered text excerpts, say for each excerpt whether the "
                  "neuron responds anywhere in it: 1 if it does, 0 if it does not. Answer as JSON only: "
                  "{\"answers\": [one 0 or 1 per excerpt]}.")
FUZZING_TASK = (" Given a neuron's explanation and some numbered text excerpts in which tokens are marked <<like "
                "this>>, say for each excerpt whether the marked tokens are ones the explanation says the neuron "
                "responds to: 1 if they all are, 0 if they are not. Answer as JSON only: "
                "{\"answers\": [one 0 or 1 per excerpt]}.")

# Example neurons, written for this project: (explanation, excerpts of (token, activation 0-10)).
FEW_SHOT = [
    ('days of the week, most strongly when they name a day of a meeting or event', [
        [(' The', 0), (' board', 0), (' met', 0), (' on', 0), (' Friday', 10), (' and', 0), (' again', 0),
         (' on', 0), (' Sunday', 8), (' evening', 1), ('.', 0)],
        [(' Every', 0), (' Tuesday', 9), (' the', 0), (' market', 0), (' opens', 0), (' at', 0), (' six', 0),
         ('.', 0)]]),
    ('closing brackets that end a parenthetical remark or citation', [
        [(' results', 0), (' (', 0), ('see', 0), (' Table', 0), (' 2', 1), (')', 10), (' were', 0),
         (' clear', 0), (' (', 0), ('p', 0), (' <', 0), (' 0', 0), ('.', 0), ('05', 0), (').', 7)]]),
    ('words about the sea, boats and water', [
        [(' The', 0), (' boat', 5), (' drifted', 2), (' across', 0), (' the', 0), (' bay', 8), (' while', 0),
         (' waves', 10), (' broke', 1), (' on', 0), (' the', 0), (' shore', 6), ('.', 0)]]),
]

# Detection's and fuzzing's examples: (explanation, [(excerpt, answer)]); fuzzing's mark tokens <<like this>>.
DETECTION_SHOT = ('days of the week, most strongly when they name a day of a meeting or event', [
    ('The committee will meet again on Thursday to vote on the plan.', 1),
    ('The river rose through the night and flooded the lower fields.', 0),
    ('Tickets for the Saturday concert sold out within an hour.', 1),
    ('She poured the tea and asked whether he had read the letter.', 0),
    ('Prices rose by three percent over the year, the bank said.', 0)])
FUZZING_SHOT = ('closing brackets that end a parenthetical remark or citation', [
    ('The results (see Table 2<<)>> were clear.', 1),
    ('The <<results>> were clear, and the <<team>> went home.', 0),
    ('As shown before (Smith, 2004<<)>>, the effect holds.', 1),
    ('We walked <<down>> to the harbour (it was late).', 0),
    ('Two <<of>> them <<(>>the older ones) stayed.', 0)])


def show_token(text):
    return text.replace('\\', '\\\\').replace('\n', '\\n').replace('\t', '\\t')


def listing(tokens, values):
    """One excerpt as <start>, token<TAB>value lines, <end>; values may be 'unknown'."""
    return '<start>\n' + ''.join(f"{show_token(t)}\t{v}\n" for t, v in zip(tokens, values)) + '<end>\n'


def with_instructions(system, turns, system_role):
    """A system message, or (for a chat template that rejects one) the instructions at the head of the first turn."""
    if system_role:
        return [{'role': 'system', 'content': system}] + turns
    return [{**turns[0], 'content': system + '\n\n' + turns[0]['content']}] + turns[1:]


# --- the explainer ---------------------------------------------------------------------------------------------------

def explainer_body(excerpts, header):
    """excerpts: [(token texts, 0-10 values)]: the listings, and the non-zero tokens again when they are rare."""
    shown = sum(len(v) for _, v in excerpts)
    nonzero = [show_token(t) for toks, vals in excerpts for t, v in zip(toks, vals) if v > 0]
    body = header + '\n' + ''.join(listing(t, v) for t, v in excerpts)
    if len(nonzero) < 0.2 * shown:
        body += 'Non-zero tokens: ' + ', '.join(nonzero) + '\n'
    return body + f'\nComplete the sentence: {EXPLANATION_PREFIX}'


def explainer_messages(excerpts, system_role=True):
    """excerpts: the neuron's [(token texts, 0-10 values)], after the example neurons and marked apart from them."""
    turns = []
    for i, (explanation, examples) in enumerate(FEW_SHOT):
        body = explainer_body([([t for t, _ in ex], [v for _, v in ex]) for ex in examples], f'Example neuron {i + 1}.')
        turns += [{'role': 'user', 'content': body}, {'role': 'assistant', 'content': explanation}]
    turns.append({'role': 'user', 'content': explainer_body(excerpts, 'The neuron to explain, a new one: explain '
                                                                      'it from its own excerpts below.')})
    return with_instructions(INSTRUCTIONS + EXPLAINER_TASK, turns, system_role)


LEAD_IN = re.compile(r"^(the )?(main thing )?(this |the )?neuron('s)?( main)?( job)?( does| is)*( to)?"
                     r"( finds?| detects?| looks? for| responds? to)?([: ]+|$)|^finds? ", re.IGNORECASE)


def clean_explanation(text, limit=300):
    """The answer's first line, without a lead-in ('the main thing this neuron does is find', 'the neuron does is
    find', 'find', ...), a trailing period or one pair of enclosing quotes."""
    line = (text or '').strip().split('\n')[0].strip()
    line = LEAD_IN.sub('', line, count=1).strip().rstrip('.').strip()
    for a, b in ('""', "''", '“”', '‘’', '``'):
        if len(line) >= 2 and line[0] == a and line[-1] == b and b not in line[1:-1]:   # one pair around it all
            line = line[1:-1].strip()
            break
    return line[:limit]


def copies_an_example(explanation):
    """Whether an explanation is one of the example neurons' (a small model copies the last one it read)."""
    return explanation.lower() in {e.lower() for e, _ in FEW_SHOT}


# --- the simulators --------------------------------------------------------------------------------------------------

def simulator_prompt(explanation, tokens, slot='unknown'):
    """The all-at-once prompt for one excerpt and the character offsets of its slots: the few-shot block (the same
    in every request), then the explanation and the excerpt with `slot` where each activation would be."""
    parts = [INSTRUCTIONS + SIMULATOR_TASK + '\n']
    for i, (expl, examples) in enumerate(FEW_SHOT):
        parts.append(f"\nNeuron {i + 1}\nExplanation: {EXPLANATION_PREFIX} {expl}\nActivations:\n"
                     + ''.join(listing([t for t, _ in ex], [v for _, v in ex]) for ex in examples))
    head = ''.join(parts) + (f"\nNeuron {len(FEW_SHOT) + 1}\nExplanation: {EXPLANATION_PREFIX} {explanation}\n"
                             f"Activations:\n<start>\n")
    slots, body = [], head
    for t in tokens:
        body += show_token(t) + '\t'
        slots.append(len(body))
        body += slot + '\n'
    return body + '<end>\n', slots


def few_shot_slots():
    """Offsets and values of the few-shot block's own activations in simulator_prompt (they tell how the server
    tokenises '10')."""
    prompt, _ = simulator_prompt('x', [])
    out, pos = [], 0
    for _, examples in FEW_SHOT:
        for ex in examples:
            for t, v in ex:
                pos = prompt.index(show_token(t) + '\t', pos) + len(show_token(t)) + 1
                out.append((pos, v))
    return out


def chat_simulator_question(explanation, tokens):
    numbered = '\n'.join(f"{i}: {json.dumps(t)}" for i, t in enumerate(tokens))
    return (f"Explanation: {EXPLANATION_PREFIX} {explanation}.\nTokens:\n{numbered}\n"
            f"Reply with {{\"activations\": [...]}}: one integer from 0 to 10 for each numbered token, in order.")


def chat_simulator_messages(explanation, tokens, system_role=True):
    turns = []
    for expl, examples in FEW_SHOT:
        ex = [p for e in examples for p in e]
        turns += [{'role': 'user', 'content': chat_simulator_question(expl, [t for t, _ in ex])},
                  {'role': 'assistant', 'content': json.dumps({'activations': [v for _, v in ex]})}]
    turns.append({'role': 'user', 'content': chat_simulator_question(explanation, tokens)})
    return with_instructions(INSTRUCTIONS + CHAT_SIMULATOR_TASK, turns, system_role)


# --- detection and fuzzing -------------------------------------------------------------------------------------------

def marked(tokens, mark):
    """An excerpt's text with the tokens where mark is true inside <<...>>, neighbours sharing one pair."""
    out, mark = '', [bool(m) for m in mark]
    for i, (t, m) in enumerate(zip(tokens, mark)):
        opens, closes = m and (i == 0 or not mark[i - 1]), m and (i == len(mark) - 1 or not mark[i + 1])
        out += '<<' * opens + t + '>>' * closes
    return out


def classifier_question(kind, explanation, texts):
    numbered = '\n'.join(f"{i}: {json.dumps(t)}" for i, t in enumerate(texts))
    ask = ("Which excerpts does the neuron respond to?" if kind == 'detection' else
           "In which excerpts are the marked tokens the ones it responds to?")
    return (f"Explanation: {EXPLANATION_PREFIX} {explanation}.\nExcerpts:\n{numbered}\n{ask} "
            f"Reply with {{\"answers\": [...]}}: 1 or 0 for each numbered excerpt, in order.")


def classifier_messages(kind, explanation, texts, system_role=True):
    """kind 'detection' (texts: excerpts) or 'fuzzing' (texts: excerpts with marked tokens)."""
    shot_explanation, shot = DETECTION_SHOT if kind == 'detection' else FUZZING_SHOT
    turns = [{'role': 'user', 'content': classifier_question(kind, shot_explanation, [t for t, _ in shot])},
             {'role': 'assistant', 'content': json.dumps({'answers': [a for _, a in shot]})},
             {'role': 'user', 'content': classifier_question(kind, explanation, texts)}]
    task = DETECTION_TASK if kind == 'detection' else FUZZING_TASK
    return with_instructions(INSTRUCTIONS.split(' Its activation')[0] + task, turns, system_role)


# --- reading answers -------------------------------------------------------------------------------------------------

def parse_list(text, key, n, top):
    """The n integers 0..top of an answer: its JSON object's list under key, else a bracketed list [v, v, ...]. Other
    integers in the text (an echo of the numbered listing, say) are not an answer."""
    if not isinstance(text, str):
        return None
    values = None
    start, end = text.find('{'), text.rfind('}')
    if start >= 0 and end > start:
        try:
            obj = json.loads(text[start:end + 1])
            values = obj.get(key) if isinstance(obj, dict) else None
        except json.JSONDecodeError:
            values = None
    if values is None:
        bracket = re.search(r'\[([\d\s,]*)\]', text)
        values = [int(x) for x in bracket.group(1).replace(',', ' ').split()] if bracket else None
    ok = (isinstance(values, list) and len(values) == n
          and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= top for v in values))
    return values if ok else None


# --- values from logprobs: the chat answer's tokens (llm.answer) or the echoed prompt's (llm.prompt_tokens) ----------

VALUES = {str(v) for v in range(11)}


def digit_probs(alts):
    """{value: probability} of the alternatives that read as a value 0-10 ('10' only where it is one token)."""
    probs = {}
    for tok, lp in alts.items():
        s = tok.strip()
        if s in VALUES:
            probs[int(s)] = probs.get(int(s), 0.0) + math.exp(lp)
    return probs


def expected_value(probs, ten_given_one=0.0):
    """E[value] over the digit alternatives, renormalised. Where the server writes 10 as '1' then '0', the mass of
    '1' is 1 or 10: ten_given_one = P('0' next | '1') splits it (1 p + 9 p q adds the 10s)."""
    total = sum(probs.values())
    if not total:
        return None
    ev = sum(v * p for v, p in probs.items()) / total
    return ev + 9 * probs.get(1, 0.0) / total * ten_given_one


def ten_after_one(alts):
    """P(the value goes on with '0' | it began with '1'), from the alternatives of the token after the '1': '0'
    against an ending (newline, comma, bracket, space)."""
    zero = sum(math.exp(lp) for t, lp in alts.items() if t.startswith('0'))
    end = sum(math.exp(lp) for t, lp in alts.items() if not t.strip() or t.strip()[0] in ',]}\n')
    return zero / (zero + end) if zero + end else 0.0


def expected_from_logprobs(tokens, n):
    """Each value's expected value from a chat answer's [(token, {alternative: logprob})] (llm.answer), or None
    when they do not line up with n numbers. A value's first token gives the digit distribution; where 10 is
    written as two tokens and the answer wrote '1' then a digit, the next token's alternatives tell 10 from 1
    (elsewhere '1' reads 1)."""
    if not tokens:
        return None
    text, values, prev_digit, pending = '', [], False, None
    for piece, alts in tokens:
        inside = '[' in text
        digits = piece.strip(' ,[]\n')
        if pending is not None:       # the token after a value's first token '1'
            probs = pending
            q = ten_after_one(alts) if alts else float(piece.startswith('0'))
            values[-1] = expected_value(probs, q if 10 not in probs else 0.0)
            pending = None
        if inside and digits.isdigit() and not prev_digit:
            alts = alts or {piece: 0.0}
            probs = digit_probs(alts)
            if not probs:
                probs = {int(digits): 1.0} if digits in VALUES else {}
            values.append(expected_value(probs))
            if digits == '1' and not piece.rstrip().endswith(','):
                pending = probs
        prev_digit = inside and digits.isdigit() and not piece.rstrip().endswith(',')
        text += piece
        if inside and ']' in piece:
            break
    return values if len(values) == n and all(v is not None for v in values) else None
