"""What a JSON schema asks of one string or number beyond its type: `minLength`, `maxLength`, `pattern` and
`format` (`StringRule`), and `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum` and a whole
`multipleOf` (`NumberBounds`).

Each answers what json_schema.py's recogniser needs byte by byte: whether the text so far can still become a
value that holds, and whether it holds now. A prefix that cannot is cut at once, so a constrained answer never
writes itself into a corner (a date whose month is 13, a number that has already passed its maximum).

Strings are read as characters (code points, as JSON schema counts `minLength`): a character is one UTF-8
sequence or one two-byte escape (`\\n`, `\\"`, ...); `\\u` escapes are not written in a constrained string, so
what the answer can be is a subset of what the schema admits, as elsewhere. Numbers with bounds are written
without an exponent, and compared as decimals, exactly (however many digits). A validator reads a number with a
fraction as the nearest float, so, unless the value must be an integer, each bound is first moved in to the float
nearest it on its inside: a number a float's step within an exclusive bound would read as the bound itself
(bounds with no float between them leave integers, written as such, which a validator compares exactly).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal, InvalidOperation, localcontext

from swarmllm.api.regex import EVERYTHING, Nfa, RegexError, compile_regex, intersect, overlaps, ranges

EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)  # sums of the numbers written, unrounded
MAX_TABLE = 400_000  # automaton states x lengths followed; a pattern with a huge maxLength past it is refused

_YEAR = r"(?:[1-9]\d{3}|0[1-9]\d{2}|00[1-9]\d|000[1-9])"
_LEAP_YEAR = r"(?:\d{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (
    rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
    rf"|02-(?:0[1-9]|1\d|2[0-8]))|{_LEAP_YEAR}-02-29)"
)
_TIME = r"(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
# a hostname's label: up to 63 letters, digits and hyphens, no hyphen at either end, nor at both the third and
# the fourth place (IDNA keeps "ab--" for its own labels)
_LABEL = (
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]?[A-Za-z0-9])?|[A-Za-z0-9][A-Za-z0-9-]"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,59}[A-Za-z0-9])?|-[A-Za-z0-9](?:[A-Za-z0-9-]{0,58}[A-Za-z0-9])?))"
)
_N = r"\d{1,6}"  # a duration's component: up to 6 digits, which Python's timedelta holds whatever the unit
_DURATION_TIME = rf"T(?:{_N}H(?:{_N}M)?(?:{_N}S)?|{_N}M(?:{_N}S)?|{_N}S)"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# format -> (anchored pattern, the longest string it may be): what a value of that format is written as
FORMATS: dict[str, tuple[str, int | None]] = {
    "date": (rf"^{_DATE}$", None),
    "time": (rf"^{_TIME}$", None),
    "date-time": (rf"^{_DATE}T{_TIME}$", None),
    "duration": (
        rf"^P(?:(?:{_N}Y(?:{_N}M)?(?:{_N}D)?|{_N}M(?:{_N}D)?|{_N}D)(?:{_DURATION_TIME})?|{_DURATION_TIME}|{_N}W)$",
        None,
    ),
    "uuid": (r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$", None),
    "ipv4": (rf"^{_OCTET}(?:\.{_OCTET}){{3}}$", None),
    "hostname": (rf"^{_LABEL}(?:\.{_LABEL})*$", 253),
    "email": (rf"^[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*@(?:{_LABEL}\.)+[A-Za-z]{{2,63}}$", 254),
    "uri": (r"^[A-Za-z][A-Za-z0-9+.-]*:(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+$", None),
}
# what a held string can write: no control character but those with a two-byte escape (\\b \\t \\n \\f \\r)
WRITABLE = ranges((0x08, 0x0A), (0x0C, 0x0D), (0x20, 0x10FFFF))
ANY_TEXT = Nfa((((EVERYTHING, 0),),), frozenset({0}), frozenset({0}))  # one state: any character, any length


@dataclass(frozen=True, eq=False)
class StringRule:
    """A string's automaton with its length bounds. `alive[i]`: the states from which, with i characters
    written (i capped at `low` when there is no `high`), a whole value can still be reached."""

    nfa: Nfa
    low: int
    high: int | None
    alive: tuple[frozenset[int], ...]
    plateau: tuple[int, int] = (0, -1)  # the longest run of counts alike (same live states, same side of low)

    @classmethod
    def build(cls, pattern: str | None, format_name: str | None, low: int, high: int | None) -> StringRule:
        if pattern is not None and format_name is not None:
            raise ValueError("'pattern' beside 'format' is not supported")
        if format_name is not None:
            if format_name not in FORMATS:
                raise ValueError(
                    f"the format {format_name!r} is not supported (supported: {', '.join(FORMATS)})"
                )
            pattern, longest = FORMATS[format_name]
            high = longest if high is None else high if longest is None else min(high, longest)
        try:
            nfa = ANY_TEXT if pattern is None else _writable(compile_regex(pattern))
        except RegexError as error:
            raise ValueError(str(error)) from None
        cap = low if high is None else high
        if len(nfa.edges) * (cap + 1) > MAX_TABLE:
            raise ValueError("the pattern's automaton times the length bounds is too large")
        # alive at count c: accepting and within bounds, or an edge to a state alive at the next count
        alive: list[frozenset[int]] = [frozenset()] * (cap + 1)
        for count in range(cap, -1, -1):
            if high is None and count == cap:  # lengths from `low` on: reachability of an accepting state
                states, grew = set(nfa.accepting), True
                while grew:
                    grew = False
                    for s, edges in enumerate(nfa.edges):
                        if s not in states and any(t in states for _, t in edges):
                            states.add(s)
                            grew = True
            else:
                ahead = alive[count + 1] if count < cap else frozenset()
                states = {s for s, edges in enumerate(nfa.edges) if any(t in ahead for _, t in edges)}
                if count >= low:
                    states |= nfa.accepting
            alive[count] = frozenset(states)
        runs: list[tuple[int, int]] = []  # [first, last] counts of each run of alike counts
        for count in range(cap + 1):
            if runs and (alive[count], count >= low) == (alive[runs[-1][0]], runs[-1][0] >= low):
                runs[-1] = (runs[-1][0], count)
            else:
                runs.append((count, count))
        plateau = max(runs, key=lambda run: run[1] - run[0]) if high is not None else (0, -1)
        rule = cls(nfa, low, high, tuple(alive), plateau)
        if not rule.start:
            raise ValueError("no string holds to the pattern or format within the length bounds")
        return rule

    @property
    def start(self) -> frozenset[int]:
        return self.nfa.start & self.alive[0]

    def _alive_at(self, count: int) -> frozenset[int]:
        if self.high is not None and count > self.high:
            return frozenset()
        return self.alive[min(count, len(self.alive) - 1)]

    def may_take(self, states: frozenset[int], count: int, low: int, high: int) -> bool:
        """Whether a character with a code point in [low, high] can come next."""
        ahead = self._alive_at(count + 1)
        return any(
            t in ahead and overlaps(chars, low, high) for s in states for chars, t in self.nfa.edges[s]
        )

    def take(self, states: frozenset[int], count: int, code: int) -> frozenset[int] | None:
        """The live states after one more character, or None."""
        ahead = self._alive_at(count + 1)
        following = frozenset(
            t for s in states for chars, t in self.nfa.edges[s] if t in ahead and overlaps(chars, code, code)
        )
        return following or None

    def counted(self, count: int) -> int:
        """The count after one more character: it stops at `low` when there is no `high`, where more makes no
        difference, so a long string's states repeat (and its masks are cached)."""
        return count + 1 if self.high is not None else min(count + 1, self.low)

    def key_count(self, count: int, reach: int) -> int:
        """The count a mask is cached under: within the plateau, at least `reach` characters from its end, any
        count takes the next `reach` characters as its first one does (a long `maxLength` would otherwise make
        each character a state of its own, and each token a walk of the vocabulary)."""
        first, last = self.plateau
        return first if first <= count <= last - reach else count

    def may_end(self, states: frozenset[int], count: int) -> bool:
        return count >= self.low and bool(states & self.nfa.accepting)


def _writable(nfa: Nfa) -> Nfa:
    """The automaton's edges cut to what a held string can write (a state left without a way to the end is then
    not alive in the rule)."""
    edges = tuple(
        tuple((chars, t) for chars, t in ((intersect(chars, WRITABLE), t) for chars, t in out) if chars)
        for out in nfa.edges
    )
    return Nfa(edges, nfa.accepting, nfa.start)


def _decimal(value, name: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name!r} must be a number")
    try:
        number = Decimal(value)  # a float's exact value: what Python compares an int written with
    except InvalidOperation:
        raise ValueError(f"{name!r} must be a finite number") from None
    if not number.is_finite():
        raise ValueError(f"{name!r} must be a finite number")
    return number


@dataclass(frozen=True)
class NumberBounds:
    """A number's (or an integer's) bounds, None for no bound on that side, and the integer it must be a
    multiple of (`multipleOf`), if any: a number with one is written as an integer (only a whole `multipleOf`
    is supported: validators divide floats, and disagree on 0.3 / 0.1)."""

    low: Decimal | None
    low_open: bool
    high: Decimal | None
    high_open: bool
    integer: bool
    step: int | None = None

    @classmethod
    def build(cls, schema: dict, integer: bool) -> NumberBounds:
        step = schema.get("multipleOf")
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, int | float) or not step > 0:
                raise ValueError("'multipleOf' must be a number above 0")
            if step != int(step):
                raise ValueError("'multipleOf' must be a whole number (a fraction is not supported)")
            step, integer = int(step), True
        bounds = {}
        for name in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
            if name in schema:
                bounds[name] = _decimal(schema[name], name)
        low, low_open = bounds.get("minimum"), False
        if "exclusiveMinimum" in bounds and (low is None or bounds["exclusiveMinimum"] >= low):
            low, low_open = bounds["exclusiveMinimum"], True
        high, high_open = bounds.get("maximum"), False
        if "exclusiveMaximum" in bounds and (high is None or bounds["exclusiveMaximum"] <= high):
            high, high_open = bounds["exclusiveMaximum"], True
        rule = cls(low, low_open, high, high_open, integer, step)
        if not integer:  # a float within the bounds, else an integer (between floats a float's step apart)
            floats = cls(*_inside_float(low, low_open, 1), *_inside_float(high, high_open, -1), False)
            rule = floats if floats._admits_any() else cls(low, low_open, high, high_open, True)
        if not rule._admits_any():
            raise ValueError("no number lies within the bounds")
        return rule

    def _admits_any(self) -> bool:
        return any(
            self.admits(start) for start in (b"-", b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9")
        )

    def holds(self, text: bytes) -> bool:
        """Whether the whole number written is within the bounds."""
        value = Decimal(text.decode())
        if self.step is not None and int(value) % self.step:  # (written as an integer: exact)
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def admits(self, text: bytes) -> bool:
        """Whether some number written with `text` as its start (no exponent) is within the bounds."""
        with localcontext(EXACT):
            return self._admits(text)

    def _admits(self, text: bytes) -> bool:
        negative, magnitude = text.startswith(b"-"), text.lstrip(b"-").decode()
        # the magnitudes starting that way: half-open intervals [a, b), b None for no end
        if not magnitude:
            spans = [(Decimal(0), None)]
        elif "." in magnitude:
            whole, _, fraction = magnitude.partition(".")
            start = Decimal(f"{whole}.{fraction or 0}")
            spans = [(start, start + Decimal(1).scaleb(-len(fraction)))]
        elif magnitude == "0":
            spans = [(Decimal(0), Decimal(1))]
        else:
            spans = self._digit_spans(int(magnitude), negative)
        return any(self._meets(a, b, negative) for a, b in spans)

    def _digit_spans(self, digits: int, negative: bool) -> list[tuple[Decimal, Decimal | None]]:
        """[d * 10^k, (d + 1) * 10^k) for each k up to where the bound on that side ends them all."""
        far = self.low if negative else self.high
        if far is None:
            return [(Decimal(digits), None)]  # some k reaches past any bound on the other side
        spans, k = [], 0
        while Decimal(digits).scaleb(k) <= abs(far) + 1:
            spans.append((Decimal(digits).scaleb(k), Decimal(digits + 1).scaleb(k)))
            k += 1
        return spans  # (none: every number from there is past the bound)

    def _meets(self, a: Decimal, b: Decimal | None, negative: bool) -> bool:
        """Whether the magnitudes [a, b) (values -(a..b] when negative) meet the bounds."""
        if negative:  # value = -magnitude: bound the magnitude instead
            return self._overlap(a, b, _neg(self.high), self.high_open, _neg(self.low), self.low_open)
        return self._overlap(a, b, self.low, self.low_open, self.high, self.high_open)

    def _overlap(self, a, b, low, low_open, high, high_open) -> bool:
        left, left_closed = a, True
        if low is not None and (low > a or (low == a and low_open)):
            left, left_closed = low, not low_open
        right, right_closed = b, False
        if high is not None and (b is None or high < b):
            right, right_closed = high, not high_open
        if self.integer:  # the integers in between
            first = _ceil(left) if left_closed else _floor(left) + 1
            if right is None:
                return True
            last = _floor(right) if right_closed else _ceil(right) - 1
            if self.step is not None:
                first = -(-first // self.step) * self.step  # the first multiple from there
            return first <= last
        if right is None:
            return True
        return left < right or (left == right and left_closed and right_closed)


def _inside_float(bound: Decimal | None, open_: bool, inward: int) -> tuple[Decimal | None, bool]:
    """A low (`inward` 1) or high (-1) bound moved in to the nearest float within it (closed there): a number
    with a fraction holds to that exactly when the float it reads as does (rounding keeps the order). A bound
    past every float stays: the numbers beyond it read as an infinity, which is beyond it too."""
    if bound is None:
        return None, open_
    value = float(bound)  # the nearest float (an infinity past the largest)
    if math.isinf(value):
        if (value > 0) == (inward > 0):
            return bound, open_
        value = math.copysign(sys.float_info.max, value)
    while (Decimal(value) < bound if inward > 0 else Decimal(value) > bound) or (
        open_ and Decimal(value) == bound
    ):
        value = math.nextafter(value, math.inf * inward)
    return (bound, open_) if math.isinf(value) else (Decimal(value), False)


def _neg(value: Decimal | None) -> Decimal | None:
    return None if value is None else -value


def _floor(value: Decimal) -> int:
    return int(value.to_integral_value(rounding="ROUND_FLOOR"))


def _ceil(value: Decimal) -> int:
    return int(value.to_integral_value(rounding="ROUND_CEILING"))
