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
from typing import Iterable, List, Optional, Sequence, Tuple, Union

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
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenizer must be a fast tokenizer (it must return an offset mapping); "
                         f"got {type(tokenizer).__name__} with is_fast={getattr(tokenizer, 'is_fast', None)}")
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    # a token's anchor is its first character; empty-offset (special) tokens have none
    starts = [(i, s) for i, (s, e) in enumerate(offsets) if e > s]
    spans: List[Span] = []
    for m in regex.finditer(text):
        toks = [i for i, s in starts if m.start() <= s < m.end()]
        if toks:
            spans.append((toks[0], toks[-1] + 1))
    return spans


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
