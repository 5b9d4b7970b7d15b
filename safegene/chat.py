"""Chat formatting shared by training and generation, so both see exactly the same prompt text."""

from __future__ import annotations

from typing import Any, Sequence

FALLBACK_TEMPLATE_USER = "User: {prompt}\nAssistant:"


def prompt_text(tokenizer: Any, prompt: str | Sequence[dict[str, str]], system: str | None = None) -> str:
    """The text a chat model sees before it answers (generation prompt included). `prompt` is one user message,
    or a whole conversation as chat messages ending with the user turn to answer."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if turns and turns[0]["role"] == "system":  # the conversation's own system prompt wins over the default
        system, turns = turns[0]["content"], turns[1:]
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # tokenizers without a chat template (tiny test models, base models): a plain, stable format
    head = f"{system}\n" if system else ""
    earlier = "".join(f"{'User' if t['role'] == 'user' else 'Assistant'}: {t['content']}\n" for t in turns[:-1])
    return head + earlier + FALLBACK_TEMPLATE_USER.format(prompt=turns[-1]["content"]) + " "


def last_user_turn(prompt: str | Sequence[dict[str, str]]) -> str:
    """The user message a model answers: the prompt itself, or a conversation's last user turn."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(list(prompt)) if m["role"] == "user")


def end_of_turn(tokenizer: Any) -> str:
    """The text that ends an assistant turn (Qwen: <|im_end|>), so a trained model learns to stop."""
    return tokenizer.eos_token or ""
