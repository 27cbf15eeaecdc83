"""Constrained output: JSON mode (`response_format: {"type": "json_object"}`), and the machinery that holds an
answer to any byte-level grammar (json_schema.py's schemas too).

At each step only the tokens whose bytes keep the text so far a prefix of a sentence of the grammar may be
sampled, and the end of the sequence only once the sentence is whole. A grammar is a recogniser over bytes
whose states are hashable (`Grammar`); `advance` here is a byte-level pushdown recogniser of RFC 8259 JSON whose
top level is an object, with a state that is a small hashable tuple. `TokenTrie` holds the vocabulary's byte
strings as a trie, built once per tokenizer; `GrammarMask` walks it from a state, pruning a branch at its first
invalid byte, and keeps the allowed-token mask of each state it has met (a string's body, the commonest state,
repeats at every token).

Whitespace between tokens is allowed up to `MAX_WHITESPACE` bytes in a row, and nesting up to `MAX_DEPTH`,
so a model cannot fill its answer with blank space or open brackets for ever; once the value is whole, only the
end of the sequence (a small model would rather pad it with blank lines). Bytes of 0x80 and above are
allowed only inside strings, as whole UTF-8 sequences (`utf8_step`), so a string never closes on half a
character, whatever the vocabulary's pieces.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Protocol

import torch
from transformers import LogitsProcessor
from transformers.convert_slow_tokenizer import bytes_to_unicode

from swarmllm.api.regex import utf8_step
from swarmllm.api.sessions import common_prefix

MAX_WHITESPACE = 24
MAX_DEPTH = 32
CACHED_MASKS = 256

# modes
(
    TOP,
    OBJ_OPEN,
    OBJ_KEY,
    KEY,
    KEY_ESC,
    KEY_HEX,
    COLON,
    VALUE,
    ARR_OPEN,
    AFTER,
    STR,
    STR_ESC,
    STR_HEX,
    NUM,
    LIT,
    DONE,
) = range(16)
# number sub-states (the aux of NUM): which bytes may come next
N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8)
N_CAN_END = {N_ZERO, N_INT, N_FRAC, N_EXP}
LITERALS = (b"true", b"false", b"null")
WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
WS_MODES = frozenset({TOP, OBJ_OPEN, OBJ_KEY, COLON, VALUE, ARR_OPEN, AFTER})

State = tuple[str, int, int, int]  # (open containers "o"/"a", mode, mode's aux, whitespace bytes in a row)
START: State = ("", TOP, 0, 0)


def advance(state: State, byte: int) -> State | None:
    """The state after one more byte, or None if no JSON object starts with the text so far plus `byte`."""
    stack, mode, aux, ws = state
    if mode in WS_MODES and byte in WHITESPACE:
        return (stack, mode, aux, ws + 1) if ws < MAX_WHITESPACE else None
    if mode == STR or mode == KEY:
        if aux or byte >= 0x80:  # a UTF-8 sequence, pending in aux
            pending = utf8_step(aux or None, byte)
            return None if pending is None else (stack, mode, pending if pending[1] else 0, 0)
        if byte == 0x22:  # '"'
            return (stack, AFTER, 0, 0) if mode == STR else (stack, COLON, 0, 0)
        if byte == 0x5C:  # '\'
            return (stack, mode + 1, 0, 0)
        return state if byte >= 0x20 else None
    if mode == STR_ESC or mode == KEY_ESC:
        if byte == ord("u"):
            return (stack, mode + 1, 4, 0)
        return (stack, mode - 1, 0, 0) if byte in ESCAPES else None
    if mode == STR_HEX or mode == KEY_HEX:
        if byte not in HEX:
            return None
        return (stack, mode, aux - 1, 0) if aux > 1 else (stack, mode - 2, 0, 0)
    if mode == NUM:
        following = _number(aux, byte)
        if following is not None:
            return (stack, NUM, following, 0)
        return advance((stack, AFTER, 0, 0), byte) if aux in N_CAN_END else None
    if mode == LIT:
        literal, at = LITERALS[aux // 8], aux % 8
        if byte != literal[at]:
            return None
        return (stack, AFTER, 0, 0) if at + 1 == len(literal) else (stack, LIT, aux + 1, 0)
    if mode == TOP:
        return ("o", OBJ_OPEN, 0, 0) if byte == ord("{") else None
    if mode in (OBJ_OPEN, OBJ_KEY):
        if byte == 0x22:
            return (stack, KEY, 0, 0)
        return _close(stack, byte) if mode == OBJ_OPEN else None
    if mode == COLON:
        return (stack, VALUE, 0, 0) if byte == ord(":") else None
    if mode in (VALUE, ARR_OPEN):
        opened = _value_start(stack, byte)
        if opened is not None or mode == VALUE:
            return opened
        return _close(stack, byte)
    if mode == AFTER:
        if byte == ord(","):
            return (stack, OBJ_KEY if stack[-1] == "o" else VALUE, 0, 0)
        return _close(stack, byte)
    return None  # DONE: the object is closed, only the end of the sequence may follow


def feed(state, data: bytes, grammar: Grammar | None = None):
    """The state after `data` in `grammar` (default: JSON mode's), None once the text has left it."""
    step = advance if grammar is None else grammar.advance
    for byte in data:
        if state is None:
            return None
        state = step(state, byte)
    return state


def complete(state: State | None) -> bool:
    """Whether the text so far is a whole JSON object (the end of the sequence may come now)."""
    return state is not None and state[1] == DONE


def _number(sub: int, byte: int) -> int | None:
    digit = byte in DIGITS
    if sub == N_MINUS:
        return N_ZERO if byte == ord("0") else N_INT if digit else None
    if sub in (N_ZERO, N_INT, N_FRAC):
        if digit and sub != N_ZERO:
            return sub
        if byte == ord(".") and sub != N_FRAC:
            return N_DOT
        return N_E if byte in b"eE" else None
    if sub == N_DOT:
        return N_FRAC if digit else None
    if sub == N_E:
        return N_ESIGN if byte in b"+-" else N_EXP if digit else None
    if sub == N_ESIGN:
        return N_EXP if digit else None
    return N_EXP if digit else None  # N_EXP


def _value_start(stack: str, byte: int) -> State | None:
    if byte == ord("{") or byte == ord("["):
        if len(stack) >= MAX_DEPTH:
            return None
        return (stack + "o", OBJ_OPEN, 0, 0) if byte == ord("{") else (stack + "a", ARR_OPEN, 0, 0)
    if byte == 0x22:
        return (stack, STR, 0, 0)
    if byte == ord("-"):
        return (stack, NUM, N_MINUS, 0)
    if byte in DIGITS:
        return (stack, NUM, N_ZERO if byte == ord("0") else N_INT, 0)
    for index, literal in enumerate(LITERALS):
        if byte == literal[0]:
            return (stack, LIT, index * 8 + 1, 0)
    return None


def _close(stack: str, byte: int) -> State | None:
    if (byte == ord("}") and stack[-1] == "o") or (byte == ord("]") and stack[-1] == "a"):
        rest = stack[:-1]
        return (rest, AFTER, 0, 0) if rest else (rest, DONE, 0, 0)
    return None


def token_bytes(tokenizer, vocab_size: int) -> list[bytes | None]:
    """What each token adds to the text, as bytes (None for special tokens, which never appear in the text).

    A token's own decoding can drop a leading space (SentencePiece) or differ at the start of a text, so each
    is decoded after a fixed ordinary token and that token's text is taken off. A token that holds part of a
    UTF-8 character decodes as U+FFFD: its bytes are read from its name instead (`text_bytes`)."""
    special = set(tokenizer.all_special_ids)
    anchor = next(i for i in range(vocab_size) if i not in special)
    prefix = tokenizer.decode([anchor], clean_up_tokenization_spaces=False)
    texts = tokenizer.batch_decode(
        [[anchor, i] for i in range(vocab_size)], clean_up_tokenization_spaces=False
    )
    pieces: list[bytes | None] = []
    for i, text in enumerate(texts):
        if i in special or i >= len(tokenizer) or not text.startswith(prefix):
            pieces.append(None)
        else:
            pieces.append(text_bytes(tokenizer, i, text[len(prefix) :]))
    return pieces


def text_bytes(tokenizer, token: int, text: str) -> bytes:
    """The bytes of `token`, whose text is `text`: its UTF-8, or, for a token that holds part of a UTF-8
    character (its text shows U+FFFD), the bytes its name stands for (`_raw_bytes`), where it names them."""
    if "\ufffd" in text and (raw := _raw_bytes(tokenizer.convert_ids_to_tokens(token))) is not None:
        return raw
    return text.encode("utf-8")


BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's token for a byte
BYTE_LEVEL = {char: byte for byte, char in bytes_to_unicode().items()}  # GPT-2's character for each byte


def _raw_bytes(name: str) -> bytes | None:
    """The bytes a token's name stands for, when it is a byte-fallback token or a byte-level BPE one."""
    if (byte := BYTE_FALLBACK.fullmatch(name)) is not None:
        return bytes.fromhex(byte[1])
    if name and all(char in BYTE_LEVEL for char in name):
        return bytes(BYTE_LEVEL[char] for char in name)
    return None


class Grammar(Protocol):
    """A byte-level recogniser: `start`, the state after a byte (None: no sentence starts so), and whether the
    text so far is a whole sentence."""

    start: Hashable

    def advance(self, state, byte: int): ...

    def complete(self, state) -> bool: ...

    def mask_key(self, state, reach: int) -> Hashable:
        """A key shared by states that take the same next `reach` bytes alike (so share a mask)."""
        ...


class _JsonObject:
    """JSON mode's grammar: one JSON object."""

    start = START
    advance = staticmethod(advance)
    complete = staticmethod(complete)

    @staticmethod
    def mask_key(state, reach: int) -> Hashable:
        return state


JSON_OBJECT: Grammar = _JsonObject()


class TokenTrie:
    """The vocabulary's byte strings as a trie (what each token adds to the text, `token_bytes`), built once
    per tokenizer and shared by every grammar's masks."""

    def __init__(self, pieces: Sequence[bytes | None], eos_ids: Sequence[int]) -> None:
        self.vocab_size = len(pieces)
        self.eos_ids = list(eos_ids)
        self.root: dict = {}
        for token, piece in enumerate(pieces):
            if not piece:
                continue  # special tokens and empty pieces never move the text on
            node = self.root
            for byte in piece:
                node = node.setdefault(byte, {})
            node.setdefault(None, []).append(token)
        self.pieces = pieces
        self.longest = max((len(piece) for piece in pieces if piece), default=0)  # the deepest walk, in bytes
        self.only_eos = torch.zeros(self.vocab_size, dtype=torch.bool)
        self.only_eos[self.eos_ids] = True


class GrammarMask:
    """The tokens allowed after each state of a grammar, found by a walk of the vocabulary's trie, cached per
    state."""

    def __init__(self, trie: TokenTrie, grammar: Grammar = JSON_OBJECT) -> None:
        self.trie, self.grammar = trie, grammar
        self._masks: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # concurrent requests share the cache

    def allowed(self, state) -> torch.Tensor:
        """A bool tensor over the vocabulary: True where the token may come next."""
        key = self.grammar.mask_key(state, self.trie.longest)
        with self._lock:
            mask = self._masks.get(key)
            if mask is not None:
                self._masks.move_to_end(key)
                return mask
        mask = self._walk(state)
        with self._lock:
            self._masks[key] = mask
            if len(self._masks) > CACHED_MASKS:
                self._masks.popitem(last=False)
        return mask

    def _walk(self, state) -> torch.Tensor:
        allowed: list[int] = []
        advance = self.grammar.advance
        steps: dict = {}  # (state, byte) -> the next state: a string's body meets the same pair at every node
        walk = [(self.trie.root, state)]
        while walk:
            node, at = walk.pop()
            for byte, child in node.items():
                if byte is None:
                    allowed.extend(child)
                    continue
                key = (at, byte)
                following = steps[key] if key in steps else steps.setdefault(key, advance(at, byte))
                if following is not None:
                    walk.append((child, following))
        mask = torch.zeros(self.trie.vocab_size, dtype=torch.bool)
        mask[allowed] = True
        if self.grammar.complete(state):
            mask[self.trie.eos_ids] = True
        return mask

    def after(self, state, token: int):
        """The state after `token` (None once the text has left the grammar, or for a token with no text)."""
        piece = self.trie.pieces[token] if token < len(self.trie.pieces) else None
        return None if piece is None else feed(state, piece, self.grammar)


class GrammarLogits(LogitsProcessor):
    """Leaves possible only the tokens that keep a generate's answer a prefix of a sentence of the mask's
    grammar (EOS once it is whole). It follows the answer as it grows, one row of a batch per answer, and it is
    a function of the answer it is given: one that goes back or parts from the last (speculative decoding
    reading rejected drafts again) is read from where they part."""

    def __init__(self, mask: GrammarMask, prompt_length: int):
        self.mask, self.prompt_length = mask, prompt_length
        self.answers: list[list[int]] = []  # each row's answer tokens read so far
        self.states: list[list] = []  # each row's state before each of them, and after the last

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = []
        for row, tokens in enumerate(input_ids[:, self.prompt_length :].tolist()):
            if row == len(self.answers):
                self.answers.append([])
                self.states.append([self.mask.grammar.start])
            answer, states = self.answers[row], self.states[row]
            kept = common_prefix(answer, tokens)
            del answer[kept:], states[kept + 1 :]
            for token in tokens[kept:]:
                answer.append(token)
                states.append(None if states[-1] is None else self.mask.after(states[-1], token))
            state = states[-1]
            # a row whose answer left the grammar (EOS, padding after it) only ends
            allowed = self.mask.allowed(state) if state is not None else self.mask.trie.only_eos
            rows.append(allowed)
        allowed = torch.stack(rows).to(scores.device)
        scores = scores.masked_fill(~allowed, -float("inf"))
        # nothing left (a vocabulary without the grammar's characters, or EOS banned by min_tokens): it ends
        stuck = torch.isinf(scores).all(dim=-1).nonzero().flatten()
        for row in stuck.tolist():
            scores[row, self.mask.trie.eos_ids] = 0.0
        return scores
