"""compressor.mfac.sparsegpt against a brute-force sequential OBS in float64 (explicit inverse).

The oracle sweeps the columns one at a time with the explicit inverse Hinv of the damped Hessian,
downdated after every column (Hinv <- Hinv - Hinv[:, q] Hinv[q, :] / Hinv_qq on the columns left),
and chooses the masks with the rules written out plainly (Python sorts on (score, index)), the
score of column j being w_j^2 / d_j with d_j = [H^-1 downdated by the columns before j]_jj =
[(H[j:, j:])^-1]_00 (the Schur complement; no Cholesky factor anywhere). Everything is float64, so
masks and codes agree exactly and weights to rounding (1e-9 at the conditioning drawn here).
"""

from __future__ import annotations

import math

import pytest
import torch

from compressor.mfac.gptq import HessianAccumulator
from compressor.mfac.grid import dequantize, fit_grid, quantize
from compressor.mfac.sparsegpt import (
    NormAccumulator,
    QuantSpec,
    Tiles,
    input_norms_from,
    sparsegpt_prune,
    wanda_mask,
    wanda_scores,
)

F64 = torch.float64
TOL = 1e-9


# ---------------------------------------------------------------------- data


def layer(gen: torch.Generator, rows: int, cols: int, n: int, dead: int = 2):
    """(w (rows, cols), X (n, cols), H = 2 X^T X / n) float64: correlated inputs of uneven scales,
    ``dead`` input columns always 0."""
    mix = torch.eye(cols, dtype=F64) + torch.randn(cols, cols, generator=gen, dtype=F64) / cols**0.5
    scale = torch.rand(cols, generator=gen, dtype=F64) * 2 + 0.1
    x = torch.randn(n, cols, generator=gen, dtype=F64) @ mix * scale
    x[:, torch.randperm(cols, generator=gen)[:dead]] = 0.0
    w = torch.randn(rows, cols, generator=gen, dtype=F64)
    return w, x, 2 * x.T @ x / n


def prepared(w, h, damp=0.01):
    """The preprocessing, written out: dead inputs (H_jj = 0 -> 1, W[:, j] = 0), then damping."""
    w, h = w.clone(), h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=F64)
    return w, h


# ---------------------------------------------------------------------- the oracle


def lowest(scores: list[float], k: int) -> set[int]:
    """Indices of the k lowest scores, ties to the lower index."""
    return set(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:k])


def choose_run(s, keep, sparsity, tiles):
    """Prune in the (R, L) run with scores ``s``: unstructured or whole tiles (module doc), in place."""
    R, L = s.shape
    if tiles is None:
        flat = [(-math.inf if not keep[r, j] else float(s[r, j])) for r in range(R) for j in range(L)]
        for i in lowest(flat, round(sparsity * R * L)):
            keep[i // L, i % L] = False
        return
    tr, tc = tiles.rows, tiles.cols
    cells = [(a, b) for a in range(0, R, tr) for b in range(0, L, tc)]
    tile_scores = []
    for a, b in cells:
        part, alive = s[a : a + tr, b : b + tc], keep[a : a + tr, b : b + tc]
        tile_scores.append(-math.inf if not alive.any() else float(part[alive].sum()))
    cut = lowest(tile_scores, round(sparsity * len(cells)))
    for i, (a, b) in enumerate(cells):
        if i in cut:
            keep[a : a + tr, b : b + tc] = False


def obs_oracle(w, h, *, sparsity=None, mask_block=None, nm=None, tiles=None, mask=None, spec=None):
    """Sequential OBS pruning (and quantization) of ``w`` (R, n) under the damped ``h``: returns
    (final weights, keep-mask, codes, scales, zeros, loss)."""
    w, hinv = w.clone(), torch.linalg.inv(h)
    R, n = w.shape
    d = [torch.linalg.inv(h[j:, j:])[0, 0].item() for j in range(n)]
    keep = torch.ones(R, n, dtype=torch.bool) if mask is None else mask.clone()
    g = None if spec is None else (spec.group_size or n)
    sc = torch.ones(R, n // (g or n), dtype=torch.float32)
    zp = torch.zeros(R, n // (g or n), dtype=torch.int8)
    codes = torch.zeros(R, n, dtype=torch.int8)
    out = torch.empty(R, n, dtype=F64)
    loss = 0.0
    for q in range(n):
        assert hinv[q, q].item() == pytest.approx(d[q], rel=1e-10)
        if nm is None and q % mask_block == 0:
            cols = range(q, min(q + mask_block, n))
            s = torch.stack([w[:, j] ** 2 / d[j] for j in cols], dim=1)
            part = keep[:, q : q + len(cols)]
            choose_run(s, part, sparsity, tiles)
        if nm is not None and q % nm[1] == 0:
            for r in range(R):
                sr = [
                    -math.inf if not keep[r, j] else w[r, j].item() ** 2 / d[j] for j in range(q, q + nm[1])
                ]
                for i in lowest(sr, nm[1] - nm[0]):
                    keep[r, q + i] = False
        if spec is None:
            t = torch.where(keep[:, q], w[:, q], torch.zeros(R, dtype=F64))
        else:
            k = q // g
            if q % g == 0:
                sc[:, k], zp[:, k] = fit_grid(w[:, q : q + g], spec.bits, spec.symmetric, keep[:, q : q + g])
            c = quantize(w[:, q], sc[:, k], zp[:, k], spec.bits, spec.symmetric)
            codes[:, q] = torch.where(keep[:, q], c, zp[:, k])
            t = dequantize(codes[:, q], sc[:, k], zp[:, k]).to(F64)
        e, dq = w[:, q] - t, hinv[q, q]
        loss += float(e.square().sum() / dq / 2)
        rest = slice(q + 1, n)
        w[:, rest] -= (e / dq)[:, None] * hinv[q, rest][None, :]
        hinv[rest, rest] -= torch.outer(hinv[rest, q], hinv[q, rest]) / dq
        out[:, q] = t
    return out, keep, codes, sc, zp, loss


def check(res, ref, w0, h):
    """Same mask, weights to rounding, pruned weights 0, the loss the oracle's and (1/2) tr(D H D^T)."""
    out, keep, *_, loss = ref
    assert torch.equal(res.mask, keep)
    assert res.weight.dtype == F64
    assert (res.weight - out).abs().max().item() <= TOL * max(1.0, out.abs().max().item())
    assert torch.all(res.weight[~res.mask] == 0)
    assert res.error == pytest.approx(loss, rel=1e-8)
    D = w0 - res.weight
    assert res.error == pytest.approx(0.5 * float(torch.einsum("ri,ij,rj->", D, h, D)), rel=1e-8)


def existing_mask(gen, rows, cols, p=0.2):
    return torch.rand(rows, cols, generator=gen) > p


# ---------------------------------------------------------------------- SparseGPT


@pytest.mark.parametrize("block_size", [1, 5, 128])
@pytest.mark.parametrize("mask_block", [16, 7])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
@pytest.mark.parametrize("with_mask", [False, True])
def test_unstructured_matches_brute_force(gen, block_size, mask_block, sparsity, with_mask):
    rows, cols = 12, 44  # not a multiple of either mask block
    w, _, h = layer(gen, rows, cols, 3 * cols)
    mask = existing_mask(gen, rows, cols) if with_mask else None
    res = sparsegpt_prune(
        w.float(), h, sparsity=sparsity, block_size=block_size, mask_block=mask_block, mask=mask
    )
    w0, hd = prepared(w.float().to(F64), h)
    check(res, obs_oracle(w0, hd, sparsity=sparsity, mask_block=mask_block, mask=mask), w0, hd)
    assert res.quantized is None
    for b in range(0, cols, mask_block):  # exact per run (the existing mask stays below the target)
        part = res.mask[:, b : b + mask_block]
        had = 0 if mask is None else int((~mask[:, b : b + mask_block]).sum())
        assert int((~part).sum()) == max(round(sparsity * part.numel()), had)
        if mask is not None:
            assert not bool((part & ~mask[:, b : b + mask_block]).any())


@pytest.mark.parametrize("block_size", [1, 5, 128])
@pytest.mark.parametrize("nm", [(2, 4), (1, 3)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_nm_matches_brute_force(gen, block_size, nm, with_mask):
    rows, cols = 10, 48
    n, m = nm
    w, _, h = layer(gen, rows, cols, 2 * cols, dead=3)
    mask = existing_mask(gen, rows, cols, 0.4) if with_mask else None
    res = sparsegpt_prune(w, h, structure=nm, block_size=block_size, mask=mask)
    w0, hd = prepared(w, h)
    check(res, obs_oracle(w0, hd, nm=nm, mask=mask), w0, hd)
    pruned = (~res.mask).reshape(rows, cols // m, m).sum(dim=2)
    if mask is None:
        assert torch.all(pruned == m - n)
    else:  # counting the existing zeros: m - n, or all of them where they are more
        had = (~mask).reshape(rows, cols // m, m).sum(dim=2)
        assert torch.equal(pruned, torch.clamp(had, min=m - n))
        assert bool((had > m - n).any()) and not bool((res.mask & ~mask).any())
    # sparsity given as the pattern's own is accepted
    same = sparsegpt_prune(w, h, structure=nm, sparsity=(m - n) / m, block_size=block_size, mask=mask)
    assert torch.equal(same.mask, res.mask)


@pytest.mark.parametrize("block_size", [5, 128])
@pytest.mark.parametrize("with_mask", [False, True])
def test_tiles_match_brute_force(gen, block_size, with_mask):
    rows, cols, mb = 12, 44, 16
    tiles = Tiles(3, 4)
    w, _, h = layer(gen, rows, cols, 3 * cols)
    mask = None
    if with_mask:  # some whole tiles pruned already, and scattered zeros
        mask = existing_mask(gen, rows, cols, 0.1)
        mask[0:3, 4:8] = False
        mask[6:9, 36:40] = False
    res = sparsegpt_prune(
        w, h, sparsity=0.5, structure=tiles, block_size=block_size, mask_block=mb, mask=mask
    )
    w0, hd = prepared(w, h)
    check(res, obs_oracle(w0, hd, sparsity=0.5, mask_block=mb, tiles=tiles, mask=mask), w0, hd)
    cut = ~res.mask if mask is None else ~res.mask & mask  # pruned by the selection
    gone = (~res.mask).reshape(rows // 3, 3, cols // 4, 4).all(dim=3).all(dim=1)  # whole tiles pruned
    touched = cut.reshape(rows // 3, 3, cols // 4, 4).any(dim=3).any(dim=1)
    assert bool(gone[touched].all())  # the selection prunes whole tiles only
    for b in range(0, cols, mb):
        part = gone[:, b // 4 : (b + mb) // 4]
        if mask is None:
            assert int(part.sum()) == round(0.5 * part.numel())


@pytest.mark.parametrize("block_size", [1, 5, 128])
@pytest.mark.parametrize(
    ("bits", "symmetric", "group_size"),
    [(4, False, None), (4, True, 8), (8, True, 16), (7, False, 48), (8, False, 4)],
)
@pytest.mark.parametrize("structure", [None, (2, 4)])
def test_joint_matches_brute_force(gen, block_size, bits, symmetric, group_size, structure):
    rows, cols, mb = 10, 48, 16
    w, _, h = layer(gen, rows, cols, 3 * cols)
    mask = existing_mask(gen, rows, cols, 0.1)
    spec = QuantSpec(bits, symmetric, group_size)
    sparsity = 0.5 if structure is None else None
    res = sparsegpt_prune(
        w,
        h,
        sparsity=sparsity,
        structure=structure,
        block_size=block_size,
        mask_block=mb,
        mask=mask,
        quantize=tuple(spec),
    )
    w0, hd = prepared(w, h)
    ref = obs_oracle(w0, hd, sparsity=sparsity, mask_block=mb, nm=structure, mask=mask, spec=spec)
    check(res, ref, w0, hd)
    q = res.quantized
    assert (q.bits, q.symmetric, q.group_size) == tuple(spec)
    assert torch.equal(q.codes, ref[2])
    assert torch.equal(q.scales, ref[3]) and torch.equal(q.zero_points, ref[4])
    assert torch.equal(res.weight, q.dequantize().to(F64))
    zeros = q.expanded()[1]
    assert torch.equal(q.codes[~res.mask], zeros[~res.mask])
    assert torch.all(q.dequantize()[~res.mask] == 0)
    assert bool((res.weight[res.mask] != 0).any())


def test_existing_mask_past_the_target_prunes_just_those(gen):
    rows, cols = 8, 32
    w, _, h = layer(gen, rows, cols, 2 * cols, dead=0)
    mask = existing_mask(gen, rows, cols, 0.8)
    res = sparsegpt_prune(w, h, sparsity=0.5, mask_block=16, block_size=3, mask=mask)
    assert torch.equal(res.mask, mask)
    w0, hd = prepared(w, h)
    check(res, obs_oracle(w0, hd, sparsity=0.5, mask_block=16, mask=mask), w0, hd)


def test_zero_sparsity_changes_nothing(gen):
    w, _, h = layer(gen, 8, 20, 40)
    res = sparsegpt_prune(w, h, sparsity=0.0, block_size=3, mask_block=8)
    w0, _ = prepared(w, h)
    assert bool(res.mask.all()) and torch.equal(res.weight, w0) and res.error == 0.0


# ---------------------------------------------------------------------- Wanda


def test_wanda_scores_by_hand(gen):
    rows, cols, n = 9, 17, 30
    w, x, _ = layer(gen, rows, cols, n, dead=1)
    w = w.float()
    norms = [math.sqrt(sum(x[i, j].item() ** 2 for i in range(n))) for j in range(cols)]
    s = wanda_scores(w, torch.tensor(norms, dtype=F64))
    assert s.dtype == torch.float32 and s.shape == (rows, cols)
    by_hand = torch.tensor([[abs(w[r, j].item()) * norms[j] for j in range(cols)] for r in range(rows)])
    torch.testing.assert_close(s, by_hand.float(), rtol=1e-6, atol=0)
    acc, hacc = NormAccumulator(cols), HessianAccumulator(cols)
    for chunk in (x[:7], x[7:8].reshape(1, 1, cols), x[8:], x[:0]):
        acc.add(chunk)
        hacc.add(chunk)
    assert acc.count == hacc.count == n
    torch.testing.assert_close(acc.norms(), torch.tensor(norms, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(input_norms_from(hacc), torch.tensor(norms, dtype=F64), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", [None, (2, 4), (1, 4)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_wanda_mask_per_row(gen, structure, with_mask):
    rows, cols = 11, 24
    w = torch.randn(rows, cols, generator=gen)
    w[:, 5] = 0.0  # ties at 0: the lower column goes first
    norms = torch.rand(cols, generator=gen, dtype=F64)
    mask = existing_mask(gen, rows, cols, 0.3) if with_mask else None
    sparsity = 0.6 if structure is None else None
    keep = wanda_mask(w, norms, sparsity, structure, mask)
    score = w.to(F64).abs() * norms
    ref = torch.ones(rows, cols, dtype=torch.bool) if mask is None else mask.clone()
    m = cols if structure is None else structure[1]
    k = round(0.6 * cols) if structure is None else m - structure[0]
    for r in range(rows):
        for b in range(0, cols, m):
            sr = [-math.inf if not ref[r, j] else score[r, j].item() for j in range(b, b + m)]
            for i in lowest(sr, k):
                ref[r, b + i] = False
    assert torch.equal(keep, ref)
    pruned = (~keep).reshape(rows, cols // m, m).sum(dim=2)
    if mask is None:
        assert torch.all(pruned == k)
    else:
        assert torch.equal(pruned, torch.clamp((~mask).reshape(rows, cols // m, m).sum(dim=2), min=k))


# ---------------------------------------------------------------------- bad input


def test_bad_input(gen):
    w, _, h = layer(gen, 6, 12, 24)
    for s in (-0.1, 1.0, 1.5, math.nan, True, None, "0.5"):
        with pytest.raises(ValueError, match="sparsity"):
            sparsegpt_prune(w, h, sparsity=s)
        if s is not None:
            with pytest.raises(ValueError, match="sparsity"):
                wanda_mask(w, torch.ones(12), s)
    with pytest.raises(ValueError, match="hessian must have shape"):
        sparsegpt_prune(w, h[:-1, :-1], sparsity=0.5)
    with pytest.raises(ValueError, match="hessian must have shape"):
        sparsegpt_prune(w, h[0], sparsity=0.5)
    with pytest.raises(ValueError, match="does not divide"):
        sparsegpt_prune(w, h, structure=(2, 5))
    with pytest.raises(ValueError, match="does not divide"):
        wanda_mask(w, torch.ones(12), structure=(3, 8))
    with pytest.raises(ValueError, match="each row on its own"):
        wanda_mask(w, torch.ones(12), 0.5, Tiles(2, 2))
    with pytest.raises(ValueError, match="1 <= n < m"):
        sparsegpt_prune(w, h, structure=(4, 4))
    with pytest.raises(ValueError, match=r"the sparsity is 0\.5"):
        sparsegpt_prune(w, h, sparsity=0.75, structure=(2, 4))
    with pytest.raises(ValueError, match="structure must be"):
        sparsegpt_prune(w, h, sparsity=0.5, structure=(2.0, 4))
    bad = w.clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match="w contains NaN"):
        sparsegpt_prune(bad, h, sparsity=0.5)
    with pytest.raises(ValueError, match="w contains NaN"):
        wanda_scores(bad, torch.ones(12))
    bad = h.clone()
    bad[3, 3] = math.inf
    with pytest.raises(ValueError, match="hessian contains NaN"):
        sparsegpt_prune(w, bad, sparsity=0.5)
    with pytest.raises(ValueError, match="input_norms"):
        wanda_scores(w, torch.tensor([math.nan] * 12))
    with pytest.raises(ValueError, match="input_norms"):
        wanda_scores(w, -torch.ones(12))
    with pytest.raises(ValueError, match="input_norms must have shape"):
        wanda_scores(w, torch.ones(11))
    with pytest.raises(ValueError, match="mask must be a bool"):
        sparsegpt_prune(w, h, sparsity=0.5, mask=torch.ones(6, 12))
    with pytest.raises(ValueError, match="must divide the 6 rows"):
        sparsegpt_prune(w, h, sparsity=0.5, structure=Tiles(4, 4))
    with pytest.raises(ValueError, match="mask_block"):
        sparsegpt_prune(w, h, sparsity=0.5, structure=Tiles(2, 4), mask_block=6)
    with pytest.raises(ValueError, match="group_size 4 must divide mask_block 6"):
        sparsegpt_prune(w, h, sparsity=0.5, mask_block=6, quantize=(4, True, 4))
    with pytest.raises(ValueError, match="bits"):
        sparsegpt_prune(w, h, sparsity=0.5, quantize=(3, True, None))
    with pytest.raises(ValueError, match="does not divide"):
        sparsegpt_prune(w, h, sparsity=0.5, quantize=(4, True, 5))
    for name in ("block_size", "mask_block"):
        with pytest.raises(ValueError, match=name):
            sparsegpt_prune(w, h, sparsity=0.5, **{name: 0})
    with pytest.raises(ValueError, match="damp"):
        sparsegpt_prune(w, h, sparsity=0.5, damp=-1.0)
    with pytest.raises(ValueError, match="positive definite"):
        sparsegpt_prune(w, -torch.eye(12, dtype=F64), sparsity=0.5, damp=0.0)


def test_ties_go_to_the_lower_row_major_index():
    """Equal scores everywhere (H = I: no updates): the first entries in row-major order go, one
    threshold over all rows of the run; per row in N:M and Wanda."""
    w, h = torch.ones(2, 8, dtype=F64), torch.eye(8, dtype=F64)
    res = sparsegpt_prune(w, h, sparsity=0.5, mask_block=8)
    assert torch.equal(res.mask, torch.tensor([[False] * 8, [True] * 8]))
    res = sparsegpt_prune(w, h, structure=(2, 4))
    assert torch.equal(res.mask, torch.tensor([[False, False, True, True] * 2] * 2))
    keep = wanda_mask(w, torch.ones(8), 0.25)
    assert torch.equal(keep, torch.tensor([[False, False, True, True, True, True, True, True]] * 2))
