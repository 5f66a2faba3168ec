"""Text sampled from a model: training or calibration text that follows the model's own distribution."""

from __future__ import annotations

import inspect
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


NUCLEUS_CANDIDATES = 1024  # the top-p nucleus is taken among this many most likely tokens (no full sort)
TOP_P = 0.95  # nucleus of sampled text: the model's distribution without its long tail


def nucleus_sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row [B, 1] from logits [B, V]: temperature, then the smallest set of the most likely tokens
    whose probability reaches top_p (among the NUCLEUS_CANDIDATES most likely)."""
    probs = (logits.float() / temperature).softmax(-1)
    top, index = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    top = top * ((top.cumsum(-1) - top) < top_p)  # keep a token while the mass before it is below top_p
    choice = torch.multinomial(top, 1, generator=generator)
    return index.gather(-1, choice)


@torch.no_grad()
def sample_windows(
    model: Any,
    count: int,
    seq_len: int,
    batch_size: int,
    seed: int,
    temperature: float = 1.0,
    top_p: float = TOP_P,
    start: int | None = None,
    progress: bool = False,
    desc: str = "sampling text",
) -> torch.LongTensor:
    """`count` windows [count, seq_len] sampled from `model` on its device, each from the start token (the
    model's BOS, else EOS): text that follows the model's own distribution. Seeded with a generator of its own."""
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    config = model.config
    start = first_id(start, config.bos_token_id, config.eos_token_id)
    if start is None:
        raise TransMLAError("sampling text needs a model with a BOS or EOS token to start from")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # renamed in 5.x
    out: list[torch.Tensor] = []
    with tqdm(total=count * seq_len, desc=desc, unit="tok", unit_scale=True, disable=not progress) as bar:
        for begin in range(0, count, batch_size):
            rows = min(batch_size, count - begin)
            tokens = [torch.full((rows, 1), start, dtype=torch.long, device=device)]
            cache = DynamicCache()
            for _ in range(seq_len - 1):  # a plain decode loop: every row has the same length, nothing to pad
                logits = model(input_ids=tokens[-1], use_cache=True, logits_to_keep=1, **{cache_name: cache}).logits
                tokens.append(nucleus_sample(logits[:, -1], temperature, top_p, generator))
                bar.update(rows)
            out.append(torch.cat(tokens, dim=1).cpu())
            bar.update(rows)
    return torch.cat(out)
