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
    model: Any,
    count: int,
    seq_len: int,
    batch_size: int,
    seed: int,
    temperature: float = 1.0,
    top_p: float = 0.95,
    start: int | None = None,
    progress: bool = False,
    desc: str = "sampling text",
) -> torch.LongTensor:
    """`count` windows [count, seq_len] sampled from `model` on its device, each from the start token (the
    model's BOS, else EOS): text that follows the model's own distribution. Seeded; the global RNG is restored."""
    from tqdm.auto import tqdm

    config = model.config
    start = first_id(start, config.bos_token_id, config.eos_token_id)
    if start is None:
        raise TransMLAError("sampling text needs a model with a BOS or EOS token to start from")
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    out: list[torch.Tensor] = []
    try:
        with tqdm(total=count * seq_len, desc=desc, unit="tok", unit_scale=True, disable=not progress) as bar:
            for begin in range(0, count, batch_size):
                rows = min(batch_size, count - begin)
                prompt = torch.full((rows, 1), start, dtype=torch.long, device=device)
                generated = model.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=temperature,
                    top_p=top_p, top_k=0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                    pad_token_id=first_id(config.pad_token_id, start),
                )
                out.append(generated[:, :seq_len].cpu())
                bar.update(rows * seq_len)
    finally:
        torch.random.set_rng_state(generator_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
    return torch.cat(out)
