"""OpenAI-compatible HTTP server over the engine (standard library only; works with the official `openai` client).

    GET  /health                      liveness and what is loaded
    GET  /v1/models                   the base model, and base+<adapter> for every loaded safety adapter
    POST /v1/chat/completions         OpenAI chat completions, `stream: true` for server-sent events
    POST /admin/adapters              {"name": ..., "path": ...}: load or replace an adapter while serving
    DELETE /admin/adapters/<name>     remove one

The caller picks the safety adapter per request by model name (`<base>+<adapter>`, or the adapter's name alone) or
by the extra body field `safety_adapter` (a name, or null for none). Admin calls are accepted from loopback only,
unless the server was given an admin token, in which case they need `Authorization: Bearer <token>` from anywhere.
Errors are JSON in OpenAI's shape, `{"error": {"message", "type", "code"}}`, with a 4xx status for the caller's
mistakes; a failure inside generation is a 500 for that request only.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..errors import SafegeneError
from .engine import Engine, RequestError, next_id

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20


class SafegeneServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: Engine, model_name: str, admin_token: str | None = None):
        super().__init__(address, Handler)
        self.engine = engine
        self.model_name = model_name
        self.admin_token = admin_token

    def resolve(self, model: str | None, body: dict[str, Any]) -> str | None:
        """The adapter a request asks for (None: the model alone)."""
        if "safety_adapter" in body:
            name = body["safety_adapter"]
            if name is not None and not isinstance(name, str):
                raise RequestError("safety_adapter must be a string or null")
            return name
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


class Handler(BaseHTTPRequestHandler):
    server: SafegeneServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), fmt % args)

    # --- plumbing ----------------------------------------------------------------------------------------------
    def _send(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str = "invalid_request") -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send(status, {"error": {"message": message, "type": kind, "code": code}})

    def _body(self) -> dict[str, Any] | None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self._error(413 if length > 0 else 400, f"request body must be JSON of at most {MAX_BODY_BYTES} bytes")
            return None
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:
            self._error(400, f"malformed JSON: {e}")
            return None
        if not isinstance(body, dict):
            self._error(400, "the request body must be a JSON object")
            return None
        return body

    def _admin_allowed(self) -> bool:
        token = self.server.admin_token
        if token:
            given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if hmac.compare_digest(given, token):
                return True
            self._error(401, "admin calls need 'Authorization: Bearer <admin token>'", "unauthorized")
            return False
        if ipaddress.ip_address(self.client_address[0]).is_loopback:
            return True
        self._error(403, "admin calls are accepted from loopback only (start the server with an admin token to "
                         "allow others)", "forbidden")
        return False

    # --- routes ------------------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/health":
            e = self.server.engine
            self._send(200, {"status": "ok", "model": self.server.model_name, "adapters": sorted(e.slots),
                             "stats": e.stats})
        elif self.path == "/v1/models":
            now = int(time.time())
            self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "created": now,
                                                         "owned_by": "safegene"} for m in self.server.model_ids()]})
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:  # noqa: N802
        if self.path in ("/v1/chat/completions", "/chat/completions"):
            self._chat()
        elif self.path == "/admin/adapters":
            self._admin_load()
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_DELETE(self) -> None:  # noqa: N802
        if not self.path.startswith("/admin/adapters/"):
            self._error(404, f"no route {self.path}", "not_found")
            return
        if not self._admin_allowed():
            return
        name = self.path.rsplit("/", 1)[1]
        try:
            self.server.engine.remove_adapter(name)
        except RequestError as e:
            self._error(e.status, str(e), e.code)
            return
        self._send(200, {"removed": name})

    def _admin_load(self) -> None:
        if not self._admin_allowed():
            return
        body = self._body()
        if body is None:
            return
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not name or "/" in name or "+" in name or not isinstance(path, str):
            self._error(400, "admin load needs {'name': <name without '/' or '+'>, 'path': <adapter folder>}")
            return
        from ..adapter import SafetyAdapter

        try:
            info = self.server.engine.load_adapter(name, SafetyAdapter.load(path))
        except SafegeneError as e:  # corrupt folder, wrong family: the running adapter stays
            self._error(400, f"adapter '{name}' not loaded: {e}", "bad_adapter")
            return
        self._send(200, info)

    def _chat(self) -> None:
        body = self._body()
        if body is None:
            return
        messages = body.get("messages")
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages)):
            self._error(400, "messages must be a non-empty list of {'role': ..., 'content': <string>}")
            return
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        temperature = body.get("temperature") or 0.0
        if (max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1)) or \
                not isinstance(temperature, (int, float)) or temperature < 0:
            self._error(400, "max_tokens must be a positive integer and temperature a number >= 0")
            return
        model = body.get("model") or self.server.model_name
        engine = self.server.engine
        try:
            adapter = self.server.resolve(model, body)
            req = engine.submit([{"role": m["role"], "content": m["content"]} for m in messages], adapter,
                                max_tokens, float(temperature))
        except RequestError as e:
            self._error(e.status, str(e), e.code)
            return
        rid, created = next_id(), int(time.time())
        extra = lambda: {"adapter": adapter, "gate": req.gate_strength}  # noqa: E731 - read after generation
        if body.get("stream"):
            self._stream(req, rid, created, model, extra)
            return
        try:
            text = engine.complete(req)
        except SafegeneError as e:
            self._error(500, str(e), "generation_failed")
            return
        n_prompt = len(req.input_ids)
        self._send(200, {
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": req.finish_reason or "stop"}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": req.completion_tokens,
                      "total_tokens": n_prompt + req.completion_tokens},
            "safegene": extra(),
        })

    def _stream(self, req: Any, rid: str, created: int, model: str, extra) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def event(delta: dict[str, Any], finish: str | None = None, **more: Any) -> None:
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **more}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        try:
            event({"role": "assistant", "content": ""})
            for piece in self.server.engine.stream(req):
                event({"content": piece})
            event({}, req.finish_reason or "stop", safegene=extra())
        except SafegeneError as e:
            self.wfile.write(f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n".encode())
        except (BrokenPipeError, ConnectionResetError):
            return  # the client went away; the engine finishes the request on its own
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def serve(model_ref: str, adapters: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 8000,
          admin_token: str | None = None, model_name: str | None = None, max_batch: int = 8,
          max_input_tokens: int = 2048, use_gate: bool = True, block: bool = True) -> SafegeneServer:
    """Load the model once, attach the named adapters, and serve (blocking unless `block=False`)."""
    import threading
    from pathlib import Path

    from ..adapter import SafetyAdapter
    from ..models import load_model, load_tokenizer

    if not admin_token and not ipaddress.ip_address(host if host != "localhost" else "127.0.0.1").is_loopback:
        log.warning("serving on %s without an admin token: admin calls are refused except from loopback", host)
    model, tok = load_model(model_ref), load_tokenizer(model_ref)
    engine = Engine(model, tok, max_batch=max_batch, max_input_tokens=max_input_tokens, use_gate=use_gate)
    for name, path in (adapters or {}).items():
        engine.load_adapter(name, SafetyAdapter.load(path))
    name = model_name or Path(str(model_ref).rstrip("/")).name
    server = SafegeneServer((host, port), engine, name, admin_token)
    if block:
        try:
            server.serve_forever()
        finally:
            server.server_close()
            engine.close()
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
