"""Text sampled from a model: training or calibration text that follows the model's own distribution."""

from __future__ import annotations

from typing import Any

import torch

from transmla.errors import TransMLAError


def first_id(*ids: int | list[int] | None) -> int | None:
    """The first token id given (the first of a list)."""
    for value in ids:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


@torch.no_grad()
def sample_windows(
    teacher: Any,
    tokenizer: Any,
    count: int,
    seq_len: int,
    batch_size: int,
    seed: int,
    temperature: float = 1.0,
    top_p: float = 0.95,
    progress: bool = False,
) -> torch.LongTensor:
    """`count` windows [count, seq_len] sampled from the teacher, each starting from the BOS (or EOS) token."""
    from tqdm.auto import tqdm

    start = first_id(teacher.config.bos_token_id, tokenizer.bos_token_id, teacher.config.eos_token_id, tokenizer.eos_token_id)
    if start is None:
        raise TransMLAError("--self-distill needs a model with a BOS or EOS token to start sampling from")
    device = next(teacher.parameters()).device
    generator_state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    out: list[torch.Tensor] = []
    try:
        for begin in tqdm(range(0, count, batch_size), desc="sampling text", unit="batch", disable=not progress):
            rows = min(batch_size, count - begin)
            prompt = torch.full((rows, 1), start, dtype=torch.long, device=device)
            generated = teacher.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=temperature,
                top_p=top_p, top_k=0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                pad_token_id=first_id(teacher.config.pad_token_id, start),
            )
            out.append(generated[:, :seq_len].cpu())
    finally:
        torch.random.set_rng_state(generator_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
    return torch.cat(out)
