"""Absorbed MLA decode attention: a Triton split-K kernel and its PyTorch reference.

This file is self-contained (it imports only torch, and triton when present) because it is copied into every
converted checkpoint folder next to ``modeling_transmla.py``.

In the absorbed form every query head attends directly over the cached latent ``c`` (width R) and the shared
rotated RoPE key (width D)::

    score_h(i, s) = scale * (q_lat_h(i) . c(s) + q_rope_h(i) . k_rope(s))
    o_lat_h(i)    = sum_s softmax_s(score_h(i, .)) c(s)

The Q query positions are the last Q of the T cached positions; query i sees keys 0 .. T - Q + i (only the last
``window`` of them in a sliding-window layer), further restricted by ``key_mask``. A query row that may see no key
at all returns zeros (never NaN). With ``softcap`` c the scaled scores become c * tanh(score / c) before the mask;
the Triton kernel does not cap, so capped attention runs the reference.
"""

from __future__ import annotations

import contextlib
import math

import torch

try:  # triton is optional: without it (or without CUDA) everything runs through the reference
    import triton
    import triton.language as tl

    try:
        from triton.runtime.errors import OutOfResources as _OutOfResources
    except ImportError:  # pragma: no cover - older or newer triton layouts
        _OutOfResources = RuntimeError
    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _OutOfResources = RuntimeError
    _HAS_TRITON = False

__all__ = ["mla_decode_attention", "mla_decode_reference", "triton_available"]

_LOG2E = 1.4426950408889634
_MAX_TRITON_Q = 16
_MAX_TRITON_R = 512
_MAX_TRITON_D = 256


def triton_available() -> bool:
    """True when the Triton kernel can run here (triton importable and a CUDA device present)."""
    return _HAS_TRITON and torch.cuda.is_available()


def _check_shapes(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    key_mask: torch.Tensor | None,
) -> tuple[int, int, int, int, int, int]:
    if q_lat.dim() != 4 or q_rope.dim() != 4 or latent.dim() != 3 or k_rope.dim() != 3:
        raise ValueError("expected q_lat [B,H,Q,R], q_rope [B,H,Q,D], latent [B,T,R], k_rope [B,T,D]")
    B, H, Q, R = q_lat.shape
    T = latent.shape[1]
    D = q_rope.shape[-1]
    if tuple(q_rope.shape[:3]) != (B, H, Q):
        raise ValueError(f"q_rope shape {tuple(q_rope.shape)} does not match q_lat {tuple(q_lat.shape)}")
    if tuple(latent.shape) != (B, T, R):
        raise ValueError(f"latent shape {tuple(latent.shape)} does not match [B={B}, T, R={R}]")
    if tuple(k_rope.shape) != (B, T, D):
        raise ValueError(f"k_rope shape {tuple(k_rope.shape)} does not match [B={B}, T={T}, D={D}]")
    if key_mask is not None and tuple(key_mask.shape) != (B, T):
        raise ValueError(f"key_mask shape {tuple(key_mask.shape)} does not match [B={B}, T={T}]")
    if Q > T:
        raise ValueError(f"{Q} queries but only {T} cached keys (the queries must be the last Q keys)")
    return B, H, Q, T, R, D


def mla_decode_reference(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Absorbed MLA attention in plain PyTorch, computed in float32 (float64 for float64 inputs).

    Shapes as in :func:`mla_decode_attention`. Rows that may attend no key return zeros.
    """
    B, H, Q, T, R, D = _check_shapes(q_lat, q_rope, latent, k_rope, key_mask)
    f = torch.float64 if q_lat.dtype == torch.float64 else torch.float32
    lat = latent.to(f)
    scores = torch.einsum("bhqr,btr->bhqt", q_lat.to(f), lat)
    if D > 0:
        scores = scores + torch.einsum("bhqd,btd->bhqt", q_rope.to(f), k_rope.to(f))
    scores = scores * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)

    pos = torch.arange(T, device=latent.device)
    limit = T - Q + torch.arange(Q, device=latent.device)
    allowed = pos[None, :] <= limit[:, None]  # [Q, T] causal among the queries
    if window is not None:
        allowed = allowed & (pos[None, :] > limit[:, None] - window)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask.to(device=latent.device, dtype=torch.bool)[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))

    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # fully masked rows: exp(-inf) = 0 below
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.einsum("bhqt,btr->bhqr", p, lat)
    out = out / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.to(q_lat.dtype)


if _HAS_TRITON:

    @triton.jit
    def _mla_decode_split_kernel(
        QL, QR, LAT, KR, MASK, OUT, LSE,
        s_qlb, s_qlh, s_qlq,
        s_qrb, s_qrh, s_qrq,
        s_lb, s_lt,
        s_kb, s_kt,
        s_mb,
        s_ob, s_os, s_or,
        s_eb, s_es,
        T, HQ, tokens_per_split, qk_scale, WINDOW,
        Q: tl.constexpr,
        R: tl.constexpr,
        D: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_MASK: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        WRITE_LSE: tl.constexpr,
    ):
        """One program: a block of (head, query) rows of one sequence over one split of its keys.

        Writes the split's normalised partial output (or the final output when there is a single split)
        and, for the combine step, the split's log2-sum-exp2 per row.
        """
        pid_h = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)

        rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # row = h * Q + i
        row_ok = rows < HQ
        h = rows // Q
        qi = rows % Q
        limit = T - Q + qi  # last key each row may see (causal among the queries)

        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        r_ok = offs_r < R
        d_ok = offs_d < D

        ql = tl.load(
            QL + b * s_qlb + h[:, None] * s_qlh + qi[:, None] * s_qlq + offs_r[None, :],
            mask=row_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        qr = tl.load(
            QR + b * s_qrb + h[:, None] * s_qrh + qi[:, None] * s_qrq + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )

        t_start = pid_s * tokens_per_split
        t_end = tl.minimum(t_start + tokens_per_split, T)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)

        lat_base = LAT + b * s_lb
        kr_base = KR + b * s_kb
        # every split runs the same trip count; the last one masks what lies past T
        for i in range(0, tokens_per_split, BLOCK_T):
            offs_t = t_start + i + tl.arange(0, BLOCK_T)
            t_ok = offs_t < t_end
            lat = tl.load(
                lat_base + offs_t[:, None] * s_lt + offs_r[None, :],
                mask=t_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            kr = tl.load(
                kr_base + offs_t[:, None] * s_kt + offs_d[None, :],
                mask=t_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            qk = tl.dot(ql, tl.trans(lat))
            qk = tl.dot(qr, tl.trans(kr), acc=qk)
            qk = qk * qk_scale  # log2 domain

            allowed = t_ok[None, :] & (offs_t[None, :] <= limit[:, None])
            if HAS_WINDOW:
                allowed = allowed & (offs_t[None, :] > limit[:, None] - WINDOW)
            if HAS_MASK:
                km = tl.load(MASK + b * s_mb + offs_t, mask=t_ok, other=0)
                allowed = allowed & (km != 0)[None, :]
            qk = tl.where(allowed, qk, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            # rows that have seen no allowed key yet keep m = -inf; shift them by 0 so exp2 gives 0, not NaN
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_shift)
            p = tl.exp2(qk - m_shift[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(lat.dtype), lat, acc=acc)
            m_i = m_new

        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        tl.store(
            OUT + b * s_ob + pid_s * s_os + rows[:, None] * s_or + offs_r[None, :],
            out.to(OUT.dtype.element_ty),
            mask=row_ok[:, None] & r_ok[None, :],
        )
        if WRITE_LSE:
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(LSE + b * s_eb + pid_s * s_es + rows, lse, mask=row_ok)

    @triton.jit
    def _mla_decode_combine_kernel(
        PO, LSE, OUT,
        s_pb, s_ps, s_pr,
        s_eb, s_es,
        s_ob, s_or,
        S,
        R: tl.constexpr,
        BLOCK_RC: tl.constexpr,
        CHUNK_S: tl.constexpr,
    ):
        """Merge the splits of one (row, column chunk, sequence) by their log2-sum-exp2 weights."""
        row = tl.program_id(0)
        pid_r = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_r = pid_r * BLOCK_RC + tl.arange(0, BLOCK_RC)
        r_ok = offs_r < R
        offs_s = tl.arange(0, CHUNK_S)
        lse_base = LSE + b * s_eb + row
        po_base = PO + b * s_pb + row * s_pr

        # running max, denominator and sum, kept as [BLOCK_RC] vectors (all columns share the same values)
        m = tl.full([BLOCK_RC], float("-inf"), dtype=tl.float32)
        denom = tl.zeros([BLOCK_RC], dtype=tl.float32)
        acc = tl.zeros([BLOCK_RC], dtype=tl.float32)
        for s0 in range(0, S, CHUNK_S):
            sc = s0 + offs_s
            s_ok = sc < S
            lse = tl.load(lse_base + sc * s_es, mask=s_ok, other=float("-inf"))
            o = tl.load(po_base + sc[:, None] * s_ps + offs_r[None, :], mask=s_ok[:, None] & r_ok[None, :], other=0.0)
            m_new = tl.maximum(m, tl.max(lse, axis=0))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_shift)
            w = tl.exp2(lse[:, None] - m_shift[None, :])
            denom = denom * alpha + tl.sum(w, axis=0)
            acc = acc * alpha + tl.sum(w * o, axis=0)
            m = m_new
        out = acc / tl.where(denom > 0.0, denom, 1.0)
        tl.store(OUT + b * s_ob + row * s_or + offs_r, out.to(OUT.dtype.element_ty), mask=r_ok)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _kernel_config(HQ: int, R: int, B: int = 64, num_sms: int = 132) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_T, num_warps, num_stages) for B sequences of HQ query rows and latent width R."""
    block_r = max(16, _next_pow2(R))
    max_rows = 32 if block_r >= 256 else 64  # the [BLOCK_H, BLOCK_R] float32 accumulator lives in registers
    if B * -(-HQ // max_rows) * 32 <= num_sms:
        max_rows = 16  # few sequences: more, lighter programs (the latent tile is then shared through L2)
    block_h = min(max(16, _next_pow2(HQ)), max_rows)
    return block_h, 64, 4, 3


def _choose_splits(T: int, programs_per_split: int, num_sms: int, block_t: int) -> int:
    """Split the keys so that one wave of programs (one per SM) covers the GPU; splits keep >= 2 blocks."""
    splits = max(1, num_sms // max(1, programs_per_split))
    return max(1, min(splits, T // (2 * block_t)))


# (device, BLOCK_H, BLOCK_R, BLOCK_D, BLOCK_T, warps, stages) -> (BLOCK_T, stages) that fits the device
_FITTING_CONFIG: dict[tuple, tuple[int, int]] = {}


def _mla_decode_triton(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float = 1.0,
    num_splits: int | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    block_h: int | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """The Triton split-K kernel; the tuning arguments override the built-in heuristics.

    When a configuration needs more shared memory than the device has, smaller tiles or fewer pipeline
    stages are tried, and as a last resort the reference runs.
    """
    B, H, Q, T, R, D = _check_shapes(q_lat, q_rope, latent, k_rope, key_mask)
    dtype = q_lat.dtype
    q_rope, latent, k_rope = (x.to(dtype) for x in (q_rope, latent, k_rope))
    q_lat, q_rope, latent, k_rope = (
        x if x.stride(-1) == 1 else x.contiguous() for x in (q_lat, q_rope, latent, k_rope)
    )
    HQ = H * Q
    out = torch.empty((B, H, Q, R), device=q_lat.device, dtype=dtype)
    if B == 0 or HQ == 0 or R == 0:
        return out

    num_sms = _sm_count(q_lat.device)
    bh, bt, nw, ns = _kernel_config(HQ, R, B, num_sms)
    block_h = block_h or bh
    num_warps = num_warps or nw
    block_r = max(16, _next_pow2(R))
    block_d = max(16, _next_pow2(D))
    n_hb = triton.cdiv(HQ, block_h)

    if key_mask is not None:
        mask = key_mask.to(device=q_lat.device, dtype=torch.bool)
        mask = mask.view(torch.uint8) if mask.stride(-1) == 1 else mask.contiguous().view(torch.uint8)
        s_mb = mask.stride(0)
    else:
        mask, s_mb = q_lat, 0  # never read

    key = (q_lat.device.index, block_h, block_r, block_d, block_t or bt, num_warps, num_stages or ns)
    if key in _FITTING_CONFIG:
        candidates = [_FITTING_CONFIG[key]]
    else:
        candidates = [(block_t or bt, num_stages or ns), (block_t or bt, 2), (32, 2), (16, 2), (16, 1)]
    for cand_t, cand_stages in dict.fromkeys(candidates):
        splits = num_splits or _choose_splits(T, B * n_hb, num_sms, cand_t)
        tokens_per_split = triton.cdiv(triton.cdiv(T, max(1, splits)), cand_t) * cand_t
        splits = triton.cdiv(T, tokens_per_split)
        direct = splits == 1
        if direct:
            po, lse = out, out  # lse never written
            s_ob, s_os, s_or = HQ * R, 0, R
            s_eb, s_es = 0, 0
        else:
            po = torch.empty((B, splits, HQ, R), device=q_lat.device, dtype=torch.float32)
            lse = torch.empty((B, splits, HQ), device=q_lat.device, dtype=torch.float32)
            s_ob, s_os, s_or = po.stride(0), po.stride(1), po.stride(2)
            s_eb, s_es = lse.stride(0), lse.stride(1)
        try:
            with torch.cuda.device(q_lat.device) if q_lat.is_cuda else contextlib.nullcontext():
                _mla_decode_split_kernel[(n_hb, splits, B)](
                    q_lat, q_rope, latent, k_rope, mask, po, lse,
                    q_lat.stride(0), q_lat.stride(1), q_lat.stride(2),
                    q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
                    latent.stride(0), latent.stride(1),
                    k_rope.stride(0), k_rope.stride(1),
                    s_mb,
                    s_ob, s_os, s_or,
                    s_eb, s_es,
                    T, HQ, tokens_per_split, float(scale) * _LOG2E, int(window or 0),
                    Q=Q, R=R, D=D,
                    BLOCK_H=block_h, BLOCK_T=cand_t, BLOCK_R=block_r, BLOCK_D=block_d,
                    HAS_MASK=key_mask is not None,
                    HAS_WINDOW=window is not None,
                    WRITE_LSE=not direct,
                    num_warps=num_warps,
                    num_stages=cand_stages,
                )
        except _OutOfResources:
            continue
        _FITTING_CONFIG[key] = (cand_t, cand_stages)
        break
    else:
        return mla_decode_reference(q_lat, q_rope, latent, k_rope, key_mask, scale, window=window)

    if not direct:
        # enough programs for two per SM, each reading up to 4096 partial values per step
        block_rc = block_r
        while block_rc > 128 and B * HQ * triton.cdiv(R, block_rc) < 2 * num_sms:
            block_rc //= 2
        chunk_s = max(1, min(_next_pow2(splits), 4096 // block_rc))
        with torch.cuda.device(q_lat.device) if q_lat.is_cuda else contextlib.nullcontext():
            _mla_decode_combine_kernel[(HQ, triton.cdiv(R, block_rc), B)](
                po, lse, out,
                po.stride(0), po.stride(1), po.stride(2),
                lse.stride(0), lse.stride(1),
                HQ * R, R,
                splits,
                R=R,
                BLOCK_RC=block_rc,
                CHUNK_S=chunk_s,
                num_warps=4,
                num_stages=2,
            )
    return out


def _use_triton(q_lat: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> bool:
    if not _HAS_TRITON or not q_lat.is_cuda:
        return False
    if q_lat.dtype not in (torch.bfloat16, torch.float16):
        return False
    if any(x.dtype != q_lat.dtype or x.device != q_lat.device for x in (q_rope, latent, k_rope)):
        return False
    Q, R, D = q_lat.shape[2], q_lat.shape[3], q_rope.shape[3]
    return 1 <= Q <= _MAX_TRITON_Q and 1 <= R <= _MAX_TRITON_R and D <= _MAX_TRITON_D


def mla_decode_attention(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Absorbed MLA attention of Q new queries over T cached keys (the queries are the last Q keys).

    Args:
        q_lat: [B, H, Q, R] queries multiplied by the key up-projection.
        q_rope: [B, H, Q, D] rotated query RoPE part.
        latent: [B, T, R] cached latents.
        k_rope: [B, T, D] cached rotated shared RoPE key.
        key_mask: [B, T] bool, True where a key may be attended, or None.
        scale: softmax scale.
        softcap: c of the score capping c * tanh(score / c), or None.
        window: sliding window (each query sees its last ``window`` keys), or None.

    Returns:
        o_lat [B, H, Q, R] in the dtype of ``q_lat`` (float32 accumulation). Rows that may attend no key
        are zeros.

    Runs the Triton kernel for CUDA bf16/fp16 inputs with Q <= 16 and R <= 512 and no soft-capping, else the
    PyTorch reference.
    """
    if softcap is None and _use_triton(q_lat, q_rope, latent, k_rope):
        return _mla_decode_triton(q_lat, q_rope, latent, k_rope, key_mask, scale, window=window)
    return mla_decode_reference(q_lat, q_rope, latent, k_rope, key_mask, scale, softcap, window)
