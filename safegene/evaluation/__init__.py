"""Evaluation: generation, judges, metrics, judge validation."""

from ..generation import generate, generate_to_jsonl
from .judges import (REFUSAL_PHRASES, ContentClassifierJudge, EndpointJudge, LLMJudge, RefusalPhraseJudge, Verdict,
                     get_judge)
from .metrics import Rate, cohen_kappa, roc_auc
from .refusal import evaluate_refusal, refusal_rate
from .utility import task_utility

__all__ = ["REFUSAL_PHRASES", "ContentClassifierJudge", "EndpointJudge", "LLMJudge", "Rate", "RefusalPhraseJudge",
           "Verdict", "cohen_kappa", "evaluate_refusal", "generate", "generate_to_jsonl", "get_judge", "refusal_rate",
           "roc_auc", "task_utility"]
