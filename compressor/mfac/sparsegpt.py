"""Layer-wise one-shot pruning: SparseGPT (alone or joint with quantization) and Wanda.

``sparsegpt_prune`` (Frantar & Alistarh, 2023) prunes W (rows, cols) (a Linear's (out_features,
in_features)) under the layer loss (1/2) dw^T H dw of every row, H = 2 X X^T / n the Hessian of
``HessianAccumulator``, with the sweep of ``compressor.mfac.gptq``: U the upper Cholesky factor of
H^-1 (H^-1 = U^T U, U_qq^2 = [H^-1 downdated by the columns before q]_qq), columns in natural order:

    target_q = 0 (pruned) | w_q (kept) | dequantize(quantize(w_q)) (kept, joint mode)
    err_q    = (w_q - target_q) / U_qq                                       (rows,)
    W[:, q+1:] -= err_q U[q, q+1:]                                           (the OBS update)
    loss    += sum(err_q^2) / 2      = sum (w_q - target_q)^2 / (2 [H^-1 downdated]_qq)

The mask is chosen during the sweep (adaptive mask selection), on the weights as updated by all the
columns before, with the OBS saliency of each weight read off the factor:

    score_rj = W_rj^2 / U_jj^2                                                (rows, columns scored)

over each run of ``mask_block`` columns when the sweep reaches its first column (unstructured:
one threshold over all rows of the run; ``Tiles``: whole tiles by their summed scores), or over each
group of m columns per row (N:M). The lowest scores are pruned, ties to the lower (row-major) index.

``wanda_scores`` / ``wanda_mask`` (Sun et al., 2023): S_rj = |W_rj| ||X_j||_2, pruned per output row,
no update. ||X_j||_2 = sqrt(sum_i x_ij^2) = sqrt(H_jj n / 2) (``input_norms_from``), or from
``NormAccumulator`` without the (cols, cols) Hessian. Needs torch alone.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .gptq import HessianAccumulator, _step, _upper_cholesky, input_rows
from .grid import QuantizedWeight, check_group_size, code_range, fit_grid

F64 = torch.float64


@dataclass(frozen=True)
class Tiles:
    """Structure pruning whole tiles of ``rows`` x ``cols`` weights (rows divides the weight's rows,
    cols divides ``mask_block`` and the weight's cols)."""

    rows: int
    cols: int


class QuantSpec(NamedTuple):
    """The grid of joint pruning and quantization (``compressor.mfac.grid``); a plain
    (bits, symmetric, group_size) tuple is accepted too. bits: 4, 7 (reduced-range int8) or 8."""

    bits: int
    symmetric: bool
    group_size: int | None = None


#: None (unstructured), (n, m) (keep n of every m consecutive columns of a row) or ``Tiles``.
Structure = tuple[int, int] | Tiles | None


@dataclass
class SparseGPTResult:
    """The outcome of ``sparsegpt_prune``.

    weight: (rows, cols) float64, the final values (pruned weights exactly 0; in joint mode the
    dequantized grid values). mask: (rows, cols) bool, True = kept (dead inputs' weights are 0
    whether kept or not). error: sum over columns of sum(err_q^2) / 2 (the OBS losses; the steps
    being exact, it equals (1/2) sum_r d_r^T H d_r for the rows d_r of W - weight, H damped and W's
    dead inputs zeroed). quantized: the codes and grids in joint mode, else None.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    error: float
    quantized: QuantizedWeight | None = None


# ---------------------------------------------------------------------- checks


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_matrix(w: torch.Tensor, mask: torch.Tensor | None) -> None:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2 or w.numel() == 0:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"w must be a non-empty floating-point tensor of shape (rows, cols), got {got}")
    if not bool(w.isfinite().all()):
        raise ValueError("w contains NaN or Inf")
    if mask is not None and (
        not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != w.shape
    ):
        raise ValueError(f"mask must be a bool tensor of the weight's shape {tuple(w.shape)}")


def _check_nm(structure: object, cols: int) -> tuple[int, int]:
    if not (isinstance(structure, tuple) and len(structure) == 2 and all(map(_is_int, structure))):
        raise ValueError(f"structure must be None, an (n, m) tuple of ints or Tiles, got {structure!r}")
    n, m = (int(v) for v in structure)
    if not 1 <= n < m:
        raise ValueError(f"N:M structure needs 1 <= n < m, got {n}:{m}")
    if cols % m:
        raise ValueError(f"m = {m} does not divide the {cols} columns of the weight")
    return n, m


def _check_sparsity(sparsity: float | None, nm: tuple[int, int] | None) -> float:
    """The fraction to prune: ``sparsity`` in [0, 1); with N:M None or (m - n) / m."""
    if nm is not None:
        fixed = (nm[1] - nm[0]) / nm[1]
        if sparsity is not None and not (
            isinstance(sparsity, numbers.Real) and abs(float(sparsity) - fixed) <= 1e-9
        ):
            raise ValueError(f"with {nm[0]}:{nm[1]} the sparsity is {fixed}; pass None, got {sparsity!r}")
        return fixed
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, numbers.Real)
        or not 0.0 <= float(sparsity) < 1.0
    ):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """bool of score's shape: True at the k lowest entries along the last dim (stable: ties to the
    lower index)."""
    idx = torch.sort(score, dim=-1, stable=True).indices[..., :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)


# ---------------------------------------------------------------------- mask selection


def _select(score: torch.Tensor, keep: torch.Tensor, sparsity: float, tiles: Tiles | None) -> torch.Tensor:
    """The pruned weights (bool) of one mask block: ``score`` (rows, L); ``keep`` False marks the
    weights pruned already, which come first (score -inf) and stay pruned. Prunes
    max(round(sparsity * count), count already pruned) entries (tiles)."""
    if tiles is None:
        score = score.masked_fill(~keep, -math.inf).reshape(-1)
        return _lowest(score, round(sparsity * score.numel())).reshape(keep.shape) | ~keep
    rows, cols = keep.shape
    R, C, r, c = rows // tiles.rows, cols // tiles.cols, tiles.rows, tiles.cols
    tile = score.masked_fill(~keep, 0.0).reshape(R, r, C, c).sum(dim=(1, 3))  # pruned entries add 0
    full = (~keep).reshape(R, r, C, c).all(dim=3).all(dim=1)  # tiles pruned already
    cut = _lowest(tile.masked_fill(full, -math.inf).reshape(-1), round(sparsity * R * C)).reshape(R, C)
    return (cut | full)[:, None, :, None].expand(R, r, C, c).reshape(rows, cols) | ~keep


def _current(
    Wt: torch.Tensor, ErrT: torch.Tensor, U: torch.Tensor, i1: int, i2: int, q: int, end: int
) -> torch.Tensor:
    """W[:, q:end] (rows, end - q) as the unblocked sweep holds it at column q of the lazy block
    [i1, i2): a copy with the block's pending updates of the columns >= i2 applied. ``Wt`` is W
    transposed (cols, rows), ``ErrT`` the block's errors so far (i2 - i1, rows)."""
    cur = Wt[q:end].T.clone()
    if end > i2 and q > i1:
        cur[:, i2 - q :] -= ErrT[: q - i1].T @ U[i1:q, i2:end]
    return cur


# ---------------------------------------------------------------------- SparseGPT


@torch.no_grad()
def sparsegpt_prune(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float | None = None,
    structure: Structure = None,
    damp: float = 0.01,
    block_size: int = 128,
    mask_block: int = 128,
    mask: torch.Tensor | None = None,
    quantize: QuantSpec | tuple[int, bool, int | None] | None = None,
) -> SparseGPTResult:
    """SparseGPT of ``w`` (rows, cols) under the layer Hessian ``hessian`` (cols, cols) (module doc).

    Args:
        w: (rows, cols) weights (a Linear's layout).
        hessian: (cols, cols) H = 2 X X^T / n of the layer's inputs.
        sparsity: the fraction pruned, in [0, 1); with N:M None (or (m - n) / m).
        structure: None: unstructured, round(sparsity * rows * L) weights pruned in every run of
            L = ``mask_block`` columns (the last run may be shorter; round half to even), one threshold
            over all its rows. (n, m): keep n of every m consecutive columns of each row (m divides
            cols), chosen when the sweep reaches the group's first column. ``Tiles(r, c)``: whole r x c
            tiles, round(sparsity * tiles) of each run of ``mask_block`` columns, scored by the sum of
            their entries' scores.
        damp: lambda = damp * mean(diag H) is added to H's diagonal (after dead inputs get H_jj = 1).
        block_size: columns per lazy batch update (any size >= 1; the values do not depend on it).
        mask_block: columns per mask selection (unstructured and tiles).
        mask: (rows, cols) bool, an existing mask: its False weights count as pruned first (score
            -inf) and stay pruned; a run (or N:M group, or tile count) that already prunes more than
            the target prunes just those. Tiles: a tile with all its weights False counts as pruned;
            the False weights of other tiles add 0 to their tile's score and stay pruned.
        quantize: joint mode, ``QuantSpec(bits, symmetric, group_size)``: one sweep, kept weights
            target their grid value, pruned ones 0 (code = zero point). Each grid (a row, or a group
            of group_size columns) is fitted when the sweep reaches its first column, after that
            column's mask selection, on its current weights (pending lazy updates applied), leaving
            out the weights known to be pruned by then. Unstructured and tiles need group_size to
            divide mask_block (the group's whole mask is then known) or be a multiple of it (only the
            first run's selection is known; per-row grids likewise). N:M: a grid knows the groups of m
            starting at or before its first column: the whole mask if group_size <= m, else only the
            first group of m.

    Dead inputs (H_jj = 0) get W[:, j] = 0 first. float64 throughout; the result is on w's device.
    """
    _check_matrix(w, mask)
    rows, cols = w.shape
    if not isinstance(hessian, torch.Tensor) or not hessian.is_floating_point():
        raise ValueError("hessian must be a floating-point tensor")
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must have shape ({cols}, {cols}), got {tuple(hessian.shape)}")
    if not bool(hessian.isfinite().all()):
        raise ValueError("hessian contains NaN or Inf")
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    for name, v in (("block_size", block_size), ("mask_block", mask_block)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    nm = tiles = None
    if isinstance(structure, Tiles):
        tiles = structure
        if not (_is_int(tiles.rows) and _is_int(tiles.cols) and tiles.rows >= 1 and tiles.cols >= 1):
            raise ValueError(f"tile sides must be integers >= 1, got {tiles!r}")
        if rows % tiles.rows or mask_block % tiles.cols or cols % tiles.cols:
            raise ValueError(
                f"{tiles!r} must divide the {rows} rows, the mask_block {mask_block} and the {cols} columns"
            )
    elif structure is not None:
        nm = _check_nm(structure, cols)
    s = _check_sparsity(sparsity, nm)
    spec = None
    if quantize is not None:
        if not isinstance(quantize, tuple) or not 2 <= len(quantize) <= 3:
            raise ValueError(f"quantize must be None or (bits, symmetric, group_size), got {quantize!r}")
        spec = QuantSpec(*quantize)
        code_range(spec.bits, spec.symmetric)
        if not isinstance(spec.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {spec.symmetric!r}")
        if spec.group_size is not None and not _is_int(spec.group_size):
            raise ValueError(f"group_size must be None or an int, got {spec.group_size!r}")
        check_group_size(cols, spec.group_size)
        gs = spec.group_size
        if nm is None and gs is not None and gs % mask_block and mask_block % gs:
            raise ValueError(f"group_size {gs} must divide mask_block {mask_block} or be a multiple of it")

    W = w.detach().to(F64, copy=True)
    H = hessian.detach().to(device=W.device, dtype=F64, copy=True)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(float(damp) * H.diagonal().mean())
    U = _upper_cholesky(torch.cholesky_inverse(_upper_cholesky(H, "the damped Hessian"), upper=True), "H^-1")
    d2 = U.diagonal().square()  # [H^-1 downdated by the columns before j]_jj
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device) if mask is None else mask.to(W.device)
    keep = keep.clone()

    if spec is not None:
        g = check_group_size(cols, spec.group_size)
        scales = torch.ones(rows, cols // g, dtype=torch.float32, device=W.device)
        zeros = torch.zeros(rows, cols // g, dtype=torch.int8, device=W.device)
        codes = torch.empty(rows, cols, dtype=torch.int8, device=W.device)
    # The sweep works on W transposed (cols, rows): a column of W is a contiguous row of Wt, so the
    # per-column updates are contiguous rank-1 updates (memory-bound otherwise at rows in the 1000s).
    Wt = W.T.contiguous()
    loss = W.new_zeros(())
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        ErrT = W.new_empty(i2 - i1, rows)  # err_q of the block's columns
        for q in range(i1, i2):
            if nm is None and q % mask_block == 0:  # a run of mask_block columns: its mask
                end = min(q + mask_block, cols)
                score = _current(Wt, ErrT, U, i1, i2, q, end).square() / d2[q:end]
                keep[:, q:end] &= ~_select(score, keep[:, q:end], s, tiles)
            elif nm is not None and q % nm[1] == 0:  # a group of m columns: its N:M mask, per row
                end = q + nm[1]
                score = _current(Wt, ErrT, U, i1, i2, q, end).square() / d2[q:end]
                score = score.masked_fill(~keep[:, q:end], -math.inf)
                keep[:, q:end] &= ~_lowest(score, nm[1] - nm[0])
            wq = Wt[q]
            if spec is not None:
                k = q // g
                if q % g == 0:  # the grid's current weights, leaving out those known to be pruned
                    cur = _current(Wt, ErrT, U, i1, i2, q, q + g)
                    scales[:, k], zeros[:, k] = fit_grid(cur, spec.bits, spec.symmetric, keep[:, q : q + g])
                codes[:, q], target = _step(
                    wq, scales[:, k], zeros[:, k], keep[:, q], spec.bits, spec.symmetric
                )
            else:
                target = torch.where(keep[:, q], wq, 0.0)
            err = (wq - target) / U[q, q]
            loss += err.square().sum() / 2
            Wt[q + 1 : i2].addr_(U[q, q + 1 : i2], err, alpha=-1.0)  # W[:, q+1:i2] -= err U[q, q+1:i2]
            Wt[q] = target
            ErrT[q - i1] = err
        Wt[i2:].addmm_(U[i1:i2, i2:].T, ErrT, alpha=-1.0)  # W[:, i2:] -= Err U[i1:i2, i2:]

    quantized = None
    if spec is not None:
        quantized = QuantizedWeight(codes, scales, zeros, spec.bits, spec.symmetric, spec.group_size)
    return SparseGPTResult(Wt.T.contiguous(), keep, float(loss), quantized)


# ---------------------------------------------------------------------- Wanda


class NormAccumulator:
    """sum_i x_ij^2 (cols,) float64 over the input rows x_i fed so far; ``norms`` gives ||X_j||_2.

    Wanda's statistic without the (cols, cols) Hessian of ``HessianAccumulator``.
    """

    def __init__(self, cols: int, device: torch.device | str | None = None) -> None:
        if not _is_int(cols) or cols < 1:
            raise ValueError(f"cols must be an integer >= 1, got {cols!r}")
        self.cols = int(cols)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.count = 0
        self._sq = torch.zeros(self.cols, dtype=F64, device=self.device)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (..., cols): every leading index is one input row (none: no-op)."""
        rows = input_rows(x, self.cols, self.device)
        if rows.shape[0] == 0:
            return
        self._sq += rows.square().sum(dim=0)
        self.count += rows.shape[0]

    def norms(self) -> torch.Tensor:
        """||X_j||_2 = sqrt(sum_i x_ij^2), (cols,) float64. ValueError before any row was added."""
        if self.count == 0:
            raise ValueError("no input rows were added (count = 0)")
        return self._sq.sqrt()


def input_norms_from(acc: HessianAccumulator) -> torch.Tensor:
    """||X_j||_2 = sqrt(H_jj n / 2) from a ``HessianAccumulator`` (H = 2 X X^T / n), (cols,) float64."""
    if not isinstance(acc, HessianAccumulator):
        raise ValueError(f"acc must be a HessianAccumulator, got {type(acc).__name__}")
    return (acc.hessian().diagonal() * (acc.count / 2)).clamp(min=0.0).sqrt()


def _wanda64(w: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_rj| ||X_j||_2 in float64, (rows, cols), after the checks."""
    if not isinstance(input_norms, torch.Tensor) or not input_norms.is_floating_point():
        raise ValueError("input_norms must be a floating-point tensor (cols,)")
    if input_norms.shape != (w.shape[1],):
        raise ValueError(f"input_norms must have shape ({w.shape[1]},), got {tuple(input_norms.shape)}")
    if not bool(input_norms.isfinite().all()) or bool((input_norms < 0).any()):
        raise ValueError("input_norms must hold finite values >= 0")
    return w.detach().to(F64).abs() * input_norms.to(device=w.device, dtype=F64)


def wanda_scores(w: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's S_rj = |W_rj| ||X_j||_2 of ``w`` (rows, cols): (rows, cols) float32 (computed in float64).

    ``input_norms`` (cols,): the l2 norm of every input feature over the calibration rows
    (``NormAccumulator``, ``input_norms_from``).
    """
    _check_matrix(w, None)
    return _wanda64(w, input_norms).to(torch.float32)


def wanda_mask(
    w: torch.Tensor,
    input_norms: torch.Tensor,
    sparsity: float | None = None,
    structure: tuple[int, int] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Wanda's keep-mask of ``w`` (rows, cols): (rows, cols) bool, True = kept.

    Each row compared on its own (float64 scores): the round(sparsity * cols) lowest pruned (round
    half to even), or with ``structure`` (n, m) the m - n lowest of every m consecutive columns
    (``sparsity`` None). ``mask`` False weights count as pruned first and stay pruned (a row or
    group already past the target prunes just those). Ties go to the lower column.
    """
    _check_matrix(w, mask)
    rows, cols = w.shape
    if isinstance(structure, Tiles):
        raise ValueError("wanda_mask compares each row on its own: structure must be None or (n, m)")
    nm = None if structure is None else _check_nm(structure, cols)
    s = _check_sparsity(sparsity, nm)
    score = _wanda64(w, input_norms)
    keep = torch.ones_like(score, dtype=torch.bool) if mask is None else mask.to(score.device)
    score = score.masked_fill(~keep, -math.inf)
    if nm is None:
        return ~(_lowest(score, round(s * cols)) | ~keep)
    n, m = nm
    pruned = _lowest(score.reshape(rows, cols // m, m), m - n).reshape(rows, cols)
    return ~(pruned | ~keep)
