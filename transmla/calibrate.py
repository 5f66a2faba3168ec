"""Layer-by-layer calibration: run calibration tokens through the model one decoder layer at a time.

Layer l is converted from statistics of its inputs as produced by the already converted layers 0..l-1, so that
their errors are seen, not compounded blindly. Only the current layer's hidden states are kept ([N, T, hidden],
float32, in a memory-mapped file when they do not fit in memory); statistics are accumulated in float64 on the
driver's device.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import TransMLAError
from .io import TensorSource
from .mla_layer import SourceAttention


@dataclass
class LayerStats:
    """Moments of one attention layer's input x (after input_layernorm) over the calibration tokens.

    shrink[h, i] = (E_p cos(Delta theta_i), E_p sin(Delta theta_i)) under head h's attention weights p;
    value_mean / value_second: moments of the attention-averaged input xbar_h(t) = sum_s p_h(t, s) x(s), the
    second moments averaged over heads (per-head [H, h, h] matrices would not fit for large models).
    """

    tokens: int
    mean: torch.Tensor  # [h]
    second: torch.Tensor  # [h, h], E[x x^T]
    shrink: torch.Tensor  # [H, d/2, 2]
    value_mean: torch.Tensor  # [H, h]
    value_second: torch.Tensor  # [h, h]: mean over heads of E_t xbar_h xbar_h^T

    @property
    def cov(self) -> torch.Tensor:
        return self.second - torch.outer(self.mean, self.mean)

    def value_cov(self) -> torch.Tensor:
        """[h, h]: the covariance of xbar_h about its per-head mean, averaged over heads."""
        heads = self.value_mean.shape[0]
        return self.value_second - self.value_mean.T @ self.value_mean / heads

    def independent_blocks(self, split: int) -> "LayerStats":
        """These moments with inputs [:split] and [split:] made uncorrelated (cov and value_cov block-diagonal; means and diagonal blocks kept).

        On pre-features z = [q_n; k_n; v] the converted kv_a_proj reads only [k_n; v]. A latent error E with zero
        q_n columns costs tr(M E S E^T) = tr(M E_kv S_kv E_kv^T) whatever S's cross block, and with that block
        zero a latent reading q_n can only cost more: the whitened latent then reads [k_n; v] alone, and is the
        best one that does.
        """
        a, b = slice(0, split), slice(split, None)

        def decoupled(second: torch.Tensor, mean_outer: torch.Tensor) -> torch.Tensor:
            out = second.clone()
            out[a, b], out[b, a] = mean_outer[a, b], mean_outer[b, a]
            return out

        second = decoupled(self.second, torch.outer(self.mean, self.mean))
        heads = self.value_mean.shape[0]
        value_second = decoupled(self.value_second, self.value_mean.T @ self.value_mean / heads)
        return LayerStats(self.tokens, self.mean, second, self.shrink, self.value_mean, value_second)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))


def rope_tables(inv_freq: torch.Tensor, length: int, scaling: float, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, d] in the rotate-half layout."""
    t = torch.arange(length, device=device, dtype=torch.float64)
    freqs = t[:, None] * inv_freq.to(device=device, dtype=torch.float64)[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scaling).float(), (emb.sin() * scaling).float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


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
    """Causal attention of the source layer on x [B, T, h]: probabilities [B, H, T, T] and per-head output
    before o_proj [B, T, H*d] (float32)."""
    bsz, length, _ = x.shape
    d, heads, groups = src.head_dim, src.heads, src.groups

    def proj(w: torch.Tensor, b: torch.Tensor | None, n: int) -> torch.Tensor:
        y = F.linear(x, w.float(), None if b is None else b.float())
        return y.view(bsz, length, n, d).transpose(1, 2)

    q = rotate(proj(src.q, src.q_bias, heads), cos, sin)
    k = rotate(proj(src.k, src.k_bias, groups), cos, sin)
    v = proj(src.v, src.v_bias, groups)
    mask = causal_mask(length, x.device) if mask is None else mask
    probs, out = grouped_attention(q, k, v, d**-0.5, mask)
    return probs, out.transpose(1, 2).reshape(bsz, length, heads * d)


OFFLOAD_MODES = ("auto", "never", "always")
REFIT_TOKENS = 8192  # calibration tokens (queries) that the least-squares value refit uses


def check_offload_mode(offload: str) -> None:
    if offload not in OFFLOAD_MODES:
        raise TransMLAError(f"--calib-offload {offload!r} is not one of {', '.join(OFFLOAD_MODES)}")


def hidden_buffer(shape: tuple[int, int, int], device: torch.device, offload: str = "auto",
                  scratch_dir: Path | None = None) -> torch.Tensor:
    """An uninitialised float32 [N, T, h] buffer for the calibration hidden states.

    On `device` when it fits in half of what is free there; otherwise (or with offload="always") in a
    memory-mapped file under `scratch_dir` (default: the system's temporary folder). The file is unlinked at once,
    so the kernel frees it when the process ends, however it ends. offload="never" keeps it on `device`.
    """
    check_offload_mode(offload)
    numel = shape[0] * shape[1] * shape[2]
    if offload == "never" or (offload == "auto" and 4 * numel <= free_memory(device) // 2):
        return torch.empty(shape, dtype=torch.float32, device=device)
    if offload == "auto" and device.type != "cpu" and 4 * numel <= free_memory(torch.device("cpu")) // 2:
        return torch.empty(shape, dtype=torch.float32)
    folder = Path(scratch_dir or tempfile.gettempdir())
    if shutil.disk_usage(folder).free < 4 * numel:
        raise TransMLAError(f"the calibration hidden states ({4 * numel / 2**30:.1f} GiB) fit neither in memory nor in "
                            f"the free space of {folder}; lower --calib-samples or --calib-seq-len")
    fd, path = tempfile.mkstemp(prefix=".transmla-calibration-", suffix=".f32", dir=folder)
    try:
        os.ftruncate(fd, 4 * numel)
        buffer = torch.from_file(path, shared=True, size=numel, dtype=torch.float32)
    except OSError as exc:
        raise TransMLAError(f"cannot offload {4 * numel / 2**30:.1f} GiB of calibration hidden states to {folder} "
                            f"({exc.strerror or exc}); free space there or lower --calib-samples") from exc
    finally:
        os.close(fd)
        os.unlink(path)
    return buffer.view(shape)


def free_memory(device: torch.device) -> int:
    """Bytes available for new allocations on `device`."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


class LayerwiseRunner:
    """Holds the hidden states entering one decoder layer and advances them through converted layers."""

    def __init__(self, tensors: TensorSource, config: Any, input_ids: torch.LongTensor, inv_freq: torch.Tensor,
                 scaling: float, device: str | torch.device = "cpu", chunk_tokens: int = 4096,
                 offload: str = "auto", scratch_dir: Path | None = None) -> None:
        self.tensors, self.config, self.device = tensors, config, torch.device(device)
        self.inv_freq, self.scaling = inv_freq, scaling
        self.eps = float(config.rms_norm_eps)
        self.samples, self.length = input_ids.shape
        self.batch = max(1, chunk_tokens // self.length)
        embed = tensors.get("model.embed_tokens.weight")  # source dtype: only the looked-up rows become float32
        shape = (self.samples, self.length, embed.shape[1])
        self.hidden = hidden_buffer(shape, self.device, offload, scratch_dir)  # [N, T, h]
        for start in range(0, self.samples, self.batch):
            self.hidden[start:start + self.batch] = embed[input_ids[start:start + self.batch].to(embed.device)].float()
        del embed
        self.cos, self.sin = rope_tables(inv_freq, self.length, scaling, self.device)
        self.mask = causal_mask(self.length, self.device)
        # The value refit solves (R+1)-wide least squares per group: REFIT_TOKENS queries are ample.
        self.refit_samples = max(1, min(self.samples, REFIT_TOKENS // self.length))

    def norm_weight(self, layer: int, name: str = "input_layernorm") -> torch.Tensor:
        return self.tensors.get(f"model.layers.{layer}.{name}.weight", torch.float32).to(self.device)

    def chunks(self, layer: int, limit: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """(sample slice, normalised attention input x [B, T, h]) over the calibration batch."""
        weight = self.norm_weight(layer)
        stop = self.samples if limit is None else min(limit, self.samples)
        for start in range(0, stop, self.batch):
            rows = slice(start, min(start + self.batch, stop))
            yield rows, rms_norm(self.hidden[rows].to(self.device), weight, self.eps)

    @torch.no_grad()
    def statistics(self, layer: int, src: SourceAttention) -> LayerStats:
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
        for _, x in self.chunks(layer):
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
                        samples: int | None = None) -> float:
        """Mean squared difference between the source's and a converted attention's outputs (after o_proj) on
        the current inputs of the first `samples` calibration sequences: the layer's local calibration loss."""
        module = self.converted_layer(layer, attention, rank, rope_inv_freq).self_attn
        src32 = _to(src, torch.float32, self.device)
        from .modeling.modeling_transmla import build_masks

        total, count = 0.0, 0
        for _, x in self.chunks(layer, samples):
            _, out = source_attention_probs(src32, src32.inputs(x), self.cos, self.sin, self.mask)
            ref = F.linear(out, src32.o, None)
            bsz, length, _ = x.shape
            pos = torch.arange(length, device=self.device)[None].expand(bsz, -1)
            mask, key_mask = build_masks(None, bsz, length, length, self.device)
            got = module(x, pos, mask, key_mask, None)
            if o_bias is not None:
                got = got - o_bias.to(got)
            total += float((got - ref).double().pow(2).sum())
            count += bsz * length
        return total / count

    @torch.no_grad()
    def refit_values(self, layer: int, src: SourceAttention, attention: dict[str, torch.Tensor], rank: int,
                     rope_inv_freq: list[float], rel: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        """Least-squares value up-projection under the converted layer's own attention weights.

        Head h of group g outputs A_g cbar_h + b_g with cbar_h = sum_s phat_h(t, s) c_s (phat: the converted
        scores); A_g, b_g minimise sum_{h in g} w_h |A_g cbar_h + b_g - o_h|^2 against the source head outputs
        o_h, w_h = |W_o,h|_F^2 / d. Returns W_UV [G*d, R] and the o_proj bias sum_h W_o,h b_g(h).
        """
        d, heads, groups = src.head_dim, src.heads, src.groups
        src32 = _to(src, torch.float32, self.device)
        gh = src.group_of_head.to(self.device)
        o_heads = src.o.view(src.o.shape[0], heads, d).permute(1, 0, 2)
        w = (o_heads.pow(2).sum(dim=(1, 2)) / d).to(self.device, torch.float64)
        gram = torch.zeros(groups, rank + 1, rank + 1, dtype=torch.float64, device=self.device)
        cross = torch.zeros(groups, d, rank + 1, dtype=torch.float64, device=self.device)
        latent_attn = LatentAttention(attention, rank, rope_inv_freq, self.scaling, heads, groups, d, self.device)
        for _, x in self.chunks(layer, self.refit_samples):
            z = src32.inputs(x)
            _, out = source_attention_probs(src32, z, self.cos, self.sin, self.mask)
            q_in, kv_in = (z, z) if src32.pre is None else src32.pre.split(z)
            probs, latent = latent_attn.probs(q_in, kv_in, self.mask)
            cbar = (probs @ latent[:, None]).double()  # [B, H, T, R]
            cbar = torch.cat([cbar, torch.ones_like(cbar[..., :1])], dim=-1)
            target = out.view(*out.shape[:2], heads, d).transpose(1, 2).double()  # [B, H, T, d]
            gram.index_add_(0, gh, torch.einsum("h,bhtr,bhts->hrs", w, cbar, cbar))
            cross.index_add_(0, gh, torch.einsum("h,bhtd,bhtr->hdr", w, target, cbar))
        reg = rel * gram.diagonal(dim1=1, dim2=2)[:, :-1].mean(-1)
        eye = torch.eye(rank + 1, dtype=gram.dtype, device=gram.device)
        eye[-1, -1] = 0
        sol = torch.linalg.solve(gram + reg[:, None, None] * eye, cross.transpose(1, 2)).transpose(1, 2)  # [G, d, R+1]
        up_value, bias = sol[..., :-1].reshape(groups * d, rank), sol[..., -1]
        o_bias = torch.einsum("hxd,hd->x", o_heads.to(bias), bias[gh])
        return up_value, o_bias

    @torch.no_grad()
    def advance_source(self, layer: int, src: SourceAttention, o_bias: torch.Tensor | None) -> None:
        """Run the source's own layer l on the hidden states (for a pass that only measures)."""
        from transformers.activations import ACT2FN

        src32 = _to(src, torch.float32, self.device)
        prefix = f"model.layers.{layer}."
        get = lambda n: self.tensors.get(prefix + n, torch.float32).to(self.device) if self.tensors.has(prefix + n) else None  # noqa: E731
        post = get("post_attention_layernorm.weight")
        gate, up, down = get("mlp.gate_proj.weight"), get("mlp.up_proj.weight"), get("mlp.down_proj.weight")
        gate_b, up_b, down_b = get("mlp.gate_proj.bias"), get("mlp.up_proj.bias"), get("mlp.down_proj.bias")
        act = ACT2FN[self.config.hidden_act]
        ob = None if o_bias is None else o_bias.to(self.device, torch.float32)
        for rows, x in self.chunks(layer):
            _, out = source_attention_probs(src32, src32.inputs(x), self.cos, self.sin, self.mask)
            hidden = self.hidden[rows].to(self.device) + F.linear(out, src32.o, ob)
            y = rms_norm(hidden, post, self.eps)
            mlp = F.linear(act(F.linear(y, gate, gate_b)) * F.linear(y, up, up_b), down, down_b)
            self.hidden[rows] = (hidden + mlp).to(self.hidden.device)

    def residual_energy(self) -> float:
        """Mean squared norm of the hidden states entering the current layer."""
        total = sum(float(self.hidden[i:i + self.batch].double().pow(2).sum()) for i in range(0, self.samples, self.batch))
        return total / (self.samples * self.length)

    def converted_layer(self, layer: int, attention: dict[str, torch.Tensor], rank: int, rope_inv_freq: list[float]):
        from .modeling.configuration_transmla import TransMLAConfig
        from .modeling.modeling_transmla import TransMLADecoderLayer

        cfg = self.config
        geo_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // geo_heads
        config = TransMLAConfig(
            vocab_size=1, bos_token_id=None, eos_token_id=None, pad_token_id=None, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=1,
            num_attention_heads=geo_heads, num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or geo_heads,
            head_dim=head_dim, kv_lora_rank=[rank], qk_rope_head_dim=2 * len(rope_inv_freq),
            rope_inv_freq=[rope_inv_freq], rope_attention_scaling=self.scaling, hidden_act=cfg.hidden_act,
            rms_norm_eps=cfg.rms_norm_eps, attention_bias="q_proj.bias" in attention or "kv_a_proj.bias" in attention,
            attention_out_bias="o_proj.bias" in attention, mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            qk_norm="q_norm.weight" in attention, pre_proj_bias="pre_q_proj.bias" in attention,
        )
        module = TransMLADecoderLayer(config, 0)
        state = {f"self_attn.{k}": v.float() for k, v in attention.items()}
        prefix = f"model.layers.{layer}."
        for key in self.tensors.keys():
            if key.startswith(prefix) and ".self_attn." not in key:
                state[key[len(prefix):]] = self.tensors.get(key, torch.float32)
        module.load_state_dict(state, strict=True)
        return module.to(self.device).eval()

    def _run(self, module: Any, hidden: torch.Tensor) -> torch.Tensor:
        from .modeling.modeling_transmla import build_masks

        bsz, length, _ = hidden.shape
        pos = torch.arange(length, device=self.device)[None].expand(bsz, -1)
        mask, key_mask = build_masks(None, bsz, length, length, self.device)
        return module(hidden, pos, mask, key_mask, None)


class LatentAttention:
    """The scores of a converted attention layer (docs/format.md), computed directly to expose its weights."""

    def __init__(self, attention: dict[str, torch.Tensor], rank: int, rope_inv_freq: list[float], scaling: float,
                 heads: int, groups: int, head_dim: int, device: torch.device) -> None:
        get = lambda k: attention[k].to(device, torch.float32) if k in attention else None  # noqa: E731
        self.q_w, self.q_b, self.a_w, self.a_b = get("q_proj.weight"), get("q_proj.bias"), get("kv_a_proj.weight"), get("kv_a_proj.bias")
        self.b_w = get("kv_b_proj.weight")
        self.rank, self.rope_dim = rank, 2 * len(rope_inv_freq)
        self.heads, self.groups, self.d = heads, groups, head_dim
        self.inv_freq = torch.tensor(rope_inv_freq, dtype=torch.float64)
        self.scaling, self.device = scaling, device

    def probs(self, x: torch.Tensor, kv_x: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention weights [B, H, T, T] and the latent [B, T, R]; q_proj reads x, kv_a_proj `kv_x` (default x)."""
        bsz, length, _ = x.shape
        d, D = self.d, self.rope_dim
        q = F.linear(x, self.q_w, self.q_b).view(bsz, length, self.heads, d + D).transpose(1, 2)
        q_nope, q_rope = q.split([d, D], dim=-1)
        kv_x = x if kv_x is None else kv_x
        latent, k_rope = F.linear(kv_x, self.a_w, self.a_b).split([self.rank, D], dim=-1)
        cos, sin = rope_tables(self.inv_freq, length, self.scaling, x.device)
        q_rope, k_rope = rotate(q_rope, cos, sin), rotate(k_rope, cos, sin)
        k_nope = F.linear(latent, self.b_w).view(bsz, length, self.groups, 2 * d)[..., :d].transpose(1, 2)
        scores = grouped_scores(q_nope, k_nope).add_(q_rope @ k_rope[:, None].transpose(-1, -2))  # the rotary key is shared
        mask = causal_mask(length, x.device) if mask is None else mask
        return scores.mul_(d**-0.5).add_(mask).softmax(-1), latent


def _to(src: SourceAttention, dtype: torch.dtype, device: torch.device) -> SourceAttention:
    return src.to(device, dtype)
