"""JSON mode's recogniser against Python's `json`, and its vocabulary walk against a brute-force scan."""

import json
import random

import pytest
import torch
from mutation import mutate
from transformers import AutoTokenizer

from swarmllm.api.json_mode import (
    MAX_DEPTH,
    MAX_WHITESPACE,
    START,
    GrammarLogits,
    GrammarMask,
    TokenTrie,
    complete,
    feed,
    token_bytes,
)
from swarmllm.bundled import smollm2_checkpoint
from swarmllm.models.tiny import tiny_tokenizer


def _value(rng: random.Random, depth: int):
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.randint(-(10**6), 10**6)
    if kind == 2:
        return rng.uniform(-1e6, 1e6) * 10 ** rng.randint(-30, 30)
    if kind in (3, 4):
        return "".join(rng.choice('ab "\\/\n\t\u00e9\u4e2d\U0001f600x') for _ in range(rng.randrange(6)))
    if kind == 5:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return _object(rng, depth + 1)


def _object(rng: random.Random, depth: int = 0) -> dict:
    return {
        _value(rng, 9) if rng.random() < 0.3 else "k": _value(rng, depth) for _ in range(rng.randrange(4))
    }


def _document(rng: random.Random, *, ascii_only: bool = False) -> bytes:
    indent = rng.choice([None, None, 1, 2])
    separators = rng.choice([None, (",", ":"), (", ", ": ")])
    ascii_only = ascii_only or rng.random() < 0.5
    return json.dumps(_object(rng), indent=indent, separators=separators, ensure_ascii=ascii_only).encode()


def _python_says_object(text: bytes) -> bool:
    def no_constants(name):
        raise ValueError(name)

    if text != text.rstrip():
        return False  # a whole answer ends at its closing brace
    try:
        return isinstance(json.loads(text, parse_constant=no_constants), dict)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False


def test_every_prefix_of_a_json_object_lives_and_only_the_whole_is_complete():
    rng = random.Random(0)
    for _ in range(400):
        text = _document(rng)
        state = START
        for i, byte in enumerate(text):
            assert not complete(state), text[:i]
            state = feed(state, bytes([byte]))
            assert state is not None, (text, i)
        assert complete(state), text
        # nothing after the object: no other value, not even the blanks json.loads allows, only the end
        assert feed(state, b" ") is None and feed(state, b"{") is None and feed(state, b",") is None


def test_the_recogniser_agrees_with_pythons_json_on_mutated_documents():
    rng = random.Random(1)
    alphabet = b'{}[]",:0123456789-+.eE \n\ttfnrulsa\\/x'
    checked = 0
    for _ in range(4000):
        text = bytearray(_document(rng, ascii_only=True))  # (the recogniser leaves UTF-8 to the tokenizer)
        mutate(rng, text, alphabet)
        text = bytes(text)
        ours = complete(feed(START, text))
        assert ours == _python_says_object(text), text
        checked += ours
    assert checked > 200  # many mutations still give an object: the comparison ran both ways


@pytest.mark.parametrize(
    "text, whole",
    [
        (b'{"a": 01}', False),
        (b'{"a": 1.}', False),
        (b'{"a": .5}', False),
        (b'{"a": -}', False),
        (b'{"a": 1e}', False),
        (b'{"a": NaN}', False),
        (b'{"a": "\x01"}', False),
        (b'{"a": "\\x"}', False),
        (b'{"a": "\\u12G4"}', False),
        (b'{"a": tru}', False),
        (b'{"a": [1,]}', False),
        (b'{"a": 1,}', False),
        (b"{a: 1}", False),
        (b"[1, 2]", False),
        (b'"text"', False),
        (b'{"a": [1, {"b": null}], "c": -0.5E+3, "\\u00e9\\n": "\\"x\\""}', True),
        (b" {}", True),
        (b"{} ", False),
    ],
)
def test_cases_python_and_the_recogniser_agree_on(text, whole):
    assert complete(feed(START, text)) == whole == _python_says_object(text)


def test_whitespace_runs_and_nesting_are_bounded():
    assert feed(START, b"{" + b" " * MAX_WHITESPACE) is not None
    assert feed(START, b"{" + b" " * (MAX_WHITESPACE + 1)) is None
    assert feed(START, b'{"a": "' + b" " * 1000) is not None  # inside a string a blank is text
    assert feed(START, b'{"a":' + b"[" * (MAX_DEPTH - 1)) is not None
    assert feed(START, b'{"a":' + b"[" * MAX_DEPTH) is None


def _brute_force(pieces, eos_ids, state) -> set[int]:
    allowed = {token for token, piece in enumerate(pieces) if piece and feed(state, piece) is not None}
    return allowed | (set(eos_ids) if complete(state) else set())


def test_the_trie_walk_allows_exactly_the_tokens_a_brute_force_scan_does():
    rng = random.Random(2)
    alphabet = b'{}[]",:0123456789-.eE \ntfnrulas\\x\xc3\xa9'
    pieces = [None] + [
        bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(3000)
    ]  # token 0: EOS, no text
    mask = GrammarMask(TokenTrie(pieces, [0]))
    texts = [_document(rng) for _ in range(6)] + [b'{"a": [1, -2.5e+3, "\\u00e9\\n", true], "b": {}}']
    states = {START}
    for text in texts:
        state = START
        for byte in text:
            state = feed(state, bytes([byte]))
            states.add(state)
    for state in sorted(states, key=repr)[:300]:
        allowed = mask.allowed(state)
        assert set(allowed.nonzero().flatten().tolist()) == _brute_force(pieces, [0], state), state
        assert mask.allowed(state) is allowed  # cached


def test_token_bytes_are_what_each_token_adds_to_the_text():
    smollm2 = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    text = '{"name": "Zoë", "tags": ["a b", 12.5, null],\n  "ok": true}'
    pieces = token_bytes(smollm2, len(smollm2))
    ids = smollm2.encode(text)
    assert b"".join(pieces[i] for i in ids) == text.encode()
    assert all(pieces[i] is None for i in smollm2.all_special_ids)

    tiny = tiny_tokenizer()  # a word-level vocabulary: decoding puts a space between tokens
    tiny_pieces = token_bytes(tiny, len(tiny))
    ids = tiny.encode("the cat , 1")
    assert b"".join(tiny_pieces[i] for i in ids).decode() == " " + tiny.decode(ids)


def test_the_processor_masks_each_row_by_its_own_answer_and_ends_a_stuck_one():
    pieces = [None, b"{", b"}", b'"a"', b":", b"1", b" ", b"x"]  # token 0: EOS
    mask = GrammarMask(TokenTrie(pieces, [0]))
    processor = GrammarLogits(mask, prompt_length=2)
    prompt = [[7, 7], [7, 7]]
    scores = torch.zeros(2, len(pieces))
    out = processor(torch.tensor(prompt), scores)
    assert (out[0] > -torch.inf).nonzero().flatten().tolist() == [1, 6]  # "{" or a blank
    out = processor(torch.tensor([[7, 7, 1], [7, 7, 6]]), scores)
    assert (out[0] > -torch.inf).nonzero().flatten().tolist() == [2, 3, 6]
    assert (out[1] > -torch.inf).nonzero().flatten().tolist() == [1, 6]
    out = processor(torch.tensor([[7, 7, 1, 2], [7, 7, 6, 1]]), scores)
    assert (out[0] > -torch.inf).nonzero().flatten().tolist() == [0]  # whole: only EOS
    # a row whose every allowed token was banned before (here by -inf scores) may only end
    banned = torch.zeros(2, len(pieces))
    banned[:, [0, 2, 3, 6]] = -torch.inf
    out = processor(torch.tensor([[7, 7, 1, 2, 6], [7, 7, 6, 1, 6]]), banned)
    assert (out[0] > -torch.inf).nonzero().flatten().tolist() == [0]
    assert (out[1] > -torch.inf).nonzero().flatten().tolist() == [0]


def test_the_processor_is_a_function_of_the_answer_it_is_given():
    """Called with answers that go back and part from the last (as speculative decoding calls it), it masks
    each as a fresh processor would."""
    pieces = [None, b"{", b"}", b'"a"', b":", b"1", b" ", b"x"]
    mask = GrammarMask(TokenTrie(pieces, [0]))
    processor = GrammarLogits(mask, prompt_length=1)
    scores = torch.zeros(1, len(pieces))
    for answer in ([1, 3, 4], [1], [1, 3, 4, 5, 2], [1, 6, 3], [], [1, 3, 4, 6, 5], [2]):
        ids = torch.tensor([[7, *answer]])
        fresh = GrammarLogits(mask, prompt_length=1)(ids, scores)
        assert torch.equal(processor(ids, scores), fresh), answer
