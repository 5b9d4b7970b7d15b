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

# importing a method's module registers it; the order here is the order of the benchmark's rows
from . import safegene_variants  # noqa: F401
from .resta import resta
from .projection import safe_lora, safemerge, subspace_cosines
from .realign import realign
from .self_critique import SelfCritique
from .classifier_guard import ClassifierGuard
from . import mixed_ft  # noqa: F401
from .registry import METHODS, Defence, Method, MethodContext, default_methods, get_method, register
from .task_update import task_update

__all__ = ["METHODS", "ClassifierGuard", "Defence", "default_methods", "Method", "MethodContext", "SelfCritique", "get_method",
           "realign", "register", "resta", "safe_lora", "safemerge", "subspace_cosines", "task_update"]
