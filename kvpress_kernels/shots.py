"""Shots: the few-shot exemplars of a prompt, as token spans (what :class:`~kvpress_kernels.methods.ShotKV`
keeps or drops whole).

A *shot span* is a half-open interval ``(start, end)`` of token indices into one prompt **as the
tokenizer returns it for that prompt alone** (no padding: with a left-padded batch, index 0 is the
prompt's first real token). Everything not covered by a shot (instruction, separators, the final
question) is a *non-shot span*; ShotKV never evicts those.

Two ways to get spans:

- give them yourself (``[(s0, e0), (s1, e1), ...]``), e.g. from the lengths of the exemplars you
  concatenated;
- or find them in the text with :func:`find_shots`: every non-overlapping match of a regular
  expression is one shot, mapped to tokens through the (fast) tokenizer's offset mapping.

:func:`validate_spans` checks spans against a prompt length (in range, non-empty, non-overlapping)
and is what the integration runs before compressing.
"""

from __future__ import annotations

import re
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

Span = Tuple[int, int]

#: Default shot pattern for plain completion prompts ``"Q: ...\nA: <answer>"``: a question block
#: up to and including its non-empty answer line. The final question (``"Q: ...\nA:"`` with nothing
#: after ``A:``) has no answer, so it is not a shot and stays protected.
DEFAULT_SHOT_PATTERN = r"Q:.*?\nA:[ \t]*\S[^\n]*"

_RE_FLAGS = int(re.ASCII | re.IGNORECASE | re.LOCALE | re.MULTILINE | re.DOTALL | re.VERBOSE | re.UNICODE | re.DEBUG)


def find_shots(text: str, tokenizer, pattern: Union[str, "re.Pattern[str]"] = DEFAULT_SHOT_PATTERN, *,
               flags: int = re.DOTALL, add_special_tokens: bool = True) -> List[Span]:
    """Token spans of the shots of ``text``: one shot per non-overlapping match of ``pattern``.

    The text is tokenized as ``tokenizer(text, add_special_tokens=add_special_tokens,
    return_offsets_mapping=True)``; tokenize the prompt you generate from the same way, so that the
    spans index its ``input_ids``. A token belongs to the shot whose character range
    ``[match.start(), match.end())`` contains the token's first character (special tokens, whose
    offsets are empty, belong to no shot). So a token straddling two shots goes to the one it starts
    in, and the spans never overlap.

    Parameters
    ----------
    text : str
        The prompt.
    tokenizer : a fast (Rust-backed) Hugging Face tokenizer
        It must support ``return_offsets_mapping`` (``tokenizer.is_fast``).
    pattern : str or compiled regex
        Matches one whole shot. Default :data:`DEFAULT_SHOT_PATTERN` (``"Q: ...\\nA: answer"`` blocks).
    flags : int
        ``re`` flags used when ``pattern`` is a string (default ``re.DOTALL``).
    add_special_tokens : bool
        Passed to the tokenizer (a BOS token shifts every span by one).

    Returns
    -------
    list of (start, end)
        Half-open token spans in increasing order; a match that covers no token start is dropped.

    Raises
    ------
    TypeError
        ``text`` is not a string, ``pattern`` is not a string / compiled regex, or ``flags`` is not an int.
    ValueError
        The tokenizer cannot give offsets (a slow tokenizer), ``pattern`` is not a valid regular
        expression or matches the empty string, or ``flags`` holds bits that are no ``re`` flag.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if isinstance(flags, bool) or not isinstance(flags, int):  # re.RegexFlag is an int
        raise TypeError(f"flags must be an int of re flags (e.g. re.DOTALL | re.MULTILINE), got {type(flags).__name__}")
    if not isinstance(add_special_tokens, bool):
        raise TypeError(f"add_special_tokens must be a bool, got {type(add_special_tokens).__name__}")
    if flags & ~_RE_FLAGS or flags < 0:
        raise ValueError(f"flags must combine re flags (re.IGNORECASE, re.MULTILINE, re.DOTALL, ...), got {flags!r}")
    if isinstance(pattern, str):
        try:
            regex = re.compile(pattern, flags)
        except re.error as exc:
            raise ValueError(f"pattern is not a valid regular expression ({exc}): {pattern!r}") from None
        except ValueError as exc:  # e.g. re.LOCALE with a str pattern
            raise ValueError(f"flags {flags!r} cannot be used with a str pattern: {exc}") from None
    elif isinstance(pattern, re.Pattern):
        regex = pattern
    else:
        raise TypeError(f"pattern must be a str or a compiled regular expression, got {type(pattern).__name__}")
    if regex.fullmatch("") is not None:
        raise ValueError("pattern must not match the empty string (every position would be a shot), "
                         f"got {regex.pattern!r}")
    _need_fast(tokenizer)
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return _token_spans(enc["offset_mapping"], [(m.start(), m.end()) for m in regex.finditer(text)])


def _token_spans(offsets, char_ranges) -> List[Span]:
    """Token spans of character ranges: a token belongs to the range holding its first character
    (empty-offset special tokens belong to none); ranges that hold no token start are dropped."""
    # a token's anchor is its first character; empty-offset (special) tokens have none
    starts = [(i, s) for i, (s, e) in enumerate(offsets) if e > s]
    spans: List[Span] = []
    for c0, c1 in char_ranges:
        toks = [i for i, s in starts if c0 <= s < c1]
        if toks:
            spans.append((toks[0], toks[-1] + 1))
    return spans


def _need_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenizer must be a fast tokenizer (it must return an offset mapping); "
                         f"got {type(tokenizer).__name__} with is_fast={getattr(tokenizer, 'is_fast', None)}")


#: Paragraph separator of :func:`find_paragraphs`: a blank line.
DEFAULT_PARAGRAPH_SEPARATOR = r"\n[ \t]*\n"


def find_paragraphs(text: str, tokenizer, separator: str = DEFAULT_PARAGRAPH_SEPARATOR, *,
                    add_special_tokens: bool = True) -> List[Span]:
    """Token spans of the paragraphs (passages) of a document: the stretches of ``text`` between
    matches of ``separator`` (default: a blank line) that hold more than whitespace.

    Use them as ShotKV segments to keep or drop whole passages. Tokenization and the token-to-span
    rule are those of :func:`find_shots`; separators belong to no paragraph (they stay protected).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not isinstance(separator, str):
        raise TypeError(f"separator must be a str (a regular expression), got {type(separator).__name__}")
    try:
        regex = re.compile(separator)
    except re.error as exc:
        raise ValueError(f"separator is not a valid regular expression ({exc}): {separator!r}") from None
    if regex.fullmatch("") is not None:
        raise ValueError(f"separator must not match the empty string, got {separator!r}")
    _need_fast(tokenizer)
    ranges, cur = [], 0
    for m in list(regex.finditer(text)) + [None]:
        end = len(text) if m is None else m.start()
        piece = text[cur:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            ranges.append((cur + lead, cur + len(piece.rstrip())))
        if m is not None:
            cur = m.end()
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return _token_spans(enc["offset_mapping"], ranges)


class ChatSegments(NamedTuple):
    """A conversation rendered by the tokenizer's chat template, cut into segments.

    ``input_ids``: the prompt's token ids. ``turns``: token spans of the past turns, the segments a
    ShotKV-style method keeps or drops whole (pass them as ``shots``). ``system``: the span of the
    leading system message(s) or ``None``; ``current``: the span of the current turn (the last user
    message and everything after it, the generation prompt included). Neither is a segment, so ShotKV
    protects them, and the current turn, at the end of the prompt, is its observation window.
    """

    input_ids: List[int]
    turns: List[Span]
    system: Optional[Span]
    current: Span


def find_chat_turns(messages: Sequence[dict], tokenizer, *, unit: str = "exchange",
                    add_generation_prompt: bool = True, **template_kwargs) -> ChatSegments:
    """Render ``messages`` with ``tokenizer.apply_chat_template`` and find the token span of each turn.

    Each message's characters are found by rendering the conversation's prefixes (``messages[:i]``):
    the chat template must render a prefix of a conversation as a prefix of its text (the usual
    templates do; a ``ValueError`` says when one does not). Tokens are mapped to messages by their
    first character (:func:`find_shots`'s rule), with ``add_special_tokens=False`` (the template
    writes its own special tokens).

    Parameters
    ----------
    messages : list of ``{"role": ..., "content": ...}``
        The conversation; it must end with a user message (the current turn).
    tokenizer : a fast Hugging Face tokenizer with a chat template
    unit : {"exchange", "message"}
        ``"exchange"`` (default): a past turn is a user message with the assistant answer(s) after it;
        ``"message"``: every past message is its own segment.
    add_generation_prompt : bool
        Passed to the template (the assistant header after the last message).
    template_kwargs
        Other keywords of ``apply_chat_template`` (e.g. ``chat_template=``).
    """
    if unit not in ("exchange", "message"):
        raise ValueError(f"unit must be 'exchange' or 'message', got {unit!r}")
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages or \
            not all(isinstance(m, dict) and "role" in m for m in messages):
        raise TypeError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last message must be the current user turn, got role {messages[-1]['role']!r}")
    _need_fast(tokenizer)

    def render(msgs, gen):
        return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen, **template_kwargs)

    text = render(messages, add_generation_prompt)
    ends = []
    for i in range(1, len(messages)):
        prefix = render(messages[:i], False)
        if not text.startswith(prefix):
            raise ValueError(f"the chat template does not render the first {i} message(s) as a prefix of the whole "
                             "conversation, so turns cannot be located from it")
        ends.append(len(prefix))
    bounds = [0] + ends + [len(text)]
    n_sys = 0
    while n_sys < len(messages) and messages[n_sys]["role"] == "system":
        n_sys += 1
    groups: List[Tuple[int, int]] = []      # message index ranges of the past turns
    for i in range(n_sys, len(messages) - 1):
        if unit == "message" or messages[i]["role"] == "user" or not groups:
            groups.append((i, i + 1))
        else:
            groups[-1] = (groups[-1][0], i + 1)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    turns = _token_spans(offsets, [(bounds[a], bounds[b]) for a, b in groups])
    system = _token_spans(offsets, [(0, bounds[n_sys])]) if n_sys else []
    current = _token_spans(offsets, [(bounds[len(messages) - 1], len(text))])
    if not current:
        raise ValueError("the current turn renders to no token")
    return ChatSegments(list(enc["input_ids"]), turns, system[0] if system else None, current[0])


def validate_spans(spans, n_tokens: int, *, name: str = "shots") -> List[Span]:
    """Check and normalise one prompt's shot spans; return them sorted by start.

    Each span must be a pair of ints ``(start, end)`` with ``0 <= start < end <= n_tokens``, and no two
    spans may overlap (touching is fine: ``(0, 5), (5, 9)``). ``ValueError``/``TypeError`` name ``name``.
    """
    if isinstance(spans, (str, bytes)) or not isinstance(spans, Iterable):
        raise TypeError(f"{name} must be a list of (start, end) token spans, got {type(spans).__name__}")
    out: List[Span] = []
    for sp in spans:
        if hasattr(sp, "tolist"):
            sp = sp.tolist()
        if not isinstance(sp, (tuple, list)) or len(sp) != 2 or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in sp):
            raise TypeError(f"{name} must hold (start, end) pairs of ints, got {sp!r}")
        s, e = int(sp[0]), int(sp[1])
        if not (0 <= s < e <= n_tokens):
            raise ValueError(f"{name}: span ({s}, {e}) is out of range or empty for a prompt of {n_tokens} tokens "
                             f"(need 0 <= start < end <= {n_tokens})")
        out.append((s, e))
    out.sort()
    for (s0, e0), (s1, e1) in zip(out, out[1:]):
        if s1 < e0:
            raise ValueError(f"{name}: spans ({s0}, {e0}) and ({s1}, {e1}) overlap")
    return out


def normalize_batch_shots(shots, prompt_lengths: Sequence[int], *, name: str = "shots") -> Optional[List[List[Span]]]:
    """Per-sequence validated spans for a batch, or ``None`` when ``shots`` is ``None``.

    ``shots`` is either one list of spans (allowed only for a batch of one sequence) or a list with one
    list of spans per sequence. Spans index each prompt without its padding.
    """
    if shots is None:
        return None
    B = len(prompt_lengths)
    if isinstance(shots, (str, bytes)) or not isinstance(shots, Sequence):
        raise TypeError(f"{name} must be a list of (start, end) spans or one such list per sequence, "
                        f"got {type(shots).__name__}")
    flat = len(shots) == 0 or _is_span(shots[0])
    if flat:
        if B != 1:
            raise ValueError(f"{name} for a batch of {B} sequences must be a list of {B} span lists "
                             "(one per sequence, indices into each unpadded prompt)")
        per_seq = [shots]
    else:
        if len(shots) != B:
            raise ValueError(f"{name} must hold one span list per sequence: got {len(shots)} lists for a batch of {B}")
        per_seq = list(shots)
    return [validate_spans(s, int(n), name=f"{name}[{b}]" if not flat else name)
            for b, (s, n) in enumerate(zip(per_seq, prompt_lengths))]


def _is_span(x) -> bool:
    if hasattr(x, "tolist"):
        x = x.tolist()
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in x)
