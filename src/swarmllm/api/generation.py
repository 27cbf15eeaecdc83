"""What the API adds around `generate()`: prompts from chat messages, text from tokens as they come (with stop
strings and incomplete characters held back), each generated token's log-probability when asked, and sampling
that a request's `seed` makes reproducible even while other requests sample at the same time.

Streamed and whole answers are made by the same `TextAssembler`: the whole answer is the streamed pieces joined,
so the two can never differ. A piece carries the log-probabilities of the tokens it was made from (those held back
travel with the piece that sends their text), so the streamed ones joined are the whole answer's too.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import (
    LogitsProcessor,
    MinPLogitsWarper,
    StoppingCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

# A tokenizer without a chat template gets this plain layout (documented in the README): one "role: content"
# line per message, then "assistant:" for the model to continue.
FALLBACK_ROLE_LINE = "{role}: {content}\n"
FALLBACK_GENERATION_PROMPT = "assistant:"


def chat_prompt(
    tokenizer,
    messages: Sequence[dict[str, str]],
    continue_final: bool = False,
    open_turn: bool = True,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text for chat `messages` (each with `role` and `content`): the tokenizer's chat template with
    the assistant's turn opened, or the plain fallback layout when the tokenizer has no template. continue_final:
    the last message (the assistant's) left open instead, its answer continuing its text (an assistant prefill).
    open_turn False: the assistant's turn not opened (vLLM's `add_generation_prompt`); `variables`: more for the
    template (vLLM's `chat_template_kwargs`; the fallback layout has none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            list(messages),
            add_generation_prompt=open_turn and not continue_final,
            continue_final_message=continue_final,
            tokenize=False,
            **(variables or {}),
        )
    lines = "".join(FALLBACK_ROLE_LINE.format(role=m["role"], content=m["content"]) for m in messages)
    if continue_final:
        return lines.removesuffix("\n")
    return lines + FALLBACK_GENERATION_PROMPT if open_turn else lines


CONTEXT_TOKENS = 6  # decoded before a token for its text as it reads in its sequence: enough for its space


def text_after(decode: Callable[[list[int]], str], context: list[int], before: str, tokens: list[int]) -> str:
    """What `tokens` add to the text of `context` (whose text is `before`): decoded alone, a SentencePiece or
    word-level token loses the space before it. Their own decoding where the context's text changes with them (a
    character split across the two)."""
    after = decode([*context, *tokens])
    return after[len(before) :] if after.startswith(before) else decode(tokens)


def whole_context(decode: Callable[[list[int]], str], tokens: Sequence[int]) -> list[int]:
    """The last CONTEXT_TOKENS of `tokens`, less those at its start that begin inside a character: SentencePiece's
    byte fallback decodes a run of byte tokens that is not whole UTF-8 as U+FFFD throughout, the bytes that
    follow it (the answer's first ones) too."""
    context = list(tokens)[-CONTEXT_TOKENS:]
    while context and decode(context).startswith("\ufffd"):
        context = context[1:]
    return context


class TextAssembler:
    """Turns generated token ids into text pieces that are safe to send: a piece never ends inside a UTF-8
    character (decoders show those as U+FFFD until the next token completes them) nor with the beginning of a
    stop string, and nothing from a stop string on is ever sent. EOS tokens end the text and are not shown.
    The text is what the tokens add after the prompt's last tokens (`context`, see `text_after`), as vLLM's."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop: Sequence[str] = (),
        eos_ids: Sequence[int] = (),
        min_tokens: int = 0,
        context: Sequence[int] = (),
    ):
        self.decode = decode
        self.context = whole_context(decode, context)
        self._before = decode(self.context)
        self.stop = [s for s in stop if s]
        self.eos_ids = set(eos_ids)
        self.min_tokens = min_tokens  # stop strings count only after this many tokens (as in vLLM)
        self._free = 0  # characters of the first min_tokens tokens' text: no stop string ends there
        self.tokens: list[int] = []  # every generated token, EOS included (what usage counts)
        self._text_tokens: list[int] = []
        self._sent = 0  # characters of the decoded text already handed out
        self.finish_reason: str | None = None  # "stop" (EOS or a stop string); the caller sets "length"
        self.stop_string: str | None = None  # the stop string that ended the text, if one did

    @property
    def stopped(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> str:
        """The text that `token` makes safe to send ("" when it must wait for more tokens)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self._flush()
        self._text_tokens.append(token)
        text = self._text()
        if len(self.tokens) <= self.min_tokens:  # too early for stop strings to cut, not to be held back
            self._free = max(self._free, len(text.rstrip("\ufffd")))
            return "" if text.endswith("\ufffd") else self._take(text, len(text) - self._held_back(text))
        cut = self._stop_at(text)
        if cut is not None:
            self.finish_reason = "stop"
            return self._take(text, cut)
        if text.endswith("\ufffd"):
            return ""  # a character split across tokens: wait for the rest
        return self._take(text, len(text) - self._held_back(text))

    def finish(self) -> str:
        """What is still held back once generation has ended (none of it can start a stop string any more)."""
        return self._flush()

    def _text(self) -> str:
        return text_after(self.decode, self.context, self._before, self._text_tokens)

    def _flush(self) -> str:
        text = self._text()
        cut = self._stop_at(text) if len(self.tokens) > self.min_tokens else None
        return self._take(text, len(text) if cut is None else cut)

    def _take(self, text: str, end: int) -> str:
        piece = text[self._sent : max(end, self._sent)]
        self._sent = max(end, self._sent)
        return piece

    def _stop_at(self, text: str) -> int | None:
        """Where the first stop string in the unsent part (or straddling its start) begins, if any (and which it
        is, in `stop_string`): each is looked for only where it would end in unsent text past the first
        `min_tokens` tokens' text."""
        checked = max(self._sent, self._free)
        found = [(i, s) for s in self.stop if (i := text.find(s, max(0, checked - len(s) + 1))) >= 0]
        if not found:
            return None
        at, self.stop_string = min(found)
        return at

    def _held_back(self, text: str) -> int:
        """The length of the longest end of `text` that a stop string starts with (it may grow into one)."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the `top` most likely tokens of its step (None and none for
    a prompt's first token, which nothing predicts)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), the most likely first


def _entry(token: int, logprobs: torch.Tensor, top: int) -> TokenLogprob:
    """`token`'s entry from its step's log-probabilities [vocab]."""
    best = ()
    if top:
        values, ids = logprobs.topk(top)
        best = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), best)


def prompt_logprobs(tokens: Sequence[int], logits: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the ones before it, from the model's logits over the prompt
    ([tokens, vocab]: position i predicts token i + 1)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [TokenLogprob(tokens[0], None)] + [_entry(t, logprobs[i], top) for i, t in enumerate(tokens[1:])]


class TokenTexts:
    """Each token's text as it reads in its sequence: what it adds to the text of the tokens before it. Decoded
    alone, a SentencePiece or word-level token loses the space before it (" Paris" reads "Paris"), and the
    tokens joined would not be the text. A few tokens of context are enough for that."""

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = ()):
        self.decode = decode
        self.context = whole_context(decode, context)
        self._before = decode(self.context)  # the context's text, asked for each token and its alternatives

    def text(self, token: int) -> str:
        return text_after(self.decode, self.context, self._before, [token])

    def joined(self, tokens: Sequence[int]) -> list[str]:
        """The texts of the `tokens` that come next, such that they join to the text they make: a character whose
        bytes span tokens is the text of the token that completes it, and those before it read "" (alone, each
        reads U+FFFD). The context stays as it is."""
        context, before = self.context, self._before
        out: list[str] = []
        pending: list[int] = []
        text = ""
        for token in tokens:
            pending.append(token)
            text = text_after(self.decode, context, before, pending)
            if text.endswith("\ufffd"):
                out.append("")
                continue
            out.append(text)
            context = whole_context(self.decode, [*context, *pending])
            before, pending = self.decode(context), []
        if pending:  # the text ends inside a character: the last token has what there is
            out[-1] = text
        return out

    def push(self, token: int) -> None:
        context = [*self.context, token]
        kept = context[-CONTEXT_TOKENS:]
        text = self.decode(kept)
        if not text.startswith("\ufffd") and not text.endswith("\ufffd"):
            # no character split at either end (the common case): the context and its text, in one decode
            self.context, self._before = kept, text
            return
        # inside a character, byte fallback garbles its whole run: then no token is dropped for starting in one
        inside = self.decode(context).endswith("\ufffd")
        self.context = context[-CONTEXT_TOKENS:] if inside else whole_context(self.decode, context)
        self._before = self.decode(self.context)


@dataclass(frozen=True)
class Piece:
    """Text that is safe to send, and the log-probabilities of the tokens that made it (if they were asked for)."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


class LogprobRecorder(LogitsProcessor):
    """Keeps the log-probabilities of a generate's (batch 1) steps until the streamer takes the tokens chosen
    from them, in order. First in a generate's processors, so they are the model's own, before temperature and
    top-p; a speculative generate gives it each round's rows at once (`record`)."""

    def __init__(self, top: int):
        self.top = top
        self._rows: deque[torch.Tensor] = deque()  # [vocab] log-probabilities of the tokens still to come

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.record(scores)
        return scores

    def record(self, logits: torch.Tensor) -> None:
        """The model's logits [n, vocab] at the next n tokens."""
        self._rows.extend(torch.log_softmax(logits.float(), dim=-1))

    def entry(self, token: int) -> TokenLogprob:
        """The next token's entry (each token takes the oldest row recorded)."""
        return _entry(token, self._rows.popleft(), self.top)


class PieceStreamer(BaseStreamer):
    """Feeds each new token of a generate (batch 1) to an assembler and hands the resulting pieces to `emit`,
    with the tokens' log-probabilities when a `recorder` is given (EOS has none: it is not part of the text);
    `counted(n)` as tokens come (a metric that shows them live, not when their generation ends)."""

    def __init__(
        self,
        assembler: TextAssembler,
        emit: Callable[[Piece], None],
        recorder: LogprobRecorder | None = None,
        counted: Callable[[int], None] | None = None,
    ):
        self.assembler, self.emit, self.recorder, self.counted = assembler, emit, recorder, counted
        self._prompt_seen = False
        self._pending: list[TokenLogprob] = []  # of tokens whose text has not been sent yet
        self.logprob_sum = 0.0  # of every generated token, EOS included (with a recorder): what best_of ranks
        self.first_token_at: float | None = None  # time.perf_counter() at the first token (for metrics)

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate's first call carries the prompt
            self._prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        tokens = value.reshape(-1).tolist()
        if self.counted is not None:
            self.counted(len(tokens))
        for token in tokens:
            shown = token not in self.assembler.eos_ids and not self.assembler.stopped
            if self.recorder is not None:
                entry = self.recorder.entry(int(token))  # (taken even past a stop: the rows stay in step)
                if not self.assembler.stopped:
                    self.logprob_sum += entry.logprob
                    if shown:
                        self._pending.append(entry)
            text = self.assembler.add(int(token))
            if text:
                self.emit(self._piece(text))

    def end(self) -> None:
        pass

    def finish(self) -> Piece | None:
        """What is still held back once generation has ended, if anything."""
        text = self.assembler.finish()
        return self._piece(text) if text or self._pending else None

    def _piece(self, text: str) -> Piece:
        piece, self._pending = Piece(text, self._pending), []
        return piece


class StopWhen(StoppingCriteria):
    """Ends a generate when `done()` says so (a stop string was produced, or the requester went away)."""

    def __init__(self, done: Callable[[], bool]):
        self.done = done

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.done(), dtype=torch.bool, device=input_ids.device)


def special_ids(generation_config) -> tuple[list[int], int]:
    """A model's EOS ids and the pad id its generates use (the first EOS when it names none)."""
    eos = generation_config.eos_token_id
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = generation_config.pad_token_id
    return eos_ids, pad if pad is not None else (eos_ids[0] if eos_ids else 0)


def sampling(
    temperature: float, seed: int, *, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> list[LogitsProcessor]:
    """The processors that draw the next token, last in a generate's list: none for greedy (temperature 0),
    else temperature, top-k, top-p and min-p (transformers' order), then a `SeededSampler` with `seed`."""
    if temperature <= 0:
        return []
    processors: list[LogitsProcessor] = []
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    if min_p > 0:
        processors.append(MinPLogitsWarper(min_p))
    return [*processors, SeededSampler(seed)]


PROMPT_LOOKUP = "ngram"  # a draft "model" that names prompt lookup (vLLM's speculative method "ngram")


@dataclass(frozen=True)
class Draft:
    """What proposes `tokens` tokens a round for the swarm to check in one step (speculative decoding,
    `client.speculative`), as vLLM's `--speculative-config` gives a server: a local draft model, or prompt
    lookup (drafts copied from the prompt and the answer so far). The tokens are the swarm's own: greedy ones
    exactly plain greedy decoding's, sampled ones drawn from the same distribution (with the request's seed,
    though not the same draws as without a draft)."""

    model: Any  # a transformers causal LM with the swarm model's vocabulary; None: prompt lookup
    tokens: int

    @classmethod
    def load(cls, path: str, vocab_size: int, tokens: int | None = None) -> Draft:
        """The checkpoint at `path` (a folder or hub id), in float32 on the CPU, checked against the vocabulary
        of the model it drafts for, or prompt lookup for PROMPT_LOOKUP; `tokens` a round (default: the
        client's, DEFAULT_DRAFT_TOKENS)."""
        from transformers import AutoModelForCausalLM

        from swarmllm.client.model import DEFAULT_DRAFT_TOKENS

        tokens = DEFAULT_DRAFT_TOKENS if tokens is None else tokens
        if tokens < 1:
            raise ValueError(f"a draft proposes at least 1 token a round, not {tokens}")
        if path == PROMPT_LOOKUP:
            return cls(None, tokens)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if model.config.vocab_size != vocab_size:
            raise ValueError(
                f"the draft model {path} has a vocabulary of {model.config.vocab_size} tokens, the model it drafts "
                f"for {vocab_size}: they must share one"
            )
        return cls(model, tokens)

    def options(
        self, temperature: float, seed: int, *, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
    ) -> dict:
        """`generate()`'s options that draw the tokens speculatively: greedy at temperature 0, else sampled
        with temperature, top-k, top-p and min-p, from a generator seeded with `seed`."""
        if self.model is None:
            options = {"prompt_lookup_num_tokens": self.tokens, "do_sample": False}
        else:
            options = {"assistant_model": self.model, "num_assistant_tokens": self.tokens, "do_sample": False}
        if temperature > 0:
            options |= {
                "do_sample": True,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k,
                "min_p": min_p,
                "generator": seeded_generator(seed),
            }
        return options


MT_STATE_AT = 24  # bytes before word 0 of the Mersenne Twister in a CPU generator's state (torch's layout)
MT_WORDS = 624


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator whose draws depend on all 64 bits of `seed` (taken modulo 2**64, as torch takes negative
    ones): `manual_seed` seeds the Mersenne Twister with the low 32 bits alone, so seeds 1 and 1 + 2**32 drew
    alike. A seed past 32 bits fills the twister's words from numpy's SeedSequence of the whole seed instead
    (a smaller one seeds it as `manual_seed` does)."""
    seed %= 2**64
    generator = torch.Generator().manual_seed(seed & 0xFFFF_FFFF)
    if seed >> 32:
        state = generator.get_state()
        words = state[MT_STATE_AT : MT_STATE_AT + 8 * MT_WORDS].view(torch.int64)  # each word in 64 bits
        if int(words[0]) != seed & 0xFFFF_FFFF:
            raise RuntimeError("torch's CPU generator state is not laid out as expected")
        key = np.random.MT19937(seed).state["state"]["key"]
        words.copy_(torch.from_numpy(key.astype(np.int64)))
        generator.set_state(state)
    return generator


class SeededSampler(LogitsProcessor):
    """Draws the next token from the (already temperature- and top-p-shaped) distribution with a generator of
    the request's own, and leaves only that token possible, so that greedy selection picks it. transformers'
    own sampling draws from the process-wide generator, which concurrent requests would share."""

    def __init__(self, seed: int):
        self.generator = seeded_generator(seed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs.cpu(), 1, generator=self.generator).to(scores.device)
        out = torch.full_like(scores, -float("inf"))
        return out.scatter_(1, chosen, 0.0)


class LogitBias(LogitsProcessor):
    """OpenAI's `logit_bias`: a value added to the logits of some tokens before they are chosen from (-100 bans a
    token, 100 all but forces it)."""

    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        values = self.values.to(scores.device, scores.dtype).expand(scores.shape[0], -1)
        return scores.index_add(1, self.ids.to(scores.device), values)


class OutputPenalties(LogitsProcessor):
    """OpenAI's `frequency_penalty` and `presence_penalty`: a token's logit loses `frequency` for each time it was
    generated already and `presence` once if it was at all. They count the generated tokens, not the prompt's
    (as vLLM does; `repetition_penalty` is the one that reads the prompt too)."""

    def __init__(self, prompt_length: int, frequency: float, presence: float):
        self.prompt_length, self.frequency, self.presence = prompt_length, frequency, presence

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length :]
        counts = torch.zeros(scores.shape, dtype=scores.dtype, device=scores.device)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
