"""The serving engine: one model, named safety adapters attached as hooks, one worker thread that batches requests.

Every change to the model (attaching, replacing, removing an adapter) runs on the worker thread between batches,
so no hook is registered or removed while a forward pass runs. A request holds the adapter *slot* it was admitted
with: replacing an adapter installs a new slot for new requests, and the old one is detached only when the last
request using it has finished ("requests in flight finish on the adapter they started with").

Requests with the same adapter are batched together (left-padded prefill, then one token per step with the KV
cache); each new piece of text is pushed to the request's queue as it is decoded, which serves streaming.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import SafegeneError

log = logging.getLogger(__name__)

_DONE = object()


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


@dataclass
class GenRequest:
    messages: list[dict[str, str]]
    slot: AdapterSlot | None
    max_tokens: int
    temperature: float
    input_ids: list[int] = field(default_factory=list)
    out: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    gate_strength: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None


class Engine:
    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 8, max_wait_ms: float = 10.0,
                 max_input_tokens: int = 2048, max_new_tokens: int = 512, use_gate: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
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
        slot.handle = AttachedAdapter(self.model, adapter, enabled=False)
        gate = (adapter.card or {}).get("gate")
        if gate and self.use_gate:
            slot.gate = SafetyGate.from_dict(gate)
            slot.gate_hook = install_gate(slot.gate, self.model, slot.handle)
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
               temperature: float = 0.0) -> GenRequest:
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):  # newer tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        if len(ids) > self.max_input_tokens:
            raise RequestError(f"the messages are {len(ids)} tokens; this server takes at most "
                               f"{self.max_input_tokens}", 400, "context_length_exceeded")
        with self._lock:
            slot = None
            if adapter is not None:
                slot = self.slots.get(adapter)
                if slot is None:
                    raise RequestError(f"no safety adapter named '{adapter}' (loaded: {sorted(self.slots) or 'none'})",
                                       404, "model_not_found")
                slot.refs += 1
        req = GenRequest(messages=messages, slot=slot, input_ids=list(ids), temperature=float(temperature or 0.0),
                         max_tokens=min(int(max_tokens or self.max_new_tokens), self.max_new_tokens))
        self._queue.put(("gen", req))
        return req

    def complete(self, req: GenRequest) -> str:
        """Wait for the whole text of a submitted request."""
        parts = []
        while True:
            item = req.out.get()
            if item is _DONE:
                return "".join(parts)
            if isinstance(item, BaseException):
                raise item
            parts.append(item)

    def stream(self, req: GenRequest):
        while True:
            item = req.out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

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
                    r.out.put(SafegeneError(f"generation failed: {e}"))
                    r.out.put(_DONE)
            finally:
                for r in batch:
                    self._release(r.slot)

    def _generate(self, batch: list[GenRequest]) -> None:
        import torch

        slot = batch[0].slot
        tok = self.tokenizer
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch))
        width = max(len(r.input_ids) for r in batch)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r.input_ids)) + r.input_ids for r in batch])
        attn = torch.tensor([[0] * (width - len(r.input_ids)) + [1] * len(r.input_ids) for r in batch])
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = {tok.eos_token_id, tok.pad_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}
        generated: list[list[int]] = [[] for _ in batch]
        emitted = [""] * len(batch)
        active = [True] * len(batch)
        past = None
        steps = max(r.max_tokens for r in batch)
        if slot is not None:
            slot.handle.row_strength = None
            slot.handle.enable()
        try:
            with torch.inference_mode():
                for step in range(steps):
                    out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=pos, past_key_values=past,
                                     use_cache=True)
                    past = out.past_key_values
                    logits = out.logits[:, -1, :].float()
                    if step == 0 and slot is not None and slot.gate is not None and slot.handle.row_strength is not None:
                        for r, g in zip(batch, slot.handle.row_strength.tolist()):
                            r.gate_strength = round(g, 4)
                    nxt = logits.argmax(-1)
                    for i, r in enumerate(batch):
                        if r.temperature > 0:
                            probs = torch.softmax(logits[i] / r.temperature, -1)
                            nxt[i] = torch.multinomial(probs, 1)[0]
                    for i, r in enumerate(batch):
                        if not active[i]:
                            continue
                        t = int(nxt[i])
                        if t not in eos:
                            generated[i].append(t)
                            r.completion_tokens += 1
                        text = tok.decode(generated[i], skip_special_tokens=True)
                        done = t in eos or len(generated[i]) >= r.max_tokens
                        # hold back a character split across tokens until it is complete, but flush at the end
                        if len(text) > len(emitted[i]) and (done or not text.endswith("\ufffd")):
                            r.out.put(text[len(emitted[i]):])
                            emitted[i] = text
                        if done:
                            active[i] = False
                            r.finish_reason = "stop" if t in eos else "length"
                            r.out.put(_DONE)
                    if not any(active):
                        break
                    input_ids = nxt[:, None]
                    attn = torch.cat([attn, torch.ones(len(batch), 1, dtype=attn.dtype)], 1)
                    pos = pos[:, -1:] + 1
        finally:
            if slot is not None:
                slot.handle.disable()
                slot.handle.row_strength = None
        for i, r in enumerate(batch):
            if active[i]:
                r.finish_reason = "length"
                r.out.put(_DONE)


_ids = itertools.count(1)


def next_id() -> str:
    return f"chatcmpl-{int(time.time())}-{next(_ids)}"
