"""Teacher-forced sequence batches and the losses the adapter stages train with.

A batch holds chat-formatted prompt + response token ids, right-padded, with a mask over the positions whose
next token is a response token. Distillation and recalibration score only those positions.

Batches are built on the CPU; inputs go to the model's input device and targets to wherever the logits come out
(the last device of a dispatched model). Log-softmax, cross-entropy and KL are computed in float32 whatever the
weights' dtype (`float32_math`): in bfloat16 a log-probability carries about three significant digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .data.records import PromptResponse
from .models.placement import float32_math, model_device
from .training import encode_pair


@dataclass
class SeqBatch:
    input_ids: Any  # (n, T) long
    attention_mask: Any  # (n, T) long
    target_mask: Any  # (n, T) bool: logits at t predict a response token at t+1
    targets: Any  # (n, T) long: the token at t+1 (0 where not a target)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def subset(self, idx) -> "SeqBatch":
        return SeqBatch(self.input_ids[idx], self.attention_mask[idx], self.target_mask[idx], self.targets[idx])

    def target_rows(self, idx: Sequence[int]):
        """Rows of sequences `idx` in tensors flattened over all target positions (e.g. a teacher's top-k)."""
        import torch

        offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.target_mask.sum(1).cumsum(0)])
        return torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in idx])


def encode_batch(tokenizer: Any, pairs: Sequence[PromptResponse], max_length: int | Sequence[int]) -> SeqBatch:
    """`pairs` tokenized and right-padded; `max_length` is one token limit for all, or one per pair (a long
    jailbreak-wrapped prompt may get more room than a plain one)."""
    import torch

    limits = [max_length] * len(pairs) if isinstance(max_length, int) else list(max_length)
    if len(limits) != len(pairs):
        raise ValueError(f"{len(limits)} token limits for {len(pairs)} pairs")
    enc = [encode_pair(tokenizer, p, n) for p, n in zip(pairs, limits)]
    width = max(len(e.input_ids) for e in enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    att = torch.zeros((len(enc), width), dtype=torch.long)
    tmask = torch.zeros((len(enc), width), dtype=torch.bool)
    tgt = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        att[i, :n] = 1
        lab = torch.tensor(e.labels)
        # position t predicts label t+1
        nxt = lab[1:]
        tmask[i, : n - 1] = nxt != -100
        tgt[i, : n - 1] = torch.where(nxt != -100, nxt, torch.zeros_like(nxt))
    return SeqBatch(ids, att, tmask, tgt)


def opening_only(batch: SeqBatch, n: int) -> SeqBatch:
    """`batch` with only each row's first `n` target positions scored (an answer's opening), and each row ending at
    its last scored position: under causal attention what follows changes nothing scored, so it is padding."""
    import torch

    mask = batch.target_mask & (batch.target_mask.cumsum(1) <= n)
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(1, keepdim=True).values
    keep = (positions <= last) | (last < 0)  # a row with nothing scored keeps its tokens
    return SeqBatch(batch.input_ids, batch.attention_mask * keep, mask, batch.targets)


def target_logits(model: Any, batch: SeqBatch):
    """Logits at target positions, flattened to (n_targets, vocab)."""
    device = model_device(model)
    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    return out.logits[batch.target_mask.to(out.logits.device)]


def teacher_topk(model: Any, batch: SeqBatch, k: int, chunk: int = 8):
    """The teacher's top-k log-probabilities and token ids at every target position (no grad)."""
    import torch

    vals, idxs = [], []
    with torch.inference_mode():
        for s in range(0, len(batch), chunk):
            lp = torch.log_softmax(float32_math(target_logits(model, batch.subset(slice(s, s + chunk)))), -1)
            v, i = lp.topk(min(k, lp.shape[-1]), -1)
            vals.append(v)
            idxs.append(i)
    return torch.cat(vals), torch.cat(idxs)


def topk_cross_entropy(student_logits, teacher_vals, teacher_idx):
    """Cross-entropy of the student against the teacher's renormalised top-k distribution (KL up to a constant)."""
    import torch

    student_logits = float32_math(student_logits)
    p = torch.softmax(float32_math(teacher_vals), -1).to(student_logits.device)
    logq = torch.log_softmax(student_logits, -1).gather(-1, teacher_idx.to(student_logits.device))
    return -(p * logq).sum(-1).mean()


def topk_kl(student_logits, teacher_vals, teacher_idx):
    """KL(teacher_topk || student) restricted to the teacher's top-k support (0 when they agree there)."""
    import torch

    student_logits = float32_math(student_logits)
    logp = torch.log_softmax(float32_math(teacher_vals), -1).to(student_logits.device)
    logq = torch.log_softmax(student_logits, -1).gather(-1, teacher_idx.to(student_logits.device))
    logq = logq - torch.logsumexp(logq, -1, keepdim=True)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def token_nll(logits, targets):
    import torch

    return torch.nn.functional.cross_entropy(float32_math(logits), targets.to(logits.device))


def target_logprob_sums(logits: Any, batch: SeqBatch):
    """Per-sequence sum of target-token log-probabilities, from logits at `batch`'s target positions, (n,), in
    float32 on the CPU."""
    import torch

    targets = batch.targets[batch.target_mask].to(logits.device)
    lp = torch.log_softmax(float32_math(logits), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
    owner = torch.arange(len(batch)).unsqueeze(1).expand_as(batch.target_mask)[batch.target_mask]
    return torch.zeros(len(batch), dtype=lp.dtype).index_add_(0, owner, lp)


def sequence_mean_nll(logits: Any, batch: SeqBatch):
    """Per-sequence mean NLL of the response tokens, from logits at `batch`'s target positions, (n,), float32 on
    the CPU (differentiable)."""
    return -target_logprob_sums(logits, batch) / batch.target_mask.sum(1).clamp(min=1)


def preference_loss(refusal_logits: Any, refusals: SeqBatch, compliant_logits: Any, compliant: SeqBatch):
    """mean_i softplus(NLL(refusal_i) − NLL(compliant_i)), each NLL a per-token mean over that answer.

    A DPO-style margin without a reference model: −log σ(log p(refusal) − log p(compliant)) with both log-likelihoods
    length-normalised, as in SimPO (Meng et al. 2024, reference-free). Unnormalised sums would compare a one-sentence
    refusal with a long compliant answer, whose summed NLL is larger by its length alone, so the margin would start
    satisfied and the term would push nothing. Row i of `compliant` must answer row i of `refusals`' prompt."""
    import torch

    margin = sequence_mean_nll(refusal_logits, refusals) - sequence_mean_nll(compliant_logits, compliant)
    return torch.nn.functional.softplus(margin).mean()


def sequence_logprob(model: Any, batch: SeqBatch, chunk: int = 8):
    """Sum of log-probabilities of each sequence's response tokens with a full forward pass, (n,) (no grad)."""
    import torch

    with torch.inference_mode():
        return torch.cat([target_logprob_sums(target_logits(model, batch.subset(slice(s, s + chunk))),
                                              batch.subset(slice(s, s + chunk)))
                          for s in range(0, len(batch), chunk)])
