"""Text sampled from a model: training or calibration text that follows the model's own distribution.

Every row of a batch decodes one token per step through a fixed-shape state (`decode_state`): a static cache
written in place, a mask built on the device, and Gumbel-max sampling from noise drawn before the step, so that a
step waits for nothing on the host and, on a GPU, replays as a CUDA graph (one per attention span). A row whose
document ends (EOS) starts a new one in place: its next slot holds the start token at position 0 and its mask
forgets the earlier slots. Draws come from a generator of the sampler's own, so the same model, seed, device,
dtype and batch give the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from transmla.families import FAMILIES

from .decode_state import ATTENTION_NAME, SlotCache, register_attention, span_for

SAMPLER_VERSION = 3  # raise when a change alters the tokens drawn for the same inputs (it keys the sample cache)
NUCLEUS_CANDIDATES = 1024  # the top-p nucleus is taken among this many most likely tokens (no full sort)
TOP_P = 0.95  # nucleus of sampled text: the model's distribution without its long tail
SAMPLE_DTYPE = torch.bfloat16  # sampling needs the model's distribution, not float32 logits
MAX_GPU_ROWS = 2048  # rows decoded at once on a GPU, memory permitting
CPU_ROWS = 16  # ... and on a CPU, where a step costs its arithmetic
# A decode step is many small products: on a CPU shared with any other work, threads that wait for each other
# at every product stall (SmolLM2, 16 rows, 2 cores with one other busy process: 11 tokens/s on 2 threads, 190 on
# 1), so sampling takes every core only when the others are idle (275 tokens/s on 2 idle cores), else one. The
# tokens drawn are the same either way (tests/test_sampling.py).
IDLE_CORES = 0.5  # the rest of the machine counts as idle below this many busy cores


def cpu_sampling_threads() -> int:
    """Threads for sampling on the CPU: all of torch's when the machine is otherwise idle, else one."""
    import psutil

    busy = psutil.cpu_percent(interval=0.2) / 100 * (psutil.cpu_count() or 1)
    return torch.get_num_threads() if busy < IDLE_CORES else 1


def first_id(*ids: int | list[int] | None) -> int | None:
    """The first token id given (the first of a list)."""
    for value in ids:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def eos_ids(config: Any) -> list[int]:
    """Every end-of-text id of the model's config."""
    eos = getattr(config, "eos_token_id", None)
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]


def nucleus_gumbel(logits: torch.Tensor, temperature: float, top_p: float, noise: torch.Tensor) -> torch.Tensor:
    """One token per row [B] from logits [B, V] and uniform noise [B, K]: temperature, then the smallest set of
    the most likely tokens whose probability reaches top_p (among the K most likely), sampled by Gumbel-max
    (argmax of log p + Gumbel noise), which needs no host synchronisation."""
    probs = (logits.float() / temperature).softmax(-1)
    top, index = probs.topk(noise.shape[-1], dim=-1)
    keep = (top.cumsum(-1) - top) < top_p  # a token stays while the mass before it is below top_p
    gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1 - 1e-7)))
    choice = torch.where(keep, top.log() + gumbel, float("-inf")).argmax(-1, keepdim=True)
    return index.gather(-1, choice)[:, 0]


def device_name(device: torch.device) -> str:
    """What made the samples: `cpu`, or the GPU's name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def rows_for(config: Any, count: int, seq_len: int, device: torch.device) -> int:
    """Rows decoded at once: CPU_ROWS on a CPU; on a GPU as many as a quarter of its memory holds (cache and
    logits), at most MAX_GPU_ROWS. It depends on the card, not on what is free now, so that the same command on
    the same machine draws the same tokens."""
    if device.type != "cuda":
        return min(count, CPU_ROWS)
    config = config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_row = 2 * config.num_hidden_layers * heads * head_dim * seq_len * SAMPLE_DTYPE.itemsize
    per_row += 4 * 4 * config.vocab_size  # float32 logits, probabilities and their top-k temporaries
    budget = torch.cuda.get_device_properties(device).total_memory // 4
    return max(1, min(count, MAX_GPU_ROWS, budget // per_row))


def sampler_record(device: torch.device, dtype: torch.dtype, rows: int) -> dict[str, Any]:
    """Everything besides the model and the draw's settings that changes the tokens drawn: it keys the sample
    cache and goes into the converted model's record."""
    import transformers

    return {"sampler": SAMPLER_VERSION, "device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
            "rows": rows, "torch": torch.__version__, "transformers": transformers.__version__}


@dataclass
class Draw:
    """The settings of one sampling run."""

    seq_len: int
    seed: int
    temperature: float = 1.0
    top_p: float = TOP_P
    start: int | None = None  # start token; None: the model's BOS, else EOS, else a random token per row


class Sampler:
    """Decodes `rows` sequences of `seq_len` tokens at once from `model` (a transformers causal LM)."""

    def __init__(self, model: Any, rows: int, draw: Draw) -> None:
        self.model, self.rows, self.draw = model, rows, draw
        self.device = next(model.parameters()).device
        config = model.config.get_text_config()
        self.vocab = int(config.vocab_size)
        self.start = first_id(draw.start, getattr(config, "bos_token_id", None), getattr(config, "eos_token_id", None))
        self.eos = torch.tensor(eos_ids(config), dtype=torch.long, device=self.device)
        self.start_ends = self.start is not None and self.start in eos_ids(config)  # e.g. a model with EOS only
        self.generator = torch.Generator(device=self.device).manual_seed(draw.seed)
        self.candidates = min(NUCLEUS_CANDIDATES, self.vocab)
        self.cache = SlotCache(config.num_hidden_layers, draw.seq_len, self.device)
        self.tokens = torch.zeros(rows, draw.seq_len, dtype=torch.long, device=self.device)
        self.doc_start = torch.zeros(rows, 1, dtype=torch.long, device=self.device)  # slot where each row's document began
        self.noise = torch.empty(rows, self.candidates, device=self.device)
        self.slots = torch.arange(draw.seq_len, device=self.device)
        self.cache_arg = "cache" if "cache" in _forward_parameters(model) else "past_key_values"  # renamed in 5.x
        family = FAMILIES.get(config.model_type)  # per layer: the sliding window, or None (unknown families: none)
        self.windows = family.sliding_windows(config) if family else [None] * config.num_hidden_layers
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.use_graphs = self.device.type == "cuda"

    def reset(self) -> None:
        """A new batch: every row starts a document at slot 0."""
        self.cache.position.zero_()
        self.cache.steps = 0
        self.doc_start.zero_()
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys.zero_()
                layer.values.zero_()
        if self.start is not None:
            self.tokens[:, 0] = self.start
        else:  # no BOS or EOS to start from: a token drawn from the vocabulary
            self.tokens[:, 0] = torch.randint(self.vocab, (self.rows,), generator=self.generator, device=self.device)

    def step(self) -> None:
        """Decode the token after slot `position` for every row, in place (the body of a captured graph)."""
        position = self.cache.position
        span = self.cache.span
        current = self.tokens.index_select(1, position)  # [B, 1]
        visible = (self.slots[:span] >= self.doc_start) & (self.slots[:span] <= position)  # [B, span]
        logits = self.model(input_ids=current, position_ids=position - self.doc_start,
                            attention_mask=self.masks(visible[:, None, None, :], position), use_cache=True, logits_to_keep=1,
                            **{self.cache_arg: self.cache}).logits[:, -1]
        chosen = nucleus_gumbel(logits, self.draw.temperature, self.draw.top_p, self.noise)
        if self.eos.numel():
            if self.start_ends:
                begins = torch.isin(chosen, self.eos)  # the start token itself ends a document and opens the next
            else:
                begins = torch.isin(current[:, 0], self.eos)  # after an EOS comes the start token
                if self.start is not None:
                    chosen = torch.where(begins, self.start, chosen)
            self.doc_start.copy_(torch.where(begins[:, None], position + 1, self.doc_start))
        self.tokens.index_copy_(1, position + 1, chosen[:, None])
        position.add_(1)

    def masks(self, visible: torch.Tensor, position: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The mask of every layer: `visible`, cut to the last W slots in sliding-window layers (one mask where
        all layers are alike, else one per layer type, as transformers takes them)."""
        window = next((w for w in self.windows if w is not None), None)
        if window is None:
            return visible
        windowed = visible & (self.slots[:visible.shape[-1]] > position - window)
        if None not in self.windows:
            return windowed
        return {"full_attention": visible, "sliding_attention": windowed}

    def run_step(self, slot: int) -> None:
        """Decode the token after `slot`: noise first, then the step (a graph replay where one is captured)."""
        self.cache.span = span_for(slot + 1, self.draw.seq_len)
        self.noise.uniform_(generator=self.generator)
        graph = self.graphs.get(self.cache.span)
        if graph is not None:
            graph.replay()
        else:
            self.step()
            if self.use_graphs:
                self.graphs[self.cache.span] = self.capture()
        self.cache.steps = slot + 1

    def capture(self) -> torch.cuda.CUDAGraph | None:
        """The step as a CUDA graph for the current span (captured, not run); None where capture fails, and then
        every later step runs eagerly."""
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.graphs.values())).pool() if self.graphs else None
        try:
            with torch.cuda.graph(graph, pool=pool):
                self.step()
        except Exception:  # a model whose forward can not be captured: decode eagerly
            self.use_graphs = False
            torch.cuda.synchronize(self.device)
            return None
        return graph

    def sample(self, on_step: Callable[[], None] | None = None) -> torch.LongTensor:
        """One batch [rows, seq_len] (on the CPU)."""
        self.reset()
        for slot in range(self.draw.seq_len - 1):
            self.run_step(slot)
            if on_step is not None:
                on_step()
        return self.tokens.cpu()


def _forward_parameters(model: Any) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


@torch.inference_mode()
def sample_windows(
    model: Any,
    count: int,
    seq_len: int,
    seed: int,
    temperature: float = 1.0,
    top_p: float = TOP_P,
    start: int | None = None,
    rows: int | None = None,
    progress: bool = False,
    desc: str = "sampling text",
) -> torch.LongTensor:
    """`count` windows [count, seq_len] sampled from `model` on its device, `rows` at a time (default: sized to
    the device, `rows_for`), each from the start token (the model's BOS, else EOS, else a random token): text that
    follows the model's own distribution, documents packed where one ends early. Prints tokens/s at the end."""
    import time

    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    rows = rows or rows_for(model.config, count, seq_len, device)
    register_attention()
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cpu_sampling_threads())
    began = time.perf_counter()
    out: list[torch.Tensor] = []
    try:
        sampler = Sampler(model, rows, Draw(seq_len, seed, temperature, top_p, start))
        with tqdm(total=count * seq_len, desc=desc, unit="tok", unit_scale=True, disable=not progress) as bar:
            for begin in range(0, count, rows):
                kept = min(rows, count - begin)
                out.append(sampler.sample(lambda: bar.update(kept))[:kept])
                bar.update(kept)
    finally:
        config._attn_implementation = saved
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - began
    if progress:
        tqdm.write(f"sampled {count * seq_len:,} tokens in {seconds:.1f} s ({count * seq_len / max(seconds, 1e-9):,.0f} tokens/s, "
                   f"{rows} rows at a time on {device_name(device)})")
    return torch.cat(out)


def cached_samples(kind: str, model_id: dict[str, Any], config: Any, load: Callable[[], Any],
                   device: torch.device | str, dtype: torch.dtype, count: int, draw: Draw, progress: bool = False,
                   desc: str = "sampling text") -> tuple[torch.LongTensor, dict[str, Any]]:
    """`count` windows sampled from the model that `load()` returns (with `config`, on `device`, in `dtype`),
    taken from the user cache when the same model, draw and sampler made them before; and the record of how they
    were made (for the output's config)."""
    from .cache import cached_tokens

    device = torch.device(device)
    rows = rows_for(config, count, draw.seq_len, device)
    record = {"count": count, "seq_len": draw.seq_len, "seed": draw.seed, "temperature": draw.temperature,
              "top_p": draw.top_p, "start": draw.start, **sampler_record(device, dtype, rows)}

    def make() -> torch.LongTensor:
        return sample_windows(load(), count, draw.seq_len, draw.seed, draw.temperature, draw.top_p, draw.start,
                              rows=rows, progress=progress, desc=desc)

    return cached_tokens({"kind": kind, "model": model_id, **record}, make), record
