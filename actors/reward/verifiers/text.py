"""Text verifiers: ``exact_match``, ``regex``, ``format`` and ``length``.

Inputs of every reward function: ``prompts``, ``completions`` (lists of str)
and metadata lists aligned with them (``answer`` where a verifier compares);
output: one float per sample.

Normalisation (``normalize``, ``same_answer``), used by ``exact_match`` and by
``regex``'s ``answer`` group: strip, collapse internal whitespace to one space,
case-fold, drop one trailing period. Two normalised strings that are both plain
decimal numbers (optional sign, digits with optional correctly grouped
thousands commas, optional fraction) compare as numbers, exactly
(``"1,000" == "1000"``, ``"42.0" == "42"``), unless either has a leading zero
(``"0123"`` is a digit string, not 123: it must equal ``"0123"``; ``"0.5"`` is
fine). Everything else compares as the normalised string.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from actors.validation import ConfigError, require

_NUMBER = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")


def normalize(text: str) -> str:
    """Stripped, whitespace runs collapsed to one space, case-folded, one trailing period dropped."""
    s = " ".join(str(text).split()).casefold()
    return s[:-1].rstrip() if s.endswith(".") else s


def as_number(text: str) -> Decimal | None:
    """The value of a normalised plain decimal number, None if ``text`` is not one or has a
    leading zero (``"007"``, ``"0,123"``: digit strings, compared as strings)."""
    if not _NUMBER.fullmatch(text):
        return None
    digits = text.lstrip("+-").replace(",", "")
    integer = digits.partition(".")[0]
    if len(integer) > 1 and integer.startswith("0"):
        return None
    try:
        return Decimal(digits) if not text.startswith("-") else -Decimal(digits)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
        return None


def same_answer(given: str, answer) -> bool:
    """True if ``given`` equals ``answer`` after ``normalize`` (numbers by value, see the module
    docstring). A missing answer (None) never matches."""
    if answer is None:
        return False
    a, b = normalize(given), normalize(answer)
    if a == b:
        return True
    x, y = as_number(a), as_number(b)
    return x is not None and y is not None and x == y


def exact_match(prompts: list[str], completions: list[str], *, answer: list[str], **_) -> list[float]:
    """1.0 per sample whose completion equals its ``answer`` (``same_answer``), else 0.0."""
    return [1.0 if same_answer(c, a) else 0.0 for c, a in zip(completions, answer)]


class Regex:
    """``regex``: 1.0 if ``pattern`` (a Python regex, DOTALL, ``re.search``) matches the completion.

    If the pattern has a group named ``answer``, the group's text must also equal the
    sample's ``answer`` metadata (``same_answer``). ``re.search`` takes the first match;
    anchor the pattern (``#### (?P<answer>\\S+)\\s*$``) to judge the last one.
    """

    def __init__(self, *, pattern: str):
        require(isinstance(pattern, str) and pattern != "", "pattern", f"a non-empty regex string, got {pattern!r}")
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except re.error as e:
            raise ConfigError(f"pattern: invalid regular expression {pattern!r}: {e}") from None
        self.checks_answer = "answer" in self.regex.groupindex

    def __call__(self, prompts: list[str], completions: list[str], *, answer: list | None = None,
                 **_) -> list[float]:
        if self.checks_answer and answer is None:
            raise ValueError("regex: the pattern has an 'answer' group but the prompts have no 'answer' metadata")
        answers = answer if answer is not None else [None] * len(completions)
        return [self._one(c, a) for c, a in zip(completions, answers)]

    def _one(self, completion: str, answer) -> float:
        m = self.regex.search(completion)
        if m is None:
            return 0.0
        if not self.checks_answer:
            return 1.0
        got = m.group("answer")
        return 1.0 if got is not None and same_answer(got, answer) else 0.0


DEFAULT_TEMPLATE = "<think>…</think><answer>…</answer>"


def template_regex(template: str) -> re.Pattern:
    """The regex of a ``format`` template: ``…`` is any text (newlines too), the rest literal;
    whitespace in the template and between adjacent tags (``><``) matches any whitespace or none,
    as does whitespace before and after the whole completion."""
    literals = [_literal(part) for part in template.split("…")]
    return re.compile(r"\s*" + "(?:.*?)".join(literals) + r"\s*", re.DOTALL)


def _literal(text: str) -> str:
    return r"\s*".join(re.escape(word).replace("><", r">\s*<") for word in text.split())


class Format:
    """``format``: 1.0 if the whole completion has the shape of ``template`` (see ``template_regex``),
    else 0.0. Default: ``<think>…</think><answer>…</answer>``."""

    def __init__(self, *, template: str = DEFAULT_TEMPLATE):
        require(isinstance(template, str) and template.strip() != "", "template",
                f"a non-empty string, got {template!r}")
        self.regex = template_regex(template)

    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        return [1.0 if self.regex.fullmatch(c) else 0.0 for c in completions]


class Length:
    """``length``: a length penalty. 0.0 up to ``max_chars`` characters, then linearly down to
    -1.0 at ``max_chars + penalty_chars`` characters, and -1.0 beyond."""

    def __init__(self, *, max_chars: int = 1000, penalty_chars: int = 1000):
        require(_is_int(max_chars) and max_chars >= 0, "max_chars", f"an integer >= 0, got {max_chars!r}")
        require(_is_int(penalty_chars) and penalty_chars >= 1, "penalty_chars",
                f"an integer >= 1, got {penalty_chars!r}")
        self.max_chars, self.penalty_chars = max_chars, penalty_chars

    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        return [self.penalty(len(c)) for c in completions]

    def penalty(self, chars: int) -> float:
        over = chars - self.max_chars
        return 0.0 if over <= 0 else -min(1.0, over / self.penalty_chars)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

