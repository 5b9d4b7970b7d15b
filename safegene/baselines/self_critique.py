"""Self-critique (Constitutional AI's critique-and-revise loop, applied at inference time).

For each request the model (1) drafts an answer, (2) is asked, in the same conversation, whether the draft breaks a
few written principles, and (3) where it says yes (or always, with `revise: always`) answers the request again with
the principles as its system prompt; that answer replaces the draft. Nothing is trained, but every request costs
two or three generations, which `SelfCritique` reports per response (tokens, seconds) so the benchmark can price
it next to weight-space defences.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from ..config import GenerationConfig, SelfCritiqueConfig
from ..generation import Generated, generate_detailed


def _messages(prompt: Any) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def critique_flags(critique: str) -> bool:
    """The critique says the draft breaks a principle: its first word is yes."""
    m = re.match(r"\W*(\w+)", critique)
    return bool(m) and m.group(1).lower() == "yes"


class SelfCritique:
    """A responder (see `safegene.generation.Responder`): draft -> critique -> revision where flagged, batched."""

    name = "self-critique"

    def __init__(self, cfg: SelfCritiqueConfig | None = None):
        self.cfg = cfg or SelfCritiqueConfig()
        principles = "\n".join(f"{i}. {p}" for i, p in enumerate(self.cfg.principles, 1))
        self.critique_request = self.cfg.critique_request.format(principles=principles)
        self.revision_system = self.cfg.revision_system.format(principles=principles)

    def __call__(self, model: Any, tokenizer: Any, prompts: Sequence[Any], cfg: GenerationConfig | None = None,
                 progress: bool = True, desc: str = "self-critique") -> list[Generated]:
        gen = cfg or GenerationConfig()
        drafts = generate_detailed(model, tokenizer, prompts, gen, progress=progress, desc=f"{desc} (draft)")
        asked = [_messages(p) + [{"role": "assistant", "content": d.text}, {"role": "user", "content": self.critique_request}]
                 for p, d in zip(prompts, drafts)]
        critiques = generate_detailed(model, tokenizer, asked, dataclasses.replace(gen, max_new_tokens=self.cfg.critique_tokens),
                                      progress=progress, desc=f"{desc} (critique)")
        flagged = [self.cfg.revise == "always" or critique_flags(c.text) for c in critiques]
        todo = [i for i, f in enumerate(flagged) if f]
        # the revision answers the request afresh under the principles (a conversation's own system prompt, such as
        # a persona, is replaced: the principles are what the revision is for)
        again = [[{"role": "system", "content": self.revision_system}]
                 + [m for m in _messages(prompts[i]) if m["role"] != "system"] for i in todo]
        revised = dict(zip(todo, generate_detailed(model, tokenizer, again, gen, progress=progress,
                                                   desc=f"{desc} (revision)") if todo else []))
        out = []
        for i, (d, c) in enumerate(zip(drafts, critiques)):
            r = revised.get(i)
            # an empty revision says nothing about the draft's safety: keep the draft rather than answer nothing
            text = r.text if r is not None and r.text else d.text
            out.append(Generated(text, d.tokens + c.tokens + (r.tokens if r else 0),
                                 d.seconds + c.seconds + (r.seconds if r else 0.0),
                                 {"draft": d.text, "critique": c.text, "revised": r is not None}))
        return out
