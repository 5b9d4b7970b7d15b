"""`safegene demo`: the whole pipeline and benchmark on the embedded default model, with a preset sized for a
2-core CPU (full: 48 minutes measured here; --quick: 9). It is `safegene bench` with a built-in config.

A (aligned) -> degrade -> D;  A -> task fine-tunes (a little poison mixed in) -> T_task;
extract (A - D) -> select layers (on D) -> recalibrate per T_task -> evaluate A, D, T, T + SafeGene and every
baseline with two judges; writes results.json, results.md and report.html under the output folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .baselines import METHODS
from .baselines.projection import ProjectionBaselineConfig
from .bench import BenchConfig
from .config import opt
from .generation import GenerationConfig
from .training import LoraTrainConfig
from .data import shared_data_dir
from .models import DEFAULT_MODEL, PlacementConfig


@dataclass
class DemoConfig:
    """The demo: `bench` with a built-in preset on the embedded default model."""

    output: str = opt("runs/demo", "output folder (a re-run reuses its finished stages)", aliases=("-o",))
    model: str | None = opt(None, "aligned model (default: the embedded default)")
    quick: bool = opt(False, "a smaller preset (one task, 16 prompts; about 10 minutes)")
    placement: PlacementConfig = opt(PlacementConfig(), "where the demo's models run and train, in what dtype "
                                     "(--device, --dtype; --device-map for evaluation and recalibration)",
                                     added_later=True)


def preset(quick: bool, output: str | Path = "runs/demo", model: str | None = None,
           placement: PlacementConfig | None = None) -> BenchConfig:
    # tasks with exact answers; the shared folder adds the field's standard classification task when present
    tasks = ["arithmetic", "sst2" if shared_data_dir() else "gsm8k-100"]
    # the weight-space methods only: the inference-time and retraining competitors are in configs/robustness.yaml
    common = dict(model=model or DEFAULT_MODEL, output=str(output), projection=ProjectionBaselineConfig(),
                  methods=[name for name, m in METHODS.items() if m.demo], placement=placement or PlacementConfig())
    if quick:
        return BenchConfig(**common, tasks=tasks[:1], n_harmful=16, n_over_refusal=8, n_task=16,
                           generation=GenerationConfig(max_new_tokens=32, batch_size=16),
                           train=LoraTrainConfig(learning_rate=4e-4), degrade_examples=40, degrade_steps=10,
                           task_examples=40, task_steps=10, select_prompts=12, shots=16, recal_steps=8,
                           realign_steps=8)
    return BenchConfig(**common, tasks=tasks)


def run_demo(output: str | Path = "runs/demo", quick: bool = False, overwrite: bool = False,
             model: str | None = None, placement: PlacementConfig | None = None) -> dict[str, Any]:
    import shutil

    from .bench import run_bench

    if overwrite:
        shutil.rmtree(output, ignore_errors=True)
    return run_bench(preset(quick, output, model, placement))
