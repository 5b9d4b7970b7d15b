"""Serving: an OpenAI-compatible server with per-request safety adapters, hot swap and an adaptive gate."""

from .engine import Engine, RequestError
from .gate import SafetyGate, fit_gate
from .server import SafegeneServer, create_app, serve

__all__ = ["Engine", "RequestError", "SafegeneServer", "SafetyGate", "create_app", "fit_gate", "serve"]
