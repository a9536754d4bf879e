"""Where second-order pays: M-FAC against magnitude pruning and first-order optimizers on mnist-cnn.

Run from the repository root::

    python bench/quality.py                 # the full study (3 seeds; tens of minutes on 2 cores)
    python bench/quality.py --quick         # 1 seed, fewer settings: a smoke run

Writes ``bench/results/quality.md`` (tables, mean +- std over seeds) and PNG plots beside it:

a) one-shot: a dense mnist-cnn (trained per seed) pruned in one step to 50..95% by magnitude and by
   M-FAC (m in {16, 64, 256}; 1 or 16 sub-steps, i.e. 0 or 16 recomputations; Fisher blocks of 128
   coordinates or one block per layer), test accuracy right after pruning, no fine-tuning;
b) gradual to 90%: recipes/mnist_mfac_gradual.yaml against recipes/mnist_gmp_gradual.yaml (same
   schedule and fine-tuning), final test accuracy;
c) optimizers from scratch, same epochs: M-FAC (m = 512, no momentum) against SGD, SGD with
   momentum and Adam: final training loss, test accuracy, and step time over SGD's in the same run.

Every pruned weight set is the same for both methods (all conv and linear weights, global ranking).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compressor.session import Session  # noqa: E402
from compressor.trainer import evaluate, run  # noqa: E402
from compressor.zoo import build_model, load_data  # noqa: E402
from modifiers.magnitude import MagnitudePruning  # noqa: E402
from modifiers.mfac_pruning import MFACPruning  # noqa: E402

PRUNED = ["re:(conv|fc)\\d\\.weight"]
LOSS = torch.nn.functional.cross_entropy


def train_dense(seed: int, epochs: int, data: Any) -> torch.nn.Module:
    """mnist-cnn trained with SGD (lr 0.05, momentum 0.9, batch 64) for ``epochs``."""
    model = build_model("mnist-cnn", data.input_shape, data.num_classes, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(epochs):
        order = torch.Generator().manual_seed(seed * 1000 + epoch)
        for x, y in DataLoader(data.train, batch_size=64, shuffle=True, generator=order):
            opt.zero_grad()
            LOSS(model(x), y).backward()
            opt.step()
    return model


def one_shot(model: torch.nn.Module, modifier: Any, data: Any, seed: int) -> float:
    """Test accuracy of a copy of ``model`` pruned in one step by ``modifier`` (no fine-tuning)."""
    pruned = copy.deepcopy(model)
    opt = torch.optim.SGD(pruned.parameters(), lr=0.0)
    session = Session([modifier], pruned, opt, steps_per_epoch=1, data=data.train, loss_fn=LOSS)
    session.sampler.seed = seed
    session.before_step()  # start == end == 0: the one pruning step happens here
    session.after_step()
    return evaluate(pruned, data.test, LOSS)["accuracy"]


def one_shot_study(
    seeds: list[int], sparsities: list[float], grads: list[int], recomps: list[int], epochs: int
):
    data = load_data("mnist")
    rows: dict[tuple[str, float], list[float]] = {}
    for seed in seeds:
        dense = train_dense(seed, epochs, data)
        rows.setdefault(("dense", 0.0), []).append(evaluate(dense, data.test, LOSS)["accuracy"])
        for s in sparsities:
            mag = MagnitudePruning(type="MagnitudePruning", params=PRUNED, start=0, end=0, final_sparsity=s)
            rows.setdefault(("magnitude", s), []).append(one_shot(dense, mag, data, seed))
            for m in grads:
                for r in recomps:
                    for block in (128, None):
                        mfac = MFACPruning(
                            type="MFACPruning",
                            params=PRUNED,
                            start=0,
                            end=0,
                            final_sparsity=s,
                            num_grads=m,
                            num_recomputations=max(1, r),
                            block_size=block,
                        )
                        label = f"M-FAC m={m} R={r} B={block or 'layer'}"
                        began = time.perf_counter()
                        rows.setdefault((label, s), []).append(one_shot(dense, mfac, data, seed))
                        print(
                            f"seed {seed} {s:.0%} {label}: {rows[(label, s)][-1]:.2%} "
                            f"({time.perf_counter() - began:.1f} s)",
                            flush=True,
                        )
            print(f"seed {seed} {s:.0%} magnitude: {rows[('magnitude', s)][-1]:.2%}", flush=True)
    return rows


def gradual_study(seeds: list[int], out: Path) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {}
    recipes = {
        name: ROOT / "recipes" / f"{name}.yaml" for name in ("mnist_mfac_gradual", "mnist_gmp_gradual")
    }
    recipes["dense, same schedule"] = ROOT / "recipes" / "mnist_dense.yaml"
    for name, path in recipes.items():
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


def optimizer_study(seeds: list[int], epochs: int) -> dict[str, list[dict[str, float]]]:
    from compressor.mfac import MFAC

    data = load_data("mnist")
    makers = {
        "SGD": lambda p: torch.optim.SGD(p, lr=0.05),
        "SGD momentum 0.9": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        "Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
        "M-FAC m=512": lambda p: MFAC(p, lr=1e-3, num_grads=512, damp=1e-5),
    }
    results: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
        for name, make in makers.items():
            model = build_model("mnist-cnn", data.input_shape, data.num_classes, seed=seed)
            opt = make(model.parameters())
            step_time, iter_time, steps, last_loss = 0.0, 0.0, 0, float("nan")
            for epoch in range(epochs):
                order = torch.Generator().manual_seed(seed * 1000 + epoch)
                total, seen = 0.0, 0
                for x, y in DataLoader(data.train, batch_size=64, shuffle=True, generator=order):
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
            acc = evaluate(model, data.test, LOSS)["accuracy"]
            results.setdefault(name, []).append(
                {"loss": last_loss, "accuracy": acc, "step_s": step_time / steps, "iter_s": iter_time / steps}
            )
            print(
                f"seed {seed} {name}: loss {last_loss:.4f} acc {acc:.2%} "
                f"step {1e3 * step_time / steps:.2f} ms",
                flush=True,
            )
    return results


def _ms(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_report(
    out: Path, one: dict, gradual: dict, optim: dict, seeds: list[int], sparsities: list[float]
) -> str:
    lines = [f"# Quality: M-FAC against magnitude and first-order methods (mnist-cnn, seeds {seeds})", ""]
    if one:
        lines += _one_shot_table(one, sparsities)
    if gradual:
        lines += _gradual_table(gradual)
    if optim:
        lines += _optimizer_table(optim)
    text = "\n".join(lines) + "\n"
    (out / "quality.md").write_text(text)
    if one:
        _plot_one_shot(out / "quality_oneshot.png", one, sparsities)
    return text


def _one_shot_table(one: dict, sparsities: list[float]) -> list[str]:
    lines = ["## a) One-shot pruning, test accuracy (%) without fine-tuning", ""]
    methods = list(dict.fromkeys(m for m, _ in one if m != "dense"))
    lines.append("| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
    lines.append("|---|" + "---|" * len(sparsities))
    lines.append("| dense | " + " | ".join(_ms(one[("dense", 0.0)]) for _ in sparsities) + " |")
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(_ms(one[(method, s)]) for s in sparsities) + " |")
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
    sgd = statistics.fmean(r["step_s"] for r in optim["SGD"])
    sgd_iter = statistics.fmean(r["iter_s"] for r in optim["SGD"])
    for name, runs in optim.items():
        loss, acc = _ms([r["loss"] for r in runs], scale=1.0, digits=4), _ms([r["accuracy"] for r in runs])
        step = statistics.fmean(r["step_s"] for r in runs) / sgd
        iteration = statistics.fmean(r["iter_s"] for r in runs) / sgd_iter
        lines.append(f"| {name} | {loss} | {acc} | {step:.2f} | {iteration:.2f} |")
    return [*lines, ""]


def _plot_one_shot(path: Path, one: dict, sparsities: list[float]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method in dict.fromkeys(m for m, _ in one if m != "dense"):
        means = [100 * statistics.fmean(one[(method, s)]) for s in sparsities]
        style = "k--o" if method == "magnitude" else "-o"
        ax.plot([100 * s for s in sparsities], means, style, label=method, markersize=3)
    ax.set_xlabel("sparsity (% of conv and linear weights)")
    ax.set_ylabel("test accuracy after one-shot pruning (%)")
    ax.set_title("One-shot pruning of mnist-cnn: M-FAC vs magnitude")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, m in {16, 64}, R in {0, 4}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--parts", default="abc", help="which studies to run (a, b, c)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, --quick 1)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    sparsities = [0.5, 0.7, 0.8, 0.9, 0.95]
    grads, recomps = ([16, 64], [0, 4]) if args.quick else ([16, 64, 256], [0, 16])
    args.out.mkdir(parents=True, exist_ok=True)
    one = (
        one_shot_study(seeds, sparsities, grads, recomps, epochs=2 if args.quick else 8)
        if "a" in args.parts
        else {}
    )
    gradual = gradual_study(seeds, args.out / "runs") if "b" in args.parts else {}
    optim = optimizer_study(seeds, epochs=1 if args.quick else 5) if "c" in args.parts else {}
    print(write_report(args.out, one, gradual, optim, seeds, sparsities))


if __name__ == "__main__":
    main()
