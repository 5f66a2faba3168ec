r"""Joint low-rank factorisation of the position-free keys and the values into one latent.

After `rope` has split off the rotary key, each layer has a position-free key z = W_z x (G*d - D values:
the components that lost their rotation, each shared by all heads) and the values v = W_v x (G*d values).
MLA caches one latent c = W_down x of R values and recovers both from it:

    [z; v] ~= A c,   A = [A_z; A_v].

With B = [a W_z; W_v] (the key rows scaled by a, so that keys and values weigh alike: TransMLA's balanced
KV), the best rank-R approximation of B x over isotropic inputs is the truncated SVD B = U S V^T:
W_down = U_R^T B and A = diag(1/a, 1) U_R. At R = rank(B) the reconstruction is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch



@dataclass
class LatentFactors:
    """W_down [R, hidden], A_z [G*d - D, R], A_v [G*d, R]."""

    down: torch.Tensor
    up_key: torch.Tensor
    up_value: torch.Tensor


def max_latent_rank(hidden_size: int, key_rows: int, value_rows: int) -> int:
    """The largest useful latent width: the rank of [W_z; W_v] can not exceed either side."""
    return min(hidden_size, key_rows + value_rows)


def balance_scale(key: torch.Tensor, value: torch.Tensor) -> float:
    """a such that a W_z and W_v have the same Frobenius norm (1 if either is empty or zero)."""
    kn, vn = float(key.norm()), float(value.norm())
    return vn / kn if kn > 0 and vn > 0 else 1.0


def svd_latent(key: torch.Tensor, value: torch.Tensor, rank: int, key_scale: float | None = None) -> LatentFactors:
    """Truncated SVD of the balanced stack [a W_z; W_v] (float64)."""
    key, value = key.double(), value.double()
    a = balance_scale(key, value) if key_scale is None else key_scale
    stacked = torch.cat([a * key, value])
    u = fix_signs(left_singular_vectors(stacked)[:, :rank])
    down = u.T @ stacked
    return LatentFactors(down=down, up_key=u[: key.shape[0]] / a, up_value=u[key.shape[0] :])


def balanced_pca(key: torch.Tensor, value: torch.Tensor, second: torch.Tensor, rank: int) -> LatentFactors:
    """TransMLA's balanced-KV PCA: keys scaled so that their mean per-dim RMS output matches the values', then
    the top eigenvectors of the output second moment B E[x x^T] B^T."""
    rms = lambda w: torch.einsum("rh,hx,rx->r", w, second, w).clamp_min(0).sqrt().mean()  # noqa: E731
    a = float(rms(value) / rms(key)) if key.shape[0] and float(rms(key)) > 0 else 1.0
    stacked = torch.cat([a * key, value])
    energy = stacked @ second @ stacked.T
    vals, vecs = torch.linalg.eigh((energy + energy.T) / 2)
    u = fix_signs(vecs.flip(-1)[:, :rank])
    return LatentFactors(down=u.T @ stacked, up_key=u[: key.shape[0]] / a, up_value=u[key.shape[0] :])


def left_singular_vectors(matrix: torch.Tensor) -> torch.Tensor:
    """U of the SVD, columns by decreasing singular value. For a wide matrix the eigenvectors of the small Gram
    matrix M M^T are the same vectors and several times cheaper to get than a full SVD."""
    if matrix.shape[0] <= matrix.shape[1]:
        _, vectors = torch.linalg.eigh(matrix @ matrix.T)
        return vectors.flip(-1)
    return torch.linalg.svd(matrix, full_matrices=False)[0]


def fix_signs(u: torch.Tensor) -> torch.Tensor:
    """Deterministic SVD signs: the largest-magnitude entry of every column is positive."""
    idx = u.abs().argmax(0, keepdim=True)
    return u * torch.sign(torch.gather(u, 0, idx))
