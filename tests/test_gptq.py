"""compressor.mfac.gptq against a brute-force OBQ in float64 (explicit inverse, downdated per step).

The oracle quantizes one coordinate at a time with the explicit inverse Hinv of the (damped)
Hessian or of the dense block-diagonal Fisher: target from the grid, w -= (w_q - target) /
Hinv_qq * Hinv[:, q], then Hinv -= Hinv[:, q] Hinv[q, :] / Hinv_qq. Everything is float64, so the
weights agree to rounding (1e-9 at the conditioning drawn here) and the codes exactly (a code
could only differ where a weight sits within rounding of a grid midpoint). The loss the functions
report is also checked against an identity independent of the sweep: the OBS steps are exact, so
their losses add up to (1/2) tr(D H D^T), D = W - dequantized.
"""

from __future__ import annotations

import pytest
import torch

from compressor.mfac import BlockFisherInverse
from compressor.mfac.gptq import (
    HessianAccumulator,
    block_inverses,
    fisher_quantize,
    gptq_quantize,
    smoothing_scales,
)
from compressor.mfac.grid import dequantize, fit_grid, quantize, quantize_rtn

F64 = torch.float64
TOL = 1e-9


def obq_oracle(w, hinv, *, bits, symmetric, g, order, static, mask=None):
    """Sequential OBS quantization of every row of ``w`` (R, n) in ``order``, with the explicit
    inverse ``hinv`` (n, n); grids over runs of ``g`` coordinates, fitted all up front (``static``)
    or when the sweep reaches a run's first coordinate. Returns codes, scales, zeros, the value each
    weight held when quantized, and the summed loss."""
    w, hinv = w.clone(), hinv.clone()
    R, n = w.shape
    sc = torch.ones(R, n // g, dtype=torch.float32)
    zp = torch.zeros(R, n // g, dtype=torch.int8)

    def fit(k):
        part = None if mask is None else mask[:, k * g : (k + 1) * g]
        sc[:, k], zp[:, k] = fit_grid(w[:, k * g : (k + 1) * g], bits, symmetric, part)

    if static:
        for k in range(n // g):
            fit(k)
    codes = torch.empty(R, n, dtype=torch.int8)
    held = torch.empty(R, n, dtype=F64)
    loss = 0.0
    for q in order:
        if not static and q % g == 0:
            fit(q // g)
        s, z = sc[:, q // g], zp[:, q // g]
        c = quantize(w[:, q], s, z, bits, symmetric)
        if mask is not None:
            c = torch.where(mask[:, q], c, z)
        t = dequantize(c, s, z).to(F64)
        codes[:, q], held[:, q] = c, w[:, q]
        d = hinv[q, q]
        loss += float((w[:, q] - t).square().sum() / d / 2)
        w -= ((w[:, q] - t) / d)[:, None] * hinv[:, q][None, :]
        hinv -= torch.outer(hinv[:, q], hinv[q, :]) / d
    return codes, sc, zp, held, loss


def correlated_inputs(n: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """(n, cols) float64 rows with correlated features of uneven scales."""
    mix = torch.eye(cols, dtype=F64) + torch.randn(cols, cols, generator=gen, dtype=F64) / cols**0.5
    scale = torch.rand(cols, generator=gen, dtype=F64) * 2 + 0.1
    return torch.randn(n, cols, generator=gen, dtype=F64) @ mix * scale


def prepared(w, h, damp):
    """GPTQ's preprocessing, written out: dead inputs, then damping."""
    w, h = w.clone(), h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=F64)
    return w, h


def half_quadratic(diff, h):
    """(1/2) sum_r diff_r^T h diff_r for the rows of ``diff`` (R, n) and h (n, n)."""
    return 0.5 * float(torch.einsum("ri,ij,rj->", diff, h, diff))


def check_against_oracle(res, ref):
    codes, sc, zp, held, loss = ref
    q = res.quantized
    assert torch.equal(q.codes, codes)
    assert torch.equal(q.scales, sc) and torch.equal(q.zero_points, zp)
    assert torch.equal(
        q.dequantize(),
        dequantize(codes, sc.repeat_interleave(q.group_cols, 1), zp.repeat_interleave(q.group_cols, 1)),
    )
    assert (res.updated - held).abs().max().item() <= TOL * max(1.0, held.abs().max().item())
    assert res.error == pytest.approx(loss, rel=TOL)


def check_gptq(res, ref, w0, h):
    """``check_against_oracle``, and the loss is (1/2) tr(D H D^T), D = W0 - dequantized."""
    check_against_oracle(res, ref)
    assert res.error == pytest.approx(half_quadratic(w0 - res.quantized.dequantize().to(F64), h), rel=1e-8)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("block_size", [1, 3, 128])
def test_gptq_matches_brute_force_obq(gen, bits, symmetric, group_size, block_size):
    rows, cols = 12, 64
    x = correlated_inputs(4 * cols, cols, gen)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(rows, cols, generator=gen, dtype=F64)
    res = gptq_quantize(
        w.float(), h, bits=bits, symmetric=symmetric, group_size=group_size, block_size=block_size
    )
    w0, hd = prepared(w.float().to(F64), h, 0.01)
    g = cols if group_size is None else group_size
    ref = obq_oracle(
        w0, torch.linalg.inv(hd), bits=bits, symmetric=symmetric, g=g, order=range(cols), static=False
    )
    check_gptq(res, ref, w0, hd)
    if group_size is not None:  # lazy refits: the grids differ from grids fitted on the original weights
        assert not torch.equal(res.quantized.scales, quantize_rtn(w, bits, symmetric, group_size).scales)


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("block_size", [5, 128])
def test_act_order_is_brute_force_in_permuted_order(gen, group_size, block_size):
    rows, cols = 10, 40
    x = correlated_inputs(3 * cols, cols, gen)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(rows, cols, generator=gen, dtype=F64)
    res = gptq_quantize(
        w, h, bits=4, symmetric=False, group_size=group_size, block_size=block_size, act_order=True
    )
    w0, hd = prepared(w, h, 0.01)
    order = torch.argsort(hd.diagonal(), descending=True, stable=True)
    assert not torch.equal(order, torch.arange(cols))
    g = cols if group_size is None else group_size
    ref = obq_oracle(
        w0, torch.linalg.inv(hd), bits=4, symmetric=False, g=g, order=order.tolist(), static=True
    )
    check_gptq(res, ref, w0, hd)
    # static grids: those of the original weights
    assert torch.equal(res.quantized.scales, quantize_rtn(w, 4, False, group_size).scales)


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("act_order", [False, True])
def test_mask_and_dead_inputs(gen, group_size, act_order):
    rows, cols = 8, 48
    x = correlated_inputs(2 * cols, cols, gen)
    dead = torch.randperm(cols, generator=gen)[:5]
    x[:, dead] = 0.0
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(rows, cols, generator=gen, dtype=F64)
    mask = torch.rand(rows, cols, generator=gen) > 0.4
    res = gptq_quantize(
        w, h, bits=4, symmetric=True, group_size=group_size, block_size=7, act_order=act_order, mask=mask
    )
    w0, hd = prepared(w, h, 0.01)
    order = torch.argsort(hd.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    g = cols if group_size is None else group_size
    ref = obq_oracle(
        w0,
        torch.linalg.inv(hd),
        bits=4,
        symmetric=True,
        g=g,
        order=order.tolist(),
        static=act_order or group_size is None,
        mask=mask,
    )
    check_gptq(res, ref, w0, hd)
    q = res.quantized
    deq = q.dequantize()
    assert torch.all(deq[~mask] == 0) and torch.all(deq[:, dead] == 0)
    zeros = q.expanded()[1]
    assert torch.equal(q.codes[~mask], zeros[~mask])
    assert bool((deq[mask] != 0).any())


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_diagonal_hessian_gives_rtn(gen, group_size, act_order):
    rows, cols = 16, 32
    h = torch.diag(torch.rand(cols, generator=gen, dtype=F64) + 0.1)
    w = torch.randn(rows, cols, generator=gen)
    mask = torch.rand(rows, cols, generator=gen) > 0.3
    res = gptq_quantize(
        w, h, bits=4, symmetric=False, group_size=group_size, act_order=act_order, block_size=5, mask=mask
    )
    rtn = quantize_rtn(w, 4, False, group_size, mask)
    assert torch.equal(res.quantized.codes, rtn.codes)
    assert torch.equal(res.quantized.scales, rtn.scales)
    assert torch.equal(res.updated, w.to(F64))


@pytest.mark.parametrize("group_size", [None, 16])
def test_gptq_beats_rtn_on_the_layer_output(gen, group_size):
    rows, cols, n = 32, 64, 512
    x = correlated_inputs(n, cols, gen)
    acc = HessianAccumulator(cols)
    acc.add(x)
    w = torch.randn(rows, cols, generator=gen)
    res = gptq_quantize(w, acc.hessian(), bits=4, symmetric=True, group_size=group_size)
    rtn = quantize_rtn(w, 4, True, group_size)

    def objective(q):
        return float(((w.to(F64) - q.dequantize().to(F64)) @ x.T).square().sum())

    assert objective(res.quantized) < objective(rtn)


def test_hessian_accumulator_is_the_running_mean(gen):
    cols = 24
    x = torch.randn(53, cols, generator=gen, dtype=F64) * 3
    acc = HessianAccumulator(cols)
    with pytest.raises(ValueError, match="no input rows"):
        acc.hessian()
    chunks = [x[:1], x[1:1], x[1:21].reshape(4, 5, cols), x[21:50].float(), x[50:]]
    for c in chunks:
        acc.add(c)
    assert acc.count == 53
    seen = torch.cat([c.reshape(-1, cols).to(F64) for c in chunks])  # the float32 chunk as rounded
    ref = 2 * seen.T @ seen / 53
    assert (acc.hessian() - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    assert torch.equal(acc.absmax(), seen.abs().amax(0))
    assert acc.nbytes == (cols * cols + cols) * 8
    one = HessianAccumulator(cols)
    one.add(x)
    assert (one.hessian() - 2 * x.T @ x / 53).abs().max().item() <= 1e-12 * ref.abs().max().item()
    assert acc.hessian().dtype == F64 and acc.hessian().shape == (cols, cols)


def _fisher_problem(gen, rows, cols, B, damp=0.1, m=64):
    """BlockFisherInverse over the rows * cols coordinates from m random gradients fed in two chunks;
    its blocks (``block_inverses``), the blocks inverted by hand and the dense (d, d) F^-1."""
    d = rows * cols
    grads = torch.randn(m, d, generator=gen, dtype=F64)
    fi = BlockFisherInverse(d, B, damp, dtype=F64)
    fi.add(grads[:20])
    fi.add(grads[20:])
    gb = grads.T.reshape(d // B, B, m)  # the gradients of each block, (blocks, B, m)
    blocks = torch.linalg.inv(damp * torch.eye(B, dtype=F64) + gb @ gb.mT / m)
    dense = torch.block_diag(*blocks)  # (d, d): zero between blocks
    return block_inverses(fi), blocks, dense


@pytest.mark.parametrize(
    ("cols", "B", "group_size"),
    [(24, 24, None), (24, 8, None), (24, 4, 8), (24, 12, 4), (24, 12, 12), (24, 6, 24)],
)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("masked", [False, True])
def test_fisher_quantize_matches_dense_obs(gen, cols, B, group_size, bits, masked):
    rows = 7
    finv, blocks, dense = _fisher_problem(gen, rows, cols, B)
    assert (finv - blocks).abs().max().item() < 1e-12  # block_inverses reads F_b^-1 in order
    w = torch.randn(rows, cols, generator=gen, dtype=F64)
    mask = torch.rand(rows, cols, generator=gen) > 0.3 if masked else None
    res = fisher_quantize(w, finv, bits=bits, symmetric=bits == 8, group_size=group_size, mask=mask)
    g = cols if group_size is None else group_size
    c, sc, zp, held, loss = obq_oracle(
        w.reshape(1, -1),
        dense,
        bits=bits,
        symmetric=bits == 8,
        g=g,
        order=range(rows * cols),
        static=False,
        mask=None if mask is None else mask.reshape(1, -1),
    )
    ref = (c.reshape(rows, cols), sc.reshape(rows, -1), zp.reshape(rows, -1), held.reshape(rows, cols), loss)
    check_against_oracle(res, ref)
    diff = (w - res.quantized.dequantize().to(F64)).reshape(1, -1)
    assert res.error == pytest.approx(half_quadratic(diff, torch.linalg.inv(dense)), rel=1e-8)
    if mask is not None:
        assert torch.all(res.quantized.dequantize()[~mask] == 0)


def test_smoothing_scales():
    a = torch.tensor([4.0, 0.0, 1.0, 1e12, 9.0], dtype=F64)
    b = torch.tensor([1.0, 2.0, 0.0, 1e-12, 4.0], dtype=F64)
    s = smoothing_scales(a, b, alpha=0.5)
    assert s.dtype == torch.float32
    assert torch.allclose(s.double(), torch.tensor([2.0, 1.0, 1.0, 1e5, 1.5], dtype=F64), rtol=1e-6)
    s = smoothing_scales(a[:1], b[:1], alpha=0.25)
    assert s.item() == pytest.approx(4**0.25)


def _bad_gptq_calls():
    w, h = torch.randn(4, 8), torch.eye(8, dtype=F64)
    ok = {"bits": 4, "symmetric": True}
    nan_w = w.clone()
    nan_w[0, 0] = float("nan")
    inf_h = h.clone()
    inf_h[1, 2] = float("inf")
    return [
        ((w[0], h), ok, "shape \\(rows, cols\\)"),
        ((w, h[:4, :4]), ok, "hessian must have shape \\(8, 8\\)"),
        ((w, h), {"bits": 3, "symmetric": True}, "bits must be 4, 7 or 8"),
        ((w, h), {**ok, "group_size": 3}, "group_size 3 does not divide the 8 columns"),
        ((nan_w, h), ok, "w contains NaN or Inf"),
        ((w, inf_h), ok, "hessian contains NaN or Inf"),
        ((w, h), {**ok, "mask": torch.ones(4, 8)}, "mask must be a bool tensor"),
        ((w, h), {**ok, "block_size": 0}, "block_size must be an integer >= 1"),
        ((w, h), {**ok, "damp": -1.0}, "damp must be a finite number >= 0"),
        ((w, -h), ok, "not positive definite"),
    ]


@pytest.mark.parametrize(("args", "kwargs", "message"), _bad_gptq_calls())
def test_gptq_bad_inputs(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gptq_quantize(*args, **kwargs)


def test_fisher_and_accumulator_bad_inputs():
    w = torch.randn(4, 12)
    eye = torch.eye(4, dtype=F64).expand(12, 4, 4)
    with pytest.raises(ValueError, match="block size 5 does not divide the 12 columns"):
        fisher_quantize(w, torch.eye(5, dtype=F64).expand(4, 5, 5), bits=4, symmetric=True)
    with pytest.raises(ValueError, match="block size 4 and group_size 6 are not aligned"):
        fisher_quantize(w, eye, bits=4, symmetric=True, group_size=6)
    with pytest.raises(ValueError, match="holds 11 blocks, the weight has 12"):
        fisher_quantize(w, eye[:11], bits=4, symmetric=True)
    with pytest.raises(ValueError, match="not positive definite"):
        fisher_quantize(w, -eye, bits=4, symmetric=True)
    with pytest.raises(ValueError, match="does not divide the 10 coordinates"):
        block_inverses(BlockFisherInverse(10, 4))
    acc = HessianAccumulator(6)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 6\)"):
        acc.add(torch.randn(3, 5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.add(torch.tensor([[1.0, 2, 3, 4, 5, float("nan")]]))
    assert acc.count == 0
    with pytest.raises(ValueError, match="alpha must be"):
        smoothing_scales(torch.ones(3), torch.ones(3), alpha=2.0)
    with pytest.raises(ValueError, match="differ"):
        smoothing_scales(torch.ones(3), torch.ones(4))
