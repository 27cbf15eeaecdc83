"""`swarmllm api MODEL`: an OpenAI-compatible HTTP API over a swarm (`/v1/models`, `/v1/completions`,
`/v1/chat/completions`, with `stream: true` as server-sent events, `/v1/embeddings`, `/v1/responses` in
api/responses.py), and Ollama's and Anthropic's beside it (api/ollama.py, api/messages.py).

Each request (each of its `n` choices) runs `generate()` of one shared `DistributedModelForCausalLM` in a worker
thread with an inference session of its own while it runs (sessions are per thread), so concurrent requests each
hold their own caches on the servers and never wait for one another's tokens (a request's later choices wait for
its first one's prompt to be through, `Engine.start_all`). Between requests the sessions are kept
(`api.sessions`): a prompt that extends what one holds sends the servers only its new tokens. Text comes out of
`api.generation.TextAssembler` piece by piece; a non-streamed answer is those pieces joined. Errors use OpenAI's
format: 404 for an unknown model, 400 for an invalid parameter, 503 when the swarm cannot serve the request (e.g.
blocks without a server).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from aiohttp import web
from jinja2 import TemplateError
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
)

from swarmllm.api.embeddings import embed, encoded, unit
from swarmllm.api.generation import (
    Draft,
    LogitBias,
    LogprobRecorder,
    OutputPenalties,
    Piece,
    PieceStreamer,
    StopWhen,
    TextAssembler,
    TokenLogprob,
    TokenTexts,
    chat_prompt,
    prompt_logprobs,
    sampling,
    special_ids,
)
from swarmllm.api.json_mode import GrammarLogits, text_bytes
from swarmllm.api.messages import MessagesApi
from swarmllm.api.metrics import ApiMetrics
from swarmllm.api.ollama import OllamaApi
from swarmllm.api.responses import ResponsesApi
from swarmllm.api.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    GuideMasks,
    TokenizeRequest,
)
from swarmllm.api.sessions import SessionPool
from swarmllm.api.streams import joined, merged, read_json, stream, swarm_error, validated
from swarmllm.api.tools import ResponseStream, ToolCalling, ToolError, message_text
from swarmllm.client.loop import event_loop
from swarmllm.client.routing import missing_blocks

logger = logging.getLogger(__name__)

_END = object()  # the end of a generation's pieces
MAX_EMBED_TOKENS = 65_536  # summed over one embeddings request's inputs
HEALTH_TIMEOUT_S = 10.0  # for the swarm's server list (a DHT look-up when the list is stale)
# the most a request's later choice waits for the first's prompt to be through (then it computes its own)
FIRST_CHOICE_WAIT_S = 300.0
DONE = b"data: [DONE]\n\n"  # the last server-sent event


@dataclass
class Generation:
    """One request's generate, running in a worker thread: its text pieces arrive in `pieces`."""

    prompt_tokens: int
    max_new_tokens: int
    assembler: TextAssembler
    texts: TokenTexts  # the texts of its tokens, for `logprobs`, in the order they come
    index: int = 0  # which of its prompt's choices (or best_of candidates)
    pieces: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the requester went away: the generate stops at its next token
    # set while it runs: ends it before its first token (a wait for room, a prefill) when its requester goes away
    abort: Callable[[], None] | None = None
    logprob_sum: float = 0.0  # of its tokens under the model, when recorded (set when it ends)
    # of the prompt, held by the servers already (a kept session's) or copied (their prefix caches)
    cached_tokens: int = 0
    # set at its first token (its prompt is through the servers, in their prefix caches) or when it ends
    primed: threading.Event = field(default_factory=threading.Event)

    @property
    def mean_logprob(self) -> float:
        """What `best_of` ranks candidates by: OpenAI's "highest log probability per token"."""
        return self.logprob_sum / max(self.completion_tokens, 1)

    @property
    def completion_tokens(self) -> int:
        return len(self.assembler.tokens)

    @property
    def finish_reason(self) -> str:
        return self.assembler.finish_reason or "length"

    async def text(self) -> AsyncIterator[Piece]:
        """The pieces as they come; raises what the generate raised."""
        while True:
            piece = await self.pieces.get()
            if piece is _END:
                return
            if isinstance(piece, BaseException):
                raise piece
            yield piece


class Engine:
    """The model, its tokenizer and the worker threads that run requests' generates."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        *,
        context_length: int,
        max_concurrent: int = 16,
        keep_sessions: int = 4,
        keep_sessions_s: float = 120.0,
        metrics: ApiMetrics | None = None,
        draft: Draft | None = None,
    ):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.draft = draft  # speculative decoding, for every request
        self.context_length = context_length
        self.max_concurrent = max_concurrent
        self.executor = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="swarmllm-api")
        self.sessions = SessionPool(
            model, size=keep_sessions, idle_s=keep_sessions_s, context_length=context_length
        )
        self.eos_ids, self.pad_id = special_ids(model.generation_config)
        self.guides = GuideMasks(self.tokenizer, model.config.vocab_size, self.eos_ids)
        self.metrics = metrics or ApiMetrics()  # (one for every model of an API)
        self.counted = self.metrics.model(name)  # this model's series
        self.adapters: list[Engine] = []  # engines of this model with an adapter, over its swarm connection
        self.parent: str | None = None  # an adapter's engine: its model's name

    def with_adapter(self, name: str, path: str) -> Engine:
        """An engine of this model with the LoRA adapter saved at `path` (`--lora-modules NAME=DIR`), served as
        `name`: the same swarm connection, head, tokenizer, draft and settings, and sessions of its own."""
        engine = Engine(
            self.model.with_adapter(path),  # (its name on the wire is the client's own)
            self.tokenizer,
            name,
            context_length=self.context_length,
            max_concurrent=self.max_concurrent,
            keep_sessions=self.sessions.size,
            keep_sessions_s=self.sessions.idle_s,
            metrics=self.metrics,
            draft=self.draft,
        )
        engine.parent = self.name
        self.adapters.append(engine)
        return engine

    def give_way_for_room(self) -> None:
        """(The swarm client's `room_wanted`, on its event loop.) A generation waits for cache room (a new one,
        or one moving off a failed server): the sessions kept for next turns give way (closed off the loop, which
        closing waits on). It waits for the room its other generations hold as they end, or other requesters',
        up to the client's `room_wait_s`, as vLLM queues a request."""
        asyncio.get_running_loop().run_in_executor(None, self._give_way)

    def _give_way(self) -> None:
        """Close the sessions kept for next turns (its adapters' too: one swarm connection), for a generation
        refused cache room."""
        if closed := sum(engine.sessions.close_all() for engine in (self, *self.adapters)):
            logger.info("no cache room for a generation: closed %d kept sessions", closed)

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def start_all(self, prompt_ids: list[int], max_new_tokens: int | None, request) -> list[Generation]:
        """The request's `n` choices (or `best_of` candidates), each a generate of its own (seeded `seed + i`,
        when seeded). The others open their sessions once the first has its first token: its prompt is then in
        the servers' prefix caches, and they copy its whole blocks instead of computing them again (a server's
        compute thread would have run their prefills one after another anyway), as vLLM's `n` shares its prompt."""
        first = self.start(prompt_ids, max_new_tokens, request)
        others = (
            self.start(prompt_ids, max_new_tokens, request, i, first.primed)
            for i in range(1, request.candidates())
        )
        return [first, *others]

    def stop_ids(self, request) -> list[int]:
        """The tokens that end a generate's text: EOS (unless `ignore_eos`) and the request's `stop_token_ids`."""
        return ([] if request.ignore_eos else self.eos_ids) + list(request.stop_token_ids or ())

    def fit(self, prompt_ids: list[int], max_new_tokens: int | None) -> int:
        """How many tokens a generate from `prompt_ids` may make (None: up to the context), or a 400 where the
        prompt is empty or they do not fit the context."""
        if not prompt_ids:  # (a text of no tokens): nothing to generate from
            raise ApiError(400, "the prompt has no tokens", "invalid_request_error", "prompt")
        room = self.context_length - len(prompt_ids)
        if max_new_tokens is None:
            max_new_tokens = max(room, 1)  # up to the context, which must leave room for one token
        if max_new_tokens > room:
            raise ApiError(
                400,
                f"This model's context is {self.context_length} tokens; the prompt has {len(prompt_ids)} and "
                f"{max_new_tokens} more were asked for",
                "invalid_request_error",
                "max_tokens",
                "context_length_exceeded",
            )
        return max_new_tokens

    def start(
        self,
        prompt_ids: list[int],
        max_new_tokens: int | None,
        request,
        index: int = 0,
        after: threading.Event | None = None,
    ) -> Generation:
        """A generate in a worker thread (at most `--max-concurrent` at once); `after`: what it waits for before
        it opens its session (`start_all`)."""
        max_new_tokens = self.fit(prompt_ids, max_new_tokens)
        loop = asyncio.get_running_loop()
        echo = getattr(request, "echo", False)  # (then the prompt's tokens come first)
        gen = Generation(
            len(prompt_ids),
            max_new_tokens,
            TextAssembler(
                functools.partial(self.decode, skip_special_tokens=request.skip_special_tokens),
                request.stop_strings(),
                self.stop_ids(request),
                request.min_tokens,
                prompt_ids,
            ),
            TokenTexts(self.tokenizer.decode, () if echo else prompt_ids),
            index,
        )

        def put(item) -> None:
            loop.call_soon_threadsafe(gen.pieces.put_nowait, item)

        started = time.perf_counter()
        self.counted.generations_waiting.inc()  # running once a worker takes it (--max-concurrent)

        def work() -> None:
            self.counted.generations_waiting.dec()
            self.counted.generations_running.inc()
            outcome: object = _END
            try:
                if after is not None:  # (set by a generation started before it, whose end sets it anyway)
                    after.wait(FIRST_CHOICE_WAIT_S)
                if gen.cancelled:  # its requester left while it waited for a worker: no session for nobody
                    return
                need = len(prompt_ids) + max_new_tokens  # (0: echo alone, a forward over the prompt at most)
                # scoring the prompt needs the logits of all of its positions: nothing held can serve
                scored = echo and request.logprob_top() is not None

                def counted(tokens: int) -> None:
                    self.counted.generation_tokens.inc(tokens)
                    gen.primed.set()

                streamer = PieceStreamer(gen.assembler, put, self._recorder(request), counted)
                # (a session refused cache room waits for it in the swarm client: `give_way_for_room`)
                with self.sessions.use([] if scored else prompt_ids, need) as (remote, gen.cached_tokens):
                    copied = remote.copied

                    def abort() -> None:
                        """(On the API's loop.) Its requester left before its first token: the session closes,
                        which ends a wait for room (up to the client's `room_wait_s`) or a prefill now."""
                        if streamer.first_token_at is None:
                            loop.run_in_executor(None, self.sessions.drop, remote)

                    gen.abort = abort
                    if gen.cancelled:  # (left before `abort` was set)
                        abort()
                    try:
                        if echo:
                            self._echo(prompt_ids, gen, request, streamer, put, index)
                        else:
                            self._generate(prompt_ids, gen, request, streamer, index)
                    finally:
                        gen.abort = None  # (the session goes back to the pool next)
                    # and the positions the servers copied from their prefix caches
                    gen.cached_tokens = min(gen.cached_tokens + remote.copied - copied, len(prompt_ids))
                tail = streamer.finish()
                if tail is not None:
                    put(tail)
                gen.logprob_sum = streamer.logprob_sum
                self.counted.generated(
                    started, streamer.first_token_at, time.perf_counter(), gen.completion_tokens,
                    gen.prompt_tokens, gen.cached_tokens,
                )  # fmt: skip
            except BaseException as e:  # noqa: BLE001 - handed to the request, which answers with it
                if gen.cancelled:  # its requester left (and its session may have been closed under it)
                    logger.debug("generation ended for a requester that left: %r", e)
                else:
                    logger.warning("generation failed: %r", e)
                    self.counted.generation_failures.inc()
                outcome = e
            finally:
                # no longer running before its end is handed out: whoever reads the gauge after the answer
                # sees it gone
                self.counted.generations_running.dec()
                gen.primed.set()
                put(outcome)

        loop.run_in_executor(self.executor, work)
        return gen

    def _echo(
        self, prompt_ids: list[int], gen: Generation, request, streamer: PieceStreamer, put, index: int
    ) -> None:
        """The prompt first (its tokens' log-probabilities from one forward over it, if asked), then the
        completion, in the request's inference session: the generate reuses what the forward left on the
        servers."""
        top = request.logprob_top()
        entries = []
        if top is not None:
            with torch.no_grad():  # scoring, as generate's own forwards: no graph (and the merged LM head)
                logits = self.model(torch.tensor([prompt_ids], device=self.model.device)).logits[0]
            entries = prompt_logprobs(prompt_ids, logits, top)
        put(Piece(self.tokenizer.decode(prompt_ids), entries))  # as given: special tokens too
        if gen.max_new_tokens > 0:
            self._generate(prompt_ids, gen, request, streamer, index)

    @staticmethod
    def _recorder(request) -> LogprobRecorder | None:
        top = request.logprob_top()
        if top is None and request.candidates() > request.n:
            top = 0  # best_of ranks by the tokens' log-probabilities
        return None if top is None else LogprobRecorder(top)

    def _generate(
        self, prompt_ids: list[int], gen: Generation, request, streamer: PieceStreamer, index: int
    ) -> None:
        ids = torch.tensor([prompt_ids], device=self.model.device)
        top = {"top_p": request.top_p, "top_k": request.top_k, "min_p": request.min_p}
        shaping = self._shaping(len(prompt_ids), request)
        seed = self._seed(request, index)
        if self.draft is not None:
            draw = self.draft.options(request.temperature, seed, **top)
            draw["logits_processor"] = LogitsProcessorList(shaping)
            if streamer.recorder is not None:  # the swarm's own logits of each round's tokens
                draw["record_logits"] = streamer.recorder.record
        else:
            # the recorder first (the model's own log-probabilities); sampling, when asked, is SeededSampler's
            recorder = [] if streamer.recorder is None else [streamer.recorder]
            processors = recorder + shaping + sampling(request.temperature, seed, **top)
            draw = {"do_sample": False, "logits_processor": LogitsProcessorList(processors)}
        self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=gen.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=None if request.ignore_eos else self.eos_ids,  # stop_token_ids: the assembler's
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList(
                [StopWhen(lambda: gen.assembler.stopped or gen.cancelled)]
            ),
            **draw,
        )
        if self.draft is not None:
            self.counted.speculated(self.model.last_speculation)

    @staticmethod
    def _seed(request, index: int) -> int:
        """A choice's seed: the request's plus its index, or a random one."""
        if request.seed is not None:
            return request.seed + index
        return int.from_bytes(uuid.uuid4().bytes[:8], "little")

    def _shaping(self, prompt_length: int, request) -> list:
        """What shapes the model's logits before a token is chosen from them, in vLLM's order: `min_tokens` and
        `logit_bias`, the penalties, then structured output's constraint (temperature, top-k, top-p and min-p
        come after). Each is a function of the tokens so far, as speculative decoding needs (see there)."""
        processors = []
        stop_ids = self.stop_ids(request)
        if request.min_tokens and stop_ids:
            processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, request.min_tokens, stop_ids))
        if request.logit_bias:
            processors.append(LogitBias(request.logit_bias))
        if request.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(request.repetition_penalty))
        if request.frequency_penalty or request.presence_penalty:
            processors.append(
                OutputPenalties(prompt_length, request.frequency_penalty, request.presence_penalty)
            )
        if (guide := request.grammar()) is not None:
            processors.append(GrammarLogits(self.guides.mask(guide), prompt_length))
        return processors

    @staticmethod
    def _texts(entries: list[TokenLogprob], texts: TokenTexts) -> list[tuple[str, list[str]]]:
        """Each entry's token text and its top tokens' (in place of it), the context moving on token by token."""
        out = []
        for e in entries:
            out.append((texts.text(e.token), [texts.text(t) for t, _ in e.top]))
            texts.push(e.token)
        return out

    def chat_logprobs(self, entries: list[TokenLogprob], texts: TokenTexts) -> dict:
        """OpenAI's chat `logprobs`: each token's text, bytes and log-probability, with its step's top tokens. A
        token that holds part of a character reads U+FFFD, and its bytes are its own, so that the bytes of the
        tokens joined are the text's (what OpenAI's `bytes` are for)."""

        def one(token: int, text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text_bytes(self.tokenizer, token, text))}

        return {
            "content": [
                {
                    **one(e.token, text, e.logprob),
                    "top_logprobs": [one(t, text, lp) for text, (t, lp) in zip(tops, e.top, strict=True)],
                }
                for e, (text, tops) in zip(entries, self._texts(entries, texts), strict=True)
            ]
        }

    def completion_logprobs(
        self, entries: list[TokenLogprob], offset: int, top: bool, texts: TokenTexts
    ) -> dict:
        """OpenAI's (legacy) completion `logprobs`; `offset`: where the first token's text starts in the answer."""
        tokens = texts.joined([e.token for e in entries])  # (before `_texts` moves the context on)
        named = self._texts(entries, texts)
        starts = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset))[: len(tokens)]
        tops = [
            None if e.logprob is None else {t: lp for t, (_, lp) in zip(alts, e.top, strict=True)}
            for e, (_, alts) in zip(entries, named, strict=True)
        ]
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops if top else None,
            "text_offset": starts,
        }

    async def embed(
        self, ids: list[list[int]], dimensions: int | None, normalize: bool = True
    ) -> torch.Tensor:
        """Each input's embedding (api/embeddings.py), its first `dimensions` entries, of length 1 unless not
        `normalize`; computed in a worker thread. A failure of the swarm is a 503."""
        loop = asyncio.get_running_loop()
        try:
            vectors = await loop.run_in_executor(self.executor, embed, self.model, ids, self.pad_id)
        except Exception as e:  # noqa: BLE001 - the swarm's failure
            logger.warning("embedding failed: %r", e)
            raise swarm_error(e) from None
        self.counted.embedded_inputs.inc(len(ids))
        self.counted.embedded_tokens.inc(sum(map(len, ids)))
        return unit(vectors, dimensions) if normalize else vectors[:, :dimensions]

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.sessions.close_all()


def _error(e: ApiError) -> web.Response:
    return web.json_response(e.body, status=e.status)


class Api:
    """One model's routes (its engine, its checks), with Ollama's and the Responses API's beside them; served
    alone or with other models' by `api.gateway.Gateway`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.served = [engine.name]  # the names of every model the API serves (a gateway's, all of them)
        self.responses = ResponsesApi(self)  # OpenAI's Responses API (`/v1/responses`)
        self.ollama = OllamaApi(self)  # Ollama's API beside it (`/api/...`)
        self.messages = MessagesApi(self)  # and Anthropic's Messages API (`/v1/messages`)

    def routes(self) -> list[tuple[str, str, Callable]]:
        """(method, path, handler) of every route that answers for this model."""
        return [
            ("GET", "/v1/models/{model:.+}", self.model),
            ("POST", "/v1/completions", self.completions),
            ("POST", "/v1/chat/completions", self.chat),
            ("POST", "/v1/embeddings", self.embeddings),
            # vLLM's tokenizer endpoints, at the root as there: lm-evaluation-harness tokenizes through them
            ("GET", "/tokenizer_info", self.tokenizer_info),
            ("POST", "/tokenize", self.tokenize),
            ("POST", "/detokenize", self.detokenize),
            *self.responses.routes(),
            *self.ollama.routes(),
            *self.messages.routes(),
        ]

    async def health(self) -> tuple[bool, dict]:
        """Whether some online server holds each block of the model (as the DHT says), and the blocks
        without one."""
        swarm = self.engine.model.swarm
        try:
            asked = asyncio.run_coroutine_threadsafe(swarm.servers(), event_loop())
            servers = await asyncio.wait_for(asyncio.wrap_future(asked), HEALTH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - the DHT could not be asked
            return False, {"status": "unavailable", "error": str(e) or type(e).__name__}
        missing = missing_blocks(servers, swarm.num_blocks)
        if missing:
            return False, {"status": "unavailable", "missing_blocks": missing}
        return True, {"status": "ok", "servers": len(servers)}

    def model_card(self) -> dict:
        card = {"id": self.engine.name, "object": "model", "created": 0, "owned_by": "swarmllm"}
        # and Anthropic's fields of a model (its client's `models.list` and `models.retrieve`)
        card |= {"type": "model", "display_name": self.engine.name, "created_at": "1970-01-01T00:00:00Z"}
        if self.engine.parent is not None:  # an adapter's model, as vLLM lists a LoRA's
            card["parent"] = self.engine.parent
        return card

    async def model(self, request: web.Request) -> web.Response:
        try:
            self._check_model(request.match_info["model"])
        except ApiError as e:
            return _error(e)
        return web.json_response(self.model_card())

    def _check_model(self, name: str) -> None:
        if name != self.engine.name:
            served = ", ".join(f"'{n}'" for n in self.served)
            raise ApiError(
                404,
                f"The model '{name}' does not exist (this API serves {served})",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    @staticmethod
    async def _body(request: web.Request, schema):
        return validated(schema, await read_json(request))

    def _prompt_ids(self, prompt, param: str = "prompt") -> list[list[int]]:
        """Each prompt's token ids: one text, texts, one list of ids, or lists of ids."""
        several = isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list)
        ids = []
        for one in prompt if several else [prompt]:
            if isinstance(one, str):
                ids.append(self.engine.tokenizer(one)["input_ids"])
                continue
            if not one:
                raise ApiError(
                    400, "a prompt of token ids needs at least one", "invalid_request_error", param
                )
            self._check_ids(one, param)
            ids.append(list(one))
        return ids

    def embedding_ids(self, body: EmbeddingRequest, truncate: bool = False) -> list[list[int]]:
        """Each input's token ids, each at most the context long (`truncate`: cut there, else a 400), at most
        MAX_EMBED_TOKENS in all; and `dimensions` at most the model's."""
        hidden = self.engine.model.config.hidden_size
        if body.dimensions is not None and body.dimensions > hidden:
            raise ApiError(400, f"dimensions must be at most {hidden}", "invalid_request_error", "dimensions")
        ids = self._prompt_ids(body.input, "input")
        if not all(ids):
            raise ApiError(400, "an input needs at least one token", "invalid_request_error", "input")
        context = self.engine.context_length
        if truncate:
            ids = [one[:context] for one in ids]
        elif (longest := max(map(len, ids))) > context:
            raise ApiError(
                400,
                f"This model's context is {context} tokens; an input has {longest}",
                "invalid_request_error",
                "input",
                "context_length_exceeded",
            )
        if (total := sum(map(len, ids))) > MAX_EMBED_TOKENS:
            raise ApiError(
                400,
                f"the inputs have {total} tokens in all; at most {MAX_EMBED_TOKENS} per request",
                "invalid_request_error",
                "input",
            )
        return ids

    async def embeddings(self, request: web.Request) -> web.Response:
        """OpenAI's embeddings: one vector per input, in order, as floats or base64."""
        try:
            body = await self._body(request, EmbeddingRequest)
            self._check_model(body.model)
            ids = self.embedding_ids(body)
            vectors = await self.engine.embed(ids, body.dimensions)
        except ApiError as e:
            return _error(e)
        data = [
            {"object": "embedding", "index": i, "embedding": encoded(vector, body.encoding_format)}
            for i, vector in enumerate(vectors)
        ]
        tokens = sum(map(len, ids))
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return web.json_response({"object": "list", "data": data, "model": self.engine.name, "usage": usage})

    async def tokenizer_info(self, _request: web.Request) -> web.Response:
        tokenizer = self.engine.tokenizer
        return web.json_response(
            {
                "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token,
                "pad_token": tokenizer.pad_token,
                "chat_template": getattr(tokenizer, "chat_template", None),
                "model_max_length": self.engine.context_length,
            }
        )

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request, TokenizeRequest)
        except ApiError as e:
            return _error(e)
        tokens = self.engine.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        return web.json_response(
            {"tokens": tokens, "count": len(tokens), "max_model_len": self.engine.context_length}
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request, DetokenizeRequest)
            self._check_ids(body.tokens, "tokens")
        except ApiError as e:
            return _error(e)
        return web.json_response({"prompt": self.engine.tokenizer.decode(body.tokens)})

    def _check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"token ids must be in [0, {vocab})", "invalid_request_error", param)

    def _check_sampling(self, body) -> None:
        """The token ids a request names besides its prompt are the model's."""
        self._check_ids(list(body.logit_bias or ()), "logit_bias")
        self._check_ids(body.stop_token_ids or [], "stop_token_ids")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request, CompletionRequest)
            self._check_model(body.model)
            self._check_sampling(body)
            prompts = self._prompt_ids(body.prompt)
            for ids in prompts:  # every prompt checked before any starts: a 400 leaves none generating
                self.engine.fit(ids, body.max_new_tokens())
            gens = [gen for ids in prompts for gen in self.engine.start_all(ids, body.max_new_tokens(), body)]
        except ApiError as e:
            return _error(e)
        reply = _Reply("cmpl", "text_completion", self.engine.name)
        top, offsets = body.logprob_top(), [0] * len(gens)  # each choice's text so far

        def logprobs(i: int, piece: Piece) -> dict | None:
            if top is None:
                return None
            out = self.engine.completion_logprobs(piece.logprobs, offsets[i], top > 0, gens[i].texts)
            offsets[i] += len(piece.text)
            return out

        def choice(i: int, piece: Piece) -> dict:
            return {"text": piece.text, "logprobs": logprobs(i, piece)}

        if body.stream:
            return await reply.stream(request, gens, body, choice, {"text": "", "logprobs": None})
        per_prompt = body.candidates()

        def best() -> list[int]:
            """Each prompt's n candidates with the highest log-probability per token, the best first."""
            return [
                i
                for first in range(0, len(gens), per_prompt)
                for i in sorted(range(first, first + per_prompt), key=lambda i: -gens[i].mean_logprob)[
                    : body.n
                ]
            ]

        return await reply.whole(gens, choice, best if per_prompt > body.n else None)

    def chat_ids(self, body: ChatRequest) -> tuple[list[int], ToolCalling | None]:
        """A chat request's prompt ids (the chat template over its messages, with the tools' instruction and
        format when it has tools), and its tools."""
        messages = [m.model_dump(include={"role", "content", "tool_calls"}) for m in body.messages]
        try:
            tools = body.tool_calling()
            messages = (
                tools.messages(messages)
                if tools
                else [{"role": m["role"], "content": message_text(m)} for m in messages]
            )
        except ToolError as e:
            raise ApiError(400, str(e), "invalid_request_error", e.param) from None
        try:
            text = chat_prompt(
                self.engine.tokenizer,
                messages,
                body.continue_final_message,
                body.add_generation_prompt,
                body.chat_template_kwargs,
            )
        except (TemplateError, ValueError, TypeError) as e:  # a role, order or variable the template refuses
            message = f"the model's chat template refused the messages: {e}"
            raise ApiError(400, message, "invalid_request_error", "messages") from None
        return self.engine.tokenizer(text, add_special_tokens=False)["input_ids"], tools

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request, ChatRequest)
            self._check_model(body.model)
            self._check_sampling(body)
            ids, tools = self.chat_ids(body)
            gens = self.engine.start_all(ids, body.max_new_tokens(), body)
        except ApiError as e:
            return _error(e)
        reply = _Reply("chatcmpl", "chat.completion", self.engine.name)

        def logprobs(i: int, piece: Piece) -> dict | None:
            if body.logprob_top() is None:
                return None
            return self.engine.chat_logprobs(piece.logprobs, gens[i].texts)

        if tools is not None:  # the answer is known once whole: a call or a response

            def answer(i: int, piece: Piece) -> dict:
                content, calls = tools.parse(piece.text)
                message = {
                    "role": "assistant",
                    "content": content,
                    **({"tool_calls": calls} if calls else {}),
                }
                finish = "tool_calls" if calls else gens[i].finish_reason
                return {"message": message, "logprobs": logprobs(i, piece), "finish_reason": finish}

            if body.stream:
                return await reply.stream_tools(request, gens, body, answer)
            return await reply.whole(gens, answer)
        if body.stream:
            return await reply.stream(
                request,
                gens,
                body,
                lambda i, piece: {"delta": {"content": piece.text}, "logprobs": logprobs(i, piece)},
                {"delta": {}, "logprobs": None},
                first={"delta": {"role": "assistant", "content": ""}, "logprobs": None},
            )
        return await reply.whole(
            gens,
            lambda i, piece: {
                "message": {"role": "assistant", "content": piece.text},
                "logprobs": logprobs(i, piece),
            },
        )


class _Reply:
    """One response's envelope (id, object, created, model) around its choice, whole or as SSE chunks."""

    def __init__(self, prefix: str, kind: str, model: str):
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.kind, self.model, self.created = kind, model, int(time.time())

    def _envelope(self, kind: str, **fields) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, **fields}

    async def whole(
        self, gens: list[Generation], choice, chosen: Callable[[], list[int]] | None = None
    ) -> web.Response:
        """The choices are `choice(i, piece)` of generation i's pieces joined into one, for each generation or
        for those `chosen()` picks once all have ended (best_of); usage counts all of them."""
        try:
            pieces = await joined(gens)
        except ApiError as e:
            return _error(e)
        picked = range(len(gens)) if chosen is None else chosen()
        choices = [
            {"index": k, "finish_reason": gens[i].finish_reason, **choice(i, pieces[i])}
            for k, i in enumerate(picked)
        ]
        body = self._envelope(self.kind, choices=choices, usage=_usage(gens))
        return web.json_response(body)

    async def _sse(
        self, request: web.Request, gens: list[Generation], body, kind: str, events: AsyncIterator[dict]
    ) -> web.StreamResponse:
        """Server-sent events: each chunk of `events`, then the usage if asked and `[DONE]` (`streams.stream`:
        a failure in the stream, cancelled generations when the requester leaves)."""

        def event(data: dict) -> bytes:
            return f"data: {json.dumps(data)}\n\n".encode()

        async def chunks() -> AsyncIterator[bytes]:
            async for data in events:
                yield event(data)

        def trailer() -> bytes:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return (event(self._envelope(kind, choices=[], usage=_usage(gens))) if usage else b"") + DONE

        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        return await stream(request, gens, headers, chunks(), lambda e: event(e.body) + DONE, trailer)

    async def stream(
        self, request: web.Request, gens: list[Generation], body, choice, last: dict, first=None
    ) -> web.StreamResponse:
        """Each piece of each choice as it comes (`choice(i, piece)`), then each choice's `last` chunk with its
        finish reason, then the usage if asked."""
        kind = self.kind + ".chunk" if self.kind == "chat.completion" else self.kind

        def chunk(i: int, data: dict, finish_reason: str | None) -> dict:
            return self._envelope(kind, choices=[{"index": i, **data, "finish_reason": finish_reason}])

        async def events() -> AsyncIterator[dict]:
            for i in range(len(gens)) if first is not None else ():
                yield chunk(i, first, None)
            async for i, piece in merged(gens):
                if piece is None:  # choice i has ended
                    yield chunk(i, last, gens[i].finish_reason)
                else:
                    yield chunk(i, choice(i, piece), None)

        return await self._sse(request, gens, body, kind, events())

    async def stream_tools(
        self, request: web.Request, gens: list[Generation], body, answer
    ) -> web.StreamResponse:
        """A chat answer with tools, streamed: the role; a direct response's text as it is generated
        (`ResponseStream`); once the answer is whole, its tool calls as one delta (each with its index) or the
        text not sent yet, with the answer's log-probabilities; then its finish reason and the usage if asked."""
        kind = self.kind + ".chunk"

        def chunk(i: int, delta: dict, finish_reason: str | None = None, logprobs=None) -> dict:
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return self._envelope(kind, choices=[choice])

        async def events() -> AsyncIterator[dict]:
            streams, pieces, sent = [ResponseStream() for _ in gens], [[] for _ in gens], [""] * len(gens)
            for i in range(len(gens)):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for i, piece in merged(gens):
                if piece is not None:
                    pieces[i].append(piece)
                    if text := streams[i].feed(piece.text):
                        sent[i] += text
                        yield chunk(i, {"content": text})
                    continue
                whole = Piece("".join(p.text for p in pieces[i]), [e for p in pieces[i] for e in p.logprobs])
                done = answer(i, whole)
                message, delta = done["message"], {}
                if "tool_calls" in message:
                    delta["tool_calls"] = [
                        {"index": j, **call} for j, call in enumerate(message["tool_calls"])
                    ]
                elif (content := message["content"] or "").startswith(sent[i]) and content != sent[i]:
                    delta["content"] = content[len(sent[i]) :]
                yield chunk(i, delta, logprobs=done["logprobs"])
                yield chunk(i, {}, done["finish_reason"])

        return await self._sse(request, gens, body, kind, events())


def _usage(gens: list[Generation]) -> dict:
    """Each prompt once, every choice's completion tokens; of each prompt's tokens, those its first choice found
    held by the servers already (OpenAI's `cached_tokens`: the others copy what the first computed, `start_all`)."""
    completion = sum(gen.completion_tokens for gen in gens)
    prompt = sum(gen.prompt_tokens for gen in gens if gen.index == 0)
    cached = sum(gen.cached_tokens for gen in gens if gen.index == 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def load_engine(
    model: str,
    initial_peers: list[str],
    *,
    name: str | None = None,
    swarm_key: str | None = None,
    context_length: int | None = None,
    max_concurrent: int = 16,
    keep_sessions: int = 4,
    keep_sessions_s: float = 120.0,
    metrics: ApiMetrics | None = None,
    draft_model: str | None = None,
    draft_tokens: int | None = None,
    revision: str | None = None,
    chat_template: str | None = None,
    **client_options,
) -> Engine:
    """The tokenizer and the client's part of `model` (embeddings, LM head) at the hub's `revision`, joined to
    the swarm; with `draft_model`, a local draft for speculative decoding (`draft_tokens` a round, or the
    client's default); `chat_template` in place of the tokenizer's."""
    from transformers import AutoTokenizer

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.dht.records import dht_prefix_for

    tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    distributed = AutoDistributedModelForCausalLM.from_pretrained(
        model, initial_peers=initial_peers, swarm_key=swarm_key, revision=revision, **client_options
    )
    draft = (
        None if draft_model is None else Draft.load(draft_model, distributed.config.vocab_size, draft_tokens)
    )
    engine = Engine(
        distributed,
        tokenizer,
        name or dht_prefix_for(model),
        context_length=context_length or default_context(distributed.config),
        max_concurrent=max_concurrent,
        keep_sessions=keep_sessions,
        keep_sessions_s=keep_sessions_s,
        metrics=metrics,
        draft=draft,
    )
    distributed.swarm.room_wanted = engine.give_way_for_room
    return engine


DEFAULT_CONTEXT = 4096  # tokens of prompt + answer, unless --context-length (servers cap sessions at 8192)


def default_context(config) -> int:
    """Prompt and answer tokens at most, unless the user says: the model's, up to DEFAULT_CONTEXT."""
    return min(getattr(config, "max_position_embeddings", None) or DEFAULT_CONTEXT, DEFAULT_CONTEXT)


async def run_api(engines: Sequence[Engine], sock, api_keys: Sequence[str] = ()) -> None:
    """Serve the API of `engines`' models on `sock` (bound by the caller) until cancelled; with `api_keys`, only
    to callers that send one."""
    from swarmllm.api.gateway import Gateway
    from swarmllm.web import serve_app

    # a requester that leaves cancels its handler: a whole answer waiting for its generations then cancels them,
    # instead of generating up to max_tokens for nobody
    app = Gateway([Api(engine) for engine in engines], api_keys).app()
    runner = await serve_app(app, sock, cancel_left=True)
    host, port = sock.getsockname()[:2]
    names = ", ".join(f"'{engine.name}'" for engine in engines)
    print(f"OpenAI-compatible API: http://{host}:{port}/v1 (model {names})", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
