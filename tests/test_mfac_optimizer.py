"""compressor.mfac.MFAC with masks against plain MFAC and a dense inverse over the kept coordinates; the
MFACOptimizer modifier's swap window, masks and exact resume in a real Session."""

from __future__ import annotations

import io
from typing import Any, ClassVar, Literal

import pytest
import torch
from conftest import dense_fisher
from pydantic import Field, ValidationError
from torch import nn

from compressor.core.modifier import Modifier
from compressor.lifecycle.session import Session
from compressor.mfac import MFAC, SlidingFisherInverse
from modifiers.learning_rate import LearningRate
from modifiers.mfac_optimizer import MFACOptimizer

# ----------------------------------------------------------------------------- the optimizer


def _tensors(gen: torch.Generator, shapes: list[tuple[int, ...]], dtype=torch.float64) -> list[torch.Tensor]:
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def test_masks_that_keep_everything_match_plain_mfac_step_for_step(gen):
    m, shapes = 4, [(5, 3), (3,), (2, 2)]
    a = _tensors(gen, shapes)
    b = [t.detach().clone().requires_grad_() for t in a]

    def groups(ps: list[torch.Tensor]) -> list[dict[str, Any]]:
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02, "momentum": 0.0}]

    hyper = dict(lr=0.05, num_grads=m, damp=1e-3, weight_decay=0.01, momentum=0.7)
    keep_all = {t: torch.ones(t.shape, dtype=torch.bool) for t in (b[0], b[2])}
    ref, opt = MFAC(groups(a), **hyper), MFAC(groups(b), **hyper, masks=keep_all)
    for step in range(2 * m + 1):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            g = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            x.grad = None if (step == 3 and i == 1) else g.clone()  # a missing gradient counts as zero
            y.grad = None if (step == 3 and i == 1) else g.clone()
        ref.step()
        opt.step()
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y), f"step {step}"
    assert opt.dim == sum(t.numel() for t in a) and opt.rebuilds == 0


class DenseMaskedMFAC:
    """The oracle: F over the kept coordinates as a dense float64 matrix, momentum on full vectors."""

    def __init__(self, params, masks, lr, m, damp, wd, mu):
        self.p = [t.detach().clone() for t in params]
        self.masks, self.lr, self.m, self.damp, self.wd, self.mu = masks, lr, m, damp, wd, mu
        self.v = [torch.zeros_like(t) for t in self.p]
        self.rows: list[torch.Tensor] = []
        self.seen = [k.clone() for k in masks]

    def step(self, grads):
        if any(not torch.equal(k, s) for k, s in zip(self.masks, self.seen, strict=True)):
            self.rows = []  # the window is rebuilt: old gradients dropped, momentum kept where still kept
            self.seen = [k.clone() for k in self.masks]
            for v, k in zip(self.v, self.masks, strict=True):
                v.masked_fill_(~k, 0)
        g = torch.cat([(gr + self.wd * p)[k] for gr, p, k in zip(grads, self.p, self.masks, strict=True)])
        self.rows.append(g)
        window = torch.zeros(self.m, g.numel(), dtype=torch.float64)
        recent = self.rows[-self.m :]
        window[: len(recent)] = torch.stack(recent)
        u = torch.linalg.solve(dense_fisher(window, self.damp), g)
        at = 0
        for p, v, k in zip(self.p, self.v, self.masks, strict=True):
            n = int(k.sum())
            v[k] = self.mu * v[k] + (1 - self.mu) * u[at : at + n]
            p[k] -= self.lr * v[k]
            at += n


def _masks(gen: torch.Generator, shapes: list[tuple[int, ...]], density: float) -> list[torch.Tensor]:
    return [torch.rand(s, generator=gen) < density for s in shapes]


@pytest.mark.parametrize("change_at", [None, 5])
def test_masked_matches_dense_inverse_over_kept_coordinates(gen, change_at):
    m, shapes = 3, [(6, 4), (5,)]
    params = _tensors(gen, shapes)
    masks = _masks(gen, shapes, 0.5)
    masks[1].fill_(True)  # an all-kept mask is a dense parameter
    masks[0][0, 0] = False
    hyper = dict(lr=0.1, m=m, damp=1e-2, wd=0.05, mu=0.6)
    oracle = DenseMaskedMFAC(params, masks, **hyper)
    opt = MFAC(
        params,
        lr=0.1,
        num_grads=m,
        damp=1e-2,
        weight_decay=0.05,
        momentum=0.6,
        masks=dict(zip(params, masks, strict=True)),
    )
    for step in range(2 * m + 3):
        if step == change_at:  # in place, as MaskSet.set does: swap one kept and one masked entry
            kept, off = masks[0].reshape(-1).nonzero()[0], (~masks[0]).reshape(-1).nonzero()[1]
            masks[0].view(-1)[kept], masks[0].view(-1)[off] = False, True
        before = [p.detach().clone() for p in params]
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        oracle.step(grads)
        kept = sum(int(k.sum()) for k in masks)
        assert opt.dim == opt.window.dim == kept
        for p, q, b, k in zip(params, oracle.p, before, masks, strict=True):
            assert torch.equal(p[~k], b[~k]), "a masked coordinate moved"
            torch.testing.assert_close(p.detach(), q, rtol=1e-9, atol=1e-12)
    expected = 0 if change_at is None else 1
    assert opt.rebuilds == expected
    if change_at is not None:
        assert opt.window.count == 2 * m + 3 - change_at  # filled again from empty after the rebuild


def test_state_dict_round_trip_and_mask_check(gen):
    shapes = [(4, 3)]
    params = _tensors(gen, shapes)
    masks = _masks(gen, shapes, 0.5)
    masks[0][0, 0] = False

    def make(ps: list[torch.Tensor]) -> MFAC:
        return MFAC(ps, lr=0.1, num_grads=2, damp=1e-2, momentum=0.5, masks={ps[0]: masks[0]})

    opt = make(params)
    params[0].grad = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    twin = [params[0].detach().clone().requires_grad_()]
    copy = make(twin)
    copy.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for _ in range(3):
        g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        params[0].grad, twin[0].grad = g.clone(), g.clone()
        opt.step()
        copy.step()
    assert torch.equal(params[0], twin[0])
    masks[0].fill_(True)
    with pytest.raises(ValueError, match="masks differ"):
        make([params[0].detach().clone().requires_grad_()]).load_state_dict(
            torch.load(io.BytesIO(buf.getvalue()))
        )


# ----------------------------------------------------------------------------- in a session


class ToyPruner(Modifier):
    """At ``at`` (a step), keeps the ``keep`` fraction of largest |w| of ``params``."""

    prunes: ClassVar[bool] = True
    type: Literal["ToyPruner"] = "ToyPruner"
    params: list[str]
    at: int
    keep: float = 0.5

    def parameter_patterns(self) -> list[str]:
        return list(self.params)

    @torch.no_grad()
    def before_step(self, session: Session) -> None:
        if session.step != self.at:
            return
        for name in self.params:
            w = session.params[name].abs()
            k = int(self.keep * w.numel())
            session.masks.set(name, w >= w.reshape(-1).kthvalue(w.numel() - k + 1).values)


class Probe(Modifier):
    """Records, at before_step: (step, which optimizer steps, its lr)."""

    type: Literal["Probe"] = "Probe"
    seen: list[Any] = Field(default_factory=list)

    def before_step(self, session: Session) -> None:
        opt = session.optimizer
        kind = "base" if opt is session.base_optimizer else type(opt).__name__
        self.seen.append((session.step, kind, opt.param_groups[0]["lr"]))


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(steps)]


def _train(session: Session, batches, first: int, last: int) -> None:
    """The trainer's step: zero_grad on the current optimizer, backward, hooks around step()."""
    for step in range(first, last):
        x, y = batches[step]
        session.optimizer.zero_grad()
        nn.functional.cross_entropy(session.model(x), y).backward()
        session.before_step()
        session.optimizer.step()
        session.after_step()


def _recipe(**mfac: Any) -> list[Modifier]:
    settings = dict(lr=0.05, num_grads=3, damp=1e-3, momentum=0.5, weight_decay=1e-3)
    settings.update(mfac)
    return [
        ToyPruner(params=["0.weight"], at=4),
        MFACOptimizer(start={"step": 2}, end={"step": 7}, **settings),
        LearningRate(kind="cosine", value=0.05, final=0.01, start={"step": 2}, end={"step": 7}),
        Probe(),
    ]


def test_swap_window_masks_and_hand_back():
    model = _model(0)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mods = _recipe()
    session = Session(mods, model, base, steps_per_epoch=4)
    batches = _batches(9)
    _train(session, batches, 0, 2)
    sgd_state = {k: v["momentum_buffer"].clone() for k, v in base.state.items()}
    _train(session, batches, 2, 7)
    assert [kind for _, kind, _ in mods[-1].seen] == ["base"] * 2 + ["MFAC"] * 5
    assert all(torch.equal(base.state[k]["momentum_buffer"], v) for k, v in sgd_state.items())
    opt = mods[1].optimizer
    kept = sum(p.numel() for p in model.parameters()) - int((~session.masks.mask("0.weight")).sum())
    assert opt.dim == kept < sum(p.numel() for p in model.parameters())
    assert opt.rebuilds == 1  # the pruner at step 4
    _train(session, batches, 7, 9)
    assert [kind for _, kind, _ in mods[-1].seen[7:]] == ["base", "base"]
    assert session.optimizer is base and mods[1].optimizer is None
    assert mods[1].state_dict() == {"active": False, "optimizer": None, "logged_dim": opt.dim}
    session.finalize()


def test_finalize_hands_back_and_subset_freezes_the_rest():
    model = _model(1)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    mfac = MFACOptimizer(lr=0.05, num_grads=2, damp=1e-3, params=["2.*"])
    session = Session([mfac], model, base, steps_per_epoch=4)
    frozen = model[0].weight.detach().clone()
    _train(session, _batches(3), 0, 3)
    assert session.optimizer is mfac.optimizer and mfac.optimizer.dim == 8 * 3 + 3
    assert torch.equal(model[0].weight, frozen) and model[0].weight.grad is None
    session.finalize()
    assert session.optimizer is base and mfac.optimizer is None


def _checkpoint(model: nn.Module, session: Session) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": session.base_optimizer.state_dict(),
            "session": session.state_dict(),
        },
        buf,
    )
    return buf.getvalue()


@pytest.mark.parametrize("stop", [3, 5, 7])  # mid-window before and after the pruner; the hand-back
def test_resume_mid_window_continues_exactly(stop):
    steps, batches = 9, _batches(9)

    def session(model: nn.Module, logs: list[Any]) -> Session:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return Session(_recipe(), model, opt, steps_per_epoch=4, metrics=lambda *row: logs.append(row))

    straight, straight_logs = _model(0), []
    s1 = session(straight, straight_logs)
    _train(s1, batches, 0, steps)

    first = _model(0)
    s2 = session(first, [])
    _train(s2, batches, 0, stop)
    saved = torch.load(io.BytesIO(_checkpoint(first, s2)))

    resumed, resumed_logs = _model(99), []  # other initial weights: everything must come from the checkpoint
    s3 = session(resumed, resumed_logs)
    resumed.load_state_dict(saved["model"])
    s3.base_optimizer.load_state_dict(saved["optimizer"])
    s3.load_state_dict(saved["session"])  # before the first before_step, as the trainer does
    _train(s3, batches, stop, steps)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert s3.modifiers[-1].seen == s1.modifiers[-1].seen[stop:]
    assert resumed_logs == [row for row in straight_logs if row[0] >= stop]


def test_settings_are_validated():
    with pytest.raises(ValidationError, match="lr"):
        MFACOptimizer(lr=0)
    with pytest.raises(ValidationError, match="momentum"):
        MFACOptimizer(lr=0.1, momentum=1.0)
    with pytest.raises(ValidationError, match="num_grads"):
        MFACOptimizer(lr=0.1, num_grads=0)
    with pytest.raises(ValidationError, match="damp"):
        MFACOptimizer(lr=0.1, damp=0)
    with pytest.raises(ValidationError, match="params"):
        MFACOptimizer(lr=0.1, params=[])
    assert MFACOptimizer(lr=0.1).num_grads == 1024
    with pytest.raises(ValidationError, match="shard"):
        MFACOptimizer(lr=0.1, shard="yes")


def test_shard_is_inert_on_a_single_process():
    """shard: true applies only under torch.distributed with several ranks: here the window is whole."""
    mfac = MFACOptimizer(lr=0.05, num_grads=2, damp=1e-3, shard=True)
    assert mfac.gradient_bytes(1000) == 4 * 2 * 1000
    model = _model(2)
    session = Session([mfac], model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=4)
    _train(session, _batches(2), 0, 2)
    assert type(mfac.optimizer.window) is SlidingFisherInverse and mfac.optimizer.window.count == 2
    session.finalize()


@pytest.mark.parametrize("count_scaling", [False, True])
def test_count_scaling_reaches_the_window(count_scaling):
    mfac = MFACOptimizer(lr=0.05, num_grads=4, damp=1e-3, count_scaling=count_scaling)
    model = _model(3)
    session = Session([mfac], model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=4)
    _train(session, _batches(2), 0, 2)
    assert mfac.optimizer.window.count_scaling is count_scaling
    session.finalize()
    with pytest.raises(ValidationError, match="count_scaling"):
        MFACOptimizer(lr=0.05, count_scaling="yes")
