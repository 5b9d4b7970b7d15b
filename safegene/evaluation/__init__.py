"""Evaluation: generation, judges, metrics."""

from ..generation import generate, generate_to_jsonl
from .judges import REFUSAL_PHRASES, RefusalPhraseJudge, Verdict
from .metrics import Rate
from .refusal import evaluate_refusal, refusal_rate
from .utility import task_utility

__all__ = ["REFUSAL_PHRASES", "Rate", "RefusalPhraseJudge", "Verdict", "evaluate_refusal", "generate",
           "generate_to_jsonl", "refusal_rate", "task_utility"]
