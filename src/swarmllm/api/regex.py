"""Regular expressions of JSON schema `pattern`s, compiled to a small automaton over code points that a string's
recogniser steps one character at a time.

A pattern is read as ECMA-262 (JSON schema's dialect) and held to what reads the same in Python's `re`, which
validators such as `jsonschema` use: where the two disagree on a class (`\\d`, `\\w`, `\\s`, `.`), the class
admits only what both call a member, so a string it matches passes either. Supported: literals and escapes,
`.`, classes `[...]` (ranges, negation, `\\d \\w \\s` and their negations), groups `(...)`, `(?:...)`,
`(?<name>...)`, `(?P<name>...)`, `|`, the quantifiers `* + ? {n} {n,} {n,m}` (lazy ones too: the language is the
same) and `^`/`$` at the ends of a top-level alternative. Unanchored, a pattern may match anywhere in the string,
as JSON schema says. Back-references, look-arounds, word boundaries, flags and Unicode properties are refused
with a `RegexError` that says which.

The automaton (`Nfa`) has no empty moves: a state's edges are (code point ranges, next state), a set of states
is where a prefix can be, and states that cannot reach the end of a match are dropped, so a live set always has
a way on. Text reaches it as code points: `utf8_step` reads UTF-8 a byte at a time (every grammar's strings
use it), and `TextGrammar` holds a whole answer to a pattern (vLLM's `guided_regex` and `guided_choice`).
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

MAX_CODE = 0x10FFFF
MAX_STATES = 4000  # an automaton past this (counted repeats multiply) is refused
MAX_REPEAT = 1000

Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive code point ranges; never a surrogate
EVERYTHING: Ranges = ((0, 0xD7FF), (0xE000, MAX_CODE))
NOTHING: Ranges = ()


class RegexError(ValueError):
    """A pattern outside the supported subset, or one no string matches."""


def ranges(*pairs: tuple[int, int]) -> Ranges:
    """Sorted, merged, without surrogates (which UTF-8 text never holds)."""
    out: list[list[int]] = []
    for low, high in sorted(pairs):
        if out and low <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], high)
        else:
            out.append([low, high])
    return intersect(tuple((a, b) for a, b in out), EVERYTHING) if out else NOTHING


def union(a: Ranges, b: Ranges) -> Ranges:
    return ranges(*a, *b)


def intersect(a: Ranges, b: Ranges) -> Ranges:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        low, high = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if low <= high:
            out.append((low, high))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def complement(a: Ranges) -> Ranges:
    out, start = [], 0
    for low, high in a:
        if low > start:
            out.append((start, low - 1))
        start = high + 1
    if start <= MAX_CODE:
        out.append((start, MAX_CODE))
    return intersect(tuple(out), EVERYTHING)


def overlaps(a: Ranges, low: int, high: int) -> bool:
    """Whether any code point in [low, high] is in `a` (a binary search: \\W's ranges run to hundreds)."""
    first = bisect.bisect_left(a, low, key=lambda pair: pair[1])  # the first range that ends at low or after
    return first < len(a) and a[first][0] <= high


@functools.cache
def _python_class(test: str) -> Ranges:
    """The code points a predicate of `str` holds for, as ranges (Python's own idea of \\d, \\w or \\s)."""
    check = {"digit": str.isdecimal, "word": lambda c: c.isalnum() or c == "_", "space": str.isspace}[test]
    found, start = [], None
    for code in range(MAX_CODE + 2):
        inside = code <= MAX_CODE and not 0xD800 <= code <= 0xDFFF and check(chr(code))
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            found.append((start, code - 1))
            start = None
    return tuple(found)


ASCII_DIGIT = ranges((0x30, 0x39))
ASCII_WORD = ranges((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
ECMA_SPACE = ranges(
    (0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
    (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF),
)  # fmt: skip
LINE_ENDS = ranges((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029))


def _class_escape(letter: str) -> tuple[Ranges, Ranges]:
    """(what both dialects admit, what either admits) for \\d \\w \\s and their negations."""
    lower = letter.lower()
    ecma = {"d": ASCII_DIGIT, "w": ASCII_WORD, "s": ECMA_SPACE}[lower]
    python = _python_class({"d": "digit", "w": "word", "s": "space"}[lower])
    both, either = intersect(ecma, python), union(ecma, python)
    return (both, either) if letter == lower else (complement(either), complement(both))


# the syntax tree: ("chars", ranges) | ("cat", parts) | ("alt", parts) | ("rep", part, low, high or None)
SIMPLE_ESCAPES = {"t": 0x09, "n": 0x0A, "v": 0x0B, "f": 0x0C, "r": 0x0D, "0": 0x00}


class _Parser:
    def __init__(self, pattern: str):
        self.text, self.at = pattern, 0

    def peek(self) -> str | None:
        return self.text[self.at] if self.at < len(self.text) else None

    def take(self) -> str:
        char = self.peek()
        if char is None:
            raise RegexError(f"pattern {self.text!r}: ends too soon")
        self.at += 1
        return char

    def top(self, search: bool) -> tuple:
        """The whole pattern: each top-level alternative with its anchors, unanchored ends open to anything
        when it is searched for (else the whole text must match, anchored or not)."""
        alternatives = []
        while True:
            start = self.peek() == "^"
            self.at += start
            body, end = self.sequence(top=True)
            any_text = ("rep", ("chars", EVERYTHING), 0, None)
            before = [any_text] if search and not start else []
            after = [any_text] if search and not end else []
            alternatives.append(("cat", [*before, body, *after]))
            if self.peek() is None:
                return ("alt", alternatives)
            self.take()  # "|"

    def alternation(self) -> tuple:
        parts = [self.sequence()[0]]
        while self.peek() == "|":
            self.take()
            parts.append(self.sequence()[0])
        return ("alt", parts)

    def sequence(self, top: bool = False) -> tuple[tuple, bool]:
        """Atoms up to a "|" or ")" (or the end), and whether a "$" at the end of a top-level one anchors it."""
        parts = []
        while (char := self.peek()) is not None and char not in "|)":
            if char == "$" and top and self.text[self.at + 1 : self.at + 2] in ("", "|"):
                self.take()
                return ("cat", parts), True
            if char in "^$":
                raise RegexError(f"pattern {self.text!r}: {char!r} only at the start or end is supported")
            parts.append(self.quantified(self.atom()))
        if top and char == ")":
            raise RegexError(f"pattern {self.text!r}: unbalanced ')'")
        return ("cat", parts), False

    def atom(self) -> tuple:
        char = self.take()
        if char == "(":
            if self.text.startswith("?:", self.at):
                self.at += 2
            elif self.text.startswith("?<", self.at) or self.text.startswith("?P<", self.at):
                if self.text[self.at + 2 : self.at + 3] in ("=", "!"):
                    raise RegexError(f"pattern {self.text!r}: look-behind is not supported")
                self.at = self.text.index(">", self.at) + 1 if ">" in self.text[self.at :] else len(self.text)
            elif self.peek() == "?":
                raise RegexError(
                    f"pattern {self.text!r}: '(?' groups other than (?:...) and names are not supported"
                )
            inner = self.alternation()
            if self.peek() != ")":
                raise RegexError(f"pattern {self.text!r}: a group is not closed")
            self.take()
            return inner
        if char == "[":
            return ("chars", self.char_class())
        if char == ".":
            return ("chars", complement(LINE_ENDS))
        if char == "\\":
            both, _ = self.escape(in_class=False)
            return ("chars", both)
        if char in "*+?":
            raise RegexError(f"pattern {self.text!r}: {char!r} follows nothing")
        if char == "{":  # Python reads "{,n}" as a repeat and ECMA as text: a literal "{" must be escaped
            raise RegexError(
                f"pattern {self.text!r}: a '{{' that is not a repeat after something must be escaped"
            )
        return ("chars", ranges((ord(char), ord(char))))

    def escape(self, in_class: bool) -> tuple[Ranges, Ranges]:
        """After a backslash: (what both dialects admit, what either admits)."""
        char = self.take()
        if char in "dDwWsS":
            return _class_escape(char)
        if char == "b" and in_class:
            code = 0x08
        elif char in SIMPLE_ESCAPES and not (
            char == "0" and self.peek() is not None and self.peek().isdigit()
        ):
            code = SIMPLE_ESCAPES[char]
        elif char in "xu":
            width = 2 if char == "x" else 4
            digits = self.text[self.at : self.at + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise RegexError(f"pattern {self.text!r}: \\{char} needs {width} hex digits")
            self.at += width
            code = int(digits, 16)
        elif char.isalnum():
            raise RegexError(f"pattern {self.text!r}: the escape \\{char} is not supported")
        else:
            code = ord(char)
        single = ranges((code, code))
        return single, single

    def char_class(self) -> Ranges:
        negated = self.peek() == "^"
        self.at += negated
        if self.peek() == "]":
            raise RegexError(f"pattern {self.text!r}: an empty class '[]' or '[^]' is not supported")
        both: Ranges = NOTHING
        either: Ranges = NOTHING
        while (char := self.take()) != "]":
            if char == "\\":
                low_both, low_either = self.escape(in_class=True)
            else:
                low_both = low_either = ranges((ord(char), ord(char)))
            if self.peek() == "-" and self.text[self.at + 1 : self.at + 2] not in ("]", ""):
                self.take()
                high_char = self.take()
                high = self.escape(in_class=True)[0] if high_char == "\\" else ranges((ord(high_char),) * 2)
                if (
                    {len(low_both), len(high)} != {1}
                    or low_both[0][0] != low_both[0][1]
                    or high[0][0] != high[0][1]
                ):
                    raise RegexError(f"pattern {self.text!r}: a range's ends must be single characters")
                if high[0][0] < low_both[0][0]:
                    raise RegexError(f"pattern {self.text!r}: a range out of order")
                low_both = low_either = ranges((low_both[0][0], high[0][0]))
            both, either = union(both, low_both), union(either, low_either)
        return complement(either) if negated else both

    def _quantifier_ahead(self, at: int) -> tuple[int, int | None] | None:
        """The bounds of a `{n}`, `{n,}` or `{n,m}` at `at`, else None (a "{" that is a literal)."""
        end = self.text.find("}", at)
        if not self.text.startswith("{", at) or end < 0:
            return None
        low, comma, high = self.text[at + 1 : end].partition(",")
        if not _number(low) or (high and not _number(high)):
            return None
        return int(low), (int(high) if high else None) if comma else int(low)

    def quantified(self, atom: tuple) -> tuple:
        """An atom and its quantifier, if any (one: a second one is an error in both dialects)."""
        char = self.peek()
        if char in ("*", "+", "?"):
            self.take()
            low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
        elif char == "{" and (bounds := self._quantifier_ahead(self.at)) is not None:
            self.at = self.text.index("}", self.at) + 1
            low, high = bounds
            if max(low, high or 0) > MAX_REPEAT or (high is not None and high < low):
                raise RegexError(f"pattern {self.text!r}: repeat counts out of order or above {MAX_REPEAT}")
        else:
            return atom
        if self.peek() == "?":
            self.take()  # lazy: the same language
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self._quantifier_ahead(self.at)):
            raise RegexError(f"pattern {self.text!r}: a quantifier follows a quantifier")
        return ("rep", atom, low, high)


def _number(text: str) -> bool:
    return text.isascii() and text.isdigit()


UTF8_LENGTHS = {0b110: 2, 0b1110: 3, 0b1111: 4}  # a lead byte's top 3 (from 0xE0: 4) bits -> its length
UTF8_LEAST = {2: 0x80, 3: 0x800, 4: 0x10000}  # below these a shorter sequence writes the character: overlong
Utf8 = tuple[int, int, int]  # (the bits so far, bytes still to come, the sequence's length)


def utf8_step(pending: Utf8 | None, byte: int) -> Utf8 | None:
    """One byte of a UTF-8 character: from None a lead byte, else a continuation. The result is whole when no
    byte is still to come (its bits are then the code point); None if the byte cannot come here, or if no
    character is left that the sequence can still be (overlong, a surrogate, past U+10FFFF)."""
    if pending is None:
        length = UTF8_LENGTHS.get(byte >> 4 if byte >= 0xE0 else byte >> 5)
        if length is None or byte in (0xC0, 0xC1) or byte > 0xF4:
            return None
        pending = (byte & (0x7F >> length), length - 1, length)
    elif 0x80 <= byte <= 0xBF and pending[1]:
        bits, left, length = pending
        pending = ((bits << 6) | (byte & 0x3F), left - 1, length)
    else:
        return None
    low, high = utf8_span(pending)
    if low > high or (0xD800 <= low and high <= 0xDFFF):
        return None
    return pending


def utf8_span(pending: Utf8) -> tuple[int, int]:
    """The least and greatest code points a sequence begun so can still become."""
    bits, left, length = pending
    low = max(bits << (6 * left), UTF8_LEAST[length])
    return low, min((bits << (6 * left)) | ((1 << (6 * left)) - 1), 0x10FFFF)


@dataclass(frozen=True)
class Nfa:
    """edges[s]: ((ranges, next state), ...); states that cannot reach `accepting` are gone."""

    edges: tuple[tuple[tuple[Ranges, int], ...], ...]
    accepting: frozenset[int]
    start: frozenset[int]

    def step(self, states: frozenset[int], code: int) -> frozenset[int]:
        return frozenset(t for s in states for chars, t in self.edges[s] if overlaps(chars, code, code))

    def matches(self, text: str) -> bool:
        states = self.start
        for char in text:
            states = self.step(states, ord(char))
        return bool(states & self.accepting)


class _Builder:
    """Thompson's construction (with empty moves), then the empty moves folded into the edges."""

    def __init__(self):
        self.chars: list[list[tuple[Ranges, int]]] = []
        self.empty: list[list[int]] = []

    def state(self) -> int:
        if len(self.chars) >= MAX_STATES:
            raise RegexError(f"the pattern's automaton has more than {MAX_STATES} states")
        self.chars.append([])
        self.empty.append([])
        return len(self.chars) - 1

    def build(self, node: tuple) -> tuple[int, int]:
        kind = node[0]
        start, end = self.state(), self.state()
        if kind == "chars":
            if node[1]:
                self.chars[start].append((node[1], end))
        elif kind == "cat":
            at = start
            for part in node[1]:
                a, b = self.build(part)
                self.empty[at].append(a)
                at = b
            self.empty[at].append(end)
        elif kind == "alt":
            for part in node[1]:
                a, b = self.build(part)
                self.empty[start].append(a)
                self.empty[b].append(end)
        else:  # rep
            _, part, low, high = node
            at = start
            for _ in range(low):
                a, b = self.build(part)
                self.empty[at].append(a)
                at = b
            if high is None:
                a, b = self.build(part)
                self.empty[at] += [a, end]
                self.empty[b] += [a, end]
            else:
                for _ in range(high - low):
                    a, b = self.build(part)
                    self.empty[at] += [a, end]
                    at = b
            self.empty[at].append(end)
        return start, end

    def closure(self, state: int) -> set[int]:
        seen, todo = {state}, [state]
        while todo:
            for t in self.empty[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return seen

    def nfa(self, start: int, end: int) -> Nfa:
        # the states kept: the start and each edge's target; a state's edges are those of its closure
        kept, todo, edges, accepting = {start: 0}, [start], [], set()
        while todo:
            state = todo.pop(0)
            merged: dict[int, Ranges] = {}
            closure = self.closure(state)
            for s in closure:
                for chars, target in self.chars[s]:
                    if target not in kept:
                        kept[target] = len(kept)
                        todo.append(target)
                    merged[kept[target]] = union(merged.get(kept[target], NOTHING), chars)
            edges.append(merged)
            if end in closure:
                accepting.add(kept[state])
        # drop what cannot reach an accepting state
        alive, grew = set(accepting), True
        while grew:
            grew = False
            for s, out in enumerate(edges):
                if s not in alive and any(t in alive for t in out):
                    alive.add(s)
                    grew = True
        if 0 not in alive:
            raise RegexError("the pattern matches no string that JSON text can hold")
        number = {s: i for i, s in enumerate(sorted(alive))}
        return Nfa(
            tuple(
                tuple((chars, number[t]) for t, chars in sorted(edges[s].items()) if t in alive)
                for s in sorted(alive)
            ),
            frozenset(number[s] for s in accepting),
            frozenset({0}),
        )


@functools.lru_cache(maxsize=64)
def compile_regex(pattern: str, search: bool = True) -> Nfa:
    """A pattern as an automaton of the whole string: searched for anywhere unless anchored, as a JSON schema
    `pattern` is (`search`), or matching the whole text, as vLLM's `guided_regex` does."""
    builder = _Builder()
    start, end = builder.build(_Parser(pattern).top(search))
    return builder.nfa(start, end)


def literal(text: str) -> str:
    """A pattern that matches `text` itself."""
    return "".join("\\" + char if char.isascii() and not char.isalnum() else char for char in text)


class TextGrammar:
    """A regular expression over the whole answer, as a byte-level grammar (json_mode's `Grammar`): a state is
    (the automaton's live states, a UTF-8 sequence begun or None). vLLM's `guided_regex` and `guided_choice`."""

    def __init__(self, nfa: Nfa):
        self.nfa = nfa
        self.start = (nfa.start, None)

    def advance(self, state: tuple, byte: int) -> tuple | None:
        states, pending = state
        if pending is None and byte < 0x80:
            following = self.nfa.step(states, byte)
            return (following, None) if following else None
        pending = utf8_step(pending, byte)
        if pending is None:
            return None
        bits, left, _ = pending
        if not left:
            following = self.nfa.step(states, bits)
            return (following, None) if following else None
        low, high = utf8_span(pending)
        live = any(overlaps(chars, low, high) for s in states for chars, _ in self.nfa.edges[s])
        return (states, pending) if live else None

    def complete(self, state: tuple | None) -> bool:
        return state is not None and state[1] is None and bool(state[0] & self.nfa.accepting)

    @staticmethod
    def mask_key(state: tuple, reach: int) -> tuple:
        return state
