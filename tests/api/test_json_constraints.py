"""A string's and a number's constraints (json_constraints.py, regex.py) against independent references:
Python's `re` on random patterns, Python's and pydantic's parsers of dates, times, durations, UUIDs and IP
addresses on strings drawn from each format's automaton, and a brute-force list of every short number."""

import itertools
import random
import re
import uuid

import jsonschema
import pytest
from format_checks import conforms

from swarmllm.api.json_constraints import FORMATS, NumberBounds, StringRule
from swarmllm.api.regex import RegexError, TextGrammar, compile_regex, literal, overlaps, ranges


def _pattern(rng: random.Random, depth: int = 0) -> str:
    parts = []
    for _ in range(rng.randint(1, 3)):
        atoms = ["a", "b", "c", "1", "[ab]", "[^a]", r"\d", "[a-c1]", r"\.", "."]
        if depth < 2:
            atoms += ["(?:" + _pattern(rng, depth + 1) + ")", "(" + _pattern(rng, depth + 1) + ")"]
        parts.append(rng.choice(atoms) + rng.choice(["", "", "*", "+", "?", "{2}", "{1,2}", "{0,}", "??"]))
    body = "".join(parts)
    if rng.random() < 0.3:
        body += "|" + _pattern(rng, depth + 1)
    return body


def test_patterns_match_what_python_re_searches_for():
    """500 random patterns (classes, groups, alternation, quantifiers, anchors) on random strings: the automaton
    accepts exactly the strings `re.search` finds the pattern in (Python's `$` also matches before a final
    newline, which the automaton leaves out: there it is only sound)."""
    rng = random.Random(0)
    for _ in range(500):
        pattern = _pattern(rng)
        pattern = ("^" if rng.random() < 0.5 else "") + pattern + ("$" if rng.random() < 0.5 else "")
        nfa, python = compile_regex(pattern), re.compile(pattern)
        for _ in range(40):
            text = "".join(rng.choice("abc1.\n") for _ in range(rng.randrange(7)))
            found = python.search(text) is not None
            if nfa.matches(text):
                assert found, (pattern, text)
            elif not text.endswith("\n"):
                assert not found, (pattern, text)


@pytest.mark.parametrize(
    "pattern, text, matches",
    [
        (r"^\w+$", "abc_1", True),
        (r"^\w+$", "é", False),  # ECMA's \w is ASCII: what both dialects call a word character
        (r"^\W$", "é", False),  # and Python calls é one, so \W leaves it out too
        (r"^\s$", "\u3000", True),  # ideographic space: white space to both
        (r"^\s$", "\x1c", False),  # Python's \s holds it, ECMA's does not
        (r"^.$", "\r", False),  # ECMA's "." stops at \r too
        (r"^[\d.-]+$", "-1.5", True),
        (r"^(?<year>\d{4})$", "2024", True),
        (r"^(?P<x>a)b$", "ab", True),
        (r"^a{2,3}$", "aaaa", False),
        (r"^\u00e9\x41$", "éA", True),
        (r"[", "", None),
        (r"(?=a)", "", None),
        (r"a{,2}", "", None),
        (r"a\b", "", None),
        (r"\p{L}", "", None),
        (r"(a)\1", "", None),
        (r"^a$b", "", None),
        (r"[^\x00-\U0010ffff]", "", None),
    ],
)
def test_pattern_cases(pattern, text, matches):
    if matches is None:
        with pytest.raises((RegexError, ValueError)):
            compile_regex(pattern)
    else:
        assert compile_regex(pattern).matches(text) == matches


def _draw(rule: StringRule, rng: random.Random, soon: int = 24) -> str | None:
    """A string the rule admits, drawn character by character from its live states (None if a walk gets
    long: a loop it did not leave)."""
    states, count, out = rule.start, 0, []
    while len(out) < 400:
        edges = [edge for s in states for edge in rule.nfa.edges[s]]
        if rule.may_end(states, count) and (not edges or rng.random() < 0.15 or len(out) >= soon):
            return "".join(out)
        for _ in range(50):
            low, high = rng.choice(rng.choice(edges)[0])
            code = rng.randint(low, min(high, low + 100, 0x7E) if low < 0x7F else min(high, low + 100))
            following = rule.take(states, count, code)
            if following is not None:
                states, count = following, rule.counted(count)
                out.append(chr(code))
                break
        else:
            raise AssertionError(f"no way on from {states} after {''.join(out)!r}")
    return None


EXAMPLES = {
    "date": (["2024-02-29", "2000-02-29", "1900-02-28", "0001-01-01", "2023-04-30"], ["1900-02-29", "2023-02-29",
             "2024-13-01", "2024-04-31", "0000-01-01", "2024-1-01"]),
    "time": (["08:00:00Z", "23:59:59.123456+05:30"], ["24:00:00Z", "08:00:00", "08:60:00Z"]),
    "date-time": (["2024-05-01T13:45:30Z", "2024-05-01T13:45:30.5-02:00"], ["2024-05-01 13:45:30Z",
                  "2024-05-01T13:45:30"]),
    "duration": (["P1DT12H", "PT30M", "P3W", "P1Y2M3DT4H5M6S"], ["P", "PT", "P1H", "1D"]),
    "uuid": ([str(uuid.UUID(int=12345678901234567890)), "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"],
             ["a0eebc99-9c0b-4ef8-bb6d", "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
    "ipv4": (["192.168.0.1", "0.0.0.0", "255.255.255.255"], ["256.1.1.1", "1.2.3", "01.2.3.4"]),
    "hostname": (["example.com", "a-b.c", "localhost", "a--b.com"], ["-a.com", "a..b", "a_b.com", "ab--c.com"]),
    "email": (["john.doe@example.com", "x+tag@mail.example.org"], ["john@", "@example.com", "a..b@example.com",
              "john@example"]),
    "uri": (["https://example.com/a?b=c#d", "urn:isbn:0451450523", "mailto:a%40b"], ["no scheme", "1http://x"]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_holds_its_examples_and_draws_only_what_parsers_accept(name):
    rule = StringRule.build(None, name, 0, None)
    nfa = rule.nfa
    good, bad = EXAMPLES[name]
    for text in good:
        assert nfa.matches(text), text
    for text in bad:
        assert not nfa.matches(text), text
    rng = random.Random(name)
    drawn = [text for text in (_draw(rule, rng) for _ in range(200)) if text is not None]
    assert len(drawn) > 150
    for text in drawn:
        assert conforms(text, name), text


def test_lengths_count_characters_and_bound_a_pattern():
    """Lengths count code points; a pattern and bounds that leave no string are refused; states from which the
    bounds cannot be met are cut (a state never leads nowhere)."""
    rule = StringRule.build(r"^(ab)+$", None, 3, 6)
    rng = random.Random(0)
    for _ in range(100):
        text = _draw(rule, rng, soon=rng.randint(0, 6))
        assert text in ("abab", "ababab"), text
    assert rule.take(rule.start, 0, ord("a")) is not None
    assert StringRule.build(None, None, 2, 2).may_end(frozenset({0}), 2)
    with pytest.raises(ValueError, match="no string"):
        StringRule.build(r"^\d{5}$", None, 0, 4)
    with pytest.raises(ValueError, match="no string"):
        StringRule.build(r"^(ab)+$", None, 3, 3)
    with pytest.raises(ValueError, match="beside"):
        StringRule.build("a", "date", 0, None)
    with pytest.raises(ValueError, match="not supported"):
        StringRule.build(None, "ipv6", 0, None)


def _number_texts(integer: bool):
    for sign, whole in itertools.product(("", "-"), range(1000 if integer else 40)):
        yield f"{sign}{whole}"
        if not integer:
            for width in (1, 2, 3) if whole < 4 else (1, 2):  # 3 places where the bounds are
                for fraction in range(10**width):
                    yield f"{sign}{whole}.{fraction:0{width}d}"


@pytest.mark.parametrize("integer", [True, False])
def test_number_bounds_admit_exactly_the_prefixes_of_numbers_within_them(integer):
    """Random bounds (quarters in [-3, 3], open or closed, one side or both; for integers, sometimes a
    `multipleOf`): `admits` is true of a prefix exactly
    when some number within the bounds is written starting with it, among all integers up to 999 and numbers up to 39.99
    (and 3.999 within the bounds' reach)."""
    rng = random.Random(integer)
    texts = list(_number_texts(integer))
    for _ in range(25):
        schema = {}
        for name in rng.sample(
            ["minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"], rng.randint(1, 3)
        ):
            schema[name] = (
                rng.randint(-12, 12) / 4 if not integer or rng.random() < 0.5 else rng.randint(-3, 3)
            )
        if integer and rng.random() < 0.4:
            schema["multipleOf"] = rng.choice([2, 3])
        valid = jsonschema.Draft202012Validator(schema).is_valid
        try:
            bounds = NumberBounds.build(schema, integer)
        except ValueError:
            assert not any(valid(float(t)) for t in texts)
            continue
        within = [t for t in texts if valid(float(t))]
        for text in within:
            assert bounds.holds(text.encode()), (schema, text)
        # prefixes whose numbers the list holds: for integers, up to 2 digits (a multiple is a digit on)
        digits = 2 if integer else 4
        prefixes = {t[:n] for t in within for n in range(1, 6) if len(t[:n].lstrip("-")) <= digits}
        for text in {t[:n] for t in texts for n in range(1, 6) if len(t[:n].lstrip("-")) <= digits}:
            assert bounds.admits(text.encode()) == (text in prefixes), (schema, text)


def test_a_text_grammar_takes_what_python_fullmatches_byte_by_byte():
    """vLLM's `guided_regex` holds the whole answer to a pattern: on 300 random patterns and random strings
    (non-ASCII too, fed as UTF-8 bytes), the grammar calls a text whole exactly when `re.fullmatch` matches it,
    and no live state is a dead end; `literal` writes a pattern of any text."""
    rng = random.Random(5)
    for _ in range(300):
        pattern = _pattern(rng)
        grammar, python = TextGrammar(compile_regex(pattern, search=False)), re.compile(pattern)
        for _ in range(30):
            text = "".join(rng.choice("abc1.\né中") for _ in range(rng.randrange(7)))
            state = grammar.start
            for byte in text.encode():
                state = grammar.advance(state, byte)
                if state is None:
                    break
                assert grammar.complete(state) or any(grammar.advance(state, b) for b in range(256)), pattern
            assert grammar.complete(state) == (python.fullmatch(text) is not None), (pattern, text)
    for _ in range(200):
        text = "".join(rng.choice('a.|()[]{}*+?^$\\-é中\n "') for _ in range(rng.randrange(8)))
        assert compile_regex(literal(text), search=False).matches(text) and re.fullmatch(literal(text), text)


def test_overlaps_finds_what_a_scan_of_the_ranges_finds():
    rng = random.Random(6)
    for _ in range(5000):
        spans = ranges(
            *[(x := rng.randint(0, 200), x + rng.randint(0, 10)) for _ in range(rng.randint(0, 6))]
        )
        low = rng.randint(0, 220)
        high = low + rng.randint(0, 15)
        assert overlaps(spans, low, high) == any(a <= high and low <= b for a, b in spans), (spans, low, high)
