"""The request bodies the API accepts, checked at the edge (pydantic), and OpenAI's error body.

Only what the API does is accepted: `best_of` other than 1 is refused with a 400 rather than silently ignored; fields the API does not know are ignored, as OpenAI's own server does with
fields newer than it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# OpenAI takes 4 stop strings; lm-evaluation-harness sends a task's whole list (and the EOS text) to completions
Stop = str | Annotated[list[str], Field(max_length=16)] | None
MAX_PROMPTS = 64  # in one completions request (lm-evaluation-harness batches its requests)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Stop = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=16)  # choices, each a generate of its own
    user: str | None = None

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
    echo: bool = False  # the prompt comes back before the completion, with its tokens' logprobs if asked
    max_tokens: int | None = Field(default=16, ge=0)  # (after echo: its check reads echo)
    logprobs: int | None = Field(default=None, ge=0, le=5)  # how many top tokens each token lists
    best_of: Literal[1] | None = None

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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict] | None = ""

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
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

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


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error format."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(e: ValidationError) -> dict:
    """The first problem of a request body as OpenAI reports it: a message and the parameter at fault."""
    first = e.errors()[0]
    param = ".".join(str(part) for part in first["loc"] if not isinstance(part, int)) or None
    if param is not None:
        # union members show up in the location ("prompt.str"); the parameter is the first part
        param = param.split(".")[0]
    message = f"Invalid value for '{param}': {first['msg']}" if param else first["msg"]
    return error_body(message, "invalid_request_error", param, "invalid_value")
