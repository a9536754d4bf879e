"""Where second-order pays: M-FAC against magnitude pruning and first-order optimizers on mnist-cnn.

Run from the repository root::

    python bench/quality.py                 # the full study (3 seeds; tens of minutes on 2 cores)
    python bench/quality.py --quick         # 1 seed, fewer settings: a smoke run

Writes ``bench/results/quality.md`` (tables, mean +- std over seeds) and PNG plots beside it:

a) one-shot: a dense mnist-cnn (trained per seed) pruned in one step to 50..95% by magnitude and by
   M-FAC (m in {16, 64, 256}; 1 or 16 sub-steps, i.e. 0 or 16 recomputations; Fisher blocks of 128
   coordinates or one block per layer), test accuracy and test loss right after pruning, no
   fine-tuning (accuracy saturates on this small test set; the loss increase is the finer measure);
b) gradual to 90%: recipes/mnist_mfac_gradual.yaml against recipes/mnist_gmp_gradual.yaml (same
   schedule and fine-tuning), final test accuracy;
c) optimizers from scratch, same epochs: M-FAC (m = 512, no momentum) against SGD, SGD with
   momentum and Adam: final training loss, test accuracy, and step time over SGD's in the same run.
   Every optimizer runs at the setting that won its own sweep (part d), and M-FAC also at the
   reference's defaults (lr 1e-3, damp 1e-5);
d) the sweep: for each optimizer a small grid (lr; for M-FAC lr x damp), seed 0, the same epochs,
   trained on 90% of the training split and scored by loss on the held-out 10% (never the test set);
e) structured: the dense models of a) with 50% of the channels of conv1, conv2 and fc1 removed in one
   shot by StructuredPruning, magnitude against second-order importance, no fine-tuning;
f) why M-FAC and magnitude agree on these models: the empirical Fisher's scale against damp, and
   one-shot pruning to 90/95/98% at damps from 1e-5 down to 1e-8;
g) the choice of StructuredPruning's default relative damp: dense models trained on 90% of the
   training split (a different split per seed), 50% of the channels removed as in e) at each damp
   of STRUCTURED_DAMPS (gradients from the 90%), scored on the held-out 10% (never the test set);
h) MFACPruning's damping on the same held-out splits: absolute damp 1e-5 against relative damps
   (MFAC_DAMPS), one-shot to 90/95/98% (m = 64, B = 128, one sub-step), scored on the held-out 10%.

Each part keeps its raw results in ``quality_<part>.json`` beside the report, so parts can run in
separate invocations (``--parts e``) and the report is rebuilt from all of them.

Every pruned weight set is the same for both methods (all conv and linear weights, global ranking).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, random_split

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compressor.data import DataBundle, load_data  # noqa: E402
from compressor.engine import evaluate, run  # noqa: E402
from compressor.lifecycle.session import Session  # noqa: E402
from compressor.models import build_model  # noqa: E402
from modifiers.channel_pruning import StructuredPruning  # noqa: E402
from modifiers.magnitude import MagnitudePruning  # noqa: E402
from modifiers.mfac_pruning import MFACPruning  # noqa: E402

PRUNED = ["re:(conv|fc)\\d\\.weight"]
LOSS = torch.nn.functional.cross_entropy


def train_dense(
    seed: int, epochs: int, data: Any, cache: Path | None = None, tag: str = ""
) -> torch.nn.Module:
    """mnist-cnn trained on ``data.train`` with SGD (lr 0.05, momentum 0.9, batch 64) for ``epochs``.

    With ``cache`` (a folder), the trained weights are kept there and reused by later parts;
    ``tag`` names a training set other than the full training split in the cached file's name.
    """
    model = build_model("mnist-cnn", data.input_shape, data.num_classes, seed=seed)
    size = sum(p.numel() for p in model.parameters())
    path = cache / f"dense-mnist-cnn-{size}-seed{seed}-epochs{epochs}{tag}.pt" if cache else None
    if path is not None and path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(epochs):
        order = torch.Generator().manual_seed(seed * 1000 + epoch)
        for x, y in DataLoader(data.train, batch_size=64, shuffle=True, generator=order):
            opt.zero_grad()
            LOSS(model(x), y).backward()
            opt.step()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model


def one_shot(model: torch.nn.Module, modifier: Any, data: Any, seed: int) -> dict[str, float]:
    """Test loss and accuracy of a copy of ``model`` pruned in one step by ``modifier`` (no fine-tuning)."""
    pruned = copy.deepcopy(model)
    opt = torch.optim.SGD(pruned.parameters(), lr=0.0)
    session = Session([modifier], pruned, opt, steps_per_epoch=1, data=data.train, loss_fn=LOSS)
    session.sampler.seed = seed
    session.before_step()  # start == end == 0: the one pruning step happens here
    session.after_step()
    return evaluate(pruned, data.test, LOSS)


def one_shot_magnitude(sparsity: float) -> MagnitudePruning:
    """Global magnitude pruning of PRUNED to ``sparsity`` in one step."""
    return MagnitudePruning(type="MagnitudePruning", params=PRUNED, start=0, end=0, final_sparsity=sparsity)


def one_shot_mfac(
    sparsity: float,
    num_grads: int,
    substeps: int,
    block: int | None,
    damp: float = 1e-5,
    relative: bool = False,
) -> MFACPruning:
    """M-FAC OBS pruning of PRUNED to ``sparsity`` in one step of ``substeps`` sub-steps (grad batch 32)."""
    return MFACPruning(
        type="MFACPruning",
        params=PRUNED,
        start=0,
        end=0,
        final_sparsity=sparsity,
        num_grads=num_grads,
        num_recomputations=substeps,
        block_size=block,
        damp=damp,
        relative_damp=relative,
    )


#: (m, R) settings of part a not run: m = 256 with 16 recomputations samples 2 x 16 x 256 gradients
#: of 32 images per pruning (about 6 minutes each on these 2 cores, 90 minutes for 3 seeds x 5 sparsities).
LEFT_OUT = {(256, 16)}


def one_shot_study(
    seeds: list[int], sparsities: list[float], grads: list[int], recomps: list[int], epochs: int, cache: Path
):
    data = load_data("mnist")
    rows: dict[tuple[str, float], list[dict[str, float]]] = {}
    for seed in seeds:
        dense = train_dense(seed, epochs, data, cache)
        rows.setdefault(("dense", 0.0), []).append(evaluate(dense, data.test, LOSS))
        for s in sparsities:
            rows.setdefault(("magnitude", s), []).append(one_shot(dense, one_shot_magnitude(s), data, seed))
            for m in grads:
                for r in recomps:
                    if (m, r) in LEFT_OUT:
                        continue
                    for block in (128, None):
                        mfac = one_shot_mfac(s, m, max(1, r), block)
                        label = f"M-FAC m={m} R={r} B={block or 'layer'}"
                        began = time.perf_counter()
                        rows.setdefault((label, s), []).append(one_shot(dense, mfac, data, seed))
                        got = rows[(label, s)][-1]
                        print(
                            f"seed {seed} {s:.0%} {label}: {got['accuracy']:.2%} loss {got['loss']:.4f} "
                            f"({time.perf_counter() - began:.1f} s)",
                            flush=True,
                        )
            got = rows[("magnitude", s)][-1]
            print(f"seed {seed} {s:.0%} magnitude: {got['accuracy']:.2%} loss {got['loss']:.4f}", flush=True)
    return rows


DAMPS = (1e-5, 1e-6, 1e-7, 1e-8)
DAMP_SPARSITIES = (0.9, 0.95, 0.98)
#: (damp, sub-steps, relative_damp) of part f: absolute damps, then damps relative to mean diag(G^T G / m)
DAMP_SETTINGS = [(d, 1, False) for d in DAMPS] + [(1e-7, 16, False)]
DAMP_SETTINGS += [(d, 1, True) for d in (1.0, 0.1, 0.01)] + [(0.1, 16, True)]


def _damp_label(damp: float, substeps: int, relative: bool) -> str:
    kind = "relative damp" if relative else "damp"
    return f"M-FAC {kind}={damp:g} R={substeps if substeps > 1 else 0}"


def damp_study(seeds: list[int], epochs: int, cache: Path) -> dict[str, Any]:
    """Why M-FAC and magnitude agree on the trained model: the empirical Fisher's scale against damp.

    Per seed: the training loss, mean diag(G^T G / m) of 64 sampled gradients against damp, the
    overlap of M-FAC's and magnitude's 90% pruned sets; then one-shot pruning to 90/95/98% by
    magnitude and by M-FAC (m = 64, B = 128) at each setting of DAMP_SETTINGS.
    """
    from compressor.lifecycle.sampling import GradientSampler
    from compressor.mfac import FisherInverse

    data = load_data("mnist")
    rows: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
        dense = train_dense(seed, epochs, data, cache)
        names = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
        grads = GradientSampler(dense, data.train, LOSS, seed=seed).sample(names, 64, 32)
        w = torch.cat([dict(dense.named_parameters())[n].detach().reshape(-1) for n in names])
        fisher_diag = grads.double().pow(2).mean(0)
        keep = int(0.9 * w.numel())
        by_magnitude = set(torch.argsort(w.abs())[:keep].tolist())
        diag = {
            "train_loss": evaluate(dense, data.train, LOSS)["loss"],
            "mean_fisher_diag": float(fisher_diag.mean()),
        }
        for damp in DAMPS:
            saliency = w.double() ** 2 / FisherInverse(grads, damp, block_size=128).diag().double()
            diag[f"above_{damp:g}"] = float((fisher_diag > damp).double().mean())
            diag[f"overlap_{damp:g}"] = (
                len(set(torch.argsort(saliency)[:keep].tolist()) & by_magnitude) / keep
            )
        rows.setdefault("diagnostics", []).append(diag)
        for s in DAMP_SPARSITIES:
            rows.setdefault(f"magnitude {s:.0%}", []).append(
                one_shot(dense, one_shot_magnitude(s), data, seed)
            )
            for damp, r, relative in DAMP_SETTINGS:
                mfac = one_shot_mfac(s, 64, r, 128, damp, relative)
                label = f"{_damp_label(damp, r, relative)} {s:.0%}"
                rows.setdefault(label, []).append(one_shot(dense, mfac, data, seed))
                got = rows[label][-1]
                print(f"seed {seed} {label}: {got['accuracy']:.2%} loss {got['loss']:.4f}", flush=True)
    return rows


STRUCTURED = ["conv1.weight", "conv2.weight", "fc1.weight"]


def structured_study(seeds: list[int], epochs: int, cache: Path) -> dict[str, list[dict[str, float]]]:
    """Half the channels of conv1, conv2 and fc1 removed in one shot by each importance, no fine-tuning."""
    data = load_data("mnist")
    rows: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
        dense = train_dense(seed, epochs, data, cache)
        rows.setdefault("dense", []).append(evaluate(dense, data.test, LOSS))
        for importance in ("magnitude", "second_order"):
            modifier = StructuredPruning(
                type="StructuredPruning",
                params=STRUCTURED,
                start=0,
                channel_sparsity=0.5,
                importance=importance,
            )
            got = one_shot(dense, modifier, data, seed)
            rows.setdefault(importance, []).append(got)
            print(
                f"seed {seed} channels 50% {importance}: {got['accuracy']:.2%} loss {got['loss']:.4f}",
                flush=True,
            )
    return rows


def held_out(data: Any, seed: int) -> Any:
    """The training split cut into 90% (``train``) and a held-out 10% (``test``), by ``seed``."""
    n_val = len(data.train) // 10
    fit, val = random_split(
        data.train, [len(data.train) - n_val, n_val], torch.Generator().manual_seed(10_000 + seed)
    )
    return DataBundle(fit, val, data.input_shape, data.num_classes, f"{data.name}-held-out-{seed}")


#: Relative damps of part g: lambda = damp * mean(diag(G^T G / m)) of each layer's sampled gradients.
STRUCTURED_DAMPS = (0.01, 0.1, 1.0, 3.0, 10.0, 30.0, 100.0)


def structured_damp_study(seeds: list[int], epochs: int, cache: Path) -> dict[str, list[dict[str, float]]]:
    """Part g: StructuredPruning (second_order) at each relative damp, scored on a held-out split."""
    data = load_data("mnist")
    rows: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
        split = held_out(data, seed)
        dense = train_dense(seed, epochs, split, cache, tag=f"-fit90-{seed}")
        rows.setdefault("dense", []).append(evaluate(dense, split.test, LOSS))
        settings = [("magnitude", 1.0)] + [("second_order", damp) for damp in STRUCTURED_DAMPS]
        for importance, damp in settings:
            modifier = StructuredPruning(
                type="StructuredPruning",
                params=STRUCTURED,
                start=0,
                channel_sparsity=0.5,
                importance=importance,
                damp=damp,
                relative_damp=True,
            )
            label = importance if importance == "magnitude" else f"second_order damp={damp:g}"
            got = one_shot(dense, modifier, split, seed)
            rows.setdefault(label, []).append(got)
            print(f"seed {seed} held-out {label}: {got['accuracy']:.2%} loss {got['loss']:.4f}", flush=True)
    return rows


#: Settings of part h: (damp, relative_damp); absolute 1e-5 was MFACPruning's default.
MFAC_DAMPS = [(1e-5, False), (0.01, True), (0.03, True), (0.1, True), (0.3, True), (1.0, True)]


def _mfac_damp_label(damp: float, relative: bool) -> str:
    return f"M-FAC {'relative' if relative else 'absolute'} damp={damp:g}"


def mfac_damp_study(seeds: list[int], epochs: int, cache: Path) -> dict[str, list[dict[str, float]]]:
    """Part h: one-shot M-FAC (m = 64, B = 128, one sub-step) at each of MFAC_DAMPS against
    magnitude, to 90/95/98%, on the held-out splits of part g."""
    data = load_data("mnist")
    rows: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
        split = held_out(data, seed)
        dense = train_dense(seed, epochs, split, cache, tag=f"-fit90-{seed}")
        rows.setdefault("dense", []).append(evaluate(dense, split.test, LOSS))
        for s in DAMP_SPARSITIES:
            rows.setdefault(f"magnitude {s:.0%}", []).append(
                one_shot(dense, one_shot_magnitude(s), split, seed)
            )
            for damp, relative in MFAC_DAMPS:
                label = f"{_mfac_damp_label(damp, relative)} {s:.0%}"
                got = one_shot(dense, one_shot_mfac(s, 64, 1, 128, damp, relative), split, seed)
                rows.setdefault(label, []).append(got)
                print(
                    f"seed {seed} held-out {label}: {got['accuracy']:.2%} loss {got['loss']:.4f}", flush=True
                )
    return rows


def gradual_study(
    seeds: list[int], out: Path, only: list[str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Part b: each recipe (or those named in ``only``) run to the end per seed; their summaries."""
    results: dict[str, list[dict[str, Any]]] = {}
    recipes = {
        name: ROOT / "recipes" / f"{name}.yaml" for name in ("mnist_mfac_gradual", "mnist_gmp_gradual")
    }
    recipes["dense, same schedule"] = ROOT / "recipes" / "mnist_dense.yaml"
    for name, path in recipes.items():
        if only and name not in only:
            continue
        for seed in seeds:
            summary = run(
                path,
                out / f"{name.replace(' ', '_').replace(',', '')}-{seed}",
                overrides={"seed": str(seed)},
                progress=False,
            )
            results.setdefault(name, []).append(summary)
            print(
                f"{name} seed {seed}: {summary['eval']['accuracy']:.2%} "
                f"(dense {summary['dense_eval_accuracy']:.2%}, sparsity {summary['sparsity']['global']:.1%})",
                flush=True,
            )
    return results


REFERENCE_MFAC = {"lr": 1e-3, "damp": 1e-5}
SWEEP: dict[str, list[dict[str, float]]] = {
    "SGD": [{"lr": lr} for lr in (0.01, 0.05, 0.2)],
    "SGD momentum 0.9": [{"lr": lr} for lr in (0.005, 0.02, 0.05)],
    "Adam": [{"lr": lr} for lr in (3e-4, 1e-3, 3e-3)],
    "M-FAC m=512": [{"lr": lr, "damp": damp} for lr in (1e-4, 1e-3, 1e-2) for damp in (1e-5, 1e-4, 1e-3)],
}
#: the same grid with the Fisher divided by the gradients in the window, not m, while it fills
SWEEP["M-FAC m=512 count scaling"] = SWEEP["M-FAC m=512"]


def make_optimizer(name: str, params: Any, hyper: dict[str, float]) -> torch.optim.Optimizer:
    """One of the compared optimizers (``name`` a key of SWEEP) with its hyperparameters."""
    from compressor.mfac import MFAC

    if name == "SGD":
        return torch.optim.SGD(params, lr=hyper["lr"])
    if name == "SGD momentum 0.9":
        return torch.optim.SGD(params, lr=hyper["lr"], momentum=0.9)
    if name == "Adam":
        return torch.optim.Adam(params, lr=hyper["lr"])
    scaled = name.endswith("count scaling")
    return MFAC(params, lr=hyper["lr"], num_grads=512, damp=hyper["damp"], count_scaling=scaled)


def train_from_scratch(
    name: str, hyper: dict[str, float], seed: int, epochs: int, train: Any, held_out: Any, data: Any
) -> dict[str, float]:
    """mnist-cnn trained from scratch (batch 64): last epoch's train loss, held-out loss/accuracy, times."""
    model = build_model("mnist-cnn", data.input_shape, data.num_classes, seed=seed)
    opt = make_optimizer(name, model.parameters(), hyper)
    step_time, iter_time, steps, last_loss = 0.0, 0.0, 0, float("nan")
    for epoch in range(epochs):
        order = torch.Generator().manual_seed(seed * 1000 + epoch)
        total, seen = 0.0, 0
        for x, y in DataLoader(train, batch_size=64, shuffle=True, generator=order):
            started = time.perf_counter()
            opt.zero_grad()
            loss = LOSS(model(x), y)
            loss.backward()
            began = time.perf_counter()
            opt.step()
            ended = time.perf_counter()
            step_time += ended - began
            iter_time += ended - started
            steps += 1
            total += loss.item() * len(y)
            seen += len(y)
        last_loss = total / seen
    scores = evaluate(model, held_out, LOSS)
    return {
        "loss": last_loss,
        "held_out_loss": scores["loss"],
        "accuracy": scores["accuracy"],
        "step_s": step_time / steps,
        "iter_s": iter_time / steps,
    }


def sweep_study(
    epochs: int, only: list[str] | None = None
) -> dict[str, list[tuple[dict[str, float], dict[str, float]]]]:
    """Each optimizer's grid (or those in ``only``) on seed 0: 90% of the training split to train,
    10% to score (by loss)."""
    data = load_data("mnist")
    n_val = len(data.train) // 10
    fit, val = random_split(data.train, [len(data.train) - n_val, n_val], torch.Generator().manual_seed(0))
    results: dict[str, list[tuple[dict[str, float], dict[str, float]]]] = {}
    for name, grid in SWEEP.items():
        if only and name not in only:
            continue
        for hyper in grid:
            got = train_from_scratch(name, hyper, 0, epochs, fit, val, data)
            if not math.isfinite(got["held_out_loss"]):
                got["held_out_loss"] = math.inf
            results.setdefault(name, []).append((hyper, got))
            print(
                f"sweep {name} {hyper}: train loss {got['loss']:.4f} val loss {got['held_out_loss']:.4f} "
                f"val acc {got['accuracy']:.2%}",
                flush=True,
            )
    return results


def best_settings(sweep: dict[str, list[tuple[dict[str, float], dict[str, float]]]]) -> dict[str, dict]:
    """Each optimizer's setting with the lowest held-out loss (the reference defaults without a sweep)."""
    if not sweep:
        return {name: (REFERENCE_MFAC if "M-FAC" in name else grid[1]) for name, grid in SWEEP.items()}
    return {name: min(runs, key=lambda r: r[1]["held_out_loss"])[0] for name, runs in sweep.items()}


def optimizer_study(
    seeds: list[int], epochs: int, settings: dict[str, dict[str, float]]
) -> dict[str, list[dict[str, float]]]:
    """Each optimizer at ``settings`` (and M-FAC at the reference defaults) from scratch, per seed."""
    data = load_data("mnist")
    runs = {f"{name} ({_hyper(h)})": (name, h) for name, h in settings.items()}
    reference = f"M-FAC m=512 ({_hyper(REFERENCE_MFAC)}, reference defaults)"
    if "M-FAC m=512" in settings and settings["M-FAC m=512"] != REFERENCE_MFAC:
        runs[reference] = ("M-FAC m=512", REFERENCE_MFAC)
    results: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
        for label, (name, hyper) in runs.items():
            got = train_from_scratch(name, hyper, seed, epochs, data.train, data.test, data)
            results.setdefault(label, []).append(got)
            print(
                f"seed {seed} {label}: loss {got['loss']:.4f} acc {got['accuracy']:.2%} "
                f"step {1e3 * got['step_s']:.2f} ms",
                flush=True,
            )
    return results


def _hyper(hyper: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in hyper.items())


def _ms(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_report(out: Path, parts: dict[str, Any], sparsities: list[float]) -> str:
    """quality.md (and the one-shot plot) from whichever parts have results."""
    seeds = sorted({seed for name, part in parts.items() if name != "d" for seed in part["seeds"]})
    lines = [f"# Quality: M-FAC against magnitude and first-order methods (mnist-cnn, seeds {seeds})", ""]
    if "a" in parts:
        lines += _one_shot_table(parts["a"]["rows"], sparsities, "accuracy")
        lines += _one_shot_table(parts["a"]["rows"], sparsities, "loss")
        lines += _paired_table(parts["a"]["rows"], sparsities)
        lines += [f"Not run (time): {', '.join(f'm={m} R={r}' for m, r in sorted(LEFT_OUT))}.", ""]
    tables = {
        "b": _gradual_table,
        "c": _optimizer_table,
        "d": _sweep_table,
        "e": _structured_table,
        "f": _damp_table,
        "g": _structured_damp_table,
        "h": _mfac_damp_table,
    }
    for name, table in tables.items():
        if name in parts:
            lines += table(parts[name]["rows"])
    notes = out / "quality_notes.md"  # the reading of these results, written by hand
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    text = "\n".join(lines) + "\n"
    (out / "quality.md").write_text(text)
    if "a" in parts:
        _plot_one_shot(out / "quality_oneshot.png", parts["a"]["rows"], sparsities)
    return text


def save_part(out: Path, part: str, seeds: list[int], rows: Any) -> None:
    """Keep a part's raw results (``quality_<part>_seeds<..>.json``) so parts and seeds can run separately."""
    if part == "a":
        rows = [[method, s, values] for (method, s), values in rows.items()]
    name = f"quality_{part}_seeds{'-'.join(map(str, seeds))}.json"
    (out / name).write_text(json.dumps({"seeds": seeds, "rows": rows}, indent=1))


def load_parts(out: Path) -> dict[str, Any]:
    """Every part saved by ``save_part`` in ``out``, the runs of separate seed sets merged by seed."""
    parts: dict[str, Any] = {}
    for part in "abcdefgh":
        saved = [json.loads(p.read_text()) for p in sorted(out.glob(f"quality_{part}_seeds*.json"))]
        if not saved:
            continue
        saved.sort(key=lambda one: one["seeds"])
        merged: dict[Any, list] = {}
        for one in saved:
            rows = one["rows"]
            if part == "a":
                rows = {(m, s): values for m, s, values in rows}
            for key, values in rows.items():
                merged.setdefault(key, []).extend(values)
        parts[part] = {"seeds": [seed for one in saved for seed in one["seeds"]], "rows": merged}
    return parts


def _one_shot_table(one: dict, sparsities: list[float], measure: str) -> list[str]:
    title = "test accuracy (%)" if measure == "accuracy" else "test loss (cross-entropy, lower is better)"
    lines = [f"## a) One-shot pruning, {title} without fine-tuning", ""]
    methods = list(dict.fromkeys(m for m, _ in one if m != "dense"))
    lines.append("| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
    lines.append("|---|" + "---|" * len(sparsities))
    scale, digits = (100.0, 2) if measure == "accuracy" else (1.0, 4)

    def cell(runs: list[dict[str, float]]) -> str:
        return _ms([r[measure] for r in runs], scale=scale, digits=digits)

    lines.append("| dense | " + " | ".join(cell(one[("dense", 0.0)]) for _ in sparsities) + " |")
    for method in methods:
        best = {s: min(statistics.fmean(r["loss"] for r in one[(m, s)]) for m in methods) for s in sparsities}
        cells = []
        for s in sparsities:
            text = cell(one[(method, s)])
            mean_loss = statistics.fmean(r["loss"] for r in one[(method, s)])
            cells.append(f"**{text}**" if measure == "loss" and mean_loss == best[s] else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _paired_table(one: dict, sparsities: list[float]) -> list[str]:
    """Per seed, magnitude's test loss minus the method's (positive: the method pruned better)."""
    lines = [
        "## a) Paired by seed: magnitude's test loss minus the method's (> 0: better than magnitude)",
        "",
    ]
    lines.append("| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
    lines.append("|---|" + "---|" * len(sparsities))
    for method in dict.fromkeys(m for m, _ in one if m not in ("dense", "magnitude")):
        cells = []
        for s in sparsities:
            diffs = [
                b["loss"] - a["loss"] for a, b in zip(one[(method, s)], one[("magnitude", s)], strict=True)
            ]
            wins = sum(d > 0 for d in diffs)
            cells.append(f"{_ms(diffs, 1.0, 4)} ({wins}/{len(diffs)})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return [*lines, "", "(k/n): the seeds on which the method's loss is lower than magnitude's.", ""]


def _structured_table(rows: dict[str, list[dict[str, float]]]) -> list[str]:
    lines = ["## e) One-shot removal of 50% of the channels (conv1, conv2, fc1), no fine-tuning", ""]
    lines += ["| importance | test accuracy (%) | test loss |", "|---|---|---|"]
    for name, runs in rows.items():
        acc = _ms([r["accuracy"] for r in runs])
        loss = _ms([r["loss"] for r in runs], scale=1.0, digits=4)
        lines.append(f"| {name} | {acc} | {loss} |")
    return [*lines, ""]


def _damp_table(rows: dict[str, list[dict[str, float]]]) -> list[str]:
    diag = rows["diagnostics"]
    lines = ["## f) Why M-FAC and magnitude agree here: the empirical Fisher against damp", ""]
    lines += [
        f"Dense models: training loss {_ms([d['train_loss'] for d in diag], 1.0, 4)}; mean diagonal of "
        f"G^T G / m (64 gradients of 32 images) {statistics.fmean(d['mean_fisher_diag'] for d in diag):.2e}.",
        "",
        "| damp | coordinates with diag(G^T G / m) > damp | 90% pruned set shared with magnitude's |",
        "|---|---|---|",
    ]
    for damp in DAMPS:
        above = _ms([d[f"above_{damp:g}"] for d in diag], digits=2)
        overlap = _ms([d[f"overlap_{damp:g}"] for d in diag], digits=2)
        lines.append(f"| {damp:g} | {above} % | {overlap} % |")
    lines += ["", "One-shot test loss / accuracy (%), m = 64, B = 128:", ""]
    methods = ["magnitude"] + [_damp_label(*setting) for setting in DAMP_SETTINGS]
    lines += ["| method | " + " | ".join(f"{s:.0%}" for s in DAMP_SPARSITIES) + " |"]
    lines += ["|---|" + "---|" * len(DAMP_SPARSITIES)]
    for method in methods:
        cells = []
        if f"{method} {DAMP_SPARSITIES[0]:.0%}" not in rows:
            continue  # a setting added after these results were measured
        for s in DAMP_SPARSITIES:
            runs = rows[f"{method} {s:.0%}"]
            cells.append(
                f"{_ms([r['loss'] for r in runs], 1.0, 4)} / {_ms([r['accuracy'] for r in runs], digits=1)}"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def best_structured_damp(rows: dict[str, list[dict[str, float]]]) -> float:
    """Part g's choice: the relative damp with the lowest mean held-out loss."""
    losses = {
        float(name.split("=")[1]): statistics.fmean(r["loss"] for r in runs)
        for name, runs in rows.items()
        if name.startswith("second_order damp=")
    }
    return min(losses, key=losses.__getitem__)


def _structured_damp_table(rows: dict[str, list[dict[str, float]]]) -> list[str]:
    chosen = best_structured_damp(rows)
    lines = [
        "## g) StructuredPruning's relative damp, chosen on held-out data (50% of the channels, no "
        "fine-tuning; trained on 90% of the training split, scored on the other 10%)",
        "",
        "| importance | held-out accuracy (%) | held-out loss |",
        "|---|---|---|",
    ]
    for name, runs in rows.items():
        mark = " (chosen)" if name == f"second_order damp={chosen:g}" else ""
        acc = _ms([r["accuracy"] for r in runs])
        loss = _ms([r["loss"] for r in runs], scale=1.0, digits=4)
        lines.append(f"| {name}{mark} | {acc} | {loss} |")
    return [*lines, ""]


def best_mfac_damp(rows: dict[str, list[dict[str, float]]]) -> tuple[float, bool]:
    """Part h's choice: the (damp, relative) with the lowest held-out loss, averaged over sparsities."""
    present = [(d, r) for d, r in MFAC_DAMPS if f"{_mfac_damp_label(d, r)} {DAMP_SPARSITIES[0]:.0%}" in rows]

    def mean_loss(setting: tuple[float, bool]) -> float:
        label = _mfac_damp_label(*setting)
        return statistics.fmean(
            statistics.fmean(r["loss"] for r in rows[f"{label} {s:.0%}"]) for s in DAMP_SPARSITIES
        )

    return min(present, key=mean_loss)


def _mfac_damp_table(rows: dict[str, list[dict[str, float]]]) -> list[str]:
    dense = rows["dense"]
    chosen = _mfac_damp_label(*best_mfac_damp(rows))
    lines = [
        "## h) MFACPruning's damping on held-out data (one-shot, m = 64, B = 128, one sub-step; "
        "held-out loss / accuracy (%))",
        "",
        f"Dense: {_ms([r['loss'] for r in dense], 1.0, 4)} / {_ms([r['accuracy'] for r in dense], digits=1)}",
        "",
        "| method | " + " | ".join(f"{s:.0%}" for s in DAMP_SPARSITIES) + " |",
        "|---|" + "---|" * len(DAMP_SPARSITIES),
    ]
    for method in ["magnitude"] + [_mfac_damp_label(*setting) for setting in MFAC_DAMPS]:
        if f"{method} {DAMP_SPARSITIES[0]:.0%}" not in rows:
            continue
        cells = []
        for s in DAMP_SPARSITIES:
            runs = rows[f"{method} {s:.0%}"]
            cells.append(
                f"{_ms([r['loss'] for r in runs], 1.0, 4)} / {_ms([r['accuracy'] for r in runs], digits=1)}"
            )
        mark = " (chosen)" if method == chosen else ""
        lines.append(f"| {method}{mark} | " + " | ".join(cells) + " |")
    return [*lines, "", "Chosen: the lowest held-out loss averaged over the three sparsities.", ""]


def _sweep_table(sweep: dict) -> list[str]:
    lines = ["## d) Sweep (seed 0; trained on 90% of the training split, scored on the held-out 10%)", ""]
    lines += ["| optimizer | setting | final train loss | held-out loss | held-out accuracy (%) |"]
    lines += ["|---|---|---|---|---|"]
    for name, runs in sweep.items():
        best = min(runs, key=lambda r: r[1]["held_out_loss"])[0]
        for hyper, got in runs:
            mark = " (chosen)" if hyper == best else ""
            lines.append(
                f"| {name} | {_hyper(hyper)}{mark} | {got['loss']:.4f} | {got['held_out_loss']:.4f} | "
                f"{100 * got['accuracy']:.2f} |"
            )
    return [*lines, ""]


def _gradual_table(gradual: dict) -> list[str]:
    lines = ["## b) Gradual pruning to 90% with fine-tuning, final test accuracy (%)", ""]
    lines += ["| recipe | dense (same run) | pruned | global sparsity |", "|---|---|---|---|"]
    for name, runs in gradual.items():
        dense = _ms([r["dense_eval_accuracy"] for r in runs])
        pruned = _ms([r["eval"]["accuracy"] for r in runs])
        lines.append(
            f"| {name} | {dense} | {pruned} | {_ms([r['sparsity']['global'] for r in runs], digits=1)} |"
        )
    return [*lines, ""]


def _optimizer_table(optim: dict) -> list[str]:
    lines = ["## c) Optimizers from scratch (same epochs)", ""]
    lines += [
        "| optimizer | final train loss | test accuracy (%) | step time / SGD's | iteration time / SGD's |",
        "|---|---|---|---|---|",
    ]
    baseline = optim[next(name for name in optim if name.startswith("SGD ("))]
    sgd = statistics.fmean(r["step_s"] for r in baseline)
    sgd_iter = statistics.fmean(r["iter_s"] for r in baseline)
    for name, runs in optim.items():
        loss, acc = _ms([r["loss"] for r in runs], scale=1.0, digits=4), _ms([r["accuracy"] for r in runs])
        step = statistics.fmean(r["step_s"] for r in runs) / sgd
        iteration = statistics.fmean(r["iter_s"] for r in runs) / sgd_iter
        lines.append(f"| {name} | {loss} | {acc} | {step:.2f} | {iteration:.2f} |")
    return [*lines, ""]


def _plot_one_shot(path: Path, one: dict, sparsities: list[float]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5))
    FigureCanvasAgg(fig)
    for i, (measure, scale, label) in enumerate(
        [
            ("accuracy", 100.0, "test accuracy after one-shot pruning (%)"),
            ("loss", 1.0, "test loss after one-shot pruning"),
        ]
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        for method in dict.fromkeys(m for m, _ in one if m != "dense"):
            means = [scale * statistics.fmean(r[measure] for r in one[(method, s)]) for s in sparsities]
            style = "k--o" if method == "magnitude" else "-o"
            ax.plot([100 * s for s in sparsities], means, style, label=method, markersize=3)
        dense = scale * statistics.fmean(r[measure] for r in one[("dense", 0.0)])
        ax.axhline(dense, color="grey", linewidth=1, linestyle=":", label="dense")
        ax.set_xlabel("sparsity (% of conv and linear weights)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle("One-shot pruning of mnist-cnn: M-FAC vs magnitude (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, m 16 or 64, R 0 or 4, less training")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--parts", default="aefbdc", help="studies to run (a-h; c uses d's choice)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, --quick 1)")
    parser.add_argument("--seed-list", default=None, help="run these seeds only, e.g. 1,2 (merged on report)")
    parser.add_argument(
        "--only", default=None, help="parts b, c, d: these recipes or optimizers only (comma-separated)"
    )
    args = parser.parse_args()
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    if args.seed_list:
        seeds = [int(seed) for seed in args.seed_list.split(",")]
    sparsities = [0.5, 0.7, 0.8, 0.9, 0.95]
    grads, recomps = ([16, 64], [0, 4]) if args.quick else ([16, 64, 256], [0, 16])
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "runs"
    dense_epochs = 2 if args.quick else 8
    if "a" in args.parts:
        one = one_shot_study(seeds, sparsities, grads, recomps, dense_epochs, cache)
        save_part(args.out, "a", seeds, one)
    if "e" in args.parts:
        save_part(args.out, "e", seeds, structured_study(seeds, dense_epochs, cache))
    if "f" in args.parts:
        save_part(args.out, "f", seeds, damp_study(seeds, dense_epochs, cache))
    if "g" in args.parts:
        save_part(args.out, "g", seeds, structured_damp_study(seeds, dense_epochs, cache))
    if "h" in args.parts:
        save_part(args.out, "h", seeds, mfac_damp_study(seeds, dense_epochs, cache))
    only = args.only.split(",") if args.only else None
    if "b" in args.parts:
        rows = gradual_study(seeds, args.out / "runs", only)
        if only:  # keep the other recipes' runs of the same seeds
            saved = args.out / f"quality_b_seeds{'-'.join(map(str, seeds))}.json"
            rows = {**(json.loads(saved.read_text())["rows"] if saved.is_file() else {}), **rows}
        save_part(args.out, "b", seeds, rows)
    optimizer_epochs = 1 if args.quick else 5
    if "d" in args.parts:
        rows = sweep_study(optimizer_epochs, only)
        if only:  # keep the other optimizers' sweep
            rows = {**load_parts(args.out).get("d", {}).get("rows", {}), **rows}
        save_part(args.out, "d", [0], rows)
    if "c" in args.parts:
        sweep = load_parts(args.out).get("d", {}).get("rows", {})
        settings = best_settings(sweep)
        if only:
            settings = {name: hyper for name, hyper in settings.items() if name in only}
        rows = optimizer_study(seeds, optimizer_epochs, settings)
        if only:  # keep the other optimizers' runs of the same seeds
            saved = args.out / f"quality_c_seeds{'-'.join(map(str, seeds))}.json"
            rows = {**(json.loads(saved.read_text())["rows"] if saved.is_file() else {}), **rows}
        save_part(args.out, "c", seeds, rows)
    print(write_report(args.out, load_parts(args.out), sparsities))


if __name__ == "__main__":
    main()
