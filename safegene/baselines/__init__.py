"""Peer methods, each producing an update to add to a task model T, in the same form as SafeGene's adapter.

Every baseline returns a `SafetyAdapter` (low-rank factors per module plus coefficients) that is *added to T*,
so the benchmark applies and evaluates all of them the same way (`adapter.attach(T)`), and each can be saved,
merged or served like SafeGene's own:

- `resta`: T + γ·(A − D) on every layer, one global γ fitted on the same few shots SafeGene's recalibration gets.
- `safe_lora`: in modules whose task update lies far from the safety subspace, keep only its projection onto it.
- `safemerge`: in those modules, merge the task update with the safety update, (1 − w)·ΔW_task + w·ΔW_safety.
- `realign`: safety SFT of T (LoRA on refusal shots + task shots): the costly fix SafeGene is meant to replace.
- `mixed_finetune` (in `safegene.training`): fine-tune A on the task data mixed with refusals, instead of T.

Two defences change how T answers instead of its weights; each is a *responder* that wraps generation and reports
what every answer cost:

- `SelfCritique`: draft, critique against written principles, revise (Constitutional-AI style).
- `ClassifierGuard`: a separate classifier screens prompts and responses, flagged ones get a refusal.
"""

from .classifier_guard import ClassifierGuard
from .projection import safe_lora, safemerge, subspace_cosines
from .realign import realign
from .resta import resta
from .self_critique import SelfCritique
from .task_update import task_update

__all__ = ["ClassifierGuard", "SelfCritique", "realign", "resta", "safe_lora", "safemerge", "subspace_cosines", "task_update"]
