"""OpenAI request bodies, checked and turned into engine requests.

``parse_completion`` and ``parse_chat`` read a ``/v1/completions`` or ``/v1/chat/completions``
body into an :class:`ApiRequest` or raise a 400 (:class:`~rwkv_cli.serve.errors.BadRequest`)
naming the field at fault; ``engine_request`` makes the batching library's request of it.
Fields that would change what a reply means and that this server does not do (``n`` > 1, tools,
a ``response_format``, ``logit_bias``, ``echo``, ``suffix``) are refused, never ignored; fields
that only describe the caller (``user``, ``metadata``, ...) are ignored. ``logprobs`` give the
sampled tokens' log-probabilities under the model's distribution after penalties (before
temperature and filters), with up to ``top_logprobs`` (chat) or ``logprobs`` (completions)
alternatives.

Extensions: ``top_k`` and ``penalty_decay`` (sampling, as ``rwkv generate``'s options) and
``think`` (chat: G1 models think first; the thought comes back as ``reasoning_content``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rwkv_cli.batching.generate import BatchRequest
from rwkv_cli.chat import reply_request
from rwkv_cli.errors import InvalidInputError
from rwkv_cli.generation import Session
from rwkv_cli.replies import raw_reply
from rwkv_cli.serve.errors import BadRequest
from rwkv_cli.settings import CHAT_SAMPLING, MAX_REPLY_TOKENS, MAX_SEED, SamplingParams
from rwkv_cli.templates import Template
from rwkv_cli.tokenizer.base import Tokenizer

# Bounds on one request's work. A prompt token costs a share of a forward pass and a generated
# token a decode step: 32768 prompt tokens take well under a minute to read on a CPU, and 8192
# generated ones at most a few minutes, so no request holds a place for long.
MAX_PROMPT_TOKENS = 32768
MAX_COMPLETION_TOKENS = 8192
COMPLETION_MAX_TOKENS = 16  # the OpenAI API's default for /v1/completions
MAX_STOPS = 4  # the OpenAI API takes up to four stop sequences
MAX_CHAT_LOGPROBS = 20  # the OpenAI API's bounds on the alternatives given per token
MAX_COMPLETION_LOGPROBS = 5
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class ApiRequest:
    """A checked completion or chat request: what to generate, and how to answer."""

    model: str | None
    max_tokens: int
    params: SamplingParams
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    prompt: str | tuple[int, ...] = ""  # /v1/completions
    messages: tuple[tuple[str, str], ...] = ()  # /v1/chat/completions, as (role, text)
    think: bool = False
    logprobs: int | None = None  # None: none; N: each token's, and the N most probable
    state: str | None = None  # the id of a kept state to continue (extension; /v1/states)

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)


def parse_completion(body: Any) -> ApiRequest:
    """A ``/v1/completions`` body, checked."""
    body = _object(body)
    return ApiRequest(
        prompt=_prompt(body.get("prompt")),
        logprobs=_integer(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS),
        **_common(body, SamplingParams(), COMPLETION_MAX_TOKENS),
    )


def parse_chat(body: Any) -> ApiRequest:
    """A ``/v1/chat/completions`` body, checked."""
    body = _object(body)
    return ApiRequest(
        messages=_messages(body.get("messages")),
        think=_typed(body, "think", bool, False),
        logprobs=_chat_logprobs(body),
        **_common(body, CHAT_SAMPLING, MAX_REPLY_TOKENS),
    )


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    """A chat's ``logprobs`` (true or false) and ``top_logprobs`` as one count (None: off)."""
    top = _integer(body, "top_logprobs", 0, MAX_CHAT_LOGPROBS)
    if not _typed(body, "logprobs", bool, False):
        if top:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return top or 0


def engine_request(
    request: ApiRequest,
    tokenizer: Tokenizer,
    template: Template,
    session: Session | None = None,
) -> BatchRequest:
    """The engine's request for ``request``, continuing ``session`` (None: a fresh document), a
    chat's messages written out with ``template``; a prompt over the bound is refused."""
    common = {
        "max_tokens": request.max_tokens,
        "params": request.params,
        "seed": request.seed,
        "logprobs": request.logprobs,
    }
    if request.is_chat:
        messages = written_messages(request.messages, template, request.think)
        engine = reply_request(
            tokenizer,
            template,
            messages,
            think=request.think,
            session=session,
            stop=request.stop,
            then_read=tuple(tokenizer.encode(template.reply_end())),  # the state continues
            **common,
        )
    else:
        prompt = request.prompt
        tokens = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        _check_ids(tokens, tokenizer.vocab_size)
        engine = BatchRequest(tuple(tokens), stop=request.stop, session=session, **common)
    if len(engine.prompt) > MAX_PROMPT_TOKENS:
        raise BadRequest(
            f"the prompt is {len(engine.prompt)} tokens; this server reads at most "
            f"{MAX_PROMPT_TOKENS}",
            param="messages" if request.is_chat else "prompt",
            code="context_length_exceeded",
        )
    return engine


def written_messages(
    messages: Sequence[tuple[str, str]], template: Template, think: bool = False
) -> list[tuple[str, str]]:
    """A conversation as the model read it: earlier replies written back as it wrote them."""
    return [
        (role, raw_reply(template, text, think) if role == "assistant" else text)
        for role, text in messages
    ]


def _absent(value: Any) -> bool:
    return not value


def _plain_text(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and value.get("type") == "text")


# Fields that would change what a reply means: the test a value passes when it leaves the reply
# as this server writes it, and why others are refused.
_UNSUPPORTED = {
    "n": (lambda value: value in (None, 1), "n must be 1: one choice per request"),
    "tools": (_absent, "tools are not supported"),
    "functions": (_absent, "functions are not supported"),
    "tool_choice": (lambda value: value in (None, "none"), "tools are not supported"),
    "response_format": (_plain_text, "response_format must be text (the default)"),
    "logit_bias": (_absent, "logit_bias is not supported"),
    "echo": (lambda value: value in (None, False), "echo is not supported"),
    "suffix": (_absent, "suffix is not supported"),
    "best_of": (lambda value: value in (None, 1), "best_of must be 1"),
}


def _object(body: Any) -> dict[str, Any]:
    """The body as an object, with no field this server would have to ignore."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name, (accepted, message) in _UNSUPPORTED.items():
        if name in body and not accepted(body[name]):
            raise BadRequest(message, param=name, code="unsupported_parameter")
    return body


def _common(body: dict[str, Any], sampling: SamplingParams, max_tokens: int) -> dict[str, Any]:
    """The fields both endpoints take, over the endpoint's defaults."""
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise BadRequest("stream_options needs stream: true", param="stream_options")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise BadRequest("include_usage must be true or false", param="stream_options")
    return {
        "model": _typed(body, "model", str, None),
        "max_tokens": _max_tokens(body, max_tokens),
        "params": _sampling(body, sampling),
        "stop": _stops(body.get("stop")),
        "seed": _integer(body, "seed", 0, MAX_SEED),
        "stream": stream,
        "include_usage": include_usage,
        "state": _typed(body, "state", str, None),
    }


@dataclass(frozen=True)
class StateContent:
    """A ``POST /v1/states`` body, checked: the text to read (a prompt, or whole turns of a
    conversation) and the id to keep the state under (None: one is made)."""

    state_id: str | None
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()


def parse_state(body: Any) -> StateContent:
    """A ``POST /v1/states`` body: ``{"text": ...}`` or ``{"messages": [...]}`` (whole turns:
    a later chat's messages continue them), and an optional ``id``."""
    body = _object(body)
    state_id = _typed(body, "id", str, None)
    if ("text" in body) == ("messages" in body):
        raise BadRequest("give text or messages (one of them)", param="text")
    if "text" in body:
        text = _typed(body, "text", str, "")
        if not text:
            raise BadRequest("text must be a non-empty string", param="text")
        return StateContent(state_id, prompt=text)
    value = body["messages"]
    if not isinstance(value, list) or not value:
        raise BadRequest("messages must be a non-empty list", param="messages")
    messages = tuple(_message(index, message) for index, message in enumerate(value))
    if messages[-1][0] == "user":
        raise BadRequest(
            "the last message must end a turn (system or assistant): a state is kept between turns",
            param="messages",
        )
    return StateContent(state_id, messages=messages)


def _typed(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise BadRequest(f"{name} must be {_KIND_NAMES[kind]}", param=name)
    return value


_KIND_NAMES = {bool: "true or false", dict: "an object", str: "a string"}


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}", param=name)
    return value


def _max_tokens(body: dict[str, Any], default: int) -> int:
    """``max_completion_tokens`` (the newer name) or ``max_tokens``."""
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    value = _integer(body, name, 1, MAX_COMPLETION_TOKENS)
    return default if value is None else value


def _sampling(body: dict[str, Any], default: SamplingParams) -> SamplingParams:
    """The sampling fields given, over ``default``; a value no sampler takes is a 400."""
    given = {}
    for field in dataclasses.fields(SamplingParams):
        value = body.get(field.name)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise BadRequest(f"{field.name} must be a number", param=field.name)
        try:  # each alone first, so that the error names its field
            dataclasses.replace(default, **{field.name: value}).validated()
        except InvalidInputError as error:
            raise BadRequest(error.message, param=field.name) from None
        given[field.name] = value
    return dataclasses.replace(default, **given)


def _stops(value: Any) -> tuple[str, ...]:
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(stop, str) and stop for stop in stops)
    ):
        raise BadRequest(
            f"stop must be a non-empty string or a list of up to {MAX_STOPS}", param="stop"
        )
    return tuple(stops)


def _prompt(value: Any) -> str | tuple[int, ...]:
    """A prompt: a string, a list holding one string, or a list of token ids."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(token, int) and not isinstance(token, bool) for token in value
    ):
        return tuple(value)
    raise BadRequest(
        "prompt must be a string or a list of token ids (one prompt per request)", param="prompt"
    )


def _check_ids(tokens, vocab_size: int) -> None:
    if any(not 0 <= token < vocab_size for token in tokens):
        raise BadRequest(f"token ids must be from 0 to {vocab_size - 1}", param="prompt")


def _messages(value: Any) -> tuple[tuple[str, str], ...]:
    """The conversation as (role, text) pairs: a system message first if any, the user's
    last (the reply follows it)."""
    if not isinstance(value, list) or not value:
        raise BadRequest("messages must be a non-empty list", param="messages")
    messages = tuple(_message(index, message) for index, message in enumerate(value))
    if any(role == "system" for role, _ in messages[1:]):
        raise BadRequest("a system message can only come first", param="messages")
    if messages[-1][0] != "user":
        raise BadRequest("the last message must be the user's: the reply follows it", "messages")
    return messages


def _message(index: int, message: Any) -> tuple[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise BadRequest(
            f"{where} must be an object whose role is one of {', '.join(ROLES)}", param=where
        )
    return ROLES[message["role"]], _content(message.get("content"), where)


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        return "".join(part["text"] for part in content)
    raise BadRequest(f"{where}.content must be a string or a list of text parts", param=where)
