"""What a generation backend is, and where each one is found by name.

A backend answers chat prompts with a model: it takes the decoding settings (`GenerationConfig`) and returns one
`Generated` per prompt (a `Responder`). Every backend turns prompts into the same chat-templated token ids
(`prompt_token_ids`) and stops on the same tokens (`stop_token_ids`), so that two backends decode alike.

`BACKENDS` names each backend with the import path of its function ("module:function"), imported only when that
backend is asked for: an optional backend (vLLM) costs nothing, and needs nothing installed, until it is used, and
this module imports no backend, so every backend can import what it shares from here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Sequence

from .chat import prompt_text
from .config import check, opt
from .errors import ConfigError

#: backend name -> "module:function" of its Responder
BACKEND_PATHS: dict[str, str] = {
    "transformers": "safegene.generation:generate_transformers",
    "vllm": "safegene.generation_vllm:generate_vllm",
}
BACKENDS = tuple(BACKEND_PATHS)


@dataclass
class GenerationConfig:
    """Decoding settings: how many tokens, how many prompts at once, greedy or sampled."""

    cli_leaf_flags: ClassVar[bool] = True  # `--max-new-tokens` as well as `--generation.max-new-tokens`
    max_new_tokens: int = opt(40, "tokens generated per prompt")
    batch_size: int = opt(8, "prompts per batch (left-padded)")
    do_sample: bool = opt(False, "sample instead of greedy decoding")
    temperature: float = opt(1.0, "sampling temperature (only with do_sample)")
    system_prompt: str | None = opt(None, "system message; None keeps the chat template's default")
    sort_by_length: bool = opt(True, "batch prompts of similar token length together (less padding); answers keep "
                               "the input order", added_later=True)
    drop_finished: bool = opt(True, "drop finished rows from the running batch (and their KV cache) once a quarter "
                              "of it has finished; greedy outputs are unchanged", added_later=True)
    backend: str = opt("transformers", "transformers (this process, any device), or vllm (a vLLM engine on the "
                       "model's folder, attached adapters served as LoRA; needs `pip install vllm` and a GPU; "
                       "batch_size is then the prompts handed to it per call)", choices=BACKENDS, added_later=True)

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


@dataclass
class Generated:
    """One response and what it cost: every token generated for it (drafts and critiques included) and its share
    of the wall time of the batches that produced it."""

    text: str
    tokens: int
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)  # what a defence did (e.g. which screen flagged it)


class Responder(Protocol):
    """Answers chat prompts with a model: every backend, and every inference-time defence that wraps one."""

    def __call__(self, model: Any, tokenizer: Any, prompts: Sequence[Any], cfg: GenerationConfig | None = None,
                 progress: bool = True, desc: str = "generating") -> list[Generated]: ...


def backend(name: str) -> Responder:
    """The generation function of backend `name`, imported now (a backend's own missing package is its error)."""
    path = BACKEND_PATHS.get(name)
    if path is None:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    module, _, function = path.partition(":")
    return getattr(importlib.import_module(module), function)


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Tokens that end a response: the tokenizer's eos and pad, and the eos ids of the model's generation config."""
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])}
    return ids - {None}


def prompt_token_ids(tokenizer: Any, prompts: Sequence[Any], system_prompt: str | None = None) -> list[list[int]]:
    """The chat-templated token ids of each prompt, as every backend feeds them to the model."""
    if not prompts:
        return []
    texts = [prompt_text(tokenizer, p, system_prompt) for p in prompts]
    return [list(r) for r in tokenizer(texts, add_special_tokens=False)["input_ids"]]
