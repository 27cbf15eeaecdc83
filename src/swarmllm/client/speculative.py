"""Speculative decoding: a small local draft model proposes k tokens, the swarm checks them all in one step.

Each round costs one trip through the swarm's chain (k + 1 tokens at once) instead of one per token: the draft
(any local transformers causal LM with the same vocabulary, keeping its own cache) proposes tokens d1..dk, the
target (the swarm) computes its distributions p1..p(k+1) after each prefix, and the longest acceptable prefix is
kept plus one token from the target, so a round yields 1 to k + 1 tokens.

The acceptance rule (`accept_drafts`) is the exact one of speculative sampling (Leviathan et al. 2023, Chen et
al. 2023): accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw from the
normalised residual max(0, p_i - q_i); if all are accepted draw the extra token from p(k+1). The tokens then
follow the target's (warped) distribution exactly, whatever the draft. Greedy keeps drafts while they equal the
target's argmax, so its tokens are plain greedy decoding's.

Rejected tokens need no undo on the servers: the next round steps at the position after the last accepted token,
and a session step at an earlier position than the session's length rewinds it (`InferenceSession.step`; the
servers overwrite those cache slots and never attend past the step). The draft's cache is cropped likewise.

The drafts may also come from the text itself (prompt lookup, `PromptLookup`; vLLM's "ngram" method): the
tokens that followed an earlier occurrence of the sequence's last n-gram. They cost no model at all, and
pay where the answer repeats its context (code edits, quotes, extraction, summaries). A proposal without a
distribution is a draft drawn from a point mass, for which the same rule is exact.

This module holds the loop and the rule; `client.model` gives it the swarm as a function from (tokens, position)
to logits, which is also how the tests give it a local model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

# (tokens [1, n], position of the first) -> the target's logits [1, n, vocab] after each of them; a call at a
# position below what the target holds forgets everything from there on
Verifier = Callable[[Tensor, int], Tensor]


@dataclass
class SpeculationStats:
    """What a speculative generation did: rounds through the swarm, tokens drafted and accepted."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        """The fraction of drafted tokens the target accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0


def accept_drafts(
    drafts: Tensor, q: Tensor, p: Tensor, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """The exact speculative sampling rule. drafts [k] were drawn from q [k, V]; p [k + 1, V] are the target's
    distributions after each prefix. Returns (number of drafts accepted, the next token)."""
    k = drafts.shape[0]
    for i in range(k):
        d = int(drafts[i])
        # accept with probability min(1, p/q): r * q < p for r uniform in [0, 1) (q[d] > 0: d was drawn from q)
        if torch.rand((), generator=generator, device=p.device) * q[i, d] < p[i, d]:
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        total = residual.sum()
        # p <= q everywhere (rounding only: a rejection needs some p > q) leaves nothing to draw from but p
        residual = residual / total if total > 0 else p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))


def accept_greedy(drafts: Tensor, target_logits: Tensor) -> tuple[int, int]:
    """Greedy: drafts [k] are kept while they are the target's argmax (target_logits [k + 1, V]); the next token
    is the target's argmax after them."""
    best = target_logits.argmax(-1)
    matches = (drafts == best[: drafts.shape[0]]).int().cumprod(0)
    accepted = int(matches.sum())
    return accepted, int(best[accepted])


# (prefix [1, n], logits [V]) -> the logits shaped by the generation's processors at that prefix
Shaper = Callable[[Tensor, Tensor], Tensor]


class Drafter(Protocol):
    """What proposes a round's drafts."""

    def propose(
        self, ids: Tensor, k: int, shaped: Shaper, do_sample: bool, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]:
        """Up to k tokens [m] to follow ids [1, n], and the distributions [m, V] they were drawn from (None: each
        was certain)."""
        ...

    def keep(self, length: int) -> None:
        """Forget what was read past the first `length` tokens."""
        ...


class ModelDraft:
    """A local draft model and its cache over the tokens it has read."""

    def __init__(self, model):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        # a sliding-window layer keeps only its window unless it records the past, and then a rejected draft
        # past the window's edge could not be cropped (transformers' assisted decoding records it too)
        self.cache.activate_past_recording()
        self.length = 0  # tokens its cache holds

    @torch.no_grad()
    def next_logits(self, ids: Tensor) -> Tensor:
        """Logits [V] after ids [1, n], reading only what the cache lacks."""
        new = ids[:, self.length :]
        out = self.model(input_ids=new, cache=self.cache, use_cache=True)
        self.length = ids.shape[1]
        return out.logits[0, -1].float()

    def propose(
        self, ids: Tensor, k: int, shaped: Shaper, do_sample: bool, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]:
        drafts, q = [], []
        prefix = ids
        for _ in range(k):
            logits = shaped(prefix, self.next_logits(prefix))
            if do_sample:
                q.append(torch.softmax(logits, dim=-1))
                token = torch.multinomial(q[-1], 1, generator=generator)
            else:
                token = logits.argmax(-1, keepdim=True)
            drafts.append(token)
            prefix = torch.cat([prefix, token[None].to(prefix.dtype)], dim=1)
        if not drafts:
            return ids.new_zeros(0), None
        return torch.cat(drafts), torch.stack(q) if q else None

    def keep(self, length: int) -> None:
        # transformers 5 crops by a negative count to remove; crop(0) still trims the recorded past to the windows
        self.cache.crop(min(0, length - self.length))
        self.length = min(length, self.length)


class PromptLookup:
    """Drafts copied from the sequence itself: the tokens after the first earlier occurrence of its last n
    tokens, the longest n up to `max_ngram` that occurs with something after it (transformers'
    `prompt_lookup_num_tokens` with `max_matching_ngram_size`)."""

    def __init__(self, max_ngram: int = 2):
        if max_ngram < 1:
            raise ValueError(f"prompt lookup matches n-grams of at least 1 token, not {max_ngram}")
        self.max_ngram = max_ngram

    def propose(
        self, ids: Tensor, k: int, shaped: Shaper, do_sample: bool, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]:
        row, n = ids[0], ids.shape[1]
        for size in range(min(self.max_ngram, n - 1), 0, -1):
            # windows starting before n - size: each has at least one token after it
            matches = (row[: n - 1].unfold(0, size, 1) == row[n - size :]).all(dim=1).nonzero()
            if len(matches):
                start = int(matches[0, 0]) + size
                return row[start : min(start + k, n)], None
        return ids.new_zeros(0), None

    def keep(self, length: int) -> None:
        pass  # nothing read: it looks at the whole sequence each round


def speculative_generate(
    verify: Verifier,
    draft,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    num_draft_tokens: int = 4,
    adaptive: bool = False,
    do_sample: bool = False,
    processors: LogitsProcessorList | None = None,
    eos_token_ids: set[int] | frozenset[int] = frozenset(),
    generator: torch.Generator | None = None,
    stats: SpeculationStats | None = None,
    held: int = 0,
    streamer: BaseStreamer | None = None,
    stop: Callable[[Tensor], bool] | None = None,
    record: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """input_ids [1, n] followed by up to `max_new_tokens` tokens (fewer after an EOS token, or once `stop`
    says so of the tokens so far: it is asked after each round).

    `verify` is the target; it holds the first `held` tokens of input_ids already (a kept session's prefix).
    `draft` proposes the drafts: a `Drafter`, or a transformers causal LM with the target's vocabulary
    (`ModelDraft`). `num_draft_tokens` is k; `adaptive` changes it as transformers' "heuristic" schedule does
    (+2 after a round that accepted every draft, -1 otherwise). `processors` (penalties, a grammar's mask, then
    temperature, top-k, top-p, min-p) shape both models' logits at each prefix: greedy takes the shaped
    target's argmax, sampling follows its distribution. Each is called with prefixes in any order (a round goes
    back over rejected drafts), so it must be a function of the prefix it is given. `streamer` gets the prompt,
    then each round's new tokens, as transformers' streamers do. `record` gets the target's own logits (before
    `processors`) at each of a round's new tokens, [new tokens, V], just before the streamer gets them: what
    log-probabilities are read from.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(
            "speculative decoding runs one sequence at a time (batch size 1), as in transformers"
        )
    stats = stats if stats is not None else SpeculationStats()
    processors = processors or LogitsProcessorList()
    draft = draft if hasattr(draft, "propose") else ModelDraft(draft)
    ids = input_ids
    if not 0 <= held < ids.shape[1]:
        raise ValueError(
            f"the target holds {held} of the prompt's {ids.shape[1]} tokens: it must lack the last"
        )
    if streamer is not None:
        streamer.put(ids.cpu())
    if held < ids.shape[1] - 1:  # the target reads the prompt but its last token, which starts a round
        verify(ids[:, held:-1], held)
    k, produced = num_draft_tokens, 0

    def shaped(prefix: Tensor, logits: Tensor) -> Tensor:
        return processors(prefix, logits[None])[0]

    while produced < max_new_tokens:
        n = ids.shape[1]
        drafting = max(0, min(k, max_new_tokens - produced - 1))  # room for the target's own extra token
        drafted, q = (
            draft.propose(ids, drafting, shaped, do_sample, generator) if drafting else (ids[0, :0], None)
        )
        drafting = drafted.shape[0]
        prefix = torch.cat([ids, drafted[None].to(ids.dtype)], dim=1)
        own = verify(prefix[:, n - 1 :], n - 1)[0].float()  # [drafting + 1, V]
        # (the processors shape a copy when `own` is recorded: one may shape its scores in place)
        scores = own if record is None else own.clone()
        target = torch.stack([shaped(prefix[:, : n + i], scores[i]) for i in range(drafting + 1)])
        if do_sample:
            p = torch.softmax(target, dim=-1)
            if q is None:  # certain drafts: each drawn from a point mass
                q = torch.nn.functional.one_hot(drafted, p.shape[-1]).to(p.dtype)
            accepted, token = accept_drafts(drafted, q, p, generator)
        else:
            accepted, token = accept_greedy(drafted, target)
        new = [*drafted[:accepted].tolist(), token]
        stats.rounds, stats.drafted, stats.accepted = (
            stats.rounds + 1,
            stats.drafted + drafting,
            stats.accepted + accepted,
        )
        end = next((i for i, t in enumerate(new) if t in eos_token_ids), None)
        if end is not None:
            new = new[: end + 1]
        ids = torch.cat([ids, torch.tensor([new], dtype=ids.dtype, device=ids.device)], dim=1)
        produced += len(new)
        if record is not None:
            record(own[: len(new)])
        if streamer is not None:
            streamer.put(torch.tensor(new))
        draft.keep(n + accepted)  # the draft read the accepted drafts (and perhaps rejected ones: forgotten)
        if end is not None or (stop is not None and stop(ids)):
            break
        if adaptive and drafting:
            k = k + 2 if accepted == drafting else max(1, k - 1)
    if streamer is not None:
        streamer.end()
    return ids
