"""Training text for healing: a mixture of text sampled from the teacher (the default: no data needed, and no
narrowing to one corpus), text files and hub datasets, packed into fixed-length windows with a held-out
validation share from every source."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from transmla.data.text import pack, source_windows
from transmla.errors import TransMLAError


@dataclass
class Windows:
    """Packed token windows [N, seq_len] for training and a held-out tail for validation."""

    train: torch.LongTensor
    validation: torch.LongTensor
    source: str

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


def parse_tokens(value: str | int) -> int:
    """A token count such as `500000`, `500k`, `2M` or `1.5B`."""
    if isinstance(value, int):
        count = value
    else:
        text = value.strip().lower().replace("_", "").replace(",", "")
        scale = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(text[-1:], 1)
        try:
            count = int(float(text[:-1] if scale > 1 else text) * scale)
        except ValueError:
            raise TransMLAError(f"token count {value!r} is not a number; write e.g. 500000, 500k or 2M") from None
    if count < 1:
        raise TransMLAError(f"token count must be positive, got {value!r}")
    return count


def val_window_count(train_tokens: int, seq_len: int, val_fraction: float, max_val_windows: int) -> int:
    """How many validation windows to hold out beside enough windows for `train_tokens`."""
    train = math.ceil(train_tokens / seq_len)
    return min(max_val_windows, max(1, math.ceil(train * val_fraction)))


class WindowStream:
    """Deterministic micro-batches: epoch e visits the windows in a permutation seeded by (seed, e).

    Global micro-batch b (counted over all processes) holds samples b*micro .. (b+1)*micro-1 of that endless
    shuffled sequence; process `rank` of `world` takes micro-batches rank, rank+world, ... Any step can be resumed
    from its index alone.
    """

    def __init__(self, windows: torch.LongTensor, micro_batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.windows = windows
        self.micro_batch = micro_batch
        self.seed = seed
        self.rank = rank
        self.world = world
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}  # a batch may straddle two epochs
            self._perms[epoch] = torch.randperm(len(self.windows), generator=generator)
        return self._perms[epoch]

    def batch(self, micro_step: int) -> torch.LongTensor:
        """This process's micro-batch number `micro_step` (0-based)."""
        first = (micro_step * self.world + self.rank) * self.micro_batch
        n = len(self.windows)
        rows = [self._perm(g // n)[g % n] for g in range(first, first + self.micro_batch)]
        return self.windows[torch.stack(rows)]

    def epochs(self, micro_steps: int) -> float:
        """Passes over the training windows that `micro_steps` micro-batches per process make."""
        return micro_steps * self.world * self.micro_batch / len(self.windows)


def build_windows(options: Any, tokenizer: Any, teacher: Any, teacher_id: dict[str, Any], accelerator: Any,
                  progress: bool) -> Windows:
    """Training and validation windows of the options' mixture: each source gives its weight's share of the
    windows (teacher samples repeated to fill their share when `sampled_tokens` is smaller) and of the held-out
    validation windows (always unique)."""
    from transmla.data.mixture import describe, shares

    mixture = options.sources()
    n_val = val_window_count(options.tokens, options.seq_len, options.val_fraction, options.max_val_windows)
    counts = shares(mixture, math.ceil(options.tokens / options.seq_len) + n_val)
    train, validation = [], []
    for source, count, held_out in zip(mixture, counts, shares(mixture, n_val)):
        sampled = math.ceil(options.sampled_tokens / options.seq_len) + held_out  # unique teacher windows at most
        unique = source_windows(source, count, options.seq_len, tokenizer, "train", lambda n: teacher_windows(
            options, teacher, teacher_id, accelerator, min(n, sampled), progress))
        if len(unique) <= held_out:
            raise TransMLAError(f"the training text ({source.label}) gives {len(unique)} windows of {options.seq_len} tokens, "
                                f"too few to hold {held_out} out for validation; give more text or a shorter --seq-len")
        keep = len(unique) - held_out
        train.append(unique[torch.arange(count - held_out) % keep])  # repeated to fill the source's share
        validation.append(unique[keep:])
    return Windows(torch.cat(train), torch.cat(validation), describe(mixture))


def teacher_windows(options: Any, teacher: Any, teacher_id: dict[str, Any], accelerator: Any, windows: int,
                    progress: bool) -> torch.LongTensor:
    """`windows` training windows packed from teacher samples of `sample_len` tokens (each from the start token),
    sampled across processes and cached in the user cache."""
    from transmla.data.sampling import Draw, cached_samples

    docs = math.ceil(windows * options.seq_len / options.sample_len)
    share = math.ceil(docs / accelerator.num_processes)
    draw = Draw(options.sample_len, options.seed + 1000 * accelerator.process_index, options.sample_temperature)
    dtype = next(teacher.parameters()).dtype
    mine, _ = cached_samples("heal", teacher_id, teacher.config, lambda: teacher, accelerator.device, dtype, share, draw,
                             progress and accelerator.is_local_main_process, "sampling text from the teacher")
    return pack(accelerator.gather(mine.to(accelerator.device)).cpu()[:docs].reshape(-1), options.seq_len)
