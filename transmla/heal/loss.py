"""The healing objective: KL divergence to the teacher's next-token distribution, plus optional cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """kl_weight * T^2 * KL(teacher_T || student_T) per token + ce_weight * next-token cross-entropy.

    Logits are [B, L, V] (the teacher's may be wider, e.g. padded vocabularies: the extra columns are dropped);
    both are taken to float32. Returns the loss and its parts (`kl`, `ce`) as detached scalars.
    """
    vocab = student_logits.shape[-1]
    student = student_logits.float().flatten(0, -2)
    teacher = teacher_logits[..., :vocab].float().flatten(0, -2)
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2
    loss = kl_weight * kl
    parts = {"kl": kl.detach()}
    if ce_weight:
        logits = student_logits[:, :-1].float().flatten(0, -2)
        ce = F.cross_entropy(logits, input_ids[:, 1:].flatten())
        loss = loss + ce_weight * ce
        parts["ce"] = ce.detach()
    return loss, parts


KL_CHUNK_TOKENS = 2048  # tokens whose logits exist at once in `hidden_distillation_loss`


def hidden_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Module,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.nn.Module,
    temperature: float = 1.0,
    chunk_tokens: int = KL_CHUNK_TOKENS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`distillation_loss` (KL only) from both models' final hidden states [B, L, h]: the logits of `chunk_tokens`
    tokens at a time, recomputed in the backward pass, so that neither model's [B, L, V] float32 logits exist."""
    from torch.utils.checkpoint import checkpoint

    student_flat, teacher_flat = student_hidden.flatten(0, -2), teacher_hidden.flatten(0, -2)
    tokens = student_flat.shape[0]

    def chunk_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        student_logits = student_head(s).float()
        with torch.no_grad():
            teacher_logits = teacher_head(t)[..., : student_logits.shape[-1]].float()
        log_student = F.log_softmax(student_logits / temperature, dim=-1)
        log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
        return F.kl_div(log_student, log_teacher, log_target=True, reduction="sum")

    total = student_flat.new_zeros((), dtype=torch.float32)
    for start in range(0, tokens, chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(chunk_kl, student_flat[part], teacher_flat[part], use_reentrant=False)
    kl = total / tokens * temperature**2
    return kl, {"kl": kl.detach()}
