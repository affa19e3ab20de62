"""Task generators of the quality harness, written in code (no downloads), deterministic for a seed.

Every task is few-/many-shot: the prompt is a run of exemplars (*shots*) followed by a final question,
in the plain completion format ``"Q: ...\\nA: ..."`` — SmolLM2-135M follows that far better than its
chat template. The tasks are built so that keeping *whole* shots should matter:

- ``lookup``       in-context lookup: shots map words to 3-digit codes; the question asks the code of
                   one shot's word, so the answer sits in exactly one exemplar (a token-level method
                   that keeps the word but drops one digit of its code fails).
- ``arithmetic``   few-shot addition (a two-digit number plus 1 or 2): the shots teach the format;
                   the answer is in no shot.
- ``pattern``      format following: shots swap two words (``Q: red fox`` -> ``A: fox red``).
- ``passkey``      passkey retrieval: a 5-digit key hidden in one paragraph of filler; the paragraphs
                   are the shots.
- ``multi_turn``   a chat (the tokenizer's chat template): fact turns ("The code of the {word} is
                   {code}."), each acknowledged, then a turn asking for one code; the harness's
                   ``multi_turn`` setting runs it as a :class:`~kvpress_kernels.sessions.ChatSession`
                   compressed after every turn (scored: the code appears in the answer).
- ``multi_answer`` multi-answer generation (the decoding phase): lookup shots, then several questions
                   asked one after another, each answered by the model before the next is appended
                   (scored as the fraction of turns right). SmolLM2-135M cannot list several codes
                   in one answer line (1.7 % of codes right in a check), so the answers are turns.

Depth balance: for ``n`` examples the answer-bearing shot of example ``i`` sits at shot index
``floor((i + 0.5) / n * n_shots)``, so answers are spread evenly over the context (``depth`` in
``[0, 1)`` records where); everything else is drawn from ``random.Random(f"{task}:{seed}:{i}")``.

An :class:`Example` keeps the context (everything the compression may see before the question) and
the question apart, so both settings of the harness can be built from it: *query-aware* (question
inside the compressed prompt) and *query-agnostic* (context compressed first, question fed after).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

CharSpan = Tuple[int, int]

# Common, single-token-ish English nouns; distinct so that a lookup key is never ambiguous.
WORDS = (
    "apple river stone cloud tiger piano candle forest rocket mirror garden silver button window planet "
    "castle dragon pepper violin marble anchor basket circus falcon glacier harbor island jacket kettle "
    "lemon meadow needle orchard pillow quartz saddle ticket umbrella velvet walnut bridge camera desert "
    "engine feather guitar hammer igloo jungle ladder magnet napkin ocean parrot rabbit spider tunnel "
    "wagon yogurt zebra bottle carpet doctor eagle fabric goblet helmet insect jigsaw kitten lantern "
    "monkey nickel oyster pencil radio sandal tomato valley wizard yacht blanket cactus dolphin "
    "elbow fountain giraffe honey iceberg jelly koala lobster mango nectar olive puzzle"
).split()

COLORS = "red blue green black white brown pink gold gray orange purple yellow".split()

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


@dataclass
class Example:
    """One prompt of a task.

    Attributes
    ----------
    task : str
    index : int
        Position in the generated list (the depth balance depends on it).
    context : str
        Instruction + shots; ends with a blank line. The *query-agnostic* setting compresses exactly this.
    question : str
        The final ``"Q: ...\\nA:"`` (no trailing space: the answer's first token carries its space).
    answer : str
        Gold answer, as the model should write it on the answer line (stripped).
    shot_spans : list of (start, end)
        Character spans of the shots inside ``context`` (each with its trailing blank line).
    answer_shot : int or None
        Index of the shot that holds the answer (``None`` when no shot does).
    depth : float
        Relative position of the answer-bearing shot in the context, ``answer_shot / n_shots``.
    max_new_tokens : int
        Enough for the answer line plus its newline.
    items : list of str
        ``multi_answer`` only: the gold answers of every turn, in order (the first is ``answer``).
    turns : list of (question, answer)
        ``multi_answer`` only: the follow-up questions, each fed (after a blank line) once the previous
        answer line is generated.
    chat : list of (user, assistant)
        ``multi_turn`` only: the conversation's fact turns, in order (the assistant messages are given).
    chat_question : str
        ``multi_turn`` only: the last user message (asks for ``answer``).
    """

    task: str
    index: int
    context: str
    question: str
    answer: str
    shot_spans: List[CharSpan]
    answer_shot: Optional[int]
    depth: float
    max_new_tokens: int
    items: List[str] = field(default_factory=list)
    turns: List[Tuple[str, str]] = field(default_factory=list)
    chat: List[Tuple[str, str]] = field(default_factory=list)
    chat_question: str = ""

    @property
    def prompt(self) -> str:
        return self.context + self.question


def _balanced_index(i: int, n: int, n_shots: int) -> int:
    return min(n_shots - 1, int((i + 0.5) / n * n_shots))


def _join_shots(shots: List[str], header: str = "") -> Tuple[str, List[CharSpan]]:
    """``header`` then each shot followed by a blank line; returns the text and the shot spans. A span
    covers the shot and its trailing blank line, so the shots tile the context after the header (a
    context that ends with a shot leaves ShotKV no non-shot tail, and it then scores from the last
    tokens, as in the query-agnostic setting)."""
    text, spans = header, []
    for s in shots:
        spans.append((len(text), len(text) + len(s) + 2))
        text += s + "\n\n"
    return text, spans


def _codes(rng: random.Random, k: int) -> List[str]:
    return [str(c) for c in rng.sample(range(100, 1000), k)]


def make_lookup(i: int, n: int, rng: random.Random, n_shots: int = 24) -> Example:
    words = rng.sample(WORDS, n_shots)
    codes = _codes(rng, n_shots)
    j = _balanced_index(i, n, n_shots)
    context, spans = _join_shots([f"Q: What is the code of {w}?\nA: {c}" for w, c in zip(words, codes)])
    return Example("lookup", i, context, f"Q: What is the code of {words[j]}?\nA:", codes[j], spans, j,
                   j / n_shots, max_new_tokens=5)


def make_arithmetic(i: int, n: int, rng: random.Random, n_shots: int = 24) -> Example:
    # Two-digit number plus 1 or 2: SmolLM2-135M gets ~10/12 of "+1" and ~6/12 of "+1..3" right with
    # full context (harder sums sit near chance and leave nothing for compression to lose).
    shots = []
    for _ in range(n_shots):
        a, b = rng.randint(10, 89), rng.randint(1, 2)
        shots.append(f"Q: What is {a} plus {b}?\nA: {a + b}")
    a, b = rng.randint(10, 89), rng.randint(1, 2)
    context, spans = _join_shots(shots)
    return Example("arithmetic", i, context, f"Q: What is {a} plus {b}?\nA:", str(a + b), spans, None, 0.0,
                   max_new_tokens=4)


def make_pattern(i: int, n: int, rng: random.Random, n_shots: int = 24) -> Example:
    shots = []
    for _ in range(n_shots):
        c, w = rng.choice(COLORS), rng.choice(WORDS)
        shots.append(f"Q: {c} {w}\nA: {w} {c}")
    c, w = rng.choice(COLORS), rng.choice(WORDS)
    context, spans = _join_shots(shots)
    return Example("pattern", i, context, f"Q: {c} {w}\nA:", f"{w} {c}", spans, None, 0.0, max_new_tokens=6)


def make_passkey(i: int, n: int, rng: random.Random, n_shots: int = 16) -> Example:
    # 16 paragraphs (~440 tokens): SmolLM2-135M finds the key 7/8 times there, but only 1/20 with 24
    # paragraphs (~650 tokens), where it starts describing what a pass key is instead.
    key = str(rng.randint(10000, 99999))
    j = _balanced_index(i, n, n_shots)
    paras = [FILLER.strip()] * n_shots
    paras[j] = f"The pass key is {key}."
    header = "There is a pass key hidden in the text below. Find it and remember it.\n\n"
    context, spans = _join_shots(paras, header)
    # The answer line is primed with "The pass key is": SmolLM2-135M then copies the key (7/8 in a
    # check), while with a bare "A:" it spends five tokens restating the sentence first.
    return Example("passkey", i, context, "Q: What is the pass key?\nA: The pass key is", key, spans, j,
                   j / n_shots, max_new_tokens=6)


def make_multi_answer(i: int, n: int, rng: random.Random, n_shots: int = 24, n_turns: int = 4) -> Example:
    """Lookup shots, then ``n_turns`` questions asked one after another: each answer is generated and
    the next question is appended after it, so the cache keeps growing while decoding and the methods
    that compress generated tokens (ShotKV's decoding phase, H2O) act on it. The first question's
    answer sits at the balanced depth; the others at random distinct shots. Scored as the fraction of
    the turns answered right."""
    words = rng.sample(WORDS, n_shots)
    codes = _codes(rng, n_shots)
    context, spans = _join_shots([f"Q: What is the code of {w}?\nA: {c}" for w, c in zip(words, codes)])
    j = _balanced_index(i, n, n_shots)
    pick = [j] + rng.sample([p for p in range(n_shots) if p != j], n_turns - 1)
    qs = [f"Q: What is the code of {words[p]}?\nA:" for p in pick]
    items = [codes[p] for p in pick]
    return Example("multi_answer", i, context, qs[0], items[0], spans, j, j / n_shots, max_new_tokens=5,
                   items=items, turns=list(zip(qs[1:], items[1:])))


#: System prompt of the ``multi_turn`` conversations.
CHAT_SYSTEM = "You are a helpful assistant. Remember the codes the user tells you."
#: The assistant's (given) acknowledgement of each fact turn: it restates the fact (SmolLM2-135M answers
#: 5/6 of the questions right with the full cache after such turns, 0/6 after a bare "OK.", which it
#: then repeats as its answer).
CHAT_ACK = "Noted: the code of the {word} is {code}."


def make_multi_turn(i: int, n: int, rng: random.Random, n_shots: int = 8) -> Example:
    """A chat: each of ``n_shots`` user turns states one fact ("The code of the {word} is {code}."), the
    assistant acknowledges it (:data:`CHAT_ACK`, given, not generated); the last user turn asks for one of
    the codes (at the balanced depth). ``chat`` holds the fact turns as (user, assistant) and ``chat_question``
    the last one; scored by :func:`score` as whether the code appears in the answer (a chat answer is a
    sentence, not an answer line). ``context``/``question`` hold the same facts as plain ``Q:/A:`` shots,
    so the other settings can run the task too."""
    words = rng.sample(WORDS, n_shots)
    codes = _codes(rng, n_shots)
    j = _balanced_index(i, n, n_shots)
    context, spans = _join_shots([f"Q: What is the code of the {w}?\nA: {c}" for w, c in zip(words, codes)])
    return Example("multi_turn", i, context, f"Q: What is the code of the {words[j]}?\nA:", codes[j], spans, j,
                   j / n_shots, max_new_tokens=16,
                   chat=[(f"The code of the {w} is {c}.", CHAT_ACK.format(word=w, code=c)) for w, c in zip(words, codes)],
                   chat_question=f"What is the code of the {words[j]}?")


GENERATORS: Dict[str, Callable[..., Example]] = {
    "lookup": make_lookup,
    "arithmetic": make_arithmetic,
    "pattern": make_pattern,
    "passkey": make_passkey,
    "multi_answer": make_multi_answer,
    "multi_turn": make_multi_turn,
}
TASK_NAMES = tuple(GENERATORS)


def generate_task(task: str, n: int, *, seed: int = 0, n_shots: Optional[int] = None) -> List[Example]:
    """``n`` examples of ``task``, deterministic for ``(task, seed, n, n_shots)``."""
    if task not in GENERATORS:
        raise ValueError(f"task must be one of {TASK_NAMES}, got {task!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    kw = {} if n_shots is None else {"n_shots": n_shots}
    return [GENERATORS[task](i, n, random.Random(f"{task}:{seed}:{i}"), **kw) for i in range(n)]


def answer_line(generated: str) -> str:
    """The model's answer: the first line of the generated text, stripped."""
    return generated.strip().split("\n", 1)[0].strip()


def score(example: Example, generated) -> float:
    """1.0 / 0.0 for an exact answer line. ``multi_answer``: ``generated`` is the list of the turns'
    generated texts (a single string counts as the first turn); the fraction of turns right."""
    if example.task == "multi_answer":
        outs = [generated] if isinstance(generated, str) else list(generated)
        return sum(1.0 for k, want in enumerate(example.items)
                   if k < len(outs) and answer_line(outs[k]).rstrip(".") == want) / len(example.items)
    if example.task == "multi_turn":
        return 1.0 if re.search(rf"(?<!\d){re.escape(example.answer)}(?!\d)", generated or "") else 0.0
    line = answer_line(generated)
    if example.task == "passkey":
        line = line.rstrip(".").split()[-1] if line else line
    return 1.0 if line.rstrip(".") == example.answer else 0.0
