"""Client-supplied regular expressions in a LoRA config, matched with PEFT's semantics in bounded time.

PEFT matches `target_modules` (a string), `exclude_modules` (a string), `layers_pattern` and the keys of
`rank_pattern` / `alpha_pattern` with Python's `re`, whose backtracking can take exponential time while it
holds the GIL: one 10-character pattern can freeze the whole server. Here each pattern

1. is at most MAX_PATTERN_CHARS characters;
2. is parsed by Python's own `re` parser, so exactly the patterns PEFT accepts are accepted, with PEFT's
   meaning, and its counted repetitions may expand to at most MAX_PATTERN_SIZE elements (`regex` compiles
   `a{1000000}` into a million of them);
3. is written back from that parse in an unambiguous syntax (every literal as `\\uXXXX`) and compiled by
   the `regex` package, which reads some `re` literals otherwise (`x{e<=1}` is a fuzzy match there);
4. is matched with `concurrent=True` (the GIL is released while it runs) and a deadline: all the matching
   for one adapter shares MATCH_BUDGET_S seconds of wall-clock time.

A pattern that is too long, invalid or too slow is `InvalidArgument` naming the option.
"""

import re
import sys
import time

import regex

from quiver.adapters.config_values import ConfigValues

if sys.version_info >= (3, 11):
    from re import _parser as sre
else:  # pragma: no cover - the module's older name
    import sre_parse as sre

MAX_PATTERN_CHARS = 2048  # PEFT's own regexes, and tools' generated ones, are well under 1,000
MAX_PATTERN_SIZE = 10_000  # elements after expanding counted repetitions
MATCH_BUDGET_S = 2.0  # one adapter's matching; a real one needs milliseconds

_FLAGS = {"i": sre.SRE_FLAG_IGNORECASE, "m": sre.SRE_FLAG_MULTILINE, "s": sre.SRE_FLAG_DOTALL, "a": sre.SRE_FLAG_ASCII}
_REGEX_FLAGS = {sre.SRE_FLAG_IGNORECASE: regex.IGNORECASE, sre.SRE_FLAG_MULTILINE: regex.MULTILINE,
                sre.SRE_FLAG_DOTALL: regex.DOTALL, sre.SRE_FLAG_ASCII: regex.ASCII}
_CATEGORIES = {sre.CATEGORY_DIGIT: r"\d", sre.CATEGORY_NOT_DIGIT: r"\D", sre.CATEGORY_SPACE: r"\s",
               sre.CATEGORY_NOT_SPACE: r"\S", sre.CATEGORY_WORD: r"\w", sre.CATEGORY_NOT_WORD: r"\W"}
_ANCHORS = {sre.AT_BEGINNING: "^", sre.AT_BEGINNING_STRING: r"\A", sre.AT_END: "$", sre.AT_END_STRING: r"\Z",
            sre.AT_BOUNDARY: r"\b", sre.AT_NON_BOUNDARY: r"\B"}
_REPEATS = {sre.MAX_REPEAT: "", sre.MIN_REPEAT: "?"} | (
    {sre.POSSESSIVE_REPEAT: "+"} if hasattr(sre, "POSSESSIVE_REPEAT") else {}
)


class _TooBig(Exception):
    pass


class BoundedPatterns:
    """The patterns of one adapter config, compiled once each, matched under one shared deadline."""

    def __init__(self, config: ConfigValues, *, budget_s: float | None = None) -> None:
        """`budget_s`: the time all matching may take (None: MATCH_BUDGET_S)."""
        self.config = config
        self._budget_s = MATCH_BUDGET_S if budget_s is None else budget_s
        self._deadline = time.monotonic() + self._budget_s
        self._compiled: dict[str, regex.Pattern] = {}

    def fullmatch(self, option: str, pattern: str, name: str) -> bool:
        """`re.fullmatch(pattern, name)`, in bounded time."""
        return self._run(option, pattern, name, whole=True) is not None

    def match(self, option: str, pattern: str, name: str) -> regex.Match | None:
        """`re.match(pattern, name)`, in bounded time."""
        return self._run(option, pattern, name, whole=False)

    def _run(self, option: str, pattern: str, name: str, *, whole: bool) -> regex.Match | None:
        compiled = self._compile(option, pattern)
        run = compiled.fullmatch if whole else compiled.match
        while True:  # `regex` times out on the process's CPU time, which other threads also spend: try again
            left = self._left(option)  # until the wall-clock budget is spent
            try:
                return run(name, timeout=left, concurrent=True)
            except TimeoutError:
                continue

    def _compile(self, option: str, pattern: str) -> regex.Pattern:
        compiled = self._compiled.get(pattern)
        if compiled is None:
            self._left(option)
            compiled = self._compiled[pattern] = _compile(pattern, refuse=lambda why: self.config.refuse(
                f"{option} holds {_quote(pattern)}, which {why}"))
        return compiled

    def _left(self, option: str) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self._too_slow(option)
        return left

    def _too_slow(self, option: str):
        return self.config.refuse(
            f"{option}: matching this config's patterns against the model's module names took longer than "
            f"{self._budget_s:g} s (a pattern that backtracks too much?); simplify them or list the modules"
        )


def _compile(pattern: str, *, refuse) -> regex.Pattern:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise refuse(f"is longer than {MAX_PATTERN_CHARS} characters")
    try:
        parsed = sre.parse(pattern)
        re.compile(pattern)  # the checks the parser leaves to the compiler
        text = _write(parsed, _group_names(parsed.state.groupdict), budget=[MAX_PATTERN_SIZE])
    except RecursionError:
        raise refuse("is nested too deeply") from None
    except _TooBig:
        raise refuse(f"expands to more than {MAX_PATTERN_SIZE} elements (counted repetitions)") from None
    except (re.error, OverflowError, ValueError) as e:
        raise refuse(f"is not a valid regular expression ({e})") from None
    flags = regex.VERSION0
    for sre_flag, regex_flag in _REGEX_FLAGS.items():
        if parsed.state.flags & sre_flag:
            flags |= regex_flag
    try:
        return regex.compile(text, flags=flags)
    except regex.error as e:  # no pattern of `re`'s is known to get here
        raise refuse(f"cannot be matched in bounded time ({e})") from None


def _group_names(groupdict: dict[str, int]) -> dict[int, str]:
    return {index: name for name, index in groupdict.items()}


def _write(items, names: dict[int, str], *, budget: list[int]) -> str:
    """`items` (a parsed `re` pattern) in `regex` syntax. `budget[0]` counts down the elements left; a
    repetition of n (n >= 1 times, at least) counts its body n times."""
    out = []
    for op, av in items:
        budget[0] -= 1
        if budget[0] < 0:
            raise _TooBig
        if op is sre.LITERAL:
            out.append(_char(av))
        elif op is sre.NOT_LITERAL:
            out.append(f"[^{_char(av)}]")
        elif op is sre.ANY:
            out.append(".")
        elif op is sre.IN:
            out.append(_class(av))
        elif op is sre.AT:
            out.append(_ANCHORS[av])
        elif op in _REPEATS:
            low, high, body = av
            saved = budget[0]
            inner = _write(body, names, budget=budget)
            budget[0] = saved - (saved - budget[0]) * max(low, 1)
            if budget[0] < 0:
                raise _TooBig
            count = f"{{{low}}}" if low == high else f"{{{low},{'' if high == sre.MAXREPEAT else high}}}"
            out.append(f"(?:{inner}){count}{_REPEATS[op]}")
        elif op is sre.SUBPATTERN:
            group, add, remove, body = av
            inner = _write(body, names, budget=budget)
            if group is not None:
                out.append(f"(?P<{names[group]}>{inner})" if group in names else f"({inner})")
            else:
                on, off = _letters(add), _letters(remove)
                out.append(f"(?{on}-{off}:{inner})" if off else f"(?{on}:{inner})")
        elif op is sre.BRANCH:
            out.append("(?:" + "|".join(_write(b, names, budget=budget) for b in av[1]) + ")")
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            direction, body = av
            sign = ("=" if op is sre.ASSERT else "!")
            out.append(f"(?{'<' if direction < 0 else ''}{sign}{_write(body, names, budget=budget)})")
        elif op is sre.GROUPREF:
            out.append(f"\\g<{av}>")
        elif op is sre.GROUPREF_EXISTS:
            group, yes, no = av
            no_text = "" if no is None else "|" + _write(no, names, budget=budget)
            out.append(f"(?({group}){_write(yes, names, budget=budget)}{no_text})")
        elif op is getattr(sre, "ATOMIC_GROUP", None):
            out.append(f"(?>{_write(av, names, budget=budget)})")
        else:
            raise ValueError(f"unsupported construct {op}")
    return "".join(out)


def _class(items) -> str:
    parts = []
    for op, av in items:
        if op is sre.NEGATE:
            parts.append("^")
        elif op is sre.LITERAL:
            parts.append(_char(av))
        elif op is sre.RANGE:
            parts.append(f"{_char(av[0])}-{_char(av[1])}")
        elif op is sre.CATEGORY:
            parts.append(_CATEGORIES[av])
        else:
            raise ValueError(f"unsupported construct {op} in a character class")
    return "[" + "".join(parts) + "]"


def _char(code: int) -> str:
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _letters(flags: int) -> str:
    return "".join(letter for letter, bit in _FLAGS.items() if flags & bit)


def _quote(pattern: str, limit: int = 80) -> str:
    return repr(pattern) if len(pattern) <= limit else repr(pattern[:limit]) + "…"
