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
