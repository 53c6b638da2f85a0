"""Request bodies of the OpenAI-compatible API (and /v1/classify), validated with pydantic.

Types are strict (a string where a number belongs is an error, as in OpenAI's API), fields OpenAI clients
send that change nothing here are ignored, and fields this server cannot honour (n > 1) are refused by name
rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError,
                      model_validator)

Number = Union[StrictFloat, StrictInt]
TopLogprobs = Annotated[StrictInt, Field(ge=0, le=20)]   # OpenAI's chat limit; vLLM takes the same for completions


class Unsupported(ValueError):
    """A request field this server cannot honour: (param, message)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    stop: Union[StrictStr, Annotated[list[StrictStr], Field(max_length=4)], None] = None
    seed: StrictInt | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    @property
    def top_logprobs_wanted(self) -> int | None:
        """None: no log-probs; k: each token's log-prob and its k likeliest alternatives."""
        return None

    def check_supported(self) -> None:
        if self.n != 1:
            raise Unsupported("n", "only n=1 is supported")

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatRequest(GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: StrictBool = False
    top_logprobs: TopLogprobs | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationRequest):
    prompt: Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1, max_length=1)]]
    logprobs: TopLogprobs | None = None   # the legacy API's integer: how many alternatives per token

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ClassifyRequest(BaseModel):
    """`input`: texts, base64-encoded images, or tabular rows ({column: value}); one or a list."""
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    input: Union[StrictStr, dict, Annotated[list[Union[StrictStr, dict]], Field(min_length=1)]]

    @property
    def inputs(self) -> list:
        return self.input if isinstance(self.input, list) else [self.input]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    input: Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1)]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None

    @property
    def inputs(self) -> list[str]:
        return self.input if isinstance(self.input, list) else [self.input]


def first_error(err: ValidationError) -> tuple[str | None, str]:
    """(param, message) of a pydantic error, in the words an API user needs."""
    e = err.errors()[0]
    loc = [str(x) for x in e.get("loc", ()) if not str(x).startswith(("function-", "union["))]
    param = ".".join(loc) or None
    return param, f"{param}: {e['msg']}" if param else e["msg"]
