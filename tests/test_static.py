"""FisherInverse (static M-FAC) against the dense float64 inverse and the paper's recursions.

Bounds:
- float64: relative error <= 1e-9 for every probe, with cond(F) up to ~5e5 (the conditioning of
  the reference's own check: N(0, 1) gradients, m = 64, d = 2000, damp = 1e-4).
- float32: the inputs themselves are rounded to float32 (relative perturbation eps32 / 2), and a
  perturbation of x or F by a relative delta moves F^-1 x by up to cond(F) * delta. The
  computation adds a few more ulps of backward error (W = L^-1 G, the dot products), so the bound
  is 5 * eps32 * cond(F) for F^-1 x. For the diagonal, (1 - colsum(W^2)) / damp with
  0 <= colsum <= 1 computed to a few ulps gives an absolute error <= 2 * eps32 / damp.
"""

from __future__ import annotations

import paper_recursions as pr
import pytest
import torch
from conftest import EPS32, condition, dense_fisher, entry_pairs, probe_vectors, realistic_grads, rel_err

from compressor.mfac import FisherInverse

F64 = torch.float64
TOL64 = 1e-9


def _check_all(grads: torch.Tensor, damp: float, block_size: int | None, dtype: torch.dtype, gen) -> None:
    """mul (single and batched probes), diag and entries of FisherInverse against the dense inverse."""
    g64 = grads.to(F64)
    f = dense_fisher(g64, damp, block_size)
    finv = torch.linalg.inv(f)
    fi = FisherInverse(grads.to(dtype), damp, block_size)
    x = probe_vectors(g64, gen).to(dtype)
    ref = x.to(F64) @ finv
    if dtype == F64:
        mul_tol, diag_atol = TOL64, TOL64 * finv.diagonal().abs().max().item()
    else:
        mul_tol, diag_atol = 5 * EPS32 * condition(f), 2 * EPS32 / damp
    batched = fi.mul(x)
    assert batched.shape == x.shape and batched.dtype == dtype
    assert rel_err(batched, ref) <= mul_tol
    for k in range(x.shape[0]):  # one vector at a time: random, in the span, the newest gradient
        single = fi.mul(x[k])
        assert single.shape == x[k].shape
        assert rel_err(single, ref[k]) <= mul_tol, f"probe {k}"
    diag = fi.diag()
    assert diag.shape == (grads.shape[1],) and diag.dtype == dtype
    assert (diag.to(F64) - finv.diagonal()).abs().max().item() <= diag_atol
    d = grads.shape[1]
    pairs = entry_pairs(d, gen)
    for i, j in pairs:
        assert abs(fi.entry(i, j) - finv[i, j].item()) <= diag_atol, (i, j)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("block_size", [None, 128, 333, 1, 5000], ids=lambda b: f"B{b}")
def test_matches_dense_inverse_realistic_scale(gen, dtype, block_size):
    """Mini-batch-like gradients (correlated rows), blocks that do and do not divide d."""
    grads = realistic_grads(48, 1999, gen)
    _check_all(grads, 1e-5, block_size, dtype, gen)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_matches_dense_inverse_reference_conditioning(gen, dtype):
    """N(0, 1) gradients, m = 64, d = 2000, damp = 1e-4: cond(F) ~ 4e5, the reference's own check."""
    grads = torch.randn(64, 2000, generator=gen, dtype=F64)
    _check_all(grads, 1e-4, None, dtype, gen)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_zero_and_duplicate_rows(gen, dtype):
    """Zero rows still count in the 1/m; duplicate rows make G G^T singular but K stays definite."""
    grads = realistic_grads(32, 1500, gen)
    grads[[0, 7, 30]] = 0.0
    grads[10] = grads[3]
    grads[11] = grads[3]
    _check_all(grads, 1e-5, None, dtype, gen)
    _check_all(grads, 1e-5, 256, dtype, gen)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_more_gradients_than_coordinates(gen, dtype):
    """m > d: G G^T has rank d < m."""
    grads = realistic_grads(96, 60, gen, scale=1.0)
    _check_all(grads, 1e-3, None, dtype, gen)
    _check_all(grads, 1e-3, 25, dtype, gen)


def test_all_zero_gradients_give_identity_over_damp(gen):
    fi = FisherInverse(torch.zeros(5, 300, dtype=F64), damp=1e-3)
    x = torch.randn(300, generator=gen, dtype=F64)
    torch.testing.assert_close(fi.mul(x), x / 1e-3, rtol=1e-15, atol=0)
    torch.testing.assert_close(fi.diag(), torch.full((300,), 1e3, dtype=F64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("block_size", [None, 100, 257], ids=lambda b: f"B{b}")
def test_agrees_with_paper_recursions(gen, block_size):
    """Second oracle: equations (4)-(5) (static) and (8)-(13) (dynamic), one gradient at a time."""
    grads = realistic_grads(24, 1000, gen)
    damp = 1e-5
    fi = FisherInverse(grads, damp, block_size)
    x = probe_vectors(grads, gen)
    b = block_size or 1000
    assert rel_err(fi.mul(x), pr.static_ihvp_blocked(grads, damp, x, b)) <= TOL64
    assert rel_err(fi.mul(x), pr.dynamic_ihvp_blocked(grads, damp, x, b)) <= TOL64
    assert rel_err(fi.diag(), pr.static_diag_blocked(grads, damp, b)) <= TOL64
    for i, j in [(3, 3), (3, 90), (5, 999), (998, 999)]:
        ref = pr.static_entry_blocked(grads, damp, i, j, b).item()
        assert abs(fi.entry(i, j) - ref) <= TOL64 * abs(fi.entry(i, i))


@pytest.mark.parametrize("block_size", [None, 64, 100], ids=lambda b: f"B{b}")
def test_pages_give_the_same_numbers(gen, block_size):
    """Tiny pages (a wide block split in column pages, several blocks per page) change nothing."""
    grads = realistic_grads(16, 1000, gen)
    x = torch.randn(2, 1000, generator=gen, dtype=F64)
    whole = FisherInverse(grads, 1e-5, block_size)
    for page_bytes in (16 * 8 * 7, 16 * 8 * 150):
        paged = FisherInverse(grads, 1e-5, block_size, page_bytes=page_bytes)
        assert rel_err(paged.mul(x), whole.mul(x)) <= 1e-12
        assert rel_err(paged.diag(), whole.diag()) <= 1e-12


def test_entries_across_blocks_are_zero(gen):
    fi = FisherInverse(realistic_grads(8, 100, gen), 1e-4, block_size=30)
    assert fi.entry(0, 29) != 0.0
    assert fi.entry(29, 30) == 0.0
    assert fi.entry(95, 5) == 0.0
    assert fi.entry(90, 99) == fi.entry(99, 90)


def test_result_follows_input_dtype_and_leaves_grads_alone(gen):
    grads = realistic_grads(8, 200, gen).float()
    before = grads.clone()
    fi = FisherInverse(grads, 1e-4)
    assert torch.equal(grads, before)
    x64 = torch.randn(200, generator=gen, dtype=F64)
    y = fi.mul(x64)
    assert y.dtype == F64 and y.shape == (200,)
    assert rel_err(y, fi.mul(x64.float())) <= 1e-6


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FisherInverse(torch.zeros(0, 10)), "m = 0"),
        (lambda: FisherInverse(torch.zeros(4, 0)), "d = 0"),
        (lambda: FisherInverse(torch.ones(10)), "shape"),
        (lambda: FisherInverse(torch.ones(2, 3, 4)), "shape"),
        (lambda: FisherInverse(torch.ones(2, 3, dtype=torch.int64)), "float32 or float64"),
        (lambda: FisherInverse(torch.ones(2, 3, dtype=torch.complex64)), "float32 or float64"),
        (lambda: FisherInverse([[1.0, 2.0]]), "torch.Tensor"),
        (lambda: FisherInverse(torch.ones(2, 3), damp=0.0), "damp"),
        (lambda: FisherInverse(torch.ones(2, 3), damp=-1e-5), "damp"),
        (lambda: FisherInverse(torch.ones(2, 3), damp=float("nan")), "damp"),
        (lambda: FisherInverse(torch.ones(2, 3), damp=float("inf")), "damp"),
        (lambda: FisherInverse(torch.ones(2, 3), damp="1e-5"), "damp"),
        (lambda: FisherInverse(torch.ones(2, 3), block_size=0), "block_size"),
        (lambda: FisherInverse(torch.ones(2, 3), block_size=2.5), "block_size"),
        (lambda: FisherInverse(torch.ones(2, 3), page_bytes=0), "page_bytes"),
    ],
)
def test_bad_construction_raises_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("block_size", [None, 16])
def test_nonfinite_gradient_is_named(bad, block_size):
    grads = torch.randn(6, 50)
    grads[4, 33] = bad
    with pytest.raises(ValueError, match=r"rows \[4\] contain NaN or Inf"):
        FisherInverse(grads, 1e-4, block_size)


def test_bad_queries_raise_value_error():
    fi = FisherInverse(torch.randn(4, 10), 1e-3)
    for bad in (torch.ones(9), torch.ones(2, 11), torch.ones(2, 2, 10), torch.ones(10, dtype=torch.int32)):
        with pytest.raises(ValueError, match="x must"):
            fi.mul(bad)
    for i, j in [(-1, 0), (0, 10), (1.0, 2), (True, 1)]:
        with pytest.raises(ValueError, match="must be an int in"):
            fi.entry(i, j)


def test_damp_too_small_for_float64_is_explained():
    grads = torch.full((3, 4), 1e150, dtype=F64)
    grads[1] *= 1 + 1e-12
    with pytest.raises(ValueError, match="increase damp"):
        FisherInverse(grads, 1e-300)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("block_size", [None, 128, 333])
def test_cuda_and_streamed_pages_match_cpu(gen, block_size):
    grads = realistic_grads(32, 5000, gen)
    x = torch.randn(3, 5000, generator=gen, dtype=F64)
    cpu = FisherInverse(grads, 1e-5, block_size)
    on_gpu = FisherInverse(grads.cuda(), 1e-5, block_size)
    streamed = FisherInverse(grads, 1e-5, block_size, device="cuda", storage="cpu", page_bytes=32 * 8 * 700)
    for fi in (on_gpu, streamed):
        y = fi.mul(x.cuda())
        assert y.is_cuda
        assert rel_err(y.cpu(), cpu.mul(x)) <= 1e-10
        assert rel_err(fi.diag().cpu(), cpu.diag()) <= 1e-10
    assert streamed.mul(x).device.type == "cpu"


@pytest.mark.parametrize("block_size", [None, 7, 30])
def test_submatrices_are_blocks_of_the_dense_inverse(gen, block_size):
    grads = realistic_grads(12, 100, gen)
    finv = torch.linalg.inv(dense_fisher(grads, 1e-4, block_size))
    fi = FisherInverse(grads, 1e-4, block_size)
    index = torch.randint(0, 100, (9, 4), generator=gen)
    index[0] = torch.tensor([28, 29, 30, 31])  # straddles a block boundary for B = 30 and B = 7
    sub = fi.submatrices(index)
    assert sub.shape == (9, 4, 4)
    expected = finv[index.unsqueeze(2), index.unsqueeze(1)]
    torch.testing.assert_close(sub, expected, rtol=1e-9, atol=1e-9 * finv.abs().max().item())
    with pytest.raises(ValueError, match="index values"):
        fi.submatrices(torch.tensor([[0, 100]]))


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_blocks_narrower_than_m_use_the_direct_form(gen, dtype):
    """B < m (and a tail narrower than m while full blocks are wider): same numbers as the oracle."""
    grads = realistic_grads(40, 700, gen)
    _check_all(grads, 1e-5, 16, dtype, gen)  # every block direct (16 < 40)
    _check_all(grads, 1e-5, 64, dtype, gen)  # full blocks Woodbury, tail of 60 too; 700 = 10 * 64 + 60
    _check_all(grads, 1e-5, 690, dtype, gen)  # tail of 10 direct beside a Woodbury block
    fi = FisherInverse(grads, 1e-5, block_size=690)
    assert fi._direct == [False, True]
    index = torch.tensor([[685, 688, 690, 695], [0, 1, 2, 699]])
    expected = torch.linalg.inv(dense_fisher(grads, 1e-5, 690))[index.unsqueeze(2), index.unsqueeze(1)]
    torch.testing.assert_close(
        fi.submatrices(index), expected, rtol=1e-8, atol=1e-8 * expected.abs().max().item()
    )
