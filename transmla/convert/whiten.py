r"""Covariance-aware factorisation of the position-free keys and the values into one latent.

Notation of `latent`: z = W_z x (the components that lost their rotation), v = W_v x, and the latent
c = W_down x with [z; v] ~= [A_z; A_v] c. Instead of the error in the weights, minimise the error where it acts.

**Keys** enter the scores: head h adds scale * q_h^T E_g(h) (z - A_z c) to its score, where E_g maps the
position-free components to head g (`assemble`) and q_h is the position-free query. Over queries independent
of the keys, the mean-square score error is tr(M_z e e^T) with M_z = scale^2 sum_h E_g^T E[q_h q_h^T] E_g.
Softmax ignores a shift that is the same for every key of a query, so the key error is taken about the mean:
E[e e^T] = (W_z - A_z W_down) S_z (...)^T with S_z a centred input covariance.

**Values** enter the output through o_proj after the attention average: head h adds W_o,h (W_v,g - A_v,g W_down)
xbar_h, xbar_h = sum_s p_h(t, s) x_s. Its mean part is a constant that o_proj's bias can absorb, so the error is
tr(M_v E S_v E^T) with M_v = blockdiag_g(sum_{h in g} W_o,h^T W_o,h) and S_v the centred covariance of xbar.

**One right covariance** (S_z = S_v = S): minimise ||M^{1/2} (B - A W_down) S^{1/2}||_F with B = [W_z; W_v],
M = blockdiag(lambda M_z, M_v). With the SVD M^{1/2} B S^{1/2} = U Sigma V^T (CARE), the optimum is
W_down = U_R^T M^{1/2} B and A = M^{-1/2} U_R: then M^{1/2} A W_down S^{1/2} = U_R U_R^T M^{1/2} B S^{1/2}, the
truncated SVD (Eckart-Young). At R = rank(B) the factorisation is exact for any positive M and S.

**Two right covariances.** For fixed W_down each part's best up-projection is a least-squares refit,
A_p = B_p S_p W_down^T (W_down S_p W_down^T)^{-1} (independent of M_p). For fixed A the stationarity condition
sum_p K_p W_down S_p = F (K_p = A_p^T M_p A_p, F = sum_p A_p^T M_p B_p S_p) is a two-term Sylvester equation:
with Y = K_1^{1/2} W_down S_1^{1/2}, Y + K' Y S' = K_1^{-1/2} F S_1^{-1/2}, K' = K_1^{-1/2} K_2 K_1^{-1/2},
S' = S_1^{-1/2} S_2 S_1^{-1/2}; in the eigenbases of K' (a) and S' (b) it is solved entrywise by dividing by
1 + k_a s_b. Alternating the two steps never increases the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .latent import LatentFactors, fix_signs


def psd_power(mat: torch.Tensor, power: float, rel_eps: float = 1e-10) -> torch.Tensor:
    """mat^power of a symmetric PSD matrix, eigenvalues floored at rel_eps * the largest."""
    mat = (mat + mat.T) / 2
    vals, vecs = torch.linalg.eigh(mat)
    floor = rel_eps * vals.abs().max().clamp_min(1e-300)
    return (vecs * vals.clamp_min(floor).pow(power)) @ vecs.T


# Calibration moments are sums of float32 products: eigenvalues below this share of the largest are noise.
COVARIANCE_FLOOR = 1e-6


def floored(cov: torch.Tensor, rel: float = COVARIANCE_FLOOR) -> torch.Tensor:
    """cov with its eigenvalues raised to at least rel * the largest: symmetric positive definite, and no
    direction that the estimate can not resolve is trusted more than rel of the strongest."""
    cov = (cov + cov.T) / 2
    vals, vecs = torch.linalg.eigh(cov)
    floor = rel * vals.max().clamp_min(1e-300)
    return (vecs * vals.clamp_min(floor)) @ vecs.T


def ridge(mat: torch.Tensor, rel: float) -> torch.Tensor:
    """mat + rel * mean(diag) * I."""
    return mat + rel * mat.diagonal().mean().clamp_min(1e-300) * torch.eye(mat.shape[0], dtype=mat.dtype, device=mat.device)


@dataclass
class WeightedProblem:
    """min sum_p ||M_p^{1/2} (B_p - A_p W_down) S_p^{1/2}||^2 over W_down [R, h] and A_p; parts p = key, value."""

    key: torch.Tensor  # B_z [Z, h]
    value: torch.Tensor  # B_v [V, h]
    key_weight: torch.Tensor  # M_z [Z, Z]
    value_weight: torch.Tensor  # M_v [V, V]
    key_cov: torch.Tensor  # S_z [h, h]
    value_cov: torch.Tensor  # S_v [h, h]

    def parts(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [(self.key, self.key_weight, self.key_cov), (self.value, self.value_weight, self.value_cov)]

    def loss(self, factors: LatentFactors) -> list[float]:
        out = []
        for (b, m, s), a in zip(self.parts(), (factors.up_key, factors.up_value)):
            e = b - a @ factors.down
            out.append(float(torch.einsum("ij,jk,ik->", m @ e, s, e)) if e.numel() else 0.0)
        return out


def top_left_singular(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and squared singular values of a wide matrix, descending, from its Gram matrix."""
    gram = mat @ mat.T
    vals, vecs = torch.linalg.eigh((gram + gram.T) / 2)
    return vecs.flip(-1), vals.flip(-1).clamp_min(0)


def weighted_spectrum(problem: WeightedProblem, common_cov: torch.Tensor | None = None, rel: float = 1e-9) -> torch.Tensor:
    """Squared singular values of M^{1/2} B S^{1/2}: the loss left by rank R is the sum of those beyond R."""
    stacked = torch.cat([problem.key, problem.value])
    m_half = torch.block_diag(*(_block_sqrt(w)[0] for w in (problem.key_weight, problem.value_weight) if w.numel()))
    s = problem.key_cov if common_cov is None else common_cov
    limit = min(stacked.shape)
    return top_left_singular(m_half @ stacked @ psd_power(ridge(s, rel), 0.5))[1][:limit]


def refit_up(b: torch.Tensor, down: torch.Tensor, cov: torch.Tensor, rel: float = 1e-9) -> torch.Tensor:
    """argmin_A ||(B - A W_down) S^{1/2}||: B S W^T (W S W^T)^{-1}."""
    gram = ridge(down @ cov @ down.T, rel)
    return torch.linalg.solve(gram, down @ cov @ b.T).T


def _block_sqrt(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return psd_power(weight, 0.5), psd_power(weight, -0.5)


def weighted_latent(problem: WeightedProblem, rank: int, common_cov: torch.Tensor | None = None,
                    iterations: int = 0, rel: float = 1e-9) -> LatentFactors:
    """CARE-style SVD of M^{1/2} B S^{1/2} with S = common_cov (default: the key covariance), then `iterations`
    alternating refinements of the two-covariance objective (see the module docstring)."""
    z = problem.key.shape[0]
    stacked = torch.cat([problem.key, problem.value])
    m_half = torch.block_diag(*(_block_sqrt(w)[0] for w in (problem.key_weight, problem.value_weight) if w.numel()))
    m_inv_half = torch.block_diag(*(_block_sqrt(w)[1] for w in (problem.key_weight, problem.value_weight) if w.numel()))
    s = problem.key_cov if common_cov is None else common_cov
    s_half = psd_power(ridge(s, rel), 0.5)
    weighted = m_half @ stacked
    u = fix_signs(top_left_singular(weighted @ s_half)[0][:, :rank])
    down = u.T @ weighted
    up = m_inv_half @ u
    factors = LatentFactors(down=down, up_key=up[:z], up_value=up[z:])
    if rank >= min(stacked.shape):
        # A full latent: the SVD is exact for every input (no loss left to refine). Least-squares steps would
        # only be fixed on the span of the calibration inputs and could lose exactness off it.
        return _normalise(factors, problem)
    for _ in range(iterations):
        factors = _refit(problem, factors.down, rel)
        factors = LatentFactors(down=_solve_down(problem, factors, rel), up_key=factors.up_key, up_value=factors.up_value)
    if iterations or common_cov is not None:
        factors = _refit(problem, factors.down, rel)
    return _normalise(factors, problem)


def _refit(problem: WeightedProblem, down: torch.Tensor, rel: float) -> LatentFactors:
    ups = [refit_up(b, down, ridge(s, rel), rel) if b.shape[0] else b.new_zeros(0, down.shape[0]) for b, _, s in problem.parts()]
    return LatentFactors(down=down, up_key=ups[0], up_value=ups[1])


def _solve_down(problem: WeightedProblem, factors: LatentFactors, rel: float) -> torch.Tensor:
    """The W_down that minimises the two-part loss for fixed A (two-term Sylvester equation)."""
    terms = []
    for (b, m, s), a in zip(problem.parts(), (factors.up_key, factors.up_value)):
        if b.shape[0]:
            terms.append((a.T @ m @ a, ridge(s, rel), a.T @ m @ b @ ridge(s, rel)))
    if len(terms) == 1:
        k, s, f = terms[0]
        return torch.linalg.solve(ridge(k, rel), torch.linalg.solve(s, f.T).T)
    (k1, s1, f1), (k2, s2, f2) = terms
    k1, k2 = ridge(k1, rel), ridge(k2, rel)
    k1_ih, s1_ih = psd_power(k1, -0.5), psd_power(s1, -0.5)
    kv, kq = torch.linalg.eigh(k1_ih @ k2 @ k1_ih)
    sv, sq = torch.linalg.eigh(s1_ih @ s2 @ s1_ih)
    rhs = kq.T @ (k1_ih @ (f1 + f2) @ s1_ih) @ sq
    y = kq @ (rhs / (1 + kv.clamp_min(0)[:, None] * sv.clamp_min(0)[None])) @ sq.T
    return k1_ih @ y @ s1_ih


def _normalise(factors: LatentFactors, problem: WeightedProblem) -> LatentFactors:
    """Rescale latent coordinates to unit energy over the inputs (harmless; keeps the cached values well scaled
    for low-precision storage)."""
    energy = torch.einsum("rh,hx,rx->r", factors.down, problem.key_cov, factors.down)
    energy = energy.clamp_min(1e-12 * float(energy.max().clamp_min(1e-30))).sqrt()
    scale = 1 / energy
    return LatentFactors(down=factors.down * scale[:, None], up_key=factors.up_key / scale, up_value=factors.up_value / scale)
