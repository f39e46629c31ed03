"""OpenAI's API formats: request bodies checked into typed parameters, and the response objects.

Every check that fails raises `ApiError`, which the app turns into OpenAI's error object
`{"error": {"message", "type", "param", "code"}}` with its status: a client always gets a
sentence naming the parameter, never a traceback. Unknown parameters are ignored (clients send
extras); parameters this server does not implement (logprobs, echo, suffix, logit_bias,
penalties, tools) are refused when set to anything but their no-op value, so a client is never
silently given something other than what it asked for.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

SEED_LIMIT = 2 ** 62  # seeds are summed with the choice index into a 64-bit generator seed
MAX_STOP = 4  # as OpenAI
MAX_PROMPTS = 16  # prompts in one completion request


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# Parameters ------------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and value == value  # not NaN


def integer(body: dict, name: str, default, low: int, high: int):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise bad(f"{name} must be an integer, got {type(value).__name__}", name, "invalid_type")
    if not low <= value <= high:
        raise bad(f"{name}={value} is out of range: it must be between {low} and {high}", name, "invalid_value")
    return value


def number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise bad(f"{name} must be a number, got {type(value).__name__}", name, "invalid_type")
    if not (low < value if low_open else low <= value) or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise bad(f"{name}={value} is out of range {interval}", name, "invalid_value")
    return float(value)


def boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false, got {type(value).__name__}", name, "invalid_type")
    return value


def stop_strings(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(value) > MAX_STOP:
        raise bad(f"stop has {len(value)} strings; at most {MAX_STOP} are allowed", "stop", "invalid_value")
    return tuple(s for s in value if s)


NOT_IMPLEMENTED = {  # parameter -> its no-op values
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
    "logit_bias": (None, {}), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
    "best_of": (None, 1), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"),
}


def refuse_unimplemented(body: dict):
    for name, no_op in NOT_IMPLEMENTED.items():
        if name in body and body[name] not in no_op:
            what = "tool calls are" if name in ("tools", "tool_choice", "functions", "function_call") else f"{name} is"
            raise bad(f"{what} not supported by this server", name, "unsupported_parameter")


@dataclass
class Generation:
    """The parameters both endpoints share, checked."""

    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


def generation(body: dict, default_max_tokens: int, max_tokens: int, max_n: int) -> Generation:
    refuse_unimplemented(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model must be a string", "model", "invalid_type")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options", "invalid_type")
    stream = boolean(body, "stream", False)
    # OpenAI's newer name for the chat limit; a request may give either, not both.
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if limit_name == "max_completion_tokens" and body.get("max_tokens") is not None:
        raise bad("give max_tokens or max_completion_tokens, not both", "max_tokens", "invalid_value")
    return Generation(
        max_tokens=integer(body, limit_name, default_max_tokens, 1, max_tokens),
        temperature=number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        n=integer(body, "n", 1, 1, max_n),
        stop=stop_strings(body),
        seed=integer(body, "seed", None, 0, SEED_LIMIT - max_n),
        stream=stream,
        include_usage=stream and boolean(options or {}, "include_usage", False),
    )


def prompts(body: dict, encode, vocab_size: int) -> list[list[int]]:
    """A completion's prompt: a string, a list of strings, a list of token ids or a list of
    those, as OpenAI accepts; -> token ids per prompt."""
    value = body.get("prompt")
    if value is None:
        raise bad("prompt is required", "prompt", "missing_required_parameter")
    if isinstance(value, str) or (isinstance(value, list) and value and all(_is_int(t) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad("prompt must be a string, a list of strings or a list of token ids", "prompt", "invalid_type")
    if len(value) > MAX_PROMPTS:
        raise bad(f"{len(value)} prompts in one request; at most {MAX_PROMPTS}", "prompt", "invalid_value")
    out = []
    for p in value:
        if isinstance(p, str):
            out.append(encode(p, "prompt"))
        elif isinstance(p, list) and all(_is_int(t) for t in p):
            if any(not 0 <= t < vocab_size for t in p):
                raise bad(f"prompt has token ids outside this model's vocabulary [0, {vocab_size})", "prompt",
                          "invalid_value")
            out.append(list(p))
        else:
            raise bad("prompt must be a string, a list of strings or a list of token ids", "prompt", "invalid_type")
    return out


ROLES = ("system", "user", "assistant")


def messages(body: dict) -> list[dict]:
    """A chat's messages as the chat template takes them: [{"role", "content": str}]."""
    value = body.get("messages")
    if value is None:
        raise bad("messages is required", "messages", "missing_required_parameter")
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages", "invalid_type")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with role and content", where, "invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise bad(f"{where}.role={role!r} is not one of: {', '.join(ROLES)}", f"{where}.role", "invalid_value")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"{where}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported",
                          f"{where}.content", "invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content must be a string", f"{where}.content", "invalid_type")
        out.append({"role": role, "content": content})
    return out


# Responses -------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shapes:
    """The response objects of one endpoint: `completion` (text) or `chat` (message, delta)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, texts: list[str], finishes: list[str], prompt_tokens: int, completion_tokens: int) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finishes))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finishes))]
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, index: int, text: str | None, finish: str | None, first: bool = False) -> dict:
        """One streamed piece of a choice. Chat: the first chunk of a choice carries its role."""
        if self.chat:
            delta = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage(prompt_tokens, completion_tokens)}
