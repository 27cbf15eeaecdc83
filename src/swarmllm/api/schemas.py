"""The request bodies the API accepts, checked at the edge (pydantic), and OpenAI's error body.

OpenAI's sampling fields are all honoured, with vLLM's extras (`top_k`, `min_p`, `repetition_penalty`,
`min_tokens`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`, guided decoding: `guided_json`,
`guided_regex`, `guided_choice` or `structured_outputs`; on chat `add_generation_prompt` and
`chat_template_kwargs`), JSON mode (`response_format` `json_object`) and structured output (`json_schema`,
api/json_schema.py). A request's grammar is a `Guide`: (kind, value), built by `guide_grammar`. What the API
cannot do is refused with a 400 rather than silently
ignored: a schema keyword it cannot hold an answer to, deprecated `functions`, a completion `suffix`. Tools
are called in one generic format (api/tools.py). Fields it does not know are ignored, as OpenAI's own server
does with fields newer than it, and a null is the field's default, as there; a number or a boolean of the wrong
JSON type (a string "0.5", true for a count) is refused as there, not read as what it looks like.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from swarmllm.api.generation import special_ids
from swarmllm.api.json_mode import JSON_OBJECT, Grammar, GrammarLogits, GrammarMask, TokenTrie, token_bytes
from swarmllm.api.json_schema import SchemaError, compile_schema
from swarmllm.api.regex import RegexError, TextGrammar, compile_regex, literal
from swarmllm.api.tools import ToolCalling, ToolError

# OpenAI takes 4 stop strings; lm-evaluation-harness sends a task's whole list (and the EOS text) to completions
Stop = str | Annotated[list[str], Field(max_length=16)] | None
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]
MAX_PROMPTS = 64  # in one completions request (lm-evaluation-harness batches its requests)
MAX_EMBED_INPUTS = 2048  # in one embeddings request, as OpenAI
GREEDY_BELOW = 1e-5  # a lower temperature is greedy, as vLLM's (logits divided by it overflow into NaN)


# ("json_object", None) | ("json_schema", schema) | ("regex", pattern) | ("choice", texts)
Guide = tuple[str, Any]
GUIDES = ("json", "regex", "choice")  # vLLM's kinds, as guided_<kind> and as structured_outputs' keys
# guides whose masks are kept: each up to json_mode.CACHED_MASKS masks of a byte per token (SmolLM2: 12.6 MB)
KEPT_GUIDES = 8


def guide_grammar(guide: Guide) -> Grammar:
    """The grammar an answer is held to: JSON mode's, a schema's, or a regular expression over the whole text
    (a choice is the alternation of its texts)."""
    kind, value = guide
    if kind == "json_object":
        return JSON_OBJECT
    if kind == "json_schema":
        return compile_schema(value)
    pattern = value if kind == "regex" else "|".join(literal(text) for text in value)
    return TextGrammar(compile_regex(pattern, search=False))


def _parsed_guide(kind: str, value: Any) -> Guide:
    """vLLM's guided decoding field as a `Guide`, its shape checked (a ValueError otherwise)."""
    if kind == "json":
        schema = json.loads(value) if isinstance(value, str) else value  # (its error is a ValueError)
        if not isinstance(schema, dict | bool):
            raise ValueError("must be a JSON schema")
        return ("json_schema", schema)
    if kind == "regex":
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return ("regex", value)
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise ValueError("must be a non-empty list of strings")
    return ("choice", tuple(dict.fromkeys(value)))


def _guide(kind: str, value: Any) -> Guide:
    """vLLM's guided decoding field as a `Guide` whose grammar compiles (a ValueError, a 400, otherwise)."""
    try:
        guide = _parsed_guide(kind, value)
        guide_grammar(guide)
    except (SchemaError, RegexError, ValueError) as e:
        raise ValueError(f"{kind}: {e}") from None
    return guide


class GuideMasks:
    """The masks of the guides a tokenizer's answers are held to, kept for the last `KEPT_GUIDES` guides (a
    client sends the same schema request after request), over one trie of its vocabulary, built at the first
    guide (a batch decode of every token). Shared by concurrent requests."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, list(eos_ids)
        self._trie: TokenTrie | None = None
        self._masks: OrderedDict[str, GrammarMask] = OrderedDict()  # by the guide's JSON, keys in their order
        self._lock = threading.Lock()

    def mask(self, guide: Guide) -> GrammarMask:
        key = json.dumps(guide)  # (not sorted: the order of a schema's properties is kept)
        with self._lock:
            if self._trie is None:
                self._trie = TokenTrie(token_bytes(self.tokenizer, self.vocab_size), self.eos_ids)
            mask = self._masks.get(key)
            if mask is None:
                mask = self._masks[key] = GrammarMask(self._trie, guide_grammar(guide))
                if len(self._masks) > KEPT_GUIDES:
                    self._masks.popitem(last=False)
            self._masks.move_to_end(key)
            return mask


def guided_logits(model, tokenizer, guide: dict, prompt_length: int) -> GrammarLogits:
    """A logits processor that holds one `generate()`'s answer to a guide, in the Python client as in the API:
    `{"json": schema}` (or its JSON text), `{"regex": pattern}` (the whole answer), `{"choice": [texts]}` or
    `{"json_object": True}`; `prompt_length` is where the answer starts in the generate's ids. Make one per
    generate: the vocabulary's trie and the last guides' masks are kept between them (`GuideMasks`)."""
    if not isinstance(guide, dict) or len(guide) != 1 or next(iter(guide)) not in (*GUIDES, "json_object"):
        raise ValueError('one of {"json": ...}, {"regex": ...}, {"choice": [...]} or {"json_object": True}')
    ((kind, value),) = guide.items()
    checked = ("json_object", None) if kind == "json_object" and value else _guide(kind, value)
    eos_ids, _ = special_ids(model.generation_config)
    masks = _guide_masks(tokenizer, model.config.vocab_size, tuple(eos_ids))
    return GrammarLogits(masks.mask(checked), prompt_length)


@functools.lru_cache(maxsize=4)
def _guide_masks(tokenizer, vocab_size: int, eos_ids: tuple[int, ...]) -> GuideMasks:
    return GuideMasks(tokenizer, vocab_size, eos_ids)


class ParamError(ValueError):
    """A rule across a request's fields that it breaks, with the parameter OpenAI's error names (the one to change)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    include_usage: bool = Field(default=False, strict=True)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, strict=True)
    # 0: the most likely token alone (OpenAI's range)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0, strict=True)
    stop: Stop = None
    # as vLLM's: what seeds a generator
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1, strict=True)
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=16, strict=True)  # choices, each a generate of its own
    user: str | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, strict=True)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, strict=True)
    # token id -> what is added to its logit
    logit_bias: Annotated[dict[int, Bias], Field(max_length=1024)] | None = None
    # vLLM's extras
    top_k: int = Field(default=0, ge=-1, strict=True)  # 0 or -1: every token
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, strict=True)
    # > 1 discourages every token seen, the prompt's too
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0, strict=True)
    # before EOS, a stop token id or a stop string may end the text
    min_tokens: int = Field(default=0, ge=0, strict=True)
    ignore_eos: bool = Field(default=False, strict=True)
    # False: special tokens (other than an EOS that ends the text) read as their text, as vLLM's
    skip_special_tokens: bool = Field(default=True, strict=True)
    stop_token_ids: Annotated[list[int], Field(max_length=16)] | None = None
    # vLLM's guided decoding, by its older names or its `structured_outputs` ({"json" | "regex" | "choice": ...})
    guided_json: dict | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(max_length=256)] | None = None
    structured_outputs: dict | None = None
    _guided: Guide | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _null_is_left_out(cls, data):
        """OpenAI's fields are nullable, a null meaning the default: dropped where None is not a value of the
        field (`max_tokens: null` stays: no limit)."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if v is not None or k not in fields or type(None) in get_args(fields[k].annotation)
        }

    @field_validator("temperature")
    @classmethod
    def _greedy_when_tiny(cls, temperature: float) -> float:
        """Below GREEDY_BELOW, greedy (0): the sampling that follows reads 0 as greedy."""
        return 0.0 if temperature < GREEDY_BELOW else temperature

    @field_validator("guided_json", "guided_regex", "guided_choice", "structured_outputs")
    @classmethod
    def _a_guide(cls, value, info: ValidationInfo):
        """Each guide checked where it is given (a 400 naming its field)."""
        if value is None:
            return value
        given = value.items() if info.field_name == "structured_outputs" else [(info.field_name[7:], value)]
        for kind, guide in given:
            if kind not in GUIDES:
                raise ValueError(f"structured_outputs.{kind} is not supported (only {', '.join(GUIDES)})")
            if guide is not None:
                _guide(kind, guide)
        return value

    @model_validator(mode="after")
    def _one_guide(self):
        given = [(kind, getattr(self, f"guided_{kind}")) for kind in GUIDES]
        given += list((self.structured_outputs or {}).items())
        given = [(kind, value) for kind, value in given if value is not None]
        if len(given) > 1:
            raise ValueError(
                "only one guide at a time (guided_json, guided_regex, guided_choice or one key of "
                "structured_outputs)"
            )
        if given:  # (its grammar compiled when its field was checked)
            self._guided = _parsed_guide(*given[0])
        return self

    def grammar(self) -> Guide | None:
        """What the answer is held to, if anything."""
        return self._guided

    @model_validator(mode="after")
    def _min_tokens_fit(self):
        limit = self.max_new_tokens()
        if limit is not None and self.min_tokens > limit:
            raise ParamError("min_tokens", "min_tokens must not exceed max_tokens")
        return self

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: (  # several prompts (texts or lists of ids): choices n x i to n x (i + 1) - 1 are prompt i's
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | list[int]
        | Annotated[list[list[int]], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    # the prompt comes back before the completion, with its tokens' logprobs if asked
    echo: bool = Field(default=False, strict=True)
    max_tokens: int | None = Field(default=16, ge=0, strict=True)  # (after echo: its check reads echo)
    # how many top tokens each token lists
    logprobs: int | None = Field(default=None, ge=0, le=5, strict=True)
    # candidates per prompt; the n most likely are returned
    best_of: int | None = Field(default=None, ge=1, le=16, strict=True)
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix):
        if suffix:
            raise ValueError("suffix (inserting text) is not supported by this API")
        return suffix

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of < self.n:
            raise ParamError("best_of", "best_of must be at least n")
        if self.stream and self.candidates() > self.n:
            raise ParamError(
                "best_of", "best_of greater than n cannot be streamed (the best are known at the end)"
            )
        return self

    def candidates(self) -> int:
        """Generates per prompt: `best_of` when sampling (greedy ones would all be the same), else `n`."""
        return self.best_of if self.best_of and self.temperature > 0 else self.n

    @field_validator("max_tokens")
    @classmethod
    def _zero_only_with_echo(cls, max_tokens, info):
        if max_tokens == 0 and not info.data.get("echo"):
            raise ValueError("max_tokens must be at least 1 (0 only with echo: scoring a prompt)")
        return max_tokens

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_top(self) -> int | None:
        """None: no log-probabilities; else how many most likely tokens each step lists beside the chosen one."""
        return self.logprobs


# what a chat template is given by the API itself (transformers' `apply_chat_template` parameters among them)
RESERVED_TEMPLATE_VARIABLES = frozenset(
    {
        "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
        "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
        "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    }
)  # fmt: skip


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict] | None = ""
    tool_calls: Annotated[list[dict], Field(max_length=64)] | None = None  # an assistant turn's calls

    @field_validator("content")
    @classmethod
    def _text(cls, content):
        """Text parts joined (the only kind of part a text model takes)."""
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise ValueError("only text content parts are supported")
            return "".join(str(part.get("text", "")) for part in content)
        return content or ""


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    logprobs: bool | None = Field(default=None, strict=True)
    top_logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)
    tools: Annotated[list, Field(max_length=128)] | None = None  # checked by `tool_calling` (api/tools.py)
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = Field(default=True, strict=True)
    functions: list | None = None  # OpenAI's deprecated form of tools: refused
    response_format: dict | None = None
    # vLLM's: the answer continues the last message (the assistant's), whose turn the prompt leaves open
    continue_final_message: bool = Field(default=False, strict=True)
    # vLLM's: whether the prompt opens the assistant's turn, and more variables for the chat template (Qwen3's
    # `enable_thinking`, ...)
    add_generation_prompt: bool = Field(default=True, strict=True)
    chat_template_kwargs: Annotated[dict[str, Any], Field(max_length=32)] | None = None
    _tools: ToolCalling | None = PrivateAttr(default=None)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, kwargs):
        """Variables the template reads beside the messages: not the ones the API sets itself."""
        if kwargs and (taken := sorted(set(kwargs) & RESERVED_TEMPLATE_VARIABLES)):
            raise ValueError(f"chat_template_kwargs may not set {taken}: the request's own fields do")
        return kwargs

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, functions):
        if functions:
            raise ValueError("functions (deprecated) are not supported; use tools")
        return functions

    @field_validator("response_format")
    @classmethod
    def _text_or_json(cls, fmt, info: ValidationInfo):
        if fmt is not None and fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise ValueError("response_format's type must be text, json_object or json_schema")
        if fmt is not None and fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict | bool):
                raise ValueError("json_schema must be an object whose 'schema' is a JSON schema")
            try:
                compile_schema(spec.get("schema", {}))
            except SchemaError as e:
                raise ValueError(f"json_schema.schema: {e}") from None
        # as OpenAI requires: a model not told to write JSON, but held to it, may fill its answer with blanks
        messages = info.data.get("messages") or []
        if (
            fmt
            and fmt.get("type") == "json_object"
            and not any("json" in m.content.lower() for m in messages)
        ):
            raise ValueError(
                "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
                "'json_object'"
            )
        return fmt

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _continued(self):
        if self.continue_final_message:
            last = self.messages[-1]
            if last.role != "assistant" or last.tool_calls:
                raise ParamError(
                    "messages", "continue_final_message needs a last message of the assistant's text"
                )
            if self.tools and self.tool_choice != "none":
                raise ParamError(
                    "continue_final_message", "an answer that continues a message calls no tools"
                )
        return self

    @model_validator(mode="after")
    def _one_format(self):
        if self._guided is not None and (self.response_format or {}).get("type", "text") != "text":
            raise ValueError("a response_format other than text does not go with guided decoding")
        return self

    def tool_calling(self) -> ToolCalling | None:
        """The request's tools and choice (None without tools, or with `tool_choice` none); raises ToolError."""
        if not self.tools and self.tool_choice not in (None, "none", "auto"):
            raise ToolError("tool_choice", "a tool choice other than none or auto needs tools")
        if not self.tools or self.tool_choice == "none":
            return None
        if self._tools is None:
            if self.response_format is not None and self.response_format.get("type") != "text":
                raise ToolError("response_format", "a response_format other than text does not go with tools")
            if self._guided is not None:
                raise ToolError("tools", "guided decoding does not go with tools")
            self._tools = ToolCalling(self.tools, self.tool_choice, self.parallel_tool_calls)
        return self._tools

    def grammar(self) -> Guide | None:
        """What the answer is held to: the tool calling format, JSON mode, a schema, a guide, or nothing."""
        if self.tool_calling() is not None:
            return ("json_schema", self.tool_calling().schema)
        kind = (self.response_format or {}).get("type", "text")
        if kind == "json_object":
            return ("json_object", None)
        if kind == "json_schema":
            return ("json_schema", self.response_format["json_schema"].get("schema", {}))
        return self._guided

    def candidates(self) -> int:
        return self.n

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_top(self) -> int | None:
        """None: no log-probabilities; else how many most likely tokens each step lists beside the chosen one."""
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize` (what lm-evaluation-harness' remote tokenizer calls)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[int]


class EmbeddingRequest(BaseModel):
    """OpenAI's `/v1/embeddings` (Ollama's `/api/embed` is translated into it): texts or token ids."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[list[int]], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    # the first ones, scaled to length 1 again
    dimensions: int | None = Field(default=None, ge=1, strict=True)
    user: str | None = None


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error format."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiError(Exception):
    """A request the API answers with an error: its HTTP status and OpenAI's error body."""

    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, param, code)


def validation_error(e: ValidationError) -> dict:
    """The first problem of a request body as OpenAI reports it: a message and the parameter at fault."""
    first = e.errors()[0]
    param = ".".join(str(part) for part in first["loc"] if not isinstance(part, int)) or None
    if param is None:  # a rule across fields: the parameter its error names
        param = getattr(first.get("ctx", {}).get("error"), "param", None)
    if param is not None:
        # union members show up in the location ("prompt.str"); the parameter is the first part
        param = param.split(".")[0]
    message = f"Invalid value for '{param}': {first['msg']}" if param else first["msg"]
    return error_body(message, "invalid_request_error", param, "invalid_value")
