"""Absorbed MLA decode attention: the PyTorch reference against expanded attention, and the Triton kernel."""

from __future__ import annotations

import math

import pytest
import torch

from transmla.modeling.mla_decode import (
    _mla_decode_triton,
    mla_decode_attention,
    mla_decode_reference,
    triton_available,
)


def _left_pad_mask(lengths: list[int], T: int, device: str | torch.device = "cpu") -> torch.Tensor:
    pos = torch.arange(T, device=device)
    return pos[None, :] >= (T - torch.tensor(lengths, device=device))[:, None]


def _expanded_attention(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    c: torch.Tensor,
    k_rope: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Plain attention with keys and values expanded from the latent, one group per G heads (float64), scores
    capped at c * tanh(score / c) and keys cut to a sliding window where asked."""
    B, H, Q, d = q_nope.shape
    T = c.shape[1]
    G = w_uk.shape[0]
    k_nope = torch.einsum("btr,gdr->bgtd", c, w_uk)  # [B, G, T, d]
    v = torch.einsum("btr,gdr->bgtd", c, w_uv)
    group = torch.arange(H) // (H // G)
    k_nope, v = k_nope[:, group], v[:, group]  # [B, H, T, d]
    scores = scale * (q_nope @ k_nope.transpose(-1, -2) + q_rope @ k_rope[:, None].transpose(-1, -2))
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    position = (T - Q + torch.arange(Q))[:, None]
    allowed = torch.arange(T)[None, :] <= position
    if window is not None:
        allowed = allowed & (torch.arange(T)[None, :] > position - window)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # [B, H, Q, d]


def _random_case(B: int, H: int, G: int, Q: int, T: int, R: int, D: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q_nope = torch.randn(B, H, Q, d, generator=g, dtype=torch.float64)
    q_rope = torch.randn(B, H, Q, D, generator=g, dtype=torch.float64)
    c = torch.randn(B, T, R, generator=g, dtype=torch.float64)
    k_rope = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w_uk = torch.randn(G, d, R, generator=g, dtype=torch.float64) / math.sqrt(R)
    w_uv = torch.randn(G, d, R, generator=g, dtype=torch.float64) / math.sqrt(R)
    return q_nope, q_rope, c, k_rope, w_uk, w_uv


def _absorbed_vs_expanded(B: int, H: int, G: int, Q: int, T: int, key_mask: torch.Tensor | None, seed: int,
                          softcap: float | None = None, window: int | None = None) -> None:
    R, D, d = 48, 16, 32
    scale = d**-0.5
    q_nope, q_rope, c, k_rope, w_uk, w_uv = _random_case(B, H, G, Q, T, R, D, d, seed)
    expected = _expanded_attention(q_nope, q_rope, c, k_rope, w_uk, w_uv, key_mask, scale, softcap, window)

    group = torch.arange(H) // (H // G)
    q_lat = torch.einsum("bhqd,hdr->bhqr", q_nope, w_uk[group])  # W_UK_g^T q_nope_h
    f = torch.float32
    o_lat = mla_decode_attention(q_lat.to(f), q_rope.to(f), c.to(f), k_rope.to(f), key_mask, scale, softcap, window)
    assert o_lat.dtype == f and o_lat.shape == (B, H, Q, R)
    out = torch.einsum("bhqr,hdr->bhqd", o_lat.double(), w_uv[group])  # W_UV_g o_lat_h
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_reference_matches_expanded_attention() -> None:
    _absorbed_vs_expanded(B=2, H=8, G=2, Q=1, T=37, key_mask=None, seed=0)


def test_reference_left_padding() -> None:
    T = 29
    mask = _left_pad_mask([29, 17, 1], T)
    _absorbed_vs_expanded(B=3, H=6, G=3, Q=1, T=T, key_mask=mask, seed=1)


def test_reference_causal_queries() -> None:
    T = 23
    _absorbed_vs_expanded(B=2, H=4, G=1, Q=5, T=T, key_mask=None, seed=2)
    _absorbed_vs_expanded(B=2, H=4, G=2, Q=5, T=T, key_mask=_left_pad_mask([23, 11], T), seed=3)


@pytest.mark.parametrize("softcap, window", [(0.8, None), (None, 6), (1.5, 9)])
def test_reference_caps_scores_and_keeps_to_the_window(softcap: float | None, window: int | None) -> None:
    T = 31
    _absorbed_vs_expanded(B=2, H=4, G=2, Q=3, T=T, key_mask=_left_pad_mask([31, 12], T), seed=6, softcap=softcap,
                          window=window)


def test_fully_masked_rows_are_zero() -> None:
    B, H, Q, T, R, D = 2, 3, 2, 10, 16, 8
    g = torch.Generator().manual_seed(4)
    args = [torch.randn(*s, generator=g) for s in ((B, H, Q, R), (B, H, Q, D), (B, T, R), (B, T, D))]
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, -1] = True  # batch 0 keeps only the last key; batch 1 keeps none
    out = mla_decode_reference(*args, key_mask=mask, scale=0.3)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    assert (out[0, :, 0] == 0).all()  # query 0 sees keys up to T-2, all masked
    torch.testing.assert_close(out[0, :, 1], args[2][0, -1].expand(H, R))  # query 1 sees only key T-1


def test_dispatch_on_cpu_uses_reference() -> None:
    g = torch.Generator().manual_seed(5)
    args = [torch.randn(*s, generator=g).bfloat16() for s in ((2, 4, 1, 32), (2, 4, 1, 8), (2, 9, 32), (2, 9, 8))]
    out = mla_decode_attention(*args, scale=0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, mla_decode_reference(*args, scale=0.5))
    if not torch.cuda.is_available():
        assert not triton_available()


def test_shape_errors() -> None:
    q = torch.zeros(1, 2, 1, 8)
    with pytest.raises(ValueError):
        mla_decode_reference(q, torch.zeros(1, 2, 1, 4), torch.zeros(1, 5, 7), torch.zeros(1, 5, 4))
    with pytest.raises(ValueError):
        mla_decode_reference(
            torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 4), torch.zeros(1, 5, 8), torch.zeros(1, 5, 4)
        )


# --------------------------------------------------------------------------------------------- GPU

needs_triton = pytest.mark.skipif(not triton_available(), reason="needs CUDA and triton")


def _gpu_case(B: int, H: int, Q: int, T: int, R: int, D: int, dtype: torch.dtype, seed: int, pad: bool):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device="cuda") * std).to(dtype)

    q_lat = rnd(B, H, Q, R, std=R**-0.25 * 2)
    q_rope = rnd(B, H, Q, D)
    latent = rnd(B, T, R, std=R**-0.25)
    k_rope = rnd(B, T, D)
    mask = None
    if pad:
        lengths = torch.randint(Q, T + 1, (B,), generator=g, device="cuda").tolist()
        lengths[0] = T
        mask = _left_pad_mask(lengths, T, device="cuda")
    return q_lat, q_rope, latent, k_rope, mask


def _check_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    err = (out.float() - ref).norm() / ref.norm().clamp_min(1e-12)
    tol = 1.5e-2 if dtype == torch.bfloat16 else 4e-3
    assert err < tol, f"relative error {err:.2e}"
    assert (out.float() - ref).abs().max() < 20 * tol * ref.abs().max().clamp_min(1e-6)


GPU_SHAPES = [
    # B, H, Q, T, R
    (1, 32, 1, 4096, 512),
    (3, 32, 1, 1000, 512),  # T not a multiple of the block
    (2, 9, 1, 20, 320),  # T under one block, H not a power of two
    (4, 16, 1, 777, 320),
    (2, 128, 1, 300, 512),  # several head blocks
    (5, 12, 1, 513, 32),
    (2, 8, 4, 130, 512),  # causal queries
    (2, 9, 3, 65, 32),
]


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_triton_matches_reference(shape: tuple[int, ...], pad: bool, dtype: torch.dtype) -> None:
    B, H, Q, T, R = shape
    D = 64
    q_lat, q_rope, latent, k_rope, mask = _gpu_case(B, H, Q, T, R, D, dtype, seed=hash(shape) % 1000, pad=pad)
    scale = 0.125
    ref = mla_decode_reference(q_lat.float(), q_rope.float(), latent.float(), k_rope.float(), mask, scale)
    out = mla_decode_attention(q_lat, q_rope, latent, k_rope, mask, scale)
    _check_close(out, ref, dtype)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("num_splits", [None, 1, 7, 64])
@pytest.mark.parametrize("window", [1, 100, 4096])
def test_triton_keeps_to_a_sliding_window(window: int, num_splits: int | None) -> None:
    B, H, Q, T, R, D = 3, 16, 2, 5000, 512, 64
    q_lat, q_rope, latent, k_rope, mask = _gpu_case(B, H, Q, T, R, D, torch.bfloat16, seed=window, pad=True)
    ref = mla_decode_reference(q_lat.float(), q_rope.float(), latent.float(), k_rope.float(), mask, 0.1, window=window)
    out = _mla_decode_triton(q_lat, q_rope, latent, k_rope, mask, 0.1, num_splits=num_splits, window=window)
    _check_close(out, ref, torch.bfloat16)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("num_splits", [1, 2, 7, 64, 300])
def test_triton_split_counts(num_splits: int) -> None:
    B, H, Q, T, R, D = 3, 32, 1, 20000, 512, 64
    q_lat, q_rope, latent, k_rope, mask = _gpu_case(B, H, Q, T, R, D, torch.bfloat16, seed=num_splits, pad=True)
    mask[1, : T - 5] = False  # most splits of batch 1 see no key at all
    ref = mla_decode_reference(q_lat.float(), q_rope.float(), latent.float(), k_rope.float(), mask, 0.1)
    out = _mla_decode_triton(q_lat, q_rope, latent, k_rope, mask, 0.1, num_splits=num_splits)
    _check_close(out, ref, torch.bfloat16)


@pytest.mark.gpu
@needs_triton
def test_triton_fully_masked_rows_are_zero() -> None:
    B, H, Q, T, R, D = 2, 16, 2, 300, 128, 64
    q_lat, q_rope, latent, k_rope, _ = _gpu_case(B, H, Q, T, R, D, torch.bfloat16, seed=7, pad=False)
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    mask[1] = False
    ref = mla_decode_reference(q_lat.float(), q_rope.float(), latent.float(), k_rope.float(), mask, 0.1)
    for splits in (1, 4):
        out = _mla_decode_triton(q_lat, q_rope, latent, k_rope, mask, 0.1, num_splits=splits)
        assert torch.isfinite(out).all()
        assert (out[1] == 0).all()
        _check_close(out[:1], ref[:1], torch.bfloat16)


@pytest.mark.gpu
@needs_triton
def test_triton_falls_back_when_shared_memory_is_short() -> None:
    B, H, Q, T, R, D = 2, 32, 1, 3000, 512, 64
    q_lat, q_rope, latent, k_rope, mask = _gpu_case(B, H, Q, T, R, D, torch.bfloat16, seed=9, pad=True)
    ref = mla_decode_reference(q_lat.float(), q_rope.float(), latent.float(), k_rope.float(), mask, 0.1)
    out = _mla_decode_triton(q_lat, q_rope, latent, k_rope, mask, 0.1, block_t=128, num_stages=6)
    _check_close(out, ref, torch.bfloat16)


@pytest.mark.gpu
@needs_triton
def test_triton_strided_cache() -> None:
    """Latent and RoPE key as two views of one [B, T, R + D] cache buffer."""
    B, H, T, R, D = 2, 32, 1500, 512, 64
    g = torch.Generator(device="cuda").manual_seed(8)
    cache = (torch.randn(B, T, R + D, generator=g, device="cuda") * 0.2).bfloat16()
    latent, k_rope = cache[..., :R], cache[..., R:]
    q_lat = torch.randn(B, H, 1, R, generator=g, device="cuda").bfloat16()
    q_rope = torch.randn(B, H, 1, D, generator=g, device="cuda").bfloat16()
    ref = mla_decode_reference(q_lat.float(), q_rope.float(), latent.float(), k_rope.float(), None, 0.1)
    out = mla_decode_attention(q_lat, q_rope, latent, k_rope, None, 0.1)
    _check_close(out, ref, torch.bfloat16)
