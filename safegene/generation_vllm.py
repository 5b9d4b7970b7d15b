"""Generation on a vLLM engine: `GenerationConfig(backend="vllm")`, imported (by its name in
`safegene.generation_backends`) only when that is asked for.

vLLM runs the model from its folder, not the transformers model in this process, so two things are carried over:
  * adapters attached at runtime (`SafetyAdapter.attach`, whose forward hooks vLLM never runs) are saved as one PEFT
    LoRA folder (several are summed exactly) and served with a `LoRARequest` on every prompt;
  * weights changed in memory (a merged adapter, `load_model` of a PEFT folder, which merges it) cannot be carried:
    a few rows of the first and last layers are compared with the folder, and a difference is an error, not a
    silently different model.
Prompts are handed over as token ids, the same chat-templated ids the transformers backend feeds (no second BOS),
with greedy or plain temperature sampling, the same stop tokens and no generation_config.json defaults, so the two
backends decode alike. The engine is built once per (model folder, dtype, LoRA rank) and reused.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import ModelError, SafegeneError
from .generation_backends import Generated, GenerationConfig, prompt_token_ids, stop_token_ids

INSTALL_FIX = "pip install vllm (it needs a CUDA GPU), or use --backend transformers"
#: the LoRA ranks a vLLM engine can be built for (vllm.config.lora.MaxLoRARanks)
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)

_engine: dict[str, Any] = {}  # "key" -> (model, dtype, rank), "llm" -> the vllm.LLM built for it
_lora_ids: dict[str, int] = {}  # adapter content hash -> the LoRARequest int id (vLLM caches adapters by id)


def require_vllm() -> Any:
    """The vllm module, or a one-line SafegeneError saying how to get it."""
    try:
        import vllm
    except ImportError as e:
        raise SafegeneError(f"backend vllm needs the vllm package, which cannot be imported here "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'not installed'}); "
                            f"{INSTALL_FIX}") from None
    return vllm


def lora_rank_for(rank: int) -> int:
    """The smallest rank a vLLM engine accepts that holds an adapter of `rank`."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise SafegeneError(f"the attached adapter has rank {rank}, above the largest vLLM serves "
                        f"({VLLM_LORA_RANKS[-1]}); extract it with a lower --rank or use --backend transformers")


def attached_adapters(model: Any) -> list[Any]:
    """The enabled `AttachedAdapter` handles on `model`."""
    from .adapter.runtime import attached_to

    return attached_to(model)


def adapter_for_vllm(handles: Sequence[Any]) -> Any:
    """One SafetyAdapter equal to what the handles add (their current scales folded in), or None."""
    if not handles:
        return None
    parts = []
    for h in handles:
        if h.row_strength is not None:
            raise SafegeneError("an attached adapter has per-request strengths (a serving gate), which vLLM cannot "
                                "apply; use --backend transformers")
        parts.append(h.adapter.with_coefficients({l: float(s) for l, s in h.scales.items()}))
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def lora_request(adapter: Any, folder: str | Path | None = None) -> Any:
    """A `LoRARequest` serving `adapter`, saved once per content as a PEFT LoRA folder (vLLM loads it from disk)."""
    from vllm.lora.request import LoRARequest

    h = hashlib.sha256(json.dumps(adapter.peft_config(), sort_keys=True).encode())
    for name, t in sorted(adapter.peft_state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    digest = h.hexdigest()[:16]
    path = Path(folder or Path(tempfile.gettempdir()) / "safegene-vllm-lora") / digest
    if not (path / "adapter_config.json").is_file():
        adapter.save(path, overwrite=True)
    # ids start at 1 (0 means "no adapter" to vLLM) and name one content for the whole process
    lora_id = _lora_ids.setdefault(digest, len(_lora_ids) + 1)
    return LoRARequest(f"safegene-{digest}", lora_id, str(path))


def model_folder(model: Any) -> tuple[str, str]:
    """(folder or hub name vLLM should load, dtype name) for a model reference or a loaded transformers model."""
    from .models import resolve_model_path

    if isinstance(model, (str, Path)):
        return str(resolve_model_path(str(model))), "auto"
    if hasattr(model, "peft_config"):
        raise SafegeneError("backend vllm serves a model folder, and this is a PEFT model in memory; merge and save "
                            "it (safegene apply), or use --backend transformers")
    ref = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not ref:
        raise SafegeneError("backend vllm needs the model's folder, and this model records none (name_or_path); "
                            "pass a model loaded from a folder, or use --backend transformers")
    dtype = str(getattr(model, "dtype", "auto")).removeprefix("torch.")
    return str(ref), dtype


def check_weights_match_folder(model: Any, folder: str | Path, rows: int = 4) -> None:
    """Raise if the in-memory weights of the first and last decoder layers (first `rows` rows of each matrix)
    differ from `folder`'s: vLLM would serve the folder, so the evaluated model would not be this one."""
    from .adapter.checkpoint import LazyCheckpoint

    folder = Path(folder)
    if not folder.is_dir():
        return  # a hub name: nothing local to compare (transformers loaded that same snapshot)
    params = dict(model.named_parameters())
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    probes = [f".layers.{l}." for l in ({0, n_layers - 1} if n_layers else {0})]
    with LazyCheckpoint(folder) as ck:
        for name, p in params.items():
            if p.ndim != 2 or p.device.type == "meta" or not any(s in name for s in probes) or name not in ck:
                continue
            disk = ck.get_rows(name, 0, min(rows, p.shape[0])).to(p.dtype)
            if not bool((p.detach()[: disk.shape[0]].cpu() == disk).all()):
                raise SafegeneError(f"the model in memory differs from its folder {folder} at {name} (an adapter "
                                    "merged or weights edited in memory); vLLM loads the folder: save this model "
                                    "(safegene apply --merge) and pass that folder, or use --backend transformers")


def engine(folder: str, dtype: str, lora_rank: int) -> Any:
    """The vLLM engine for (folder, dtype) serving LoRA adapters up to `lora_rank`, built on first use (with room
    for rank 16, vLLM's default, so most later adapters fit it too); one at a time (each holds its own share of GPU
    memory, so a different model, or a larger rank, replaces the last engine)."""
    vllm = require_vllm()
    max_lora_rank = max(lora_rank_for(lora_rank), 16)
    key = _engine.get("key")
    if key is None or key[:2] != (folder, dtype) or key[2] < lora_rank:
        key = (folder, dtype, max_lora_rank)
        _engine.clear()
        kw: dict[str, Any] = {}
        try:
            import torch

            if torch.cuda.is_available():
                # the transformers model of this process already holds GPU memory: ask vLLM for most of what is free,
                # not of the whole card (its default, 0.9 of the total, fails when the card is partly used)
                free, total = torch.cuda.mem_get_info()
                kw["gpu_memory_utilization"] = round(0.9 * free / total, 3)
        except Exception:  # noqa: BLE001  # a query that fails leaves vLLM its default
            pass
        try:
            _engine["llm"] = vllm.LLM(model=folder, dtype=dtype, enable_lora=True, max_lora_rank=max_lora_rank,
                                      max_loras=1, generation_config="vllm", **kw)
        except (OSError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ModelError(f"vLLM could not load {folder} ({type(e).__name__}: {first}); check the model is one "
                             "vLLM supports and fits the GPU, or use --backend transformers") from e
        _engine["key"] = key
    return _engine["llm"]


def generate_vllm(model: Any, tokenizer: Any, prompts: Sequence[Any], cfg: GenerationConfig | None = None,
                  progress: bool = True, desc: str = "generating") -> list[Generated]:
    """`generate_detailed` on vLLM (a Responder): one Generated per prompt, in order."""
    cfg = cfg or GenerationConfig()
    vllm = require_vllm()
    folder, dtype = model_folder(model)
    adapter = None
    if not isinstance(model, (str, Path)):
        check_weights_match_folder(model, folder)
        adapter = adapter_for_vllm(attached_adapters(model))
    llm = engine(folder, dtype, adapter.rank if adapter is not None else 1)
    stop_ids = stop_token_ids(model, tokenizer)
    params = vllm.SamplingParams(temperature=cfg.temperature if cfg.do_sample else 0.0, max_tokens=cfg.max_new_tokens,
                                 stop_token_ids=sorted(stop_ids), skip_special_tokens=True)
    ids = prompt_token_ids(tokenizer, prompts, cfg.system_prompt)
    t0 = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": r} for r in ids], params, use_tqdm=progress,
                           lora_request=lora_request(adapter) if adapter is not None else None)
    share = (time.perf_counter() - t0) / max(len(ids), 1)
    out = []
    for o in outputs:
        tokens = list(o.outputs[0].token_ids)
        while tokens and tokens[-1] in stop_ids:  # the stop token is not part of the answer (as with transformers)
            tokens.pop()
        out.append(Generated(tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens), share))
    return out
