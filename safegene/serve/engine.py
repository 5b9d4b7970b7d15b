"""The serving engine: one model, named safety adapters attached as hooks, one worker thread that batches requests.

Every change to the model (attaching, replacing, removing an adapter) runs on the worker thread between batches,
so no hook is registered or removed while a forward pass runs. A request holds the adapter *slot* it was admitted
with: replacing an adapter installs a new slot for new requests, and the old one is detached only when the last
request using it has finished ("requests in flight finish on the adapter they started with").

Requests with the same adapter are batched together and decoded by `generation.decode`, the decode loop offline
generation uses (left-padded prefill, then one token per step with the KV cache, per-row sampling settings); each
new piece of text is pushed to the request's outbox as it is decoded, which serves streaming.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence

from ..errors import SafegeneError
from ..generation import Sampling, decode, left_pad, stop_token_ids

log = logging.getLogger(__name__)

DONE = object()  # the last item of a request's outbox


class RequestError(SafegeneError):
    """A request the engine refuses (unknown adapter, input too long); carries an HTTP status."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class AdapterSlot:
    name: str
    adapter: Any
    handle: Any = None  # AttachedAdapter, created disabled on the worker thread
    gate: Any = None  # SafetyGate or None
    gate_hook: Any = None
    refs: int = 0
    retired: bool = False
    loaded_at: float = field(default_factory=time.time)

    def detach(self) -> None:
        if self.gate_hook is not None:
            self.gate_hook.remove()
        if self.handle is not None:
            self.handle.remove()


class AsyncOutbox:
    """A request's outbox read from an asyncio event loop: the worker thread's puts are handed to the loop, so no
    thread waits per request."""

    def __init__(self) -> None:
        import asyncio

        self._loop = asyncio.get_running_loop()
        self._items: "asyncio.Queue[Any]" = asyncio.Queue()

    def put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the loop has closed (server shut down): nobody is left to read it
            pass

    async def get(self) -> Any:
        return await self._items.get()


@dataclass
class GenRequest:
    messages: list[dict[str, str]]
    slot: AdapterSlot | None
    sampling: Sampling
    stop: tuple[str, ...] = ()
    input_ids: list[int] = field(default_factory=list)
    out: Any = field(default_factory=queue.Queue)  # pieces of text, then DONE (or an exception, then DONE)
    submitted: float = field(default_factory=time.perf_counter)
    gate_strength: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    cancelled: bool = False  # the client went away: the worker ends the row at its next token

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 8, max_wait_ms: float = 10.0,
                 max_input_tokens: int = 2048, max_new_tokens: int = 512, use_gate: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._stop_ids = stop_token_ids(model, tokenizer)
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_input_tokens = max_input_tokens
        self.max_new_tokens = max_new_tokens
        self.use_gate = use_gate
        self.slots: dict[str, AdapterSlot] = {}
        self._lock = threading.Lock()  # guards slots and refs
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._pending: list[GenRequest] = []
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="safegene-engine", daemon=True)
        self._worker.start()
        self.stats = {"batches": 0, "requests": 0, "max_batch_seen": 0}

    # --- adapters (executed on the worker thread) ---------------------------------------------------------------
    def _control(self, fn, *args) -> Any:
        done: "queue.Queue[Any]" = queue.Queue()
        self._queue.put(("control", fn, args, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def load_adapter(self, name: str, adapter: Any) -> dict[str, Any]:
        """Attach (or replace) adapter `name`. A wrong-family adapter raises and leaves the current one serving."""
        warnings = adapter.check_model(self.model, what="the served model")  # raises FamilyMismatchError
        return self._control(self._install, name, adapter, warnings)

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self.slots:
                raise RequestError(f"no adapter named '{name}'", 404, "adapter_not_found")
        self._control(self._uninstall, name)

    def _install(self, name: str, adapter: Any, warnings: list[str]) -> dict[str, Any]:
        from ..adapter.runtime import AttachedAdapter
        from .gate import SafetyGate, install_gate

        slot = AdapterSlot(name=name, adapter=adapter)
        try:
            slot.handle = AttachedAdapter(self.model, adapter, enabled=False)
            gate = (adapter.card or {}).get("gate")
            if gate and self.use_gate:
                slot.gate = SafetyGate.from_dict(gate)
                slot.gate_hook = install_gate(slot.gate, self.model, slot.handle)
        except BaseException:  # a half-installed adapter must leave no hook behind
            slot.detach()
            raise
        with self._lock:
            old = self.slots.get(name)
            self.slots[name] = slot
            if old is not None:
                old.retired = True
                if old.refs == 0:
                    old.detach()
        return {"name": name, "layers": adapter.layers, "gate": slot.gate is not None, "replaced": old is not None,
                "warnings": warnings}

    def _uninstall(self, name: str) -> None:
        with self._lock:
            slot = self.slots.pop(name, None)
            if slot is not None:
                slot.retired = True
                if slot.refs == 0:
                    slot.detach()

    def _release(self, slot: AdapterSlot | None) -> None:
        if slot is None:
            return
        with self._lock:
            slot.refs -= 1
            if slot.retired and slot.refs == 0:
                slot.detach()

    # --- requests ------------------------------------------------------------------------------------------------
    def submit(self, messages: list[dict[str, str]], adapter: str | None, max_tokens: int | None = None,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
               out: Any = None) -> GenRequest:
        """Queue a chat for generation; read its text with `complete`, `stream` or (with out=AsyncOutbox())
        `astream`. `stop`: strings that end the response where they first appear (not included)."""
        if max_tokens is not None and not 1 <= max_tokens <= self.max_new_tokens:
            raise RequestError(f"max_tokens must be between 1 and {self.max_new_tokens} on this server, got "
                               f"{max_tokens}", 400, "invalid_max_tokens")
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):  # newer tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        if len(ids) > self.max_input_tokens:
            raise RequestError(f"the messages are {len(ids)} tokens; this server takes at most "
                               f"{self.max_input_tokens}", 400, "context_length_exceeded")
        sampling = Sampling(max_tokens or self.max_new_tokens, float(temperature or 0.0), float(top_p), seed)
        with self._lock:
            slot = None
            if adapter is not None:
                slot = self.slots.get(adapter)
                if slot is None:
                    raise RequestError(f"no safety adapter named '{adapter}' (loaded: {sorted(self.slots) or 'none'})",
                                       404, "model_not_found")
                slot.refs += 1
        req = GenRequest(messages=messages, slot=slot, sampling=sampling, stop=tuple(stop), input_ids=list(ids),
                         **({"out": out} if out is not None else {}))
        self._queue.put(("gen", req))
        return req

    def complete(self, req: GenRequest) -> str:
        """Wait for the whole text of a submitted request."""
        return "".join(self.stream(req))

    def stream(self, req: GenRequest) -> Iterator[str]:
        while (item := req.out.get()) is not DONE:
            yield _piece(item)

    async def astream(self, req: GenRequest) -> AsyncIterator[str]:
        """`stream` for a request submitted with out=AsyncOutbox(), on that event loop."""
        while (item := await req.out.get()) is not DONE:
            yield _piece(item)

    def close(self) -> None:
        """Stop the worker and detach every adapter: the model is left as it was loaded."""
        self._stop.set()
        self._queue.put(("stop",))
        self._worker.join(timeout=10)
        with self._lock:
            for slot in self.slots.values():
                slot.detach()
            self.slots.clear()

    # --- worker --------------------------------------------------------------------------------------------------
    def _next_batch(self) -> list[GenRequest] | None:
        """First waiting request, plus those with the same adapter that arrive within max_wait."""
        first = self._pending.pop(0) if self._pending else None
        while first is None:
            item = self._queue.get()
            if self._dispatch(item):
                return None
            if item[0] == "gen":
                first = item[1]
        batch = [first]
        rest = [r for r in self._pending if r.slot is first.slot]
        for r in rest[: self.max_batch - 1]:
            self._pending.remove(r)
            batch.append(r)
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if self._dispatch(item):
                self._pending = batch + self._pending
                return None
            if item[0] == "gen":
                (batch if item[1].slot is first.slot else self._pending).append(item[1])
        return batch

    def _dispatch(self, item: tuple) -> bool:
        """Run a control item; True when the engine must stop."""
        if item[0] == "stop":
            return True
        if item[0] == "control":
            _, fn, args, done = item
            try:
                done.put((True, fn(*args)))
            except BaseException as e:  # noqa: BLE001 - handed back to the caller's thread
                done.put((False, e))
        return False

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch is None:
                if self._stop.is_set():
                    break
                continue
            try:
                self._generate(batch)
            except BaseException as e:  # noqa: BLE001 - every waiting client must hear about it
                log.exception("generation failed")
                for r in batch:
                    if r.finish_reason is None:
                        r.out.put(SafegeneError(f"generation failed: {e}"))
                        r.out.put(DONE)
            finally:
                for r in batch:
                    self._release(r.slot)

    def _generate(self, batch: list[GenRequest]) -> None:
        slot = batch[0].slot
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch))
        emitted = [""] * len(batch)

        def on_token(i: int, tokens: list[int], finish: str | None) -> bool:
            r = batch[i]
            if r.gate_strength is None and slot is not None and slot.handle.row_strength is not None:
                r.gate_strength = round(float(slot.handle.row_strength[i]), 4)  # set by the gate at prefill
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            hit = _first_stop(text, r.stop, len(emitted[i]))
            if hit is not None:
                text, finish = text[:hit], "stop"
            elif r.cancelled:
                finish = "cancelled"
            # hold back what may still change (a character split across tokens, the start of a stop string) until
            # the response is over
            ready = len(text) if finish else _stable_length(text, r.stop)
            if ready > len(emitted[i]):
                r.out.put(text[len(emitted[i]):ready])
                emitted[i] = text[:ready]
            if finish:
                r.completion_tokens = len(tokens)
                r.finish_reason = finish
                r.out.put(DONE)
            return hit is not None or r.cancelled

        input_ids, attention_mask = left_pad([r.input_ids for r in batch], self.tokenizer)
        if slot is not None:
            slot.handle.row_strength = None
            slot.handle.enable()
        try:
            decode(self.model, input_ids, attention_mask, [r.sampling for r in batch], self._stop_ids, on_token)
        finally:
            if slot is not None:
                slot.handle.disable()
                slot.handle.row_strength = None


def _piece(item: Any) -> str:
    if isinstance(item, BaseException):
        raise item
    return item


def _first_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """Where the first stop string begins in `text` (searched from `start`, what was sent already), or None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stable_length(text: str, stops: Sequence[str]) -> int:
    """Length of the prefix of `text` that more tokens cannot change: without a trailing replacement character
    (a character split across tokens) or a tail that could begin a stop string."""
    end = len(text.rstrip("\ufffd"))
    held = max((k for s in stops for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
    return end - held


_ids = itertools.count(1)


def next_id() -> str:
    return f"chatcmpl-{int(time.time())}-{next(_ids)}"
