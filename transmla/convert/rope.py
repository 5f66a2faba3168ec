r"""Moving RoPE into a small rotary key shared by all heads: one planner for every selection.

Notation (one layer, as in `attention`): G key heads of width d, H query heads, query head h reads key head
g(h). RoPE in the rotate-half layout turns dims (i, i + d/2) of every head at frequency theta_i, i < d/2. Write
k_g^i and q_h^i for these 2-vectors and R_i(t) for the 2x2 rotation by t * theta_i. The score is

    s_h(t, s) = sum_i (R_i(t) q_h^i) . (R_i(s) k_g(h)^i) = sum_i q_h^i . R_i(s - t) k_g(h)^i.

**Mixing key heads per frequency.** For each frequency take an orthogonal G x G matrix U_i and new key
components k'_ij = sum_g U_i[j, g] k_g^i. U_i mixes heads, not the two dims of a pair, so it commutes with
R_i, and since U_i^T U_i = I:

    q_h^i . R_i k_g^i = sum_j (U_i[j, g] q_h^i) . R_i k'_ij.                                          (1)

Each component (i, j) is one 2-dim rotary key shared by *all* query heads, query head h seeing it through
the query U_i[j, g(h)] q_h^i. Keeping every (i, j) gives a shared rotary key of G*d dims and reproduces the
scores exactly. A budget of D dims keeps D/2 components; each dropped one loses its rotation (R_i -> I in (1))
and is then a plain, position-free key that joins the latent (see `latent`).

**Which components to keep.** U_i diagonalises the key energy of frequency i, C_i = sum_pair E[k^i k^i^T]
(G x G, summed over both dims of the pair; from the weights alone E[x x^T] = I), so that the energy lands in
the first components (TransMLA's RoRoPE). Dropping the rotation of (i, j) changes a score by
q . (R_i(Delta) - I) k', whose mean square over distances Delta in [0, L] is about
|q_ij|^2 |k'_ij|^2 * 2 (1 - sin(theta_i L) / (theta_i L)): low frequencies barely rotate over a context and cost
almost nothing to drop. The components with the largest such cost are kept, so a high frequency may keep
several components and a low one none. L (`--rope-context`) defaults to 16: attention weight sits mostly on
nearby tokens, so short distances are the ones that matter. Weights-only on SmolLM2-135M (R=320, D=64,
perplexity on 2 windows of the WikiText-2 validation text, original 13.8): L = 4096: 376, 256: 209, 64: 110,
16: 69.8, 4: 69.8. Calibrated methods replace this prior by the measured attention distances (the query shrink below).

**Frequency folding** (TransMLA's freqfold f). Frequencies are grouped into blocks of f adjacent ones; a block
b has n_b = f*G two-dim key components k_g^i (i in b, g a key head) and one invertible n_b x n_b mixing U_b,
k'_bj = sum_(i,g) U_b[j, (i, g)] k_g^i, with W_b = U_b^{-1}, so k_g^i = sum_j W_b[(i, g), j] k'_bj. The score of
head h is then sum_b sum_j sum_(i in b) W_b[(i, g(h)), j] q_h^i . R_i k'_bj. A kept component turns at one
frequency for the whole block (exact for f = 1), its query being sum_i W_b[(i, g), j] q_h^i.

**Selection.** `rotate`: U_b from the eigenvectors of the key energy of the block (RoRoPE; f = 1 keeps the
components with the largest drop cost over all frequencies, f > 1 keeps f per block as TransMLA does). `norm`
(MHA2MLA's 2-norm rule): no mixing, keep the (frequency, head) components with the largest
sum_h |q_h^i| |k_g^i|. `high-freq` and `uniform`: no mixing, fixed frequency patterns.

**Query shrink.** A dropped component keeps the product q . R(-Delta theta) k without its rotation. With
attention weights p over distances Delta = t - s, the best position-free stand-in in the mean-square sense
(for q, k isotropic in the pair plane) is q . M k with M = E_p[R(-Delta theta)] = [[c, s], [-s, c]],
c = E_p cos(Delta theta), s = E_p sin(Delta theta). Folding M^T into the query of head h at frequency i costs
nothing at run time. Its mean-square error is |q|^2 |k|^2 (1 - c^2 - s^2) / 2, against |q|^2 |k|^2 (1 - c)
for M = I (no shrink): high frequencies, whose average rotation is about zero, are better dropped than frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention import SourceAttention, pair_blocks

ROPE_SELECTIONS = ("rotate", "norm", "high-freq", "uniform")


def drop_cost_weight(inv_freq: torch.Tensor, context: int) -> torch.Tensor:
    """Mean over distances in [0, context] of |R(Delta theta) - I|^2 / |x|^2 = 2 (1 - cos(Delta theta))."""
    x = inv_freq * context
    return 2.0 * (1.0 - torch.where(x > 1e-6, torch.sin(x) / x, 1.0 - x * x / 6))


@dataclass
class RopeStats:
    """Second moments that the rotary choice needs, for one layer.

    key_cov: [d/2, G, d/2, G], sum over both pair dims of E[k_g^i k_g'^i'] (the key energy across frequencies);
    query_energy: [d/2, H], E|q_h^i|^2; shrink: [H, d/2, 2] attention-weighted (E cos, E sin) of the
    distance rotation, or None (then taken uniform over `context` tokens, and no shrink is applied).
    """

    key_cov: torch.Tensor
    query_energy: torch.Tensor
    shrink: torch.Tensor | None = None
    context: int = 4096


@dataclass
class RopePlan:
    """Blocks of frequencies, their mixings U_b, the kept components and the dropped components' query shrink."""

    blocks: list[list[int]]
    mixing: list[torch.Tensor]  # U_b [n_b, n_b]; column (l, g) = l * G + g for the l-th frequency of the block
    kept: list[tuple[int, int]]  # (block, component), in the order of the rotary key
    kept_inv_freq: list[float]
    shrink: torch.Tensor | None = None  # [H, d/2, 2], applied to the position-free query
    cost: list[torch.Tensor] | None = None  # per block: each component's mean-square score loss if dropped

    def dropped_cost(self) -> float:
        """Mean-square score loss (summed over heads, before the 1/sqrt(d) scale) of the dropped rotations."""
        return sum(float(self.cost[b][j]) for b, j in self.dropped()) if self.cost is not None else 0.0

    def dropped(self) -> list[tuple[int, int]]:
        kept = set(self.kept)
        return [(b, j) for b, u in enumerate(self.mixing) for j in range(u.shape[0]) if (b, j) not in kept]


@dataclass
class RotarySplit:
    """The rotary parts and the position-free key rows W_z of one layer."""

    q_rope: torch.Tensor  # [H, D, h]
    q_rope_bias: torch.Tensor | None  # [H, D]
    k_rope: torch.Tensor  # [D, h]
    k_rope_bias: torch.Tensor | None  # [D]
    key_nope: torch.Tensor  # [G*d - D, h]: rows (i, j, pair dim) of the dropped components
    nope_to_heads: torch.Tensor  # [G, d, G*d - D]: E_g


def rope_stats(src: SourceAttention, second: torch.Tensor | None = None, mean: torch.Tensor | None = None,
               shrink: torch.Tensor | None = None, context: int = 4096) -> RopeStats:
    """Key and query energies from the input second moment E[x x^T] (identity: weights only) and mean."""
    d, groups = src.head_dim, src.groups
    k = pair_blocks(src.k, groups, d)  # [d/2, 2, G, h]
    q = pair_blocks(src.q, src.heads, d)  # [d/2, 2, H, h]
    c = second if second is not None else torch.eye(src.k.shape[1], dtype=src.k.dtype, device=src.k.device)
    key_cov = torch.einsum("imgh,hx,jmfx->igjf", k, c, k)
    query = torch.einsum("imgh,hx,imgx->ig", q, c, q)
    if src.k_bias is not None:
        kb = pair_blocks(src.k_bias, groups, d)  # [d/2, 2, G]
        km = torch.einsum("imgh,h->img", k, mean) if mean is not None else torch.zeros_like(kb)
        key_cov = key_cov + torch.einsum("img,jmf->igjf", km, kb) + torch.einsum("img,jmf->igjf", kb, km)
        key_cov = key_cov + torch.einsum("img,jmf->igjf", kb, kb)
    if src.q_bias is not None:
        qb = pair_blocks(src.q_bias, src.heads, d)
        qm = torch.einsum("imgh,h->img", q, mean) if mean is not None else torch.zeros_like(qb)
        query = query + (2 * qm * qb + qb * qb).sum(1)
    return RopeStats(key_cov=key_cov, query_energy=query, shrink=shrink, context=context)


def _eig_rows(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors as rows sorted by decreasing eigenvalue (deterministic signs) and the eigenvalues."""
    energy, vectors = torch.linalg.eigh(cov)
    energy, vectors = energy.flip(-1).clamp_min(0), vectors.flip(-1)
    rows = vectors.transpose(-1, -2)
    idx = rows.abs().argmax(-1, keepdim=True)
    return rows * torch.sign(torch.gather(rows, -1, idx)), energy


def drop_loss(stats: RopeStats, inv_freq: torch.Tensor) -> torch.Tensor:
    """[H, d/2]: mean-square score loss of dropping a unit component's rotation, per |q|^2 |k|^2."""
    heads = stats.query_energy.shape[1]
    if stats.shrink is None:
        return (drop_cost_weight(inv_freq, stats.context) / 2)[None].expand(heads, -1)
    c, s = stats.shrink.unbind(-1)
    return (1 - c * c - s * s).clamp_min(0) / 2


def plan_rope(stats: RopeStats, inv_freq: torch.Tensor, rope_dim: int, groups: int, group_of_head: torch.Tensor,
                selection: str = "rotate", freqfold: int = 1, per_frequency: bool = False) -> RopePlan:
    """The rotary plan of one layer for `selection` (see the module docstring); the options were checked up front
    (`ConvertOptions.check`)."""
    half = inv_freq.numel()
    n_keep = rope_dim // 2
    dtype, device = stats.key_cov.dtype, stats.key_cov.device
    loss = drop_loss(stats, inv_freq).to(dtype)  # [H, d/2]
    # Query energy seen per key head and frequency, weighted by the loss of dropping it: [d/2, G].
    q_loss = torch.zeros(half, groups, dtype=dtype, device=device)
    q_loss.index_add_(1, group_of_head.to(device), (stats.query_energy * loss.T))
    shrink = stats.shrink

    if selection == "rotate":
        blocks = [list(range(b * freqfold, (b + 1) * freqfold)) for b in range(half // freqfold)]
        mixing, cost = [], []
        for block in blocks:
            cov = stats.key_cov[block][:, :, block].reshape(len(block) * groups, len(block) * groups)
            rows, energy = _eig_rows(cov)
            mixing.append(rows)
            seen = (rows**2 @ q_loss[block].reshape(-1))  # query-loss weight seen by each component
            cost.append(energy * seen)
        if per_frequency:
            kept = [(i, int(torch.argmax(cost[i]))) for i in range(n_keep)]
            kept_freq = [float(inv_freq[i]) for i, _ in kept]
        elif freqfold == 1:
            flat = [(float(c), b, j) for b, cb in enumerate(cost) for j, c in enumerate(cb.tolist())]
            order = sorted(range(len(flat)), key=lambda k: (-flat[k][0], k))
            kept = sorted((flat[k][1], flat[k][2]) for k in order[:n_keep])
            kept_freq = [float(inv_freq[blocks[b][0]]) for b, _ in kept]
        else:
            # TransMLA: the f strongest components of each block, turning at the block's frequencies in order.
            per_block = n_keep // len(blocks)
            extra = n_keep - per_block * len(blocks)
            kept, kept_freq = [], []
            for b, block in enumerate(blocks):
                take = per_block + (1 if b < extra else 0)
                for j in range(take):
                    kept.append((b, j))
                    kept_freq.append(float(inv_freq[block[min(j, len(block) - 1)]]))
        return RopePlan(blocks, mixing, kept, kept_freq, shrink, cost)

    eye = torch.eye(groups, dtype=dtype, device=device)
    blocks = [[i] for i in range(half)]
    mixing = [eye.clone() for _ in blocks]
    if selection == "norm":
        n = half * groups
        k_norm = stats.key_cov.reshape(n, n).diagonal().view(half, groups).clamp_min(0).sqrt()
        q_norm = torch.zeros(half, groups, dtype=dtype, device=device)
        q_norm.index_add_(1, group_of_head.to(device), stats.query_energy.clamp_min(0).sqrt())
        score = (k_norm * q_norm).flatten()
        order = sorted(range(score.numel()), key=lambda k: (-float(score[k]), k))
        chosen = order[:n_keep]
    elif selection == "high-freq":
        chosen = list(range(n_keep))  # (i, g) in frequency order: the highest frequencies first
    else:  # uniform: evenly spaced frequencies, every head
        n_freq = math.ceil(n_keep / groups)
        freqs = [round(k * half / n_freq) for k in range(n_freq)]
        chosen = [i * groups + g for i in freqs for g in range(groups)][:n_keep]
    kept = sorted((k // groups, k % groups) for k in chosen)
    n = half * groups
    energy = stats.key_cov.reshape(n, n).diagonal().view(half, groups).clamp_min(0)
    cost = list(energy * q_loss)
    return RopePlan(blocks, mixing, kept, [float(inv_freq[b]) for b, _ in kept], shrink, cost)


def split_rotary(src: SourceAttention, plan: RopePlan) -> tuple[RotarySplit, torch.Tensor, torch.Tensor | None]:
    """The rotary parts, the position-free key rows and the position-free query weight and bias (shrunk)."""
    d, half, groups, heads = src.head_dim, src.head_dim // 2, src.groups, src.heads
    hidden = src.k.shape[1]
    gh = src.group_of_head
    k_blocks = pair_blocks(src.k, groups, d)  # [d/2, 2, G, h]
    q_blocks = pair_blocks(src.q, heads, d)  # [d/2, 2, H, h]
    kb_blocks = pair_blocks(src.k_bias, groups, d) if src.k_bias is not None else None
    qb_blocks = pair_blocks(src.q_bias, heads, d) if src.q_bias is not None else None

    mixed, mixed_bias, unmix = [], [], []
    for block, u in zip(plan.blocks, plan.mixing):
        u = u.to(src.k.dtype)
        n = len(block) * groups
        kb = k_blocks[block].permute(1, 0, 2, 3).reshape(2, n, hidden)  # [2, (l, g), h]
        mixed.append(torch.einsum("jc,mch->mjh", u, kb))
        if kb_blocks is not None:
            mixed_bias.append(torch.einsum("jc,mc->mj", u, kb_blocks[block].permute(1, 0, 2).reshape(2, n)))
        unmix.append(torch.linalg.inv(u))  # W_b [(l, g), j]

    def query_of(b: int, j: int, source: torch.Tensor) -> torch.Tensor:
        """sum_l W_b[(l, g(h)), j] q_h^{i_l}: [2, H, ...] from source [d/2, 2, H, ...]."""
        w = unmix[b][:, j].view(len(plan.blocks[b]), groups)[:, gh]  # [f, H]
        src_b = source[plan.blocks[b]]  # [f, 2, H, ...]
        return torch.einsum("lh,lmh...->mh...", w, src_b)

    k_rope = torch.cat([torch.stack([mixed[b][m, j] for b, j in plan.kept]) for m in (0, 1)])
    q_parts = [query_of(b, j, q_blocks) for b, j in plan.kept]  # each [2, H, h]
    q_rope = torch.cat([torch.stack([p[m] for p in q_parts], dim=1) for m in (0, 1)], dim=1)
    k_rope_bias = q_rope_bias = None
    if kb_blocks is not None:
        k_rope_bias = torch.cat([torch.stack([mixed_bias[b][m, j] for b, j in plan.kept]) for m in (0, 1)])
    if qb_blocks is not None:
        qb_parts = [query_of(b, j, qb_blocks) for b, j in plan.kept]  # each [2, H]
        q_rope_bias = torch.cat([torch.stack([p[m] for p in qb_parts], dim=1) for m in (0, 1)], dim=1)

    rows = [(b, j, m) for b, j in plan.dropped() for m in (0, 1)]
    key_nope = torch.stack([mixed[b][m, j] for b, j, m in rows]) if rows else src.k.new_zeros(0, hidden)
    nope_to_heads = src.k.new_zeros(groups, d, len(rows))
    for col, (b, j, m) in enumerate(rows):
        w = unmix[b][:, j].view(len(plan.blocks[b]), groups)  # [f, G]
        for l, i in enumerate(plan.blocks[b]):
            nope_to_heads[:, m * half + i, col] = w[l]

    q_nope, q_nope_bias = src.q, src.q_bias
    if plan.shrink is not None:
        q_nope = shrink_query(src.q, plan.shrink, heads, d)
        if src.q_bias is not None:
            q_nope_bias = shrink_query(src.q_bias[:, None], plan.shrink, heads, d)[:, 0]
    split = RotarySplit(q_rope, q_rope_bias, k_rope, k_rope_bias, key_nope, nope_to_heads)
    return split, q_nope, q_nope_bias


def shrink_query(q: torch.Tensor, shrink: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Apply M^T per head and frequency to query rows [H*d, ...]: (a, b) -> (c a - s b, s a + c b)."""
    half = head_dim // 2
    w = q.reshape(heads, 2, half, -1)
    c, s = (t.to(q.dtype)[..., None] for t in shrink.unbind(-1))  # [H, d/2, 1]
    a, b = w[:, 0], w[:, 1]
    return torch.stack([c * a - s * b, s * a + c * b], dim=1).reshape(q.shape)
