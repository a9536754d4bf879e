"""Second-order weight quantization: GPTQ / OBQ with a layer Hessian or an M-FAC block inverse Fisher.

The weight W (rows, cols) (a Linear's (out_features, in_features)) is quantized onto the integer
grids of ``compressor.mfac.grid`` one coordinate at a time, each rounding error being compensated
by the Optimal-Brain-Surgeon update of the coordinates not yet quantized. For a quadratic loss
(1/2) dw^T H dw (each row of W separately, the same H for all), with U the upper Cholesky factor
of H^-1 (H^-1 = U^T U; row q of U is row q of the inverse downdated by the columns before q,
divided by the square root of its diagonal entry):

    target_q = dequantize(quantize(w_q))       (0 for masked-off weights: code = zero point)
    err_q    = (w_q - target_q) / U_qq                                       (rows,)
    W[:, q+1:] -= err_q U[q, q+1:]                                           (the OBS update)
    loss    += sum(err_q^2) / 2     = sum (w_q - target_q)^2 / (2 [H^-1 downdated]_qq)

``gptq_quantize`` (Frantar et al., 2022): H = (2/n) sum_i x_i x_i^T over the layer's n input rows
(``HessianAccumulator``), dead inputs (H_jj = 0) dropped, H damped by damp * mean(diag H), the
sweep over columns in natural order or, with ``act_order``, in decreasing diag(H); the updates of
a block of columns onto the columns after it are applied at once (lazy batch updates, a
matrix product) which gives the unblocked sweep's values up to rounding.

``fisher_quantize``: the same step with the M-FAC block-diagonal inverse Fisher over the flattened
weight (row-major coordinates r * cols + c) in place of H^-1: every Fisher block of B consecutive
coordinates (inside one row, B divides cols) is swept on its own, all blocks at once.

``smoothing_scales``: SmoothQuant's per-input-channel migration scales. Needs torch alone.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .block_fisher import BlockFisherInverse
from .grid import QuantizedWeight, check_group_size, code_range, dequantize, fit_grid, quantize

F64 = torch.float64


# ---------------------------------------------------------------------- the layer Hessian


class HessianAccumulator:
    """H = (2/n) sum_i x_i x_i^T (cols, cols) float64 over the input rows x_i fed so far.

    Kept as a running mean (H <- H n_old / n + (2/n) X^T X), so it never grows with n. Also keeps
    the running max |x_j| of every column (SmoothQuant's activation statistic).

    Args:
        cols: the width of the inputs (a Linear's in_features).
        device: where H lives and the products run (default CPU); inputs elsewhere are copied there.
    """

    def __init__(self, cols: int, device: torch.device | str | None = None) -> None:
        if isinstance(cols, bool) or not isinstance(cols, numbers.Integral) or cols < 1:
            raise ValueError(f"cols must be an integer >= 1, got {cols!r}")
        self.cols = int(cols)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.count = 0
        self._h = torch.zeros(self.cols, self.cols, dtype=F64, device=self.device)
        self._absmax = torch.zeros(self.cols, dtype=F64, device=self.device)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (..., cols): every leading index is one input row (none: no-op)."""
        rows = input_rows(x, self.cols, self.device)
        k = rows.shape[0]
        if k == 0:
            return
        n = self.count + k
        self._h.mul_(self.count / n).addmm_(rows.T, rows, alpha=2.0 / n)
        torch.maximum(self._absmax, rows.abs().amax(dim=0), out=self._absmax)
        self.count = n

    def hessian(self) -> torch.Tensor:
        """A copy of H, (cols, cols) float64. ValueError before any row was added."""
        if self.count == 0:
            raise ValueError("no input rows were added (count = 0): H is undefined")
        return self._h.clone()

    def absmax(self) -> torch.Tensor:
        """max_i |x_ij| over the rows added, (cols,) float64 (zeros before any row)."""
        return self._absmax.clone()

    @property
    def nbytes(self) -> int:
        """Bytes held: H and the column maxima (float64)."""
        return (self._h.numel() + self._absmax.numel()) * 8

    def __repr__(self) -> str:
        return f"HessianAccumulator(cols={self.cols}, count={self.count}, device={self.device})"


# ---------------------------------------------------------------------- checks


def input_rows(x: torch.Tensor, cols: int, device: torch.device) -> torch.Tensor:
    """The rows of ``x`` (..., cols) as (n, cols) float64 on ``device``; ValueError for a wrong
    shape or dtype, or NaN / Inf."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor of shape (..., {cols})")
    if x.dim() == 0 or x.shape[-1] != cols:
        raise ValueError(f"x must have shape (..., {cols}), got {tuple(x.shape)}")
    rows = x.detach().reshape(-1, cols).to(device=device, dtype=F64)
    if not bool(rows.isfinite().all()):
        raise ValueError("x contains NaN or Inf (nothing was added)")
    return rows


@dataclass
class GPTQResult:
    """The outcome of a second-order quantization.

    quantized: the codes and grids. error: sum over coordinates of (w_q - target_q)^2 /
    (2 [H^-1]_qq) with the downdated inverse (GPTQ's logged loss; the OBS steps being exact, it
    equals (1/2) sum_r d_r^T H d_r for the rows d_r of W - dequantized, with H the damped Hessian
    and W's dead inputs zeroed; F in place of H for ``fisher_quantize``). updated: (rows, cols)
    float64, the value each weight held when it was quantized (after the updates of the
    coordinates swept before it, before rounding).
    """

    quantized: QuantizedWeight
    error: float
    updated: torch.Tensor


def _check_weight(
    w: torch.Tensor, bits: int, symmetric: bool, group_size: int | None, mask: torch.Tensor | None
) -> int:
    """Validate the common arguments; return the group length in columns."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2 or w.numel() == 0:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"w must be a non-empty floating-point tensor of shape (rows, cols), got {got}")
    code_range(bits, symmetric)  # bits must be 4 or 8
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be a bool, got {symmetric!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
        raise ValueError(f"group_size must be None or an int, got {group_size!r}")
    g = check_group_size(w.shape[1], group_size)
    if mask is not None and (
        not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != w.shape
    ):
        raise ValueError(f"mask must be a bool tensor of the weight's shape {tuple(w.shape)}")
    if not bool(w.isfinite().all()):
        raise ValueError("w contains NaN or Inf")
    return g


def _upper_cholesky(a: torch.Tensor, what: str) -> torch.Tensor:
    """U with a = U^T U (batched, float64); ValueError where a is not positive definite."""
    u, info = torch.linalg.cholesky_ex(a, upper=True)
    if bool((info != 0).any()):
        raise ValueError(f"{what} is not positive definite in float64; increase damp")
    return u


def _step(
    wq: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    keep: torch.Tensor | None,
    bits: int,
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, target) of one coordinate of every row: the grid's value, 0 where ``keep`` is False."""
    code = quantize(wq, scale, zero, bits, symmetric)
    if keep is not None:
        code = torch.where(keep, code, zero)
    return code, dequantize(code, scale, zero).to(F64)


# ---------------------------------------------------------------------- GPTQ


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    symmetric: bool,
    group_size: int | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    mask: torch.Tensor | None = None,
) -> GPTQResult:
    """GPTQ of ``w`` (rows, cols) under the layer Hessian ``hessian`` (cols, cols) (module doc).

    Args:
        w: (rows, cols) weights (a Linear's layout).
        hessian: (cols, cols) H = 2 X X^T / n of the layer's inputs.
        bits: 4 or 8 (7: reduced-range int8), the grid (``compressor.mfac.grid``).
        symmetric: symmetric grid (zero point fixed) or not.
        group_size: inputs per grid; None: one grid per row.
        damp: lambda = damp * mean(diag H) is added to H's diagonal (after dead inputs get H_jj = 1).
        block_size: columns per lazy batch update (any size >= 1; the values do not depend on it).
        act_order: sweep columns in decreasing diag(H) (stable order); codes keep the original order.
        mask: (rows, cols) bool; False weights are quantized to exactly 0 (code = zero point) and
            left out of the grid statistics.

    Grids: per row (group_size None), fitted up front; groups without ``act_order``: fitted when the
    sweep reaches a group's first column, on the group's current (updated) weights; groups with
    ``act_order``: fitted up front on the original weights. Dead inputs (H_jj = 0) get W[:, j] = 0
    before any grid is fitted. float64 throughout; the result is on w's device.
    """
    g = _check_weight(w, bits, symmetric, group_size, mask)
    rows, cols = w.shape
    if not isinstance(hessian, torch.Tensor) or not hessian.is_floating_point():
        raise ValueError("hessian must be a floating-point tensor")
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must have shape ({cols}, {cols}), got {tuple(hessian.shape)}")
    if not bool(hessian.isfinite().all()):
        raise ValueError("hessian contains NaN or Inf")
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")

    W = w.detach().to(F64, copy=True)
    H = hessian.detach().to(device=W.device, dtype=F64, copy=True)
    keep = None if mask is None else mask.to(W.device)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(float(damp) * H.diagonal().mean())

    groups = cols // g
    scales = torch.ones(rows, groups, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(rows, groups, dtype=torch.int8, device=W.device)
    lazy = group_size is not None and not act_order
    if not lazy:  # static grids on the dead-zeroed weights, before any update
        flat_keep = None if keep is None else keep.reshape(rows * groups, g)
        s, z = fit_grid(W.reshape(rows * groups, g), bits, symmetric, flat_keep)
        scales, zeros = s.reshape(rows, groups), z.reshape(rows, groups)

    order = torch.arange(cols, device=W.device)
    if act_order:
        order = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, order], H[order][:, order]
        keep = None if keep is None else keep[:, order]
    group_of = (order // g).tolist()  # the grid of each swept column
    U = _upper_cholesky(torch.cholesky_inverse(_upper_cholesky(H, "the damped Hessian"), upper=True), "H^-1")

    codes = torch.empty(rows, cols, dtype=torch.int8, device=W.device)
    loss = W.new_zeros(())
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        Err = W.new_empty(rows, i2 - i1)  # err_q of the block's columns
        for q in range(i1, i2):
            if lazy and q % g == 0:  # the group's current weights: pending block updates applied
                cur = W[:, q : q + g].clone()
                if q + g > i2:
                    cur[:, i2 - q :] -= Err[:, : q - i1] @ U[i1:q, i2 : q + g]
                part = None if keep is None else keep[:, q : q + g]
                scales[:, q // g], zeros[:, q // g] = fit_grid(cur, bits, symmetric, part)
            k = group_of[q]
            code, target = _step(
                W[:, q], scales[:, k], zeros[:, k], None if keep is None else keep[:, q], bits, symmetric
            )
            codes[:, q] = code
            err = (W[:, q] - target) / U[q, q]
            loss += err.square().sum() / 2
            W[:, q + 1 : i2] -= err[:, None] * U[q, q + 1 : i2]
            Err[:, q - i1] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]

    if act_order:
        codes[:, order], W[:, order] = codes.clone(), W.clone()
    quantized = QuantizedWeight(codes, scales, zeros, bits, symmetric, group_size)
    return GPTQResult(quantized, float(loss), W)


# ---------------------------------------------------------------------- M-FAC block Fisher


def block_inverses(fi: BlockFisherInverse) -> torch.Tensor:
    """The blocks F_b^-1 of ``fi`` as (dim / B, B, B) float64 (factoring it first if needed).

    Needs B to divide the dimension (no short tail block). A view of fi's storage when it
    accumulates in float64: do not modify it.
    """
    size = min(fi.block_size, fi.dim)
    if fi.dim % size:
        raise ValueError(f"block_size {fi.block_size} does not divide the {fi.dim} coordinates of the Fisher")
    fi.factor()
    return fi._blocks[0].to(F64)  # one segment of equal blocks (compressor.mfac._pages.segments)


@torch.no_grad()
def fisher_quantize(
    w: torch.Tensor,
    finv_blocks: torch.Tensor,
    *,
    bits: int,
    symmetric: bool,
    group_size: int | None = None,
    mask: torch.Tensor | None = None,
) -> GPTQResult:
    """OBS quantization of ``w`` (rows, cols) under a block-diagonal inverse Fisher (module doc).

    Args:
        w: (rows, cols) weights.
        finv_blocks: (rows * cols / B, B, B) float64, F_b^-1 of every run of B consecutive
            coordinates of the row-major flattened w (``block_inverses``). B must divide cols, and
            B divide group_size or group_size divide B.
        bits: as ``gptq_quantize``.
        symmetric: as ``gptq_quantize``.
        group_size: as ``gptq_quantize``.
        mask: as ``gptq_quantize``.

    Each block is swept in natural order with U_b = upper Cholesky of F_b^-1; all blocks at once.
    Grids are fitted when the sweep reaches their first column: per row and groups spanning whole
    blocks (B | group_size) on the weights as given, smaller groups on the block's current weights.
    """
    g = _check_weight(w, bits, symmetric, group_size, mask)
    rows, cols = w.shape
    if not isinstance(finv_blocks, torch.Tensor) or not finv_blocks.is_floating_point():
        raise ValueError("finv_blocks must be a floating-point tensor of shape (rows * cols / B, B, B)")
    if finv_blocks.dim() != 3 or finv_blocks.shape[1] != finv_blocks.shape[2] or finv_blocks.shape[1] < 1:
        raise ValueError(f"finv_blocks must have shape (blocks, B, B), got {tuple(finv_blocks.shape)}")
    B = finv_blocks.shape[1]
    if cols % B:
        raise ValueError(f"the Fisher block size {B} does not divide the {cols} columns of the weight")
    if g % B and B % g:
        raise ValueError(f"the Fisher block size {B} and group_size {group_size} are not aligned")
    nb = rows * cols // B
    if finv_blocks.shape[0] != nb:
        raise ValueError(
            f"finv_blocks holds {finv_blocks.shape[0]} blocks, the weight has {nb} blocks of {B} coordinates"
        )
    if not bool(finv_blocks.isfinite().all()):
        raise ValueError("finv_blocks contains NaN or Inf")

    W = w.detach().to(F64).reshape(nb, B).clone()
    keep = None if mask is None else mask.to(W.device).reshape(nb, B)
    U = _upper_cholesky(finv_blocks.detach().to(device=W.device, dtype=F64), "an inverse Fisher block")
    lazy = g < B  # groups inside a block: fitted on its current weights when the sweep reaches them
    per = B // g if lazy else 1  # grids per block
    if lazy:
        scales = torch.ones(nb, per, dtype=torch.float32, device=W.device)
        zeros = torch.zeros(nb, per, dtype=torch.int8, device=W.device)
    else:  # a group of whole blocks: no block of it is touched before its first column
        s, z = fit_grid(
            W.reshape(-1, g), bits, symmetric, None if keep is None else keep.reshape(-1, g)
        )  # (rows * cols / g,)
        first = torch.arange(nb, device=W.device) * B // g  # the group of each block
        scales, zeros = s[first, None], z[first, None]

    codes = torch.empty(nb, B, dtype=torch.int8, device=W.device)
    loss = W.new_zeros(())
    for p in range(B):
        k = p // g if lazy else 0
        if lazy and p % g == 0:
            part = None if keep is None else keep[:, p : p + g]
            scales[:, k], zeros[:, k] = fit_grid(W[:, p : p + g], bits, symmetric, part)
        code, target = _step(
            W[:, p], scales[:, k], zeros[:, k], None if keep is None else keep[:, p], bits, symmetric
        )
        codes[:, p] = code
        err = (W[:, p] - target) / U[:, p, p]
        loss += err.square().sum() / 2
        W[:, p + 1 :] -= err[:, None] * U[:, p, p + 1 :]

    if not lazy:
        scales, zeros = s, z
    quantized = QuantizedWeight(
        codes.reshape(rows, cols),
        scales.reshape(rows, cols // g),
        zeros.reshape(rows, cols // g),
        bits,
        symmetric,
        group_size,
    )
    return GPTQResult(quantized, float(loss), W.reshape(rows, cols))


# ---------------------------------------------------------------------- SmoothQuant


def smoothing_scales(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """SmoothQuant's s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha), (cols,) float32.

    1 where either maximum is 0; clamped to [1e-5, 1e5]. Inputs are divided by s and the weight's
    columns multiplied by it (X W^T unchanged). Computed in float64.
    """
    for name, t in (("act_absmax", act_absmax), ("weight_absmax", weight_absmax)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D floating-point tensor (cols,)")
        if not bool(t.isfinite().all()) or bool((t < 0).any()):
            raise ValueError(f"{name} must hold finite values >= 0")
    if act_absmax.shape != weight_absmax.shape:
        raise ValueError(
            f"act_absmax {tuple(act_absmax.shape)} and weight_absmax {tuple(weight_absmax.shape)} differ"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    a = act_absmax.to(F64)
    b = weight_absmax.to(device=a.device, dtype=F64)
    s = a.pow(alpha) / b.pow(1.0 - alpha)
    s = torch.where((a > 0) & (b > 0), s, torch.ones_like(s))
    return s.clamp(1e-5, 1e5).to(torch.float32)
