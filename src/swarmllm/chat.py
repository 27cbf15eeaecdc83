"""`swarmllm chat MODEL`: a conversation in the terminal with a model of the swarm, as `ollama run` gives one.

Each line read is a user message; the answer streams out as it is generated (never half a character, see
`api.generation.TextAssembler`), and the history goes with the next message through the model's chat template.
One inference session is kept across the turns (`api.sessions.SessionPool` of one), so each turn sends the
servers only the new message; when the conversation outgrows the session, a larger one takes over. `/clear`
starts the conversation over, `/bye` (or the end of the input) ends it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from swarmllm.api.generation import (
    Draft,
    PieceStreamer,
    StopWhen,
    TextAssembler,
    chat_prompt,
    sampling,
    special_ids,
)
from swarmllm.api.sessions import SessionPool
from swarmllm.client.speculative import SpeculationStats

PROMPT = ">>> "


@dataclass(frozen=True)
class TurnStats:
    """What one answer cost: the prompt's tokens, how many of them the servers held already, the tokens
    generated (EOS included) and the seconds it took; with a draft, what speculative decoding did."""

    prompt_tokens: int
    cached_tokens: int
    tokens: int
    seconds: float
    speculation: SpeculationStats | None = None

    def __str__(self) -> str:
        drafts = self.speculation
        return (
            f"({self.tokens} tokens in {self.seconds:.2f} s, {self.tokens / max(self.seconds, 1e-9):.1f} tokens/s; "
            f"{self.cached_tokens} of {self.prompt_tokens} prompt tokens held by the servers"
            + ("" if drafts is None else f"; {drafts.accepted} of {drafts.drafted} drafts accepted")
            + ")"
        )


class Chat:
    """A conversation with `model`: the history, the kept session, and how answers are drawn (temperature 0:
    greedy; else temperature and top-p, each turn seeded `seed + turn`; speculatively with a `draft`)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        system: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.7,
        top_p: float = 0.9,
        seed: int = 0,
        context_length: int = 4096,
        draft: Draft | None = None,
    ):
        self.model, self.tokenizer, self.draft = model, tokenizer, draft
        self.max_new_tokens, self.temperature, self.top_p, self.seed = (
            max_new_tokens,
            temperature,
            top_p,
            seed,
        )
        self.context_length = context_length
        self.eos_ids, self.pad_id = special_ids(model.generation_config)
        self.start = [] if system is None else [{"role": "system", "content": system}]
        self.messages = list(self.start)
        self.sessions = SessionPool(model, size=1, idle_s=float("inf"), context_length=context_length)
        self.turns = 0
        self.last: TurnStats | None = None  # of the latest answer

    def clear(self) -> None:
        self.messages = list(self.start)

    def say(self, text: str, out: TextIO) -> str | None:
        """The answer to `text`, written to `out` as it comes (then a newline); None when the conversation
        leaves no room for it."""
        ids = self.tokenizer(
            chat_prompt(self.tokenizer, [*self.messages, {"role": "user", "content": text}]),
            add_special_tokens=False,
        )["input_ids"]
        room = self.context_length - len(ids)
        if room < 1:
            return None
        pieces: list[str] = []

        def emit(piece) -> None:
            pieces.append(piece.text)
            out.write(piece.text)
            out.flush()

        assembler = TextAssembler(
            lambda t: self.tokenizer.decode(t, skip_special_tokens=True), (), self.eos_ids
        )
        streamer = PieceStreamer(assembler, emit)
        max_new_tokens = min(self.max_new_tokens, room)
        prompt, began = torch.tensor([ids], device=self.model.device), time.perf_counter()
        seed = self.seed + self.turns
        if self.draft is not None:
            draw = self.draft.options(self.temperature, seed, top_p=self.top_p)
        else:  # sampling, when asked, is SeededSampler's
            draw = {
                "do_sample": False,
                "logits_processor": LogitsProcessorList(sampling(self.temperature, seed, top_p=self.top_p)),
            }
        with self.sessions.use(ids, len(ids) + max_new_tokens) as (_, cached):
            self.model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([StopWhen(lambda: assembler.stopped)]),
                **draw,
            )
        tail = streamer.finish()
        if tail is not None:
            emit(tail)
        out.write("\n")
        out.flush()
        spent = time.perf_counter() - began
        speculation = None if self.draft is None else self.model.last_speculation
        self.last = TurnStats(len(ids), cached, len(assembler.tokens), spent, speculation)
        answer = "".join(pieces)
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        self.turns += 1
        return answer

    def close(self) -> None:
        self.sessions.close_all()


def run_chat(
    chat: Chat, stdin: TextIO | None = None, stdout: TextIO | None = None, stats: bool = False
) -> None:
    """Read user messages from `stdin` (one a line) until `/bye` or its end, and write the answers to `stdout`
    (default: the process's); the `>>> ` prompt goes to stderr when stdin is a terminal, and so does each
    answer's `TurnStats` with `stats`."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    # bytes that are not text (a pasted binary, another encoding) read as U+FFFD, not as an error
    if hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="replace")
    interactive = stdin.isatty()
    try:
        while True:
            if interactive:
                print(PROMPT, end="", file=sys.stderr, flush=True)
            line = stdin.readline()
            text = line.strip()
            if not line or text in ("/bye", "/exit"):
                return
            if text == "/clear":
                chat.clear()
            elif text and chat.say(text, stdout) is None:
                print(
                    f"the conversation fills the context ({chat.context_length} tokens): /clear starts it over",
                    file=sys.stderr,
                )
            elif text and stats:
                print(chat.last, file=sys.stderr)
    finally:
        chat.close()
