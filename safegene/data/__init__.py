"""Data: typed records, file loaders, built-in sets and tasks."""

from .builtin import DATASETS, DatasetInfo, dataset_info, load_builtin, shared_data_dir
from .loaders import load_harmful_prompts, load_prompt_responses, read_rows
from .records import HarmfulPrompt, PromptResponse, TaskExample
from .tasks import TASKS, TaskSpec, get_task
from .resolve import benign_prompts, harmful_prompt_texts, harmful_prompts, prompt_response_pairs, split_holdout
from .user_task import MIN_TASK_ROWS, load_task_data, split_task_data, write_shots_jsonl
from .taxonomy import CATEGORIES, SOURCE_TO_CATEGORY, safety_eval, taxonomy_markdown, unified_category

__all__ = [
    "CATEGORIES", "DATASETS", "MIN_TASK_ROWS", "SOURCE_TO_CATEGORY", "DatasetInfo", "HarmfulPrompt", "PromptResponse",
    "TASKS", "TaskExample", "TaskSpec",
    "benign_prompts", "dataset_info", "get_task", "harmful_prompt_texts", "harmful_prompts", "load_builtin",
    "load_harmful_prompts", "load_prompt_responses", "load_task_data", "prompt_response_pairs", "read_rows",
    "safety_eval", "shared_data_dir", "split_holdout", "split_task_data", "taxonomy_markdown", "unified_category",
    "write_shots_jsonl",
]
