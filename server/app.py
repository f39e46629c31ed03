"""The HTTP app: OpenAI's endpoints over the engine, the chat page, the key check and the log.

    GET  /                      the chat page (server/static/chat.html), open
    GET  /health                {"status": "ok", ...}, open
    GET  /v1/models             the one model served
    POST /v1/completions        prompt(s) -> text
    POST /v1/chat/completions   messages -> assistant message (models with chat tokens)

Built on Starlette (ASGI) and run by uvicorn (serve.py): streaming responses, a client's
disconnect and the event loop are theirs; everything OpenAI-shaped is ours (server/protocol.py),
so errors have OpenAI's error object and parameters are checked by name. FastAPI would add
pydantic models whose validation errors we would have to translate back into that object anyway.

Design decisions:
- The engine runs in its own thread (model/engine.py); its events cross into the event loop with
  `call_soon_threadsafe` onto one asyncio queue per HTTP request. A request with several prompts
  is one engine request per prompt, its choices numbered prompt by prompt as OpenAI does.
- A client that goes away cancels its rows: a stream's generator is cancelled by Starlette, a
  plain request watches for the disconnect while it waits.
- Status codes: 400 for anything wrong in the request (with `param` naming it), 401 for a
  missing or wrong key on /v1/..., 404/405 for unknown routes, 429 with Retry-After when the
  queue is full, 503 while shutting down, 500 (an error object, never a traceback: that goes
  to the server's log) when generation itself fails, for that request only.
- One log line per request on stderr: client, method, path, status, prompt+completion tokens,
  latency; uvicorn's own access log is off.
- Tool calls (the tool-use work) are refused by name for now (`tools`). Their place: when a
  row's tokens complete a call, the engine (model/engine.py, `Row.take`) runs the tool and
  appends its output to the row as forced tokens, which the decoder feeds at the next step; the
  chat endpoint streams that output as an event of its own.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from common.errors import UserError
from model.engine import Busy, Closed, Engine, Event, Request
from model.generate import Sampling
from server import protocol
from server.protocol import ApiError, bad


class Limits:
    def __init__(self, context: int, max_tokens: int, max_body: int, max_n: int):
        self.context = context  # prompt tokens the model can take (its block_size)
        self.max_tokens = max_tokens  # new tokens one choice may ask for
        self.max_body = max_body  # request body, in bytes
        self.max_n = max_n  # choices in one request (the engine's rows)


class Run:
    """One HTTP request's engine requests, and the events they send back."""

    def __init__(self, engine: Engine, requests: list[Request]):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.n = requests[0].n
        self.total = self.n * len(requests)
        self.texts, self.finishes, self.tokens = [""] * self.total, [None] * self.total, [0] * self.total
        self.prompt_tokens = sum(len(r.prompt) for r in requests)
        self.jobs = []

        def emitter(base: int):
            def emit(event: Event):
                event.index += base
                try:
                    loop.call_soon_threadsafe(self.queue.put_nowait, event)
                except RuntimeError:  # the loop is closed: nobody is listening any more
                    pass
            return emit

        try:
            for k, r in enumerate(requests):
                self.jobs.append(engine.submit(r, emitter(k * self.n)))
        except Busy:
            self.cancel()
            raise ApiError(429, "the server is busy: too many requests are waiting; retry shortly",
                           code="rate_limit_exceeded", type="rate_limit_error", headers={"Retry-After": "1"})
        except Closed:
            self.cancel()
            raise ApiError(503, "the server is shutting down", type="server_error", code="unavailable")

    @property
    def completion_tokens(self) -> int:
        return sum(self.tokens)

    def cancel(self):
        for job in self.jobs:
            job.cancel()

    async def events(self):
        """The events until every choice has finished, or one error (the last event then)."""
        remaining = self.total
        while remaining:
            event = await self.queue.get()
            if event.error is None:
                self.texts[event.index] += event.text
                self.tokens[event.index] = event.tokens
                if event.finish:
                    self.finishes[event.index] = event.finish
                    remaining -= 1
            yield event
            if event.error is not None:
                return

    async def collect(self) -> str | None:
        """Wait for the whole result; the error message if generation failed."""
        async for event in self.events():
            if event.error is not None:
                return event.error
        return None


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def until_disconnected(receive):
    while (await receive())["type"] != "http.disconnect":
        pass


async def read_json(request: HttpRequest, limit: int) -> dict:
    declared = request.headers.get("content-length")
    too_big = bad(f"request body is larger than {limit} bytes", None, "request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(body, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        detail = e.msg if isinstance(e, json.JSONDecodeError) else str(e) or "nested too deeply"
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise bad(f"request body is not valid JSON: {detail}{where}", None, "invalid_json") from None
    if not isinstance(value, dict):
        raise bad("request body must be a JSON object", None, "invalid_json")
    return value


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Server:
    def __init__(self, engine: Engine, tokenizer, model_id: str, limits: Limits, api_key: str | None = None,
                 chat_template=None):
        self.engine, self.tokenizer, self.model_id, self.limits = engine, tokenizer, model_id, limits
        self.api_key, self.chat_template = api_key, chat_template
        self.page = resources.files("server").joinpath("static/chat.html").read_text(encoding="utf-8")
        self.created = int(time.time())

    def app(self):
        routes = [
            Route("/", self.index, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ]
        handlers = {HTTPException: self.http_error, Exception: self.internal_error}
        return LogRequests(CheckKey(Starlette(routes=routes, exception_handlers=handlers), self.api_key))

    # Routes ------------------------------------------------------------------------------------

    async def index(self, request):
        return HTMLResponse(self.page)

    async def health(self, request):
        return JSONResponse({"status": "ok", "model": self.model_id, "chat": self.chat_template is not None,
                             "auth": self.api_key is not None, **self.engine.load})

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "gpt-trainer"}]})

    async def completions(self, request):
        try:
            body = await read_json(request, self.limits.max_body)
            params = protocol.generation(body, 16, self.limits.max_tokens, self.limits.max_n)
            prompts = protocol.prompts(body, self._encode, self.tokenizer.vocab_size)
            stop_ids = () if self.tokenizer.eot_id is None else (self.tokenizer.eot_id,)
            return await self._generate(request, [self._request(p, params, stop_ids, "prompt") for p in prompts],
                                        params, chat=False)
        except ApiError as e:
            return error_response(e)

    async def chat(self, request):
        try:
            body = await read_json(request, self.limits.max_body)
            if self.chat_template is None:
                raise bad(f"model {self.model_id} has no chat tokens: it was not fine-tuned for chat; "
                          f"use /v1/completions", "messages", "model_not_chat")
            params = protocol.generation(body, self.limits.max_tokens, self.limits.max_tokens, self.limits.max_n)
            messages = protocol.messages(body)
            try:
                ids = self.chat_template.render_for_generation(messages)
            except UserError as e:
                raise bad(str(e), "messages", "invalid_value") from None
            stop_ids = (self.chat_template.assistant_end_id,)
            return await self._generate(request, [self._request(ids, params, stop_ids, "messages")], params, chat=True)
        except ApiError as e:
            return error_response(e)

    # Generation --------------------------------------------------------------------------------

    def _encode(self, text: str, param: str) -> list[int]:
        try:
            return self.tokenizer.encode(text)
        except UserError as e:
            raise bad(str(e), param, "invalid_value") from None

    def _request(self, ids: list[int], p: protocol.Generation, stop_ids: tuple[int, ...], param: str) -> Request:
        if not ids:
            if self.tokenizer.eot_id is None:
                raise bad(f"{param} is empty, and this model's tokenizer has no end-of-text token to start from",
                          param, "invalid_value")
            ids = [self.tokenizer.eot_id]
        if len(ids) > self.limits.context:
            raise bad(f"this model's context is {self.limits.context} tokens; the {param} has {len(ids)}",
                      param, "context_length_exceeded")
        sampling = Sampling(temperature=p.temperature, top_p=p.top_p, vocab_limit=self.tokenizer.vocab_size)
        return Request(ids, p.max_tokens, sampling, p.n, p.seed, p.stop, stop_ids)

    async def _generate(self, request: HttpRequest, requests: list[Request], params: protocol.Generation,
                        chat: bool) -> Response:
        shapes = protocol.Shapes(chat, self.model_id)
        run = Run(self.engine, requests)
        log = request.scope["log"]

        def count():
            log["tokens"] = f"{run.prompt_tokens}+{run.completion_tokens}"

        if params.stream:
            async def stream():
                try:
                    if chat:
                        for i in range(run.total):
                            yield sse(shapes.chunk(i, "", None, first=True))
                    async for event in run.events():
                        if event.error is not None:
                            yield sse(protocol.error_body(event.error, "server_error"))
                            log["outcome"] = "error"
                            break
                        if event.text:
                            yield sse(shapes.chunk(event.index, event.text, None))
                        if event.finish:
                            yield sse(shapes.chunk(event.index, None, event.finish))
                    else:
                        if params.include_usage:
                            yield sse(shapes.usage_chunk(run.prompt_tokens, run.completion_tokens))
                    yield "data: [DONE]\n\n"
                finally:
                    run.cancel()
                    count()

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        collect = asyncio.ensure_future(run.collect())
        gone = asyncio.ensure_future(until_disconnected(request.receive))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():  # the client went away (or the handler was cancelled)
                run.cancel()
                collect.cancel()
        count()
        if not collect.done() or collect.cancelled():
            return Response(status_code=499)  # nginx's "client closed request", for the log only
        error = collect.result()
        if error is not None:
            raise ApiError(503, error, type="server_error") if self.engine.closing else \
                ApiError(500, error, type="server_error")
        return JSONResponse(shapes.response(run.texts, run.finishes, run.prompt_tokens, run.completion_tokens))

    # Errors ------------------------------------------------------------------------------------

    async def http_error(self, request, exc: HTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return JSONResponse(protocol.error_body(message, code="not_found" if exc.status_code == 404 else None),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def internal_error(self, request, exc: Exception):
        if isinstance(exc, ApiError):
            return error_response(exc)
        return JSONResponse(protocol.error_body("internal server error; the server's log has the details",
                                                "server_error"), status_code=500)


class CheckKey:
    """With an API key, /v1/... needs `Authorization: Bearer KEY`; the page and /health stay open."""

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, api_key

    async def __call__(self, scope, receive, send):
        if self.key is not None and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
                e = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                             code="invalid_api_key")
                return await error_response(e)(scope, receive, send)
        await self.app(scope, receive, send)


class LogRequests:
    """One line per request on stderr, written when its response has ended."""

    def __init__(self, app, out=None):
        self.app, self.out = app, out

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        log = scope["log"] = {"tokens": "-", "outcome": ""}  # the handlers fill it in
        sent = {}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            status = sent.get("status", "-")
            outcome = f" ({log['outcome']})" if log["outcome"] else ""  # a stream that ended with an error event
            client = scope.get("client") or ("-", 0)
            print(f'{client[0]} "{scope["method"]} {scope["path"]}" {status}{outcome} tokens={log["tokens"]} '
                  f'{time.perf_counter() - start:.3f}s', file=self.out or sys.stderr, flush=True)
