"""Chat formatting shared by training and generation, so both see exactly the same prompt text."""

from __future__ import annotations

from typing import Any

FALLBACK_TEMPLATE_USER = "User: {prompt}\nAssistant:"


def prompt_text(tokenizer: Any, prompt: str, system: str | None = None) -> str:
    """The text a chat model sees before it answers `prompt` (generation prompt included)."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # tokenizers without a chat template (tiny test models, base models): a plain, stable format
    head = f"{system}\n" if system else ""
    return head + FALLBACK_TEMPLATE_USER.format(prompt=prompt) + " "


def end_of_turn(tokenizer: Any) -> str:
    """The text that ends an assistant turn (Qwen: <|im_end|>), so a trained model learns to stop."""
    return tokenizer.eos_token or ""
