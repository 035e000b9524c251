"""Request bodies of the OpenAI-compatible endpoints, validated by pydantic (and published in the OpenAPI schema).

Parameters OpenAI defines but this server cannot honour are accepted only at their neutral value, so a client
never silently gets something other than what it asked for. Unknown extra fields are ignored, as many clients
send a few.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..runtime.generate import Sampling
from .errors import bad_request


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it contains a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
StopText = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_unicode)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    # "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=512)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: int | None = Field(None, ge=1)
    stop: StopText | list[StopText] | None = None
    seed: Seed | None = None
    n: int | None = Field(None, ge=1, le=128)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise bad_request("at most 4 stop sequences are allowed", "stop")
        return tuple(stop)

    def check_supported(self) -> None:
        """Refuse (400) parameters whose non-neutral values this server cannot honour."""
        if self.n not in (None, 1):
            raise bad_request("only n=1 is supported", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise bad_request(f"{name} is not supported (only 0)", name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")

    def sampling(self, max_new_tokens: int) -> Sampling:
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        if top_p == 0:  # only the most likely token survives: greedy
            temperature, top_p = 0.0, 1.0
        return Sampling(
            temperature=temperature,
            top_p=top_p,
            seed=self.seed,
            max_new_tokens=max_new_tokens,
            stop=self.stop_strings(),
        )


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    functions: list[dict] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs or self.top_logprobs:
            raise bad_request("logprobs are not supported", "logprobs")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request("only the text response format is supported", "response_format")
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            raise bad_request("tools and function calling are not supported", "tools")


class CompletionRequest(_Common):
    prompt: Text | list[Text] | list[int]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def requested_max_tokens(self) -> int | None:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default for completions

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise bad_request("echo is not supported", "echo")
        if self.logprobs:
            raise bad_request("logprobs are not supported", "logprobs")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.best_of not in (None, 1):
            raise bad_request("only best_of=1 is supported", "best_of")
