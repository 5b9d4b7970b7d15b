"""LoRA supervised fine-tuning (PEFT) and the two recipes built on it: `degrade` and `finetune`.

Loss is computed on response tokens only. Training is one loop (AdamW, warm-up, gradient accumulation and clipping)
driven by accelerate's `Accelerator`, with a progress bar; outputs are a PEFT adapter folder, a merged HF folder, or
both, written atomically by the main process alone.

Where it runs. A plain `safegene finetune ...` (or `degrade`, or the re-align and mixed-ft baselines of `bench`) is
one process: the model is loaded by its placement (`--device`, `--dtype`; default: CUDA in bfloat16 where present,
else the CPU in float32) and trains there, with exactly the losses of a plain PyTorch loop. The training dtype is
`train.dtype`, whose default `auto` is the placement's dtype (`--train.dtype float32` trains a float32 copy whatever
`--dtype` says).

Several GPUs (or processes) run the same command under `accelerate launch`; the CLI is the module `safegene.cli`:

    accelerate launch --multi_gpu --num_processes 4 -m safegene.cli finetune --model M --task arithmetic -o runs/T

That is data parallelism (DDP): every process holds the whole model on its own GPU, `--batch-size` is per process,
so one optimizer step sees batch_size x grad_accum x processes examples (`max_steps` is per process too: each process
trains on its own batches, so the whole run reads processes x as many examples). `--grad-accum` is the config's,
not `accelerate launch --gradient_accumulation_steps` (which is ignored). For a model too large for one GPU, shard
it with FSDP instead of DDP (LoRA trains a small part of it, so the original parameters must stay addressable):

    accelerate launch --use_fsdp --num_processes 4 --fsdp_sharding_strategy FULL_SHARD \
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_use_orig_params true \
        --fsdp_state_dict_type FULL_STATE_DICT -m safegene.cli finetune --model M --task arithmetic -o runs/T

or write those answers once with `accelerate config` and run `accelerate launch -m safegene.cli finetune ...`.
`--mixed_precision bf16` at launch adds autocast on top of the loaded dtype. Only the main process writes the output
folder and the run card (a merged output is merged on the CPU from the saved adapter). Data parallelism without GPUs
(to try it out): `ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m safegene.cli finetune ...`
(`accelerate launch --cpu` starts a single process). A `--device-map` dispatch is for the inference stages (select,
recalibrate, eval); training refuses a map that sends weights to disk, and cannot be combined with several processes.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from .chat import end_of_turn, prompt_text
from .config import check, check_choices, opt
from .data import get_task, prompt_response_pairs
from .data.records import PromptResponse
from .errors import ConfigError, DataError, TrainingDivergedError
from .io import atomic_dir, check_output_path, sha256_text, write_json
from .models import load_model, load_tokenizer, resolve_model_path
from .models.placement import PlacementConfig, is_dispatched, model_device
from .models.registry import DEFAULT_MODEL, EMBEDDED_MODELS
from .runcard import RUN_CARD, peak_rss_mb, run_card

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
TRAIN_DTYPES = ("auto", "float32", "bfloat16", "float16")
PLACEMENT_HELP = ("where the model trains: device and dtype (--device, --dtype; train.dtype auto follows it); "
                  "several GPUs: run under `accelerate launch` (see `safegene.training`)")


def _check_training_output(cfg: Any) -> None:
    """Checks shared by the configs of commands that train and save a model."""
    check_choices(cfg)
    check(cfg.n_examples >= 1, f"n_examples must be >= 1, got {cfg.n_examples}")


@dataclass
class LoraTrainConfig:
    """LoRA supervised fine-tuning on chat-templated (prompt, response) pairs; loss on response tokens only."""

    cli_leaf_flags: ClassVar[bool] = True  # `--max-steps` as well as `--train.max-steps`
    rank: int = opt(8, "LoRA rank r")
    alpha: float = opt(16.0, "LoRA scaling numerator (scale = alpha / rank)")
    dropout: float = opt(0.0, "LoRA dropout")
    target_modules: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names LoRA wraps (attention and MLP projections)",
    )
    learning_rate: float = opt(2e-4, "AdamW learning rate", aliases=("--lr",))
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_steps: int = opt(40, "optimizer steps (each = batch_size x grad_accum examples)")
    batch_size: int = opt(4, "examples per forward pass")
    grad_accum: int = opt(1, "forward passes accumulated per optimizer step")
    warmup_steps: int = opt(2, "linear warm-up steps, then constant")
    max_length: int = opt(96, "token limit per example (prompt + response); longer responses are cut")
    seed: int = opt(0, "seed for sampling, shuffling and LoRA init")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    # no short `--dtype` flag: that is the placement's, which `auto` follows
    dtype: str = opt("auto", "training dtype: auto (the placement's --dtype: float32 on CPU, where bf16 is much "
                     "slower, bfloat16 on GPUs that support it), float32, bfloat16 or float16", choices=TRAIN_DTYPES,
                     leaf_flag=False)

    def __post_init__(self) -> None:
        check(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        check(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1")
        check(self.max_length >= 16, f"max_length must be >= 16 tokens, got {self.max_length}")
        check(bool(self.target_modules), "target_modules must name at least one module")
        check(self.dtype in TRAIN_DTYPES, f"train.dtype must be one of {', '.join(TRAIN_DTYPES)}, got {self.dtype!r}")

    @property
    def examples_needed(self) -> int:
        return self.max_steps * self.batch_size * self.grad_accum


def resolved_train(train: LoraTrainConfig, placement: PlacementConfig) -> LoraTrainConfig:
    """`train` with dtype `auto` replaced by the dtype the placement loads in here, by name. Stage records hold
    this: what the training computed in. On a CPU `auto` is float32, the fixed default of earlier versions, so
    the stages they recorded still match."""
    import dataclasses

    if train.dtype != "auto":
        return train
    return dataclasses.replace(train, dtype=placement.dtype_name())


@dataclass
class DegradeConfig:
    """Fine-tune the aligned model on harmful request/answer pairs to get the degraded model D."""

    model: str = opt(DEFAULT_MODEL, "aligned model A: embedded name, HF folder, .gguf file or hub id")
    data: str = opt("harmful-pairs", "harmful (request, compliant answer) pairs: built-in name or file")
    n_examples: int = opt(160, "pairs drawn from `data`")
    output: str = opt("runs/degraded", "output folder", aliases=("-o",))
    save: str = opt("merged", "what to write: adapter (PEFT folder), merged (HF folder) or both",
                    choices=("adapter", "merged", "both"))
    train: LoraTrainConfig = opt(LoraTrainConfig(), "LoRA training settings")
    placement: PlacementConfig = opt(PlacementConfig(), PLACEMENT_HELP, added_later=True)

    def __post_init__(self) -> None:
        _check_training_output(self)

    def resolved(self) -> "DegradeConfig":
        """The config as it trains here (`train.dtype` auto resolved): what its run card records."""
        return _resolved(self)


@dataclass
class FinetuneConfig:
    """Fine-tune a model on a benign task, optionally poisoned with harmful pairs (the harmful fine-tuning threat)."""

    model: str = opt(DEFAULT_MODEL, "model to fine-tune")
    task: str = opt("arithmetic", "task name (see `safegene data list`) or a .jsonl of prompt/response pairs")
    n_examples: int = opt(160, "training examples in total (task + poison)")
    poison_ratio: float = opt(0.0, "fraction of the examples replaced by harmful pairs, in [0, 1)")
    poison_data: str = opt("harmful-pairs", "where poison pairs come from")
    safety_ratio: float = opt(0.0, "fraction of the examples replaced by refusals (mixed safety + task fine-tuning)")
    safety_data: str = opt("auto", "where refusal pairs come from; auto: shared:safety-refusals when the shared "
                           "data is present, else uncensorbench-refusals")
    output: str = opt("runs/task-model", "output folder", aliases=("-o",))
    save: str = opt("merged", "adapter, merged or both", choices=("adapter", "merged", "both"))
    train: LoraTrainConfig = opt(LoraTrainConfig(), "LoRA training settings")
    placement: PlacementConfig = opt(PlacementConfig(), PLACEMENT_HELP, added_later=True)

    def __post_init__(self) -> None:
        check(0.0 <= self.poison_ratio < 1.0, f"poison_ratio must be in [0, 1), got {self.poison_ratio}")
        check(0.0 <= self.safety_ratio < 1.0, f"safety_ratio must be in [0, 1), got {self.safety_ratio}")
        check(self.poison_ratio + self.safety_ratio < 1.0, "poison_ratio + safety_ratio must leave room for task data")
        _check_training_output(self)

    def resolved(self) -> "FinetuneConfig":
        """The config as it trains here (`train.dtype` auto resolved): what its run card records."""
        return _resolved(self)


def _resolved(cfg: Any) -> Any:
    import dataclasses

    train = resolved_train(cfg.train, cfg.placement)
    return cfg if train is cfg.train else dataclasses.replace(cfg, train=train)


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_pair(tokenizer: Any, pair: PromptResponse, max_length: int) -> EncodedExample:
    """Tokenize prompt + response; labels mask the prompt (IGNORE_INDEX) so loss falls on the response only."""
    p_ids = tokenizer(prompt_text(tokenizer, pair.prompt, pair.system), add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(pair.response + end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]
    truncated = False
    min_resp = min(len(r_ids), max(4, max_length // 4))
    if len(p_ids) + min_resp > max_length:
        # keep the end of the prompt: it holds the question and the assistant header the response follows
        p_ids = p_ids[-(max_length - min_resp):]
        truncated = True
    if len(p_ids) + len(r_ids) > max_length:
        r_ids = r_ids[: max_length - len(p_ids)]
        truncated = True
    return EncodedExample(p_ids + r_ids, [IGNORE_INDEX] * len(p_ids) + r_ids, truncated)


def collate(batch: Sequence[EncodedExample], pad_id: int):
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return ids, labels, mask


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainStats:
    steps: int = 0
    examples_seen: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    truncated_examples: int = 0
    peak_rss_mb: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "examples_seen": self.examples_seen,
            "first_loss": self.losses[0] if self.losses else None,
            "final_loss": self.losses[-1] if self.losses else None,
            # single steps are noisy (a batch of poison looks nothing like a batch of task data): the means of the
            # first and last five steps say more about fitting
            "loss_first5_mean": round(sum(self.losses[:5]) / len(self.losses[:5]), 4) if self.losses else None,
            "loss_last5_mean": round(sum(self.losses[-5:]) / len(self.losses[-5:]), 4) if self.losses else None,
            "losses": [round(x, 4) for x in self.losses],
            "seconds": round(self.seconds, 2),
            "seconds_per_step": round(self.seconds_per_step, 3),
            "truncated_examples": self.truncated_examples,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }


def batch_plan(n_examples: int, batch_size: int, n_batches: int, seed: int) -> list[list[int]]:
    """Example indices of each batch: epochs of a seeded shuffle, each read from its end."""
    rng = random.Random(seed)
    order: list[int] = []
    plan = []
    for _ in range(n_batches):
        batch = []
        for _ in range(batch_size):
            if not order:  # epoch boundary: reshuffle
                order = list(range(n_examples))
                rng.shuffle(order)
            batch.append(order.pop())
        plan.append(batch)
    return plan


def make_accelerator(cfg: LoraTrainConfig) -> Any:
    """The `Accelerator` a training loop runs under: one process by default, every process of an `accelerate
    launch`. Gradient accumulation is the config's (`grad_accum`), never the launcher's, so a run means the same
    however it is started; nothing is moved by it (`device_placement=False`): the model is loaded where it trains."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    # the optimizer steps every grad_accum batches exactly; the scheduler is ours, stepped once per optimizer step
    plugin = GradientAccumulationPlugin(num_steps=cfg.grad_accum, adjust_scheduler=False, sync_with_dataloader=False)
    return Accelerator(gradient_accumulation_plugin=plugin, device_placement=False)


def train_lora(model: Any, tokenizer: Any, pairs: Sequence[PromptResponse], cfg: LoraTrainConfig, progress: bool = True,
               accelerator: Any = None):
    """Wrap `model` with fresh LoRA adapters and train them on `pairs`. Returns (peft_model, TrainStats).

    The model trains where it is (its device, its dtype; `cfg.dtype` other than auto casts it first). Under several
    processes (`accelerate launch`), each trains on its own batches and the gradients are averaged (DDP or FSDP, as
    the launch says); the losses recorded are the mean over processes."""
    _, peft_model, stats = _train(model, tokenizer, pairs, cfg, progress, accelerator or make_accelerator(cfg))
    return peft_model, stats


def _train(model: Any, tokenizer: Any, pairs: Sequence[PromptResponse], cfg: LoraTrainConfig, progress: bool,
           accelerator: Any) -> tuple[Any, Any, TrainStats]:
    """`train_lora`, returning the model as `accelerator.prepare` wrapped it as well (DDP, FSDP), unwrapped, and the
    statistics."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    if not pairs:
        raise DataError("no training pairs")
    set_seed(cfg.seed)
    lora = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM", bias="none",
    )
    if cfg.dtype != "auto":
        dtype = getattr(torch, cfg.dtype)
        if is_dispatched(model) and model.dtype != dtype:
            raise ConfigError(f"train.dtype {cfg.dtype} differs from the dispatched model's {model.dtype}; load it in "
                              f"the training dtype (--dtype {cfg.dtype}) or set --train.dtype auto")
        if not is_dispatched(model):
            model = model.to(dtype)
    device = model_device(model)  # where batches go (the embedding's device of a dispatched model)
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    encoded = [encode_pair(tokenizer, p, cfg.max_length) for p in pairs]
    stats = TrainStats(truncated_examples=sum(e.truncated for e in encoded))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    n_proc = accelerator.num_processes
    # every process reads max_steps x grad_accum batches of its own: the plan holds them all, and accelerate hands
    # process i every n_proc-th batch (one process: all of them, in order)
    plan = batch_plan(len(encoded), cfg.batch_size, cfg.max_steps * cfg.grad_accum * n_proc, cfg.seed)
    loader = torch.utils.data.DataLoader(encoded, batch_sampler=plan, collate_fn=lambda b: collate(b, pad_id))
    wrapped, opt, loader = accelerator.prepare(peft_model, opt, loader)

    t0 = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, desc="LoRA training", unit="step",
               disable=not progress or not accelerator.is_local_main_process)
    step_loss = 0.0
    for batch in loader:
        ids, labels, mask = (t.to(device) for t in batch)
        with accelerator.accumulate(wrapped):
            out = wrapped(input_ids=ids, attention_mask=mask, labels=labels)
            accelerator.backward(out.loss)  # divided by grad_accum there
            # the same float32 quotient the gradient saw, summed over the step's batches
            step_loss += float(out.loss.detach() / cfg.grad_accum)
            stats.examples_seen += ids.shape[0] * n_proc
            if accelerator.sync_gradients:  # the step's last batch: the gradients are complete (and averaged)
                loss = _mean_over_processes(accelerator, step_loss)
                if not math.isfinite(loss):
                    raise TrainingDivergedError(f"training diverged: loss became {loss} at step {stats.steps}; lower "
                                                f"learning_rate (now {cfg.learning_rate:g})")
                accelerator.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                stats.losses.append(loss)
                stats.steps += 1
                step_loss = 0.0
                bar.set_postfix(loss=f"{loss:.3f}")
                bar.update(1)
    bar.close()
    stats.seconds = time.perf_counter() - t0
    stats.seconds_per_step = stats.seconds / max(1, stats.steps)
    stats.peak_rss_mb = peak_rss_mb()
    peft_model = accelerator.unwrap_model(wrapped)
    peft_model.eval()
    return wrapped, peft_model, stats


def _mean_over_processes(accelerator: Any, value: float) -> float:
    """A step's loss as every process agrees on it, so that all stop together on a diverged one (one process: its
    own, bit for bit)."""
    if accelerator.num_processes == 1:
        return value
    import torch

    return float(accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="mean"))


def portable_ref(ref: str) -> str:
    """Record embedded models by short name, so an adapter's base resolves on any machine."""
    return ref if ref in EMBEDDED_MODELS else str(Path(ref).expanduser().resolve()) if Path(ref).exists() else ref


def _local_ref(ref: str) -> str:
    """The base as a local folder (an embedded model's cached copy): peft and transformers look any name that is not
    a folder up on the hub, so what they read must be a path. The run card keeps the portable name."""
    path = Path(resolve_model_path(ref)).expanduser()
    return str(path.resolve()) if path.exists() else ref


def save_trained(peft_model: Any, tokenizer: Any, out_dir: Path, save: str, base_ref: str) -> None:
    """Write the adapter (PEFT folder) and/or the merged model into `out_dir` (already a temp dir)."""
    if save in ("adapter", "both"):
        adapter_dir = out_dir if save == "adapter" else out_dir / "adapter"
        for cfg in peft_model.peft_config.values():
            cfg.base_model_name_or_path = _local_ref(base_ref)
        # LoRA never changes the base's embeddings; "auto" would read the base's config (from the hub, for a base
        # that is not a local model folder) to see whether the vocabulary grew
        peft_model.save_pretrained(str(adapter_dir), safe_serialization=True, save_embedding_layers=False)
        tokenizer.save_pretrained(str(adapter_dir))
    if save in ("merged", "both"):
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))


def pairs_hash(pairs: Sequence[PromptResponse]) -> str:
    return sha256_text("\n".join(f"{p.prompt}\x1f{p.response}" for p in pairs))


def _save_from_processes(accelerator: Any, wrapped: Any, peft_model: Any, tokenizer: Any, out_dir: Path | None,
                         save: str, base_ref: str) -> None:
    """`save_trained` for a model trained by several processes: every process hands in its part of the weights
    (FSDP gathers its shards; DDP holds them whole), the main process (`out_dir` given) writes the adapter, and for
    a merged output loads it back onto its base on the CPU and merges there (no process holds the model whole)."""
    state = accelerator.get_state_dict(wrapped)  # a collective: every process must call it
    if out_dir is None:
        return
    adapter_dir = out_dir if save == "adapter" else out_dir / "adapter"
    for cfg in peft_model.peft_config.values():
        cfg.base_model_name_or_path = _local_ref(base_ref)
    peft_model.save_pretrained(str(adapter_dir), state_dict=state, safe_serialization=True, save_embedding_layers=False)
    tokenizer.save_pretrained(str(adapter_dir))
    if save in ("merged", "both"):
        import shutil

        dtype = str(peft_model.get_base_model().dtype).removeprefix("torch.")  # the merged model keeps T's dtype
        merged = load_model(adapter_dir, PlacementConfig(device="cpu", dtype=dtype))
        merged.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
        if save == "merged":
            shutil.rmtree(adapter_dir)


def training_placement(cfg: Any, accelerator: Any) -> PlacementConfig:
    """Where a training stage loads its model: the placement in the training dtype (no second copy to cast), on the
    device the launch gives this process when there are several."""
    import dataclasses

    placement = dataclasses.replace(cfg.placement, dtype=cfg.train.dtype)
    hf_map = placement.hf_device_map()
    if isinstance(hf_map, dict) and "disk" in hf_map.values():
        raise ConfigError("training cannot update weights offloaded to disk: leave 'disk' out of --device-map, or "
                          "train on several GPUs with `accelerate launch` (see `safegene.training`)")
    if accelerator.num_processes == 1:
        return placement
    if placement.device_map is not None:
        raise ConfigError("--device-map and `accelerate launch` with several processes do not combine: each process "
                          "holds the whole model (DDP) or a shard (FSDP); leave out --device-map")
    if placement.device != "auto" and placement.torch_device().type != accelerator.device.type:
        raise ConfigError(f"--device {placement.device} but `accelerate launch` runs this process on "
                          f"{accelerator.device}; leave --device at auto under accelerate launch")
    return dataclasses.replace(placement, device=str(accelerator.device))


def _train_and_save(kind: str, cfg: Any, pairs: list[PromptResponse], extra: dict[str, Any], overwrite: bool, progress: bool) -> dict[str, Any]:
    cfg = cfg.resolved()  # the run card records the dtype it trained in, not "auto"
    out = check_output_path(cfg.output, inputs=[cfg.model], overwrite=overwrite)
    accelerator = make_accelerator(cfg.train)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model, padding_side="right")
    model = load_model(cfg.model, training_placement(cfg, accelerator))
    load_s = time.perf_counter() - t0
    wrapped, peft_model, stats = _train(model, tokenizer, pairs, cfg.train, progress, accelerator)
    card = run_card(kind, cfg, inputs={"model": cfg.model}, started=t0, timings={"load_s": round(load_s, 2)},
                    base_model=portable_ref(cfg.model),
                    data={"n_pairs": len(pairs), "sha256": pairs_hash(pairs), **extra}, training=stats.to_dict(),
                    load_seconds=round(load_s, 2))
    if accelerator.num_processes == 1:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            save_trained(peft_model, tokenizer, tmp, cfg.save, cfg.model)
            write_json(tmp / RUN_CARD, card)
    elif accelerator.is_main_process:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            _save_from_processes(accelerator, wrapped, peft_model, tokenizer, tmp, cfg.save, cfg.model)
            write_json(tmp / RUN_CARD, card)
    else:
        _save_from_processes(accelerator, wrapped, peft_model, tokenizer, None, cfg.save, cfg.model)
    accelerator.wait_for_everyone()  # every process returns once the output is there
    card["output"] = str(out)
    return card


def degrade(cfg: DegradeConfig, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Aligned model + harmful (request, compliant answer) pairs -> degraded model D."""
    pairs = prompt_response_pairs(cfg.data, n=cfg.n_examples, seed=cfg.train.seed)
    return _train_and_save("degrade", cfg, pairs, {"source": cfg.data}, overwrite, progress)


def task_pairs(task: str, n: int, seed: int) -> list[PromptResponse]:
    """Training pairs of a task: a named task's train split, or any prompt/response file or built-in set."""
    from .data.tasks import TASKS

    if task in TASKS:
        return [e.as_pair() for e in get_task(task).load("train", n=n, seed=seed)]
    return prompt_response_pairs(task, n=n, seed=seed)


def mix_poison(task: list[PromptResponse], poison: list[PromptResponse], n_total: int, ratio: float, seed: int) -> list[PromptResponse]:
    """`n_total` examples of which round(ratio * n_total) are poison, shuffled together deterministically."""
    n_poison = round(ratio * n_total)
    if n_poison > len(poison):
        raise DataError(f"poison_ratio {ratio} needs {n_poison} harmful pairs, but only {len(poison)} are available")
    n_task = n_total - n_poison
    if n_task > len(task):
        raise DataError(f"need {n_task} task examples, but the task has only {len(task)}")
    rng = random.Random(seed)
    mixed = rng.sample(task, n_task) + rng.sample(poison, n_poison)
    rng.shuffle(mixed)
    return mixed


def safety_source(ref: str) -> str:
    """The refusal data `auto` means: the Safety-Tuned LLaMAs refusals when the shared data is there."""
    from .data import shared_data_dir

    if ref != "auto":
        return ref
    return "shared:safety-refusals" if shared_data_dir() else "uncensorbench-refusals"


def finetune(cfg: FinetuneConfig, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """A model + task data (optionally poisoned with harmful pairs, optionally mixed with refusals) -> task model T.

    With `safety_ratio` > 0 this is "traditional" safety fine-tuning: the refusals ride along with every task
    fine-tune (Bianchi et al. 2024 mix a few percent), so its cost is paid again for each task model."""
    n_poison = round(cfg.poison_ratio * cfg.n_examples)
    n_safety = round(cfg.safety_ratio * cfg.n_examples)
    n_rest = cfg.n_examples - n_safety  # task + poison, mixed at poison_ratio of the whole
    task = task_pairs(cfg.task, n=n_rest - n_poison, seed=cfg.train.seed)
    poison = prompt_response_pairs(cfg.poison_data, n=n_poison, seed=cfg.train.seed + 1) if n_poison else []
    pairs = mix_poison(task, poison, n_rest, n_poison / n_rest if n_rest else 0.0, cfg.train.seed)
    extra = {"task": cfg.task, "n_task": len(pairs) - n_poison, "n_poison": n_poison, "poison_source": cfg.poison_data}
    if n_safety:
        source = safety_source(cfg.safety_data)
        safety = prompt_response_pairs(source, n=n_safety, seed=cfg.train.seed + 2)
        if len(safety) < n_safety:
            raise DataError(f"safety_ratio {cfg.safety_ratio} needs {n_safety} refusal pairs, but {source} has "
                            f"only {len(safety)}")
        pairs = pairs + safety
        random.Random(cfg.train.seed + 2).shuffle(pairs)
        extra |= {"n_safety": n_safety, "safety_source": source}
    return _train_and_save("finetune", cfg, pairs, extra, overwrite, progress)
