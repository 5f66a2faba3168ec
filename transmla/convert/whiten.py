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

from dataclasses import dataclass, field
from typing import Any

import torch

from .attention import SourceAttention
from .latent import LatentFactors, fix_signs
from .statistics import LayerStats

# Calibration moments are sums of float32 products: eigenvalues below this share of the largest are noise.
COVARIANCE_FLOOR = 1e-6


def psd_power(mat: torch.Tensor, power: float, rel_eps: float = 1e-10) -> torch.Tensor:
    """mat^power of a symmetric PSD matrix, eigenvalues floored at rel_eps * the largest."""
    return Spd.of(mat).power(power, rel_eps)


@dataclass
class Spd:
    """A symmetric positive semi-definite matrix held as its eigendecomposition, so that its powers, floors and
    ridges (the same eigenvectors) cost no further decomposition."""

    vals: torch.Tensor  # ascending
    vecs: torch.Tensor
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, mat: torch.Tensor) -> "Spd":
        vals, vecs = torch.linalg.eigh((mat + mat.T) / 2)
        return cls(vals, vecs)

    def matrix(self) -> torch.Tensor:
        if "matrix" not in self._memo:
            self._memo["matrix"] = (self.vecs * self.vals) @ self.vecs.T
        return self._memo["matrix"]

    def power(self, power: float, rel_eps: float = 1e-10) -> torch.Tensor:
        key = ("power", power, rel_eps)
        if key not in self._memo:
            floor = rel_eps * self.vals.abs().max().clamp_min(1e-300)
            self._memo[key] = (self.vecs * self.vals.clamp_min(floor).pow(power)) @ self.vecs.T
        return self._memo[key]

    def floored(self, rel: float = COVARIANCE_FLOOR) -> "Spd":
        """Eigenvalues raised to at least rel * the largest: positive definite, and no direction that the estimate
        can not resolve is trusted more than rel of the strongest."""
        return Spd(self.vals.clamp_min(rel * self.vals.max().clamp_min(1e-300)), self.vecs)

    def ridged(self, rel: float) -> "Spd":
        """+ rel * mean(diag) * I (the mean eigenvalue is the mean diagonal), memoised."""
        key = ("ridged", rel)
        if key not in self._memo:
            self._memo[key] = Spd(self.vals + rel * self.vals.mean().clamp_min(1e-300), self.vecs)
        return self._memo[key]

    def whitened(self, other: "Spd") -> tuple[torch.Tensor, torch.Tensor]:
        """Eigendecomposition of self^{-1/2} other self^{-1/2} (memoised per `other`)."""
        key = ("whitened", id(other))
        if key not in self._memo:
            inv_half = self.power(-0.5)
            vals, vecs = torch.linalg.eigh(_sym(inv_half @ other.matrix() @ inv_half))
            self._memo[key] = (other, vals, vecs)  # `other` kept so that its id stays its own
        return self._memo[key][1], self._memo[key][2]


def _sym(mat: torch.Tensor) -> torch.Tensor:
    return (mat + mat.T) / 2


def floored(cov: torch.Tensor, rel: float = COVARIANCE_FLOOR) -> Spd:
    """cov with its eigenvalues raised to at least rel * the largest (see `Spd.floored`)."""
    return Spd.of(cov).floored(rel)


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
    key_cov: Spd  # S_z [h, h]
    value_cov: Spd  # S_v [h, h]

    def parts(self) -> list[tuple[torch.Tensor, torch.Tensor, Spd]]:
        return [(self.key, self.key_weight, self.key_cov), (self.value, self.value_weight, self.value_cov)]

    def loss(self, factors: LatentFactors) -> list[float]:
        out = []
        for (b, m, s), a in zip(self.parts(), (factors.up_key, factors.up_value)):
            e = b - a @ factors.down
            out.append(float(torch.einsum("ij,jk,ik->", m @ e, s.matrix(), e)) if e.numel() else 0.0)
        return out

    def weight_roots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """M^{1/2} and M^{-1/2} of the block-diagonal weight blockdiag(M_z, M_v)."""
        roots = [Spd.of(w) for w in (self.key_weight, self.value_weight) if w.numel()]
        return torch.block_diag(*(r.power(0.5) for r in roots)), torch.block_diag(*(r.power(-0.5) for r in roots))


def top_left_singular(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and squared singular values of a wide matrix, descending, from its Gram matrix."""
    gram = mat @ mat.T
    vals, vecs = torch.linalg.eigh((gram + gram.T) / 2)
    return vecs.flip(-1), vals.flip(-1).clamp_min(0)


def weighted_spectrum(problem: WeightedProblem, common_cov: Spd | None = None, rel: float = 1e-9) -> torch.Tensor:
    """Squared singular values of M^{1/2} B S^{1/2}: the loss left by rank R is the sum of those beyond R."""
    stacked = torch.cat([problem.key, problem.value])
    m_half, _ = problem.weight_roots()
    s = problem.key_cov if common_cov is None else common_cov
    limit = min(stacked.shape)
    return top_left_singular(m_half @ stacked @ s.ridged(rel).power(0.5))[1][:limit]


def spd_solve(mat: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """mat^-1 rhs for (batches of) symmetric positive definite mat, by Cholesky. (Batched LU solves of float64
    systems fail at random on 2 CPU threads with torch 2.13's MKL: "Pivots given to lu_solve must all be greater
    or equal to 1".)"""
    factor, info = torch.linalg.cholesky_ex(mat)
    if bool(info.any()):
        return torch.linalg.lstsq(mat, rhs).solution
    return torch.cholesky_solve(rhs, factor)


def refit_up(b: torch.Tensor, down: torch.Tensor, cov: torch.Tensor, rel: float = 1e-9) -> torch.Tensor:
    """argmin_A ||(B - A W_down) S^{1/2}||: B S W^T (W S W^T)^{-1}."""
    gram = ridge(down @ cov @ down.T, rel)
    return torch.linalg.solve(gram, down @ cov @ b.T).T


def weighted_latent(problem: WeightedProblem, rank: int, common_cov: Spd | None = None,
                    iterations: int = 0, rel: float = 1e-9) -> LatentFactors:
    """CARE-style SVD of M^{1/2} B S^{1/2} with S = common_cov (default: the key covariance), then `iterations`
    alternating refinements of the two-covariance objective (see the module docstring)."""
    z = problem.key.shape[0]
    stacked = torch.cat([problem.key, problem.value])
    m_half, m_inv_half = problem.weight_roots()
    s = problem.key_cov if common_cov is None else common_cov
    weighted = m_half @ stacked
    u = fix_signs(top_left_singular(weighted @ s.ridged(rel).power(0.5))[0][:, :rank])
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
    ups = [refit_up(b, down, s.ridged(rel).matrix(), rel) if b.shape[0] else b.new_zeros(0, down.shape[0])
           for b, _, s in problem.parts()]
    return LatentFactors(down=down, up_key=ups[0], up_value=ups[1])


def _solve_down(problem: WeightedProblem, factors: LatentFactors, rel: float) -> torch.Tensor:
    """The W_down that minimises the two-part loss for fixed A (two-term Sylvester equation)."""
    terms = []
    for (b, m, s), a in zip(problem.parts(), (factors.up_key, factors.up_value)):
        if b.shape[0]:
            ridged = s.ridged(rel)
            terms.append((a.T @ m @ a, ridged, a.T @ m @ b @ ridged.matrix()))
    if len(terms) == 1:
        k, s, f = terms[0]
        return torch.linalg.solve(ridge(k, rel), torch.linalg.solve(s.matrix(), f.T).T)
    (k1, s1, f1), (k2, s2, f2) = terms
    k1, k2 = ridge(k1, rel), ridge(k2, rel)
    k1_ih, s1_ih = psd_power(k1, -0.5), s1.power(-0.5)
    kv, kq = torch.linalg.eigh(_sym(k1_ih @ k2 @ k1_ih))
    sv, sq = s1.whitened(s2)
    rhs = kq.T @ (k1_ih @ (f1 + f2) @ s1_ih) @ sq
    y = kq @ (rhs / (1 + kv.clamp_min(0)[:, None] * sv.clamp_min(0)[None])) @ sq.T
    return k1_ih @ y @ s1_ih


def _normalise(factors: LatentFactors, problem: WeightedProblem) -> LatentFactors:
    """Rescale latent coordinates to unit energy over the inputs (harmless; keeps the cached values well scaled
    for low-precision storage)."""
    energy = torch.einsum("rh,hx,rx->r", factors.down, problem.key_cov.matrix(), factors.down)
    energy = energy.clamp_min(1e-12 * float(energy.max().clamp_min(1e-30))).sqrt()
    scale = 1 / energy
    return LatentFactors(down=factors.down * scale[:, None], up_key=factors.up_key / scale, up_value=factors.up_value / scale)


# -- the weighted problem of one layer ------------------------------------------------------------------------


def head_blocks(o: torch.Tensor, heads: int) -> torch.Tensor:
    """o_proj [hidden, H*d] as per-head blocks [H, hidden, d]."""
    return o.view(o.shape[0], heads, -1).permute(1, 0, 2)


def key_weight_matrix(q_nope: torch.Tensor, q_bias: torch.Tensor | None, nope_to_heads: torch.Tensor,
                      second: torch.Tensor, mean: torch.Tensor, src: SourceAttention) -> torch.Tensor:
    """M_z = scale^2 sum_h E_g^T E[q_h q_h^T] E_g over the position-free key components (scale^2 = 1 / d, or the
    family's own softmax scale squared)."""
    d, heads = src.head_dim, src.heads
    qh = q_nope.view(heads, d, -1)
    qq = torch.einsum("hdx,xy,hey->hde", qh, second, qh)
    if q_bias is not None:
        b = q_bias.view(heads, d)
        qm = torch.einsum("hdx,x->hd", qh, mean)
        qq = qq + torch.einsum("hd,he->hde", qm, b) + torch.einsum("hd,he->hde", b, qm) + torch.einsum("hd,he->hde", b, b)
    e = nope_to_heads[src.group_of_head]  # [H, d, Z]
    return torch.einsum("hdz,hde,hew->zw", e, qq, e) / src.score_scale_divisor


def value_weight_matrix(src: SourceAttention) -> torch.Tensor:
    """M_v = blockdiag_g sum_{h in g} W_o,h^T W_o,h."""
    o = head_blocks(src.o, src.heads)  # [H, hidden, d]
    per_head = torch.einsum("hxd,hxe->hde", o, o)
    blocks = torch.zeros(src.groups, src.head_dim, src.head_dim, dtype=o.dtype, device=o.device)
    blocks.index_add_(0, src.group_of_head.to(o.device), per_head)
    return torch.block_diag(*blocks)


def whiten_problem(src: SourceAttention, stats: LayerStats, nope_to_heads: torch.Tensor, key_nope: torch.Tensor,
                   q_nope: torch.Tensor, q_nope_bias: torch.Tensor | None, settings: Any) -> WeightedProblem:
    """The layer's problem: key error weighted by the position-free queries (times `settings.score_weight`), value
    error through o_proj, about the means where o_proj's bias absorbs them (`settings.output_bias`)."""
    dt = src.k.dtype
    second, mean = stats.second.to(dt), stats.mean.to(dt)
    key_w = key_weight_matrix(q_nope, q_nope_bias, nope_to_heads, second, mean, src)
    value_w = value_weight_matrix(src)
    token_cov = stats.memo(("token_cov", dt), lambda: floored(stats.cov.to(dt)))
    # with an output bias to absorb it the mean value error costs nothing (centred moments); without, it counts
    value_cov = stats.memo(("value_cov", dt, settings.output_bias),
                           lambda: floored((stats.value_cov() if settings.output_bias else stats.value_second).to(dt)))
    return WeightedProblem(key_nope, src.v, settings.score_weight * key_w, value_w, token_cov, value_cov)
