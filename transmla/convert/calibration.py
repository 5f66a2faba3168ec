"""Layer-by-layer calibration: run calibration tokens through the model one decoder layer at a time.

Layer l is converted from statistics of its inputs as produced by the already converted layers 0..l-1, so that
their errors are seen, not compounded blindly. Only the current layer's hidden states are kept ([N, T, hidden],
float32, in a memory-mapped file when they do not fit in memory); statistics are accumulated in float64 on the
driver's device.

Nothing here computes attention or wires residuals itself: the source layer runs as the family's own transformers
decoder layer (eager attention, which returns its probabilities), and everything on the converted side (the input
norm, the pre-features of q/k-normed layers, the converted layer) is the shipped modeling code (`transmla.modeling`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from transmla.families import family_of
from transmla.io.reader import TensorSource
from transmla.modeling.modeling_transmla import SharedRotary, TransMLADecoderLayer, build_masks, scale_embeddings

from .attention import PreProjection, SourceAttention
from .hidden_states import hidden_buffer
from .model_config import build_config, shared_scaling
from .statistics import LayerStats
from .whiten import spd_solve

HEADS_CACHE_BYTES = 1 << 30  # source head outputs kept per layer for the candidate fits that reread them
REFIT_TOKENS = 8192  # calibration tokens (queries) that the least-squares value refit uses
Rotary = list[tuple[torch.Tensor, float]]  # per layer: the source's inverse frequencies and cos/sin scaling


def source_mask(length: int, window: int | None, device: Any) -> torch.Tensor:
    """[1, 1, T, T] additive mask of the source's eager attention: 0 where a query sees a key (causal, and within
    `window` of it in a sliding-window layer), -inf elsewhere."""
    position = torch.arange(length, device=device)
    allowed = position[None, :] <= position[:, None]
    if window is not None:
        allowed &= position[None, :] > position[:, None] - window
    return torch.zeros(length, length, device=device).masked_fill_(~allowed, float("-inf"))[None, None]


def probability_gram(stacked: torch.Tensor) -> torch.Tensor:
    """P^T P [B, T, T] of attention probabilities stacked over heads [B, H*T, T], float32. On a CPU the product
    (the largest of a layer's statistics) runs in bfloat16 on the matrix units, with float32 sums: probabilities
    lie in [0, 1], so the rounding is relative and about 2^-9 per factor."""
    if stacked.device.type == "cpu":
        low = stacked.to(torch.bfloat16)
        return (low.transpose(1, 2) @ low).float()
    return stacked.transpose(1, 2) @ stacked


@contextmanager
def cpu_bf16_mlp(mlp: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """On a CPU, run `mlp` (the bulk of carrying hidden states to the next layer) under bfloat16 autocast, which
    the CPU's matrix units run several times faster than float32; its output is float32 again. Elsewhere as is."""
    if device.type != "cpu":
        yield
        return
    forward = mlp.forward

    def fast(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(x).float()

    mlp.forward = fast
    try:
        yield
    finally:
        del mlp.forward  # the class's forward again


class LayerwiseRunner:
    """Holds the hidden states entering one decoder layer and advances them through converted layers."""

    def __init__(self, tensors: TensorSource, config: Any, input_ids: torch.LongTensor, rotary: Rotary,
                 device: str | torch.device = "cpu", chunk_tokens: int = 4096,
                 offload: str = "auto", scratch_dir: Path | None = None, track_source: bool = False) -> None:
        self.tensors, self.config, self.device = tensors, config, torch.device(device)
        self.family = family_of(config)
        self.rotary, self.scaling = rotary, shared_scaling(rotary)
        self.samples, self.length = input_ids.shape
        self.batch = max(1, chunk_tokens // self.length)
        embed = tensors.get("model.embed_tokens.weight")  # source dtype: only the looked-up rows become float32
        multiplier = self.family.embedding_multiplier(config)
        shape = (self.samples, self.length, embed.shape[1])
        self.hidden = self.buffer(shape, offload, scratch_dir)  # [N, T, h]
        for start in range(0, self.samples, self.batch):
            rows = embed[input_ids[start:start + self.batch].to(embed.device)]
            self.hidden[start:start + self.batch] = scale_embeddings(rows, multiplier).float()
        del embed
        # the source model's own hidden states beside the converted ones (for targets that undo the drift)
        self.source_hidden = None
        if track_source:
            self.source_hidden = self.buffer(shape)
            self.source_hidden.copy_(self.hidden)
        self.positions = torch.arange(self.length, device=self.device)[None]
        self.windows = self.family.sliding_windows(config)
        self.source_rotary = self.family.source_rotary(config).to(self.device)
        self._cos_sin: dict[tuple[float, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._source: tuple[int, torch.nn.Module] | None = None
        self._shells: dict[tuple[int, bool], TransMLADecoderLayer] = {}
        self._heads: tuple[int, dict[tuple[int, int], torch.Tensor], int] = (-1, {}, 0)
        # The value refit solves (R+1)-wide least squares per group: REFIT_TOKENS queries are ample.
        self.refit_samples = max(1, min(self.samples, REFIT_TOKENS // self.length))

    def buffer(self, shape: tuple[int, int, int] | None = None, offload: str | None = None,
               scratch_dir: Path | None = None) -> torch.Tensor:
        """A float32 buffer shaped like the hidden states (or `shape`), where they would live (`hidden_buffer`)."""
        if offload is not None:
            self._placement = (offload, scratch_dir)
        return hidden_buffer(shape or tuple(self.hidden.shape), self.device, *self._placement)

    def cos_sin(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, d] of the source's frequencies of layer l, in the converted model's rotate-half layout."""
        key = tuple(self.rotary[layer][0].tolist())
        if key not in self._cos_sin:
            cos, sin = SharedRotary(list(key), self.scaling).cos_sin(self.positions, torch.float32)
            self._cos_sin[key] = cos[0], sin[0]
        return self._cos_sin[key]

    def shell(self, layer: int, pre: PreProjection | None = None) -> TransMLADecoderLayer:
        """The converted decoder layer l's input side as the shipped code runs it: its input norm, and with `pre` its
        pre-feature projections and q/k norms (the rest of the layer is left unmaterialised on the meta device)."""
        key = (layer, pre is not None)
        if key not in self._shells:
            prefix = f"model.layers.{layer}."
            state = {k[len(prefix):]: self.tensors.get(k, torch.float32) for k in self.tensors.keys()
                     if k.startswith(prefix + "input_layernorm.")}
            if pre is not None:
                state |= {f"self_attn.{k}": v.float() for k, v in pre.tensors().items()}
            inv_freq = self.rotary[layer][0].tolist()
            config = build_config(self.config, [1], [inv_freq], self.scaling, {"model.layers.0." + k for k in state},
                                  layer=layer)
            with torch.device("meta"):
                module = TransMLADecoderLayer(config, 0)
            module.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=False, assign=True)
            self._shells = {k: v for k, v in self._shells.items() if k[0] == layer} | {key: module.eval()}
        return self._shells[key]

    def norm(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """What layer l's attention reads from its hidden state (the input norm, where the family has one)."""
        return self.shell(layer).attention_input

    def features(self, layer: int, src: SourceAttention, x: torch.Tensor) -> torch.Tensor:
        """The converted layer's input from the attention input x: x itself, or the pre-features z = [q_n; k_n; v]."""
        if src.pre is None:
            return x
        return torch.cat(self.shell(layer, src.pre).self_attn.projection_inputs(x), dim=-1)

    def source_layer(self, layer: int) -> torch.nn.Module:
        """The source's decoder layer l as the family's transformers code (float32, eager attention)."""
        if self._source is None or self._source[0] != layer:
            prefix = f"model.layers.{layer}."
            state = {k[len(prefix):]: self.tensors.get(k, torch.float32) for k in self.tensors.keys()
                     if k.startswith(prefix)}
            self._source = (layer, self.family.source_layer(self.config, layer, state).to(self.device))
        return self._source[1]

    def source_inputs(self, layer: int, x: torch.Tensor) -> dict[str, Any]:
        """The keyword arguments of the source layer besides its hidden states: rotary tables and mask."""
        rotary = self.family.position_embeddings(self.source_rotary, x, self.positions, layer, self.config)
        return {"position_embeddings": rotary, "attention_mask": source_mask(self.length, self.windows[layer], x.device)}

    def source_attention(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The source attention of layer l on its input x [B, T, h]: probabilities [B, H, T, T] and the per-head
        outputs [B, T, H*d] that o_proj reads."""
        attention = self.source_layer(layer).self_attn
        heads: list[torch.Tensor] = []
        hook = attention.o_proj.register_forward_pre_hook(lambda module, args: heads.append(args[0]))
        try:
            _, probs = attention(hidden_states=x, **self.source_inputs(layer, x))
        finally:
            hook.remove()
        return probs, heads[0]

    def source_output(self, layer: int, x: torch.Tensor, part: slice | None = None) -> torch.Tensor:
        """The source attention's output after o_proj, without o_proj's own bias (`part`: see `source_heads`)."""
        heads = self.source_heads(layer, x, part) if part is not None else self.source_attention(layer, x)[1]
        return F.linear(heads, self.source_layer(layer).self_attn.o_proj.weight)

    def source_heads(self, layer: int, x: torch.Tensor, part: slice, probs: bool = False) -> Any:
        """The per-head outputs of `source_attention` for the calibration sequences `part` whose attention input
        is x, kept while layer l's inputs stay as they are (every candidate fit of a layer reads the same ones);
        with `probs`, (probabilities, heads), computed afresh."""
        key = (part.start, part.stop)
        if self._heads[0] != layer:
            self._heads = (layer, {}, 0)
        cached = self._heads[1].get(key)
        if cached is not None and not probs:
            return cached
        weights, heads = self.source_attention(layer, x)
        if self._heads[2] + heads.numel() * heads.element_size() <= HEADS_CACHE_BYTES:
            self._heads[1][key] = heads
            self._heads = (layer, self._heads[1], self._heads[2] + heads.numel() * heads.element_size())
        return (weights, heads) if probs else heads

    def forget_heads(self) -> None:
        """Drop the kept head outputs (the hidden states they were computed from change)."""
        self._heads = (-1, {}, 0)

    def chunks(self, layer: int, rows: range | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """(sample slice, attention input x [B, T, h]) over the calibration sequences `rows` (all)."""
        norm = self.norm(layer)
        rows = range(self.samples) if rows is None else rows
        for start in range(rows.start, rows.stop, self.batch):
            part = slice(start, min(start + self.batch, rows.stop))
            yield part, norm(self.hidden[part].to(self.device))

    @torch.no_grad()
    def statistics(self, layer: int, src: SourceAttention, rows: range | None = None) -> LayerStats:
        """Input moments, the attention-distance rotation averages and the attention-averaged input moments.

        Products are float32 per chunk, sums float64. The value moments need no per-head xbar_h: summed over
        heads, sum_t xbar_h xbar_h^T = X^T (sum_h P_h^T P_h) X, one [T, T] Gram matrix per sequence.
        """
        h, heads, half = src.k.shape[1], src.heads, src.head_dim // 2
        dev, f64 = self.device, torch.float64
        total = torch.zeros(h, dtype=f64, device=dev)
        second = torch.zeros(h, h, dtype=f64, device=dev)
        vmean = torch.zeros(heads, h, dtype=f64, device=dev)
        vsecond = torch.zeros(h, h, dtype=f64, device=dev)
        rot = torch.zeros(heads, half, 2, dtype=f64, device=dev)
        cos, sin = self.cos_sin(layer)
        cs = torch.cat([cos[:, :half], sin[:, :half]], dim=-1) / self.scaling  # [T, 2F]: cos, sin of s*theta
        cos_t, sin_t = cs[:, :half], cs[:, half:]
        count = 0
        for part, x in self.chunks(layer, rows):
            probs, _ = self.source_heads(layer, x, part, probs=True)
            x = self.features(layer, src, x)  # the pre-features z when the layer has q/k norms
            bsz, length = x.shape[:2]
            flat = x.reshape(-1, h)
            total += flat.sum(0).to(f64)
            second += (flat.T @ flat).to(f64)
            a = probs @ cs  # [B, H, T, 2F]: sum_s p cos(s theta), sum_s p sin(s theta)
            ac, asn = a[..., :half], a[..., half:]
            rot[..., 0] += (cos_t * ac + sin_t * asn).sum(dim=(0, 2)).to(f64)
            rot[..., 1] += (sin_t * ac - cos_t * asn).sum(dim=(0, 2)).to(f64)
            stacked = probs.reshape(bsz, heads * length, length)
            gram = probability_gram(stacked)  # [B, T, T]: sum_h P_h^T P_h
            vsecond += (flat.T @ (gram @ x).reshape(-1, h)).to(f64)
            vmean += torch.einsum("bhs,bsx->hx", probs.sum(2), x).to(f64)  # sum_t xbar_h(t), per head
            count += flat.shape[0]
        stats = LayerStats(count, total / count, second / count, rot / count, vmean / count, vsecond / (count * heads))
        return stats if src.pre is None else stats.independent_blocks(src.pre.widths[0])

    @torch.no_grad()
    def advance(self, layer: int, attention: dict[str, torch.Tensor], rank: int, rope_inv_freq: list[float]) -> None:
        """Run the converted layer l (new attention tensors + the source's norms and MLP) on the hidden states."""
        module = self.converted_layer(layer, attention, rank, rope_inv_freq)
        self.forget_heads()
        for rows, _ in self.chunks(layer):
            self.hidden[rows] = self._run(module, self.hidden[rows].to(self.device)).to(self.hidden.device)

    @torch.no_grad()
    def attention_error(self, layer: int, src: SourceAttention, o_bias: torch.Tensor | None,
                        attention: dict[str, torch.Tensor], rank: int, rope_inv_freq: list[float],
                        rows: range | None = None) -> float:
        """Mean squared difference between the source's and a converted attention's outputs (after o_proj) on
        the current inputs of the calibration sequences `rows` (all): the layer's local calibration loss."""
        module = self.converted_layer(layer, attention, rank, rope_inv_freq).self_attn
        total, count = 0.0, 0
        for part, x in self.chunks(layer, rows):
            ref = self.source_output(layer, x, part)
            bsz, length, _ = x.shape
            mask, key_mask = build_masks(None, bsz, length, length, self.device)
            got = module(x, self.positions.expand(bsz, -1), mask, key_mask, None)
            if o_bias is not None:
                got = got - o_bias.to(got)
            total += float((got - ref).double().pow(2).sum())
            count += bsz * length
        return total / count

    @torch.no_grad()
    def refit_values(self, layer: int, src: SourceAttention, attention: dict[str, torch.Tensor], rank: int,
                     rope_inv_freq: list[float], bias: bool = True, rows: range | None = None,
                     rel: float = 1e-6, tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Least-squares value up-projection under the converted layer's own attention weights.

        Head h of group g outputs A_g cbar_h + b_g with cbar_h = sum_s phat_h(t, s) c_s (phat: the converted
        scores); A_g, b_g minimise sum_{h in g} w_h |A_g cbar_h + b_g - o_h|^2 against the source head outputs
        o_h, w_h = |W_o,h|_F^2 / d. Returns W_UV [G*d, R] and the o_proj bias sum_h W_o,h b_g(h) (with `bias`
        off, b_g = 0 and None). `rows`: the calibration sequences used, at most `tokens` tokens of them (default:
        REFIT_TOKENS).
        """
        d, heads, groups = src.head_dim, src.heads, src.groups
        gh = src.group_of_head.to(self.device)
        o_heads = src.o.view(src.o.shape[0], heads, d).permute(1, 0, 2)
        w = (o_heads.pow(2).sum(dim=(1, 2)) / d).to(self.device, torch.float64)
        width = rank + int(bias)  # the latent, and a constant 1 for the bias
        gram = torch.zeros(groups, width, width, dtype=torch.float64, device=self.device)
        cross = torch.zeros(groups, d, width, dtype=torch.float64, device=self.device)
        module = self.converted_layer(layer, attention, rank, rope_inv_freq).self_attn
        limit = self.refit_samples if tokens is None else max(1, min(self.samples, tokens // self.length))
        rows = range(limit) if rows is None else range(rows.start, min(rows.stop, rows.start + limit))
        for part, x in self.chunks(layer, rows):
            out = self.source_heads(layer, x, part)
            probs, latent = module.attention_weights(x, self.positions.expand(x.shape[0], -1))
            cbar = probs @ latent[:, None]  # [B, H, T, R]
            if bias:
                cbar = torch.cat([cbar, torch.ones_like(cbar[..., :1])], dim=-1)
            cbar = cbar.transpose(0, 1).flatten(1, 2)  # [H, BT, width]
            target = out.view(-1, heads, d).transpose(0, 1)  # [H, BT, d]
            # per-head sums as float32 products, weighted and summed over a group's heads in float64
            gram.index_add_(0, gh, w[:, None, None] * (cbar.transpose(1, 2) @ cbar).double())
            cross.index_add_(0, gh, w[:, None, None] * (target.transpose(1, 2) @ cbar).double())
        reg = rel * gram.diagonal(dim1=1, dim2=2)[:, :rank].mean(-1)
        eye = torch.eye(width, dtype=gram.dtype, device=gram.device)
        eye[rank:, rank:] = 0  # the bias is not shrunk
        sol = spd_solve(gram + reg[:, None, None] * eye, cross.transpose(1, 2)).transpose(1, 2)  # [G, d, width]
        up_value = sol[..., :rank].reshape(groups * d, rank)
        if not bias:
            return up_value, None
        return up_value, torch.einsum("hxd,hd->x", o_heads.to(sol), sol[..., rank][gh])

    @torch.no_grad()
    def advance_source(self, layer: int, tracked: bool = False) -> None:
        """Run the source's own layer l on the hidden states (for a pass that only measures), or with `tracked` on
        the source model's own hidden states that a converting pass carries beside its converted ones."""
        buffer = self.source_hidden if tracked else self.hidden
        if not tracked:
            self.forget_heads()
        module = self.source_layer(layer)
        config = module.self_attn.config
        # No probabilities are needed here: on a CPU PyTorch's fused attention, where the family's scores need no capping
        cpu = self.device.type == "cpu"
        fused = "sdpa" if cpu and not self.family.attention_softcap(self.config) else config._attn_implementation
        eager, config._attn_implementation = config._attn_implementation, fused
        try:
            for start in range(0, self.samples, self.batch):
                rows = slice(start, min(start + self.batch, self.samples))
                hidden = buffer[rows].to(self.device)
                inputs = self.source_inputs(layer, hidden)
                if fused == "sdpa" and self.windows[layer] is None:
                    inputs["attention_mask"] = None  # causal, without a mask to read
                with cpu_bf16_mlp(module.mlp, self.device):
                    hidden = module(hidden, position_ids=self.positions, **inputs)
                buffer[rows] = hidden.to(buffer.device)
        finally:
            config._attn_implementation = eager

    def residual_energy(self) -> float:
        """Mean squared norm of the hidden states entering the current layer."""
        total = sum(float(self.hidden[i:i + self.batch].double().pow(2).sum()) for i in range(0, self.samples, self.batch))
        return total / (self.samples * self.length)

    def converted_layer(self, layer: int, attention: dict[str, torch.Tensor], rank: int, rope_inv_freq: list[float]):
        """The converted decoder layer l: the new attention tensors beside the source's norms and MLP."""
        prefix = f"model.layers.{layer}."
        state = {f"self_attn.{k}": v.float() for k, v in attention.items()}
        for key in self.tensors.keys():
            if key.startswith(prefix) and ".self_attn." not in key:
                state |= self.family.layer_tensor(key[len(prefix):], self.tensors.get(key, torch.float32))
        config = build_config(self.config, [rank], [rope_inv_freq], self.scaling, {"model.layers.0." + k for k in state},
                              layer=layer)
        module = TransMLADecoderLayer(config, 0)
        module.load_state_dict(state, strict=True)
        return module.to(self.device).eval()

    def _run(self, module: Any, hidden: torch.Tensor) -> torch.Tensor:
        bsz, length, _ = hidden.shape
        mask, key_mask = build_masks(None, bsz, length, length, self.device)
        with cpu_bf16_mlp(module.mlp, self.device):
            return module(hidden, self.positions.expand(bsz, -1), mask, key_mask, None)
