"""OpenAI-compatible HTTP server over the engine (FastAPI on uvicorn; works with the official `openai` client).

    GET  /health                      liveness and what is loaded
    GET  /v1/models                   the base model, and base+<adapter> for every loaded safety adapter
    POST /v1/chat/completions         OpenAI chat completions, `stream: true` for server-sent events
    POST /admin/adapters              {"name": ..., "path": ...}: load or replace an adapter while serving
    DELETE /admin/adapters/<name>     remove one

The caller picks the safety adapter per request by model name (`<base>+<adapter>`, or the adapter's name alone) or
by the extra body field `safety_adapter` (a name, or null for none). Admin calls are accepted from loopback only,
unless the server was given an admin token, in which case they need `Authorization: Bearer <token>` from anywhere.

Request fields (`ChatRequest`): every field is honoured or refused, none is ignored silently.
  honoured    model, messages (text content, or a list of text parts), max_tokens / max_completion_tokens,
              temperature (default 0: greedy), top_p, seed (with temperature > 0), stop (up to 4 strings),
              stream, stream_options.include_usage, safety_adapter
  n           1 only (one choice per request); anything else is a 400
  user, messages[].name   accepted: they name participants and change nothing in the answer
  not implemented (`NOT_IMPLEMENTED`): accepted at null or their "do nothing" value, a 400 otherwise
  anything else: a 400 naming the field
Wrong types are a 400 too (no coercion: "8" is not an integer). Every error is JSON in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`: 4xx for the caller's mistakes, 500 for anything unexpected.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import check, opt
from ..errors import SafegeneError
from ..models.placement import PlacementConfig
from .engine import AsyncOutbox, Engine, GenRequest, RequestError, next_id

log = logging.getLogger(__name__)

@dataclass
class ServeConfig:
    """An OpenAI-compatible server over one model, with per-request safety adapters and hot swap."""

    model: str = opt("runs/task-model", "model to serve (loaded once)")
    adapters: list[str] = opt([], "safety adapters to attach, as NAME=PATH (repeatable)", aliases=("--adapter",))
    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(8000, "port to listen on")
    name: str | None = opt(None, "model id clients use (default: the model folder's name)")
    admin_token_env: str = opt("SAFEGENE_ADMIN_TOKEN", "environment variable holding the admin token (needed for "
                               "admin calls from other hosts)")
    max_batch: int = opt(8, "requests decoded together")
    max_input_tokens: int = opt(2048, "longest prompt accepted, in tokens")
    use_gate: bool = opt(True, "honour adapters' gates (--no-gate: always full strength)", aliases=("--gate",))
    placement: PlacementConfig = opt(PlacementConfig(), "where the served model runs and in what dtype (--device, "
                                     "--dtype, --device-map)", added_later=True)

    def __post_init__(self) -> None:
        bad = [a for a in self.adapters if "=" not in a or not a.partition("=")[0] or not a.partition("=")[2]]
        check(not bad, f"adapters expect NAME=PATH, got {bad}")
        check(1 <= self.port <= 65535, f"port must be in 1..65535, got {self.port}")
        check(self.max_batch >= 1 and self.max_input_tokens >= 1, "max_batch and max_input_tokens must be >= 1")

    def adapter_paths(self) -> dict[str, str]:
        return dict(a.split("=", 1) for a in self.adapters)


MAX_BODY_BYTES = 1 << 20

# OpenAI request fields this server does not implement, each with the value that asks for nothing (null does too):
# a request may carry them at that value, any other value is refused rather than ignored
NOT_IMPLEMENTED: dict[str, Any] = {
    "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "logprobs": False, "top_logprobs": 0,
    "tools": [], "tool_choice": "none", "parallel_tool_calls": None, "functions": [], "function_call": "none",
    "response_format": {"type": "text"}, "modalities": ["text"], "audio": None, "prediction": None, "store": False,
    "metadata": None, "service_tier": None, "reasoning_effort": None, "web_search_options": None,
}


# --- request and response models -----------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # accepted; chat templates have no place for a participant's name

    def chat_turn(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # "developer" is OpenAI's newer name for the system turn; chat templates know "system"
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    safety_adapter: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unimplemented(cls, body: Any) -> Any:
        if not isinstance(body, dict):
            return body
        for name, nothing in NOT_IMPLEMENTED.items():
            if name in body and body[name] is not None and body[name] != nothing:
                hint = "leave it out" if nothing is None else f"leave it out or set it to {json.dumps(nothing)}"
                raise ValueError(f"'{name}' is not implemented by this server; {hint}")
        return {k: v for k, v in body.items() if k not in NOT_IMPLEMENTED}

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("this server returns one choice per request; send n=1 (or leave it out) and repeat "
                             "the request for more")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop must be a non-empty string or a list of at most 4 non-empty strings")
        return stop

    @model_validator(mode="after")
    def _one_token_limit(self) -> "ChatRequest":
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class AdminLoad(_Strict):
    name: str
    path: str = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not name or "/" in name or "+" in name:
            raise ValueError("the adapter's name must be non-empty, without '/' or '+' (it goes in URLs and model ids)")
        return name


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SafegeneInfo(BaseModel):
    adapter: str | None
    gate: float | None  # the gate's strength for this request; None without a gate


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    safegene: SafegeneInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _given_only(self) -> dict[str, str]:  # a delta names only what it adds
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    safegene: SafegeneInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "safegene"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- errors ---------------------------------------------------------------------------------------------------


def error_response(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _validation_error(errors: list[dict[str, Any]]) -> JSONResponse:
    """The first problem of a request that failed validation, as one line naming the field."""
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if e["type"] == "json_invalid":
        return error_response(400, f"malformed JSON: {e.get('ctx', {}).get('error', e['msg'])}", "invalid_json")
    if not loc and e["type"] in ("missing", "model_type", "model_attributes_type", "dict_type"):
        return error_response(400, "the request body must be a JSON object", "invalid_request")
    if e["type"] == "extra_forbidden":
        return error_response(400, f"unknown field '{param}'; leave it out (see the fields this server takes at "
                                   "/openapi.json)", "unknown_field", param)
    message = e["msg"].removeprefix("Value error, ")
    return error_response(400, f"{param}: {message}" if param else message, "invalid_request", param)


class _BodyLimit:
    """Refuses request bodies over `limit` bytes before the app reads them (declared or, when chunked, counted)."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(413, f"the request body must be JSON of at most {self.limit} bytes",
                                   "request_too_large")
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnect notices, which streaming listens for
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


# --- the app ----------------------------------------------------------------------------------------------------


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(server: "SafegeneServer") -> FastAPI:
    """The routes over `server`'s engine; `server.admin_token` and the loaded adapters are read per request."""
    app = FastAPI(title="safegene", description=__doc__)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(list(exc.errors()))

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, str(exc), exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(404, f"no route {request.url.path}", "not_found")
        return error_response(exc.status_code, str(exc.detail), "http_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the server's log (uvicorn logs what this handler re-raises), not to the caller
        return error_response(500, f"internal server error ({type(exc).__name__}); the server log has the details",
                              "internal_error")

    def admin_only(request: Request) -> None:
        if server.admin_token:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), server.admin_token.encode()):
                raise RequestError("admin calls need 'Authorization: Bearer <admin token>'", 401, "unauthorized")
        elif not _is_loopback(request.client.host if request.client else None):
            raise RequestError("admin calls are accepted from loopback only (start the server with an admin token "
                               "to allow others)", 403, "forbidden")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        e = server.engine
        return {"status": "ok", "model": server.model_name, "adapters": sorted(e.slots), "stats": e.stats}

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        now = int(time.time())
        return ModelList(data=[ModelCard(id=m, created=now) for m in server.model_ids()])

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    @app.post("/chat/completions", response_model=ChatCompletion, include_in_schema=False)
    async def chat_completions(body: ChatRequest) -> Any:
        model = body.model or server.model_name
        adapter = server.resolve(model, body)
        req = await run_in_threadpool(  # tokenising is CPU work: off the event loop
            server.engine.submit, [m.chat_turn() for m in body.messages], adapter,
            max_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature or 0.0,
            top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=body.stop_strings(),
            out=AsyncOutbox())
        reply = _Reply(req, adapter, model)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(reply.events(server.engine, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            text = "".join([piece async for piece in server.engine.astream(req)])
        except SafegeneError as e:
            return error_response(500, str(e), "generation_failed")
        return reply.completion(text)

    @app.post("/admin/adapters", dependencies=[Depends(admin_only)])
    async def load_adapter(request: Request) -> Any:
        try:  # the body is read here, after the admin check, not by FastAPI before it
            ask = AdminLoad.model_validate_json(await request.body())
        except ValidationError as e:
            return _validation_error(e.errors())
        return await run_in_threadpool(server.load_adapter, ask.name, ask.path)

    @app.delete("/admin/adapters/{name}", dependencies=[Depends(admin_only)])
    async def remove_adapter(name: str) -> dict[str, Any]:
        await run_in_threadpool(server.engine.remove_adapter, name)
        return {"removed": name}

    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
    return app


class _Reply:
    """The answer to one chat request, whole or as server-sent events."""

    def __init__(self, req: GenRequest, adapter: str | None, model: str):
        self.req, self.adapter, self.model = req, adapter, model
        self.id, self.created = next_id(), int(time.time())

    def _usage(self) -> Usage:
        n_prompt = len(self.req.input_ids)
        return Usage(prompt_tokens=n_prompt, completion_tokens=self.req.completion_tokens,
                     total_tokens=n_prompt + self.req.completion_tokens)

    def _info(self) -> SafegeneInfo:  # read after generation: the gate's strength is known from the prefill on
        return SafegeneInfo(adapter=self.adapter, gate=self.req.gate_strength)

    def completion(self, text: str) -> ChatCompletion:
        return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=self._usage(),
                              choices=[Choice(message=AssistantMessage(content=text),
                                              finish_reason=self.req.finish_reason or "stop")],
                              safegene=self._info())

    def _chunk(self, choices: list[ChunkChoice], **more: Any) -> str:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, **more)
        return f"data: {chunk.model_dump_json()}\n\n"

    def _delta(self, delta: Delta, finish: str | None = None, **more: Any) -> str:
        return self._chunk([ChunkChoice(delta=delta, finish_reason=finish)], **more)

    async def events(self, engine: Engine, include_usage: bool) -> AsyncIterator[str]:
        try:
            yield self._delta(Delta(role="assistant", content=""))
            async for piece in engine.astream(self.req):
                yield self._delta(Delta(content=piece))
            yield self._delta(Delta(), self.req.finish_reason or "stop", safegene=self._info())
            if include_usage:
                yield self._chunk([], usage=self._usage())
        except Exception as e:  # noqa: BLE001 - the status line is sent: the error can only be an event
            if not isinstance(e, SafegeneError):
                log.exception("streaming failed")
            message = str(e) if isinstance(e, SafegeneError) else f"internal server error ({type(e).__name__})"
            yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'code': None}})}\n\n"
        finally:
            if self.req.finish_reason is None:  # the client went away (or it failed): stop decoding for it
                self.req.cancel()
        yield "data: [DONE]\n\n"


# --- the server -------------------------------------------------------------------------------------------------


class SafegeneServer:
    """The app on uvicorn, bound at construction (port 0: a free one, see `server_address`); `serve_forever` runs
    it in the calling thread, `start` in a background one, `shutdown` stops it."""

    def __init__(self, address: tuple[str, int], engine: Engine, model_name: str, admin_token: str | None = None):
        import uvicorn

        self.engine = engine
        self.model_name = model_name
        self.admin_token = admin_token
        self.app = create_app(self)
        self.socket = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(address)
        self.server_address = self.socket.getsockname()[:2]
        # log_config=None: uvicorn's loggers go wherever the application's logging sends them
        self._uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_config=None, lifespan="off",
                                                      timeout_graceful_shutdown=5))
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def resolve(self, model: str | None, body: ChatRequest) -> str | None:
        """The adapter a request asks for (None: the model alone)."""
        if "safety_adapter" in body.model_fields_set:
            return body.safety_adapter
        if model in (None, "", self.model_name):
            return None
        if model.startswith(self.model_name + "+"):
            return model[len(self.model_name) + 1:]
        if model in self.engine.slots:
            return model
        raise RequestError(f"unknown model '{model}'; this server has {', '.join(self.model_ids())}", 404,
                           "model_not_found")

    def model_ids(self) -> list[str]:
        return [self.model_name] + [f"{self.model_name}+{n}" for n in sorted(self.engine.slots)]

    def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Load or replace adapter `name`; whatever goes wrong (a missing or corrupt folder, another model family)
        is a 400 and the running adapter stays."""
        from ..adapter import SafetyAdapter

        try:
            return self.engine.load_adapter(name, SafetyAdapter.load(path))
        except Exception as e:  # noqa: BLE001 - nothing about a bad folder may take the server down
            reason = str(e) if isinstance(e, SafegeneError) else f"{path}: {type(e).__name__}: {e}"
            raise RequestError(f"adapter '{name}' not loaded ({reason}); the running one stays: fix the folder and "
                               "load it again", 400, "bad_adapter") from e

    def serve_forever(self) -> None:
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def start(self, timeout: float = 30.0) -> "SafegeneServer":
        """Serve from a background thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="safegene-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if self._stopped.is_set() or time.monotonic() > deadline:
                raise SafegeneError(f"the server on {self.server_address} did not start; see the log above")
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        """Stop serving (requests in flight get up to 5 s) and wait until the server has stopped."""
        self._uvicorn.should_exit = True
        if self._thread is not None or self._uvicorn.started:
            self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()


def serve(model_ref: str, adapters: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 8000,
          admin_token: str | None = None, model_name: str | None = None, max_batch: int = 8,
          max_input_tokens: int = 2048, use_gate: bool = True, block: bool = True,
          placement: PlacementConfig | None = None) -> SafegeneServer:
    """Load the model once (on `placement`'s device, in its dtype), attach the named adapters, and serve (blocking
    unless `block=False`)."""
    from ..adapter import SafetyAdapter
    from ..models import load_model, load_tokenizer

    if not admin_token and not _is_loopback(host if host != "localhost" else "127.0.0.1"):
        log.warning("serving on %s without an admin token: admin calls are refused except from loopback", host)
    model, tok = load_model(model_ref, placement), load_tokenizer(model_ref)
    engine = Engine(model, tok, max_batch=max_batch, max_input_tokens=max_input_tokens, use_gate=use_gate)
    for name, path in (adapters or {}).items():
        engine.load_adapter(name, SafetyAdapter.load(path))
    name = model_name or Path(str(model_ref).rstrip("/")).name
    server = SafegeneServer((host, port), engine, name, admin_token)
    if not block:
        return server.start()
    try:
        server.serve_forever()
    finally:
        server.server_close()
        engine.close()
    return server
