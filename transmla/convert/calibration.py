"""Layer-by-layer calibration: run calibration tokens through the model one decoder layer at a time.

Layer l is converted from statistics of its inputs as produced by the already converted layers 0..l-1, so that
their errors are seen, not compounded blindly. Only the current layer's hidden states are kept ([N, T, hidden],
float32, in a memory-mapped file when they do not fit in memory); statistics are accumulated in float64 on the
driver's device. Norms, MLPs, the rotary tables and the converted attention are the shipped modeling code's own
(`transmla.modeling`), so calibration sees what the converted model computes; only the source attention, whose
weights the statistics need, is written out here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from transmla.io.reader import TensorSource
from transmla.modeling.modeling_transmla import (SharedRotary, TransMLADecoderLayer, TransMLAMLP, TransMLARMSNorm,
                                                 apply_rotary, build_masks)

from .attention import SourceAttention
from .hidden_states import hidden_buffer
from .model_config import build_config
from .statistics import LayerStats
from .whiten import spd_solve

REFIT_TOKENS = 8192  # calibration tokens (queries) that the least-squares value refit uses


def causal_mask(length: int, device: Any) -> torch.Tensor:
    """[T, T] additive causal mask: 0 where a query may see a key, -inf above the diagonal."""
    return torch.full((length, length), float("-inf"), device=device).triu(1)


def grouped_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q k^T [B, H, T, S] for q [B, H, T, e] and k [B, G, S, e], head h reading group h // (H/G), without
    repeating the keys."""
    bsz, heads, length, _ = q.shape
    groups = k.shape[1]
    grouped = q.reshape(bsz, groups, heads // groups * length, -1)
    return (grouped @ k.transpose(-1, -2)).view(bsz, heads, length, k.shape[2])


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, T, e] against k, v [B, G, T, *] under an additive mask: probabilities
    [B, H, T, T] and the output [B, H, T, d]."""
    bsz, heads, length, _ = q.shape
    groups = k.shape[1]
    probs = grouped_scores(q, k).mul_(scale).add_(mask).softmax(-1)
    out = probs.view(bsz, groups, -1, length) @ v  # [B, G, (H/G) T, d]
    return probs, out.view(bsz, heads, length, -1)


def source_attention_probs(src: SourceAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the source layer on x [B, T, h] with the rotary tables cos, sin [T, d] (the
    source's frequencies in the converted model's rotate-half layout): probabilities [B, H, T, T] and per-head
    output before o_proj [B, T, H*d] (float32)."""
    bsz, length, _ = x.shape
    d, heads, groups = src.head_dim, src.heads, src.groups

    def proj(w: torch.Tensor, b: torch.Tensor | None, n: int) -> torch.Tensor:
        y = F.linear(x, w.float(), None if b is None else b.float())
        return y.view(bsz, length, n, d).transpose(1, 2)

    q = apply_rotary(proj(src.q, src.q_bias, heads), cos, sin)
    k = apply_rotary(proj(src.k, src.k_bias, groups), cos, sin)
    v = proj(src.v, src.v_bias, groups)
    mask = causal_mask(length, x.device) if mask is None else mask
    probs, out = grouped_attention(q, k, v, d**-0.5, mask)
    return probs, out.transpose(1, 2).reshape(bsz, length, heads * d)


class LayerwiseRunner:
    """Holds the hidden states entering one decoder layer and advances them through converted layers."""

    def __init__(self, tensors: TensorSource, config: Any, input_ids: torch.LongTensor, inv_freq: torch.Tensor,
                 scaling: float, device: str | torch.device = "cpu", chunk_tokens: int = 4096,
                 offload: str = "auto", scratch_dir: Path | None = None, track_source: bool = False) -> None:
        self.tensors, self.config, self.device = tensors, config, torch.device(device)
        self.scaling = scaling
        self.samples, self.length = input_ids.shape
        self.batch = max(1, chunk_tokens // self.length)
        embed = tensors.get("model.embed_tokens.weight")  # source dtype: only the looked-up rows become float32
        shape = (self.samples, self.length, embed.shape[1])
        self.hidden = self.buffer(shape, offload, scratch_dir)  # [N, T, h]
        for start in range(0, self.samples, self.batch):
            self.hidden[start:start + self.batch] = embed[input_ids[start:start + self.batch].to(embed.device)].float()
        del embed
        # the source model's own hidden states beside the converted ones (for targets that undo the drift)
        self.source_hidden = None
        if track_source:
            self.source_hidden = self.buffer(shape)
            self.source_hidden.copy_(self.hidden)
        self.positions = torch.arange(self.length, device=self.device)[None]
        cos, sin = SharedRotary(inv_freq.tolist(), scaling).cos_sin(self.positions, torch.float32)
        self.cos, self.sin = cos[0], sin[0]  # [T, d]
        self.mask = causal_mask(self.length, self.device)
        # The value refit solves (R+1)-wide least squares per group: REFIT_TOKENS queries are ample.
        self.refit_samples = max(1, min(self.samples, REFIT_TOKENS // self.length))

    def buffer(self, shape: tuple[int, int, int] | None = None, offload: str | None = None,
               scratch_dir: Path | None = None) -> torch.Tensor:
        """A float32 buffer shaped like the hidden states (or `shape`), where they would live (`hidden_buffer`)."""
        if offload is not None:
            self._placement = (offload, scratch_dir)
        return hidden_buffer(shape or tuple(self.hidden.shape), self.device, *self._placement)

    def norm(self, layer: int, name: str = "input_layernorm") -> TransMLARMSNorm:
        """The source's RMSNorm `name` of layer l, as the converted model runs it."""
        weight = self.tensors.get(f"model.layers.{layer}.{name}.weight", torch.float32)
        norm = TransMLARMSNorm(weight.shape[0], eps=float(self.config.rms_norm_eps))
        norm.weight.data.copy_(weight)
        return norm.to(self.device)

    def chunks(self, layer: int, rows: range | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """(sample slice, normalised attention input x [B, T, h]) over the calibration sequences `rows` (all)."""
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
        src32 = _to(src, torch.float32, dev)
        total = torch.zeros(h, dtype=f64, device=dev)
        second = torch.zeros(h, h, dtype=f64, device=dev)
        vmean = torch.zeros(heads, h, dtype=f64, device=dev)
        vsecond = torch.zeros(h, h, dtype=f64, device=dev)
        rot = torch.zeros(heads, half, 2, dtype=f64, device=dev)
        cs = torch.cat([self.cos[:, :half], self.sin[:, :half]], dim=-1) / self.scaling  # [T, 2F]: cos, sin of s*theta
        cos_t, sin_t = cs[:, :half], cs[:, half:]
        count = 0
        for _, x in self.chunks(layer, rows):
            x = src32.inputs(x)  # the pre-features z when the layer has per-head q/k norms
            probs, _ = source_attention_probs(src32, x, self.cos, self.sin, self.mask)
            bsz, length = x.shape[:2]
            flat = x.reshape(-1, h)
            total += flat.sum(0).to(f64)
            second += (flat.T @ flat).to(f64)
            a = probs @ cs  # [B, H, T, 2F]: sum_s p cos(s theta), sum_s p sin(s theta)
            ac, asn = a[..., :half], a[..., half:]
            rot[..., 0] += (cos_t * ac + sin_t * asn).sum(dim=(0, 2)).to(f64)
            rot[..., 1] += (sin_t * ac - cos_t * asn).sum(dim=(0, 2)).to(f64)
            stacked = probs.reshape(bsz, heads * length, length)
            gram = stacked.transpose(1, 2) @ stacked  # [B, T, T]: sum_h P_h^T P_h
            vsecond += (flat.T @ (gram @ x).reshape(-1, h)).to(f64)
            vmean += torch.einsum("bhs,bsx->hx", probs.sum(2), x).to(f64)  # sum_t xbar_h(t), per head
            count += flat.shape[0]
        stats = LayerStats(count, total / count, second / count, rot / count, vmean / count, vsecond / (count * heads))
        return stats if src.pre is None else stats.independent_blocks(src.pre.widths[0])

    @torch.no_grad()
    def advance(self, layer: int, attention: dict[str, torch.Tensor], rank: int, rope_inv_freq: list[float]) -> None:
        """Run the converted layer l (new attention tensors + the source's norms and MLP) on the hidden states."""
        module = self.converted_layer(layer, attention, rank, rope_inv_freq)
        for rows, _ in self.chunks(layer):
            self.hidden[rows] = self._run(module, self.hidden[rows].to(self.device)).to(self.hidden.device)

    @torch.no_grad()
    def attention_error(self, layer: int, src: SourceAttention, o_bias: torch.Tensor | None,
                        attention: dict[str, torch.Tensor], rank: int, rope_inv_freq: list[float],
                        rows: range | None = None) -> float:
        """Mean squared difference between the source's and a converted attention's outputs (after o_proj) on
        the current inputs of the calibration sequences `rows` (all): the layer's local calibration loss."""
        module = self.converted_layer(layer, attention, rank, rope_inv_freq).self_attn
        src32 = _to(src, torch.float32, self.device)
        total, count = 0.0, 0
        for _, x in self.chunks(layer, rows):
            _, out = source_attention_probs(src32, src32.inputs(x), self.cos, self.sin, self.mask)
            ref = F.linear(out, src32.o, None)
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
                     rel: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Least-squares value up-projection under the converted layer's own attention weights.

        Head h of group g outputs A_g cbar_h + b_g with cbar_h = sum_s phat_h(t, s) c_s (phat: the converted
        scores); A_g, b_g minimise sum_{h in g} w_h |A_g cbar_h + b_g - o_h|^2 against the source head outputs
        o_h, w_h = |W_o,h|_F^2 / d. Returns W_UV [G*d, R] and the o_proj bias sum_h W_o,h b_g(h) (with `bias`
        off, b_g = 0 and None). `rows`: the calibration sequences used (default: the first REFIT_TOKENS tokens).
        """
        d, heads, groups = src.head_dim, src.heads, src.groups
        src32 = _to(src, torch.float32, self.device)
        gh = src.group_of_head.to(self.device)
        o_heads = src.o.view(src.o.shape[0], heads, d).permute(1, 0, 2)
        w = (o_heads.pow(2).sum(dim=(1, 2)) / d).to(self.device, torch.float64)
        width = rank + int(bias)  # the latent, and a constant 1 for the bias
        gram = torch.zeros(groups, width, width, dtype=torch.float64, device=self.device)
        cross = torch.zeros(groups, d, width, dtype=torch.float64, device=self.device)
        module = self.converted_layer(layer, attention, rank, rope_inv_freq).self_attn
        rows = range(self.refit_samples) if rows is None else range(rows.start, min(rows.stop, rows.start + self.refit_samples))
        for _, x in self.chunks(layer, rows):
            _, out = source_attention_probs(src32, src32.inputs(x), self.cos, self.sin, self.mask)
            probs, latent = module.attention_weights(x, self.positions.expand(x.shape[0], -1), self.mask)
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
    def advance_source(self, layer: int, src: SourceAttention, o_bias: torch.Tensor | None, tracked: bool = False) -> None:
        """Run the source's own layer l on the hidden states (for a pass that only measures), or with `tracked` on
        the source model's own hidden states that a converting pass carries beside its converted ones."""
        buffer = self.source_hidden if tracked else self.hidden
        src32 = _to(src, torch.float32, self.device)
        post, mlp = self.norm(layer, "post_attention_layernorm"), self.mlp(layer)
        ob = None if o_bias is None else o_bias.to(self.device, torch.float32)
        norm = self.norm(layer)
        for start in range(0, self.samples, self.batch):
            rows = slice(start, min(start + self.batch, self.samples))
            hidden = buffer[rows].to(self.device)
            _, out = source_attention_probs(src32, src32.inputs(norm(hidden)), self.cos, self.sin, self.mask)
            hidden = hidden + F.linear(out, src32.o, ob)
            buffer[rows] = (hidden + mlp(post(hidden))).to(buffer.device)

    def mlp(self, layer: int) -> TransMLAMLP:
        """The source's MLP of layer l, as the converted model runs it."""
        config = build_config(self.config, [1], [[1.0]], self.scaling, set(), layers=1)  # attention sizes unused
        mlp = TransMLAMLP(config)
        prefix = f"model.layers.{layer}.mlp."
        mlp.load_state_dict({k[len(prefix):]: self.tensors.get(k, torch.float32) for k in self.tensors.keys()
                             if k.startswith(prefix)})
        return mlp.to(self.device)

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
                state[key[len(prefix):]] = self.tensors.get(key, torch.float32)
        config = build_config(self.config, [rank], [rope_inv_freq], self.scaling, {"model.layers.0." + k for k in state},
                              layers=1)
        module = TransMLADecoderLayer(config, 0)
        module.load_state_dict(state, strict=True)
        return module.to(self.device).eval()

    def _run(self, module: Any, hidden: torch.Tensor) -> torch.Tensor:
        bsz, length, _ = hidden.shape
        mask, key_mask = build_masks(None, bsz, length, length, self.device)
        return module(hidden, self.positions.expand(bsz, -1), mask, key_mask, None)


def _to(src: SourceAttention, dtype: torch.dtype, device: torch.device) -> SourceAttention:
    return src.to(device, dtype)
