"""bench/quality_minilm.py: the shared dense Fisher gives the rows of separate runs, and the report's
paired claims are computed right (a tiny BERT sentence encoder stands in for MiniLM)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from bench_scripts import load
from hf_tiny import sentence_encoder_dir

from compressor.data import CodePairs
from modifiers.mfac_pruning import MFACPruning

ROOT = Path(__file__).resolve().parents[1]
qm = load("quality_minilm")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    train = CodePairs("train")
    texts = [train[i][k] for i in range(300) for k in ("query", "document")]
    directory = sentence_encoder_dir(tmp_path_factory.mktemp("enc") / "tiny", texts)
    return qm.Job(f"hf:{directory}", max_length=32)


def _plain(sparsity: float, structure, m: int, block: int, substeps: int) -> MFACPruning:
    """The same settings as ``qm.mfac`` in the library's own modifier (no sharing)."""
    return MFACPruning(
        type="MFACPruning",
        params=qm.PRUNED,
        start=0,
        end=0,
        final_sparsity=sparsity,
        structure=structure,
        num_grads=m,
        grad_batch_size=qm.GRAD_BATCH,
        block_size=block,
        num_recomputations=substeps,
    )


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = MFACPruning.build_fisher

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MFACPruning, "build_fisher", counted)
    return calls


@pytest.mark.parametrize("block", [8, 64])  # B < m: streamed; B >= m: Woodbury
def test_rows_sharing_the_dense_fisher_equal_separate_runs(job, monkeypatch, block):
    calls = _counting(monkeypatch)
    qm._SHARED.clear()
    rows = [(0.5, "unstructured", 1), (0.5, {"n": 2, "m": 4}, 1), (0.7, "unstructured", 3)]
    shared, separate = [], []
    for sparsity, spec, substeps in rows:
        label = f"M-FAC 16x{block} R{substeps}"
        shared.append(job.one_shot(qm.method(label, sparsity, spec), seed=4)[0])
    # one build at the dense weights for all three rows, and the 2 later sub-steps of the last row
    assert len(calls) == 1 + 2
    calls.clear()
    for sparsity, spec, substeps in rows:
        separate.append(job.one_shot(_plain(sparsity, spec, 16, block, substeps), seed=4)[0])
    assert len(calls) == 1 + 1 + 3
    for a, b in zip(shared, separate, strict=True):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), name
    # another seed draws other gradients: a new Fisher and other weights
    other = job.one_shot(qm.method(f"M-FAC 16x{block} R1", 0.5, "unstructured"), seed=5)[0]
    assert len(calls) == 5 + 1
    moved = [not torch.equal(x, y) for x, y in zip(other.parameters(), shared[0].parameters(), strict=True)]
    assert any(moved)
    assert qm.pruned_fraction(shared[0]) == pytest.approx(0.5, abs=1e-3)
    assert qm.pruned_fraction(shared[2]) == pytest.approx(0.7, abs=1e-3)


def test_part_g_saves_every_row_and_resumes(job, tmp_path, monkeypatch):
    monkeypatch.setattr(qm, "STRUCTURES", {"50%": (0.5, "unstructured"), "2:4": (0.5, {"n": 2, "m": 4})})
    monkeypatch.setattr(
        qm, "G_PLAN", [("magnitude global", ["50%", "2:4"], [0]), ("M-FAC 16x8 R1", ["50%"], [0, 1])]
    )
    path = tmp_path / "g.json"
    raw = qm.part_g(job, path)
    assert set(raw["rows"]) == {"magnitude global | 50%", "magnitude global | 2:4", "M-FAC 16x8 R1 | 50%"}
    assert set(raw["rows"]["M-FAC 16x8 R1 | 50%"]) == {"0", "1"}
    assert qm.load(path) == raw
    for metric in (*qm.METRICS, "sparsity"):
        assert 0.0 <= raw["rows"]["magnitude global | 50%"]["0"][metric] <= 1.0 + 1e-6
    assert raw["dense"]["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    calls = _counting(monkeypatch)
    again = qm.part_g(job, path)  # nothing left to run
    assert calls == [] and again == raw


def _m(recall: float) -> dict[str, float]:
    return {"recall@1": recall, "mrr@10": recall, "mean_cosine": 0.9, "prune_s": 1.0}


def test_report_pairs_by_seed_and_checks_two_standard_deviations():
    rows = {
        "magnitude global | 50%": {"0": _m(0.40)},
        "M-FAC 64x128 R1 | 50%": {"0": _m(0.50), "1": _m(0.52), "2": _m(0.54)},  # +0.12 ± 0.02
        "M-FAC 64x128 R8 | 50%": {"0": _m(0.51), "1": _m(0.50), "2": _m(0.56)},  # vs R1: +0.01 ± 0.03
        "magnitude global | 70%": {"0": _m(0.20)},
        "M-FAC 64x128 R1 | 70%": {"0": _m(0.20), "1": _m(0.30)},
    }
    assert qm.paired(rows, "M-FAC 64x128 R1 | 50%", "magnitude global | 50%", "recall@1") == pytest.approx(
        [0.10, 0.12, 0.14]
    )
    # a method measured on one seed so far pairs with that seed only; magnitude with every seed
    assert qm.paired(rows, "M-FAC 64x128 R1 | 50%", "M-FAC 64x128 R1 | 70%", "recall@1") == pytest.approx(
        [0.30, 0.22]
    )
    one = {**rows, "SparseGPT | 50%": {"1": _m(0.55)}}
    assert qm.paired(one, "M-FAC 64x128 R1 | 50%", "SparseGPT | 50%", "recall@1") == pytest.approx([-0.03])
    assert qm.paired(one, "SparseGPT | 50%", "M-FAC 64x128 R1 | 50%", "recall@1") == pytest.approx([0.03])
    assert qm.claim([0.10, 0.12, 0.14]) == "+0.1200 ± 0.0200 (yes)"
    assert qm.claim([0.01, -0.02, 0.04]).endswith("(no)")
    text = "\n".join(qm.g_tables({"dense": {"recall@1": 0.55, "mrr@10": 0.66}, "rows": rows}))
    line = next(x for x in text.splitlines() if x.startswith("| M-FAC 64x128 R1 |") and "(yes)" in x)
    assert "+0.1200 ± 0.0200 (yes)" in line and "+0.0500 ± 0.0707 (no)" in line
    assert "0.5200 ± 0.0200" in text  # the recall@1 table's mean ± std over seeds


def test_part_h_runs_each_recipe_per_seed_once_and_tabulates(tmp_path, monkeypatch):
    seen = []

    def fake_run(recipe, output, *, overrides, progress):
        seen.append((Path(recipe).name, overrides["seed"]))
        recall = {"minilm_mfac_gradual.yaml": 0.5, "minilm_magnitude_gradual.yaml": 0.4}.get(
            Path(recipe).name, 0.6
        )
        recall += 0.01 * int(overrides["seed"])
        pruned = "gradual" in Path(recipe).name
        return {
            "eval": {"loss": 1.0, "recall@1": recall, "mrr@10": recall + 0.1, "mean_cosine": 0.8},
            # the trainer's dense_eval of a run without pruning is its own final model
            "dense_eval": {"recall@1": 0.56, "mrr@10": 0.66} if pruned else {"recall@1": recall},
            "sparsity": {"global": 0.8} if "gradual" in Path(recipe).name else {},
            "wall_time_s": 100.0,
        }

    monkeypatch.setattr(qm, "run", fake_run)
    path = tmp_path / "h.json"
    raw = qm.part_h(path, tmp_path / "runs", [0, 1])
    assert seen[:3] == [
        ("minilm_mfac_gradual.yaml", "0"),
        ("minilm_magnitude_gradual.yaml", "0"),
        ("minilm_dense_finetune.yaml", "0"),
    ]
    assert len(seen) == 6 and qm.load(path) == raw
    assert raw["dense"] == {"recall@1": 0.56, "mrr@10": 0.66}  # the shipped model, from a pruned run
    assert qm.part_h(path, tmp_path / "runs", [0, 1]) == raw and len(seen) == 6  # resumed: nothing rerun
    for name in qm.H_RECIPES.values():
        assert (ROOT / "recipes" / f"{name}.yaml").is_file()
    text = "\n".join(qm.h_tables(raw))
    assert "| M-FAC 64x128 (`recipes/minilm_mfac_gradual.yaml`) | 0.800 | 0.5050 ± 0.0071 |" in text
    assert "| dense, same steps (`recipes/minilm_dense_finetune.yaml`) | 0.000 | 0.6050 ± 0.0071 |" in text
    assert "recall@1 +0.1000 ± 0.0000 (yes)" in text


def test_validation_split_is_disjoint_seeded_and_a_tenth():
    train, val = qm.validation_split(4462)
    assert len(val) == 446 and len(train) == 4016
    assert not set(train) & set(val) and set(train) | set(val) == set(range(4462))
    assert qm.validation_split(4462) == (train, val)
    assert qm.validation_split(4462, seed=1)[1] != val


def test_part_j_fine_tunes_each_setting_once_and_chooses_on_validation(job, tmp_path, monkeypatch):
    monkeypatch.setattr(qm, "J_WINDOW", 4)
    monkeypatch.setattr(qm, "J_GRID", {"AdamW": [{"lr": 1e-3}], "M-FAC m=4": [{"lr": 1e-3, "damp": 1e-4}]})
    path = tmp_path / "j.json"
    raw = qm.part_j(job, path)
    assert set(raw["rows"]) == {"AdamW | lr 0.001", "M-FAC m=4 | lr 0.001, damp 0.0001"}
    for row in raw["rows"].values():
        assert row["steps"] == 4016 // qm.J_BATCH
        assert math.isfinite(row["train_loss"]) and row["step_s"] > 0
        assert 0.0 <= row["val_mrr@10"] <= 1.0 and 0.0 <= row["test_recall@1"] <= 1.0
        assert row["test_mean_cosine"] < 1.0 - 1e-4  # the weights moved away from the dense model's
    assert qm.part_j(job, path) == raw  # nothing rerun


def test_the_choice_is_by_validation_and_never_a_diverged_run():
    rows = {
        "AdamW | lr 1e-05": {"val_mrr@10": 0.5, "train_loss": 1.0},
        "AdamW | lr 2e-05": {"val_mrr@10": 0.6, "train_loss": 1.0},
        "AdamW | lr 5e-05": {"val_mrr@10": 0.9, "train_loss": math.nan},
    }
    assert qm.chosen(rows, "AdamW") == "AdamW | lr 2e-05"
    assert qm.chosen(rows, "M-FAC m=64") is None


def test_write_report_has_every_part_present_and_the_plot(tmp_path):
    rows = {"magnitude global | 50%": {"0": _m(0.40)}, "M-FAC 64x128 R1 | 50%": {"0": _m(0.5), "1": _m(0.52)}}
    qm.save(tmp_path / "quality_minilm_g.json", {"dense": {"recall@1": 0.55, "mrr@10": 0.66}, "rows": rows})
    text = qm.write_report(tmp_path)
    assert (tmp_path / "quality_minilm.md").read_text() == text
    assert (tmp_path / "quality_minilm_oneshot.png").read_bytes()[:4] == b"\x89PNG"
    assert "## g)" in text and "## h)" not in text and "## j)" not in text


def test_part_i_runs_exports_and_times_the_seed0_models_together(tmp_path, monkeypatch):
    import exporters.export as export_module

    seen, timed = [], []

    def fake_run(recipe, output, *, overrides, progress):
        seen.append((Path(recipe).name, dict(overrides)))
        output.mkdir(parents=True)
        pruned = Path(recipe).name == "minilm_structured.yaml"
        recall = {"magnitude": 0.50, "unit": 0.53, "consumers": 0.41}.get(
            overrides.get("importance", overrides.get("scope")), 0.6
        )
        csv = "step,epoch,split,name,value\n"
        if pruned:
            csv += "0,0.0,train,mac_sparsity,0.5\n0,0.0,train,heads_removed,3.0\n"
            csv += "0,0.0,train,neurons_removed,700.0\n"
        (output / "metrics.csv").write_text(csv)
        (output / "checkpoint.pt").write_bytes(b"")
        return {
            "eval": {"loss": 1.0, "recall@1": recall, "mrr@10": recall + 0.1, "mean_cosine": 0.8},
            "dense_eval": {"recall@1": 0.56, "mrr@10": 0.66} if pruned else {"recall@1": recall},
            "parameters": 17_000_000 if pruned else 22_000_000,
            "wall_time_s": 100.0,
        }

    def fake_export(checkpoint, onnx, batch):
        assert batch == "dynamic"
        Path(onnx).write_bytes(b"onnx")

    def fake_time(files, rounds, reps, seq):
        timed.append((list(files), seq))
        return {
            (label, b, t): (2.0 if label.startswith("dense") else 1.0) * b / t
            for label in files
            for b in (1, 32)
            for t in (1, 2)
        }

    monkeypatch.setattr(qm, "run", fake_run)
    monkeypatch.setattr(export_module, "export_checkpoint", fake_export)
    onnx_latency = load("onnx_latency")

    monkeypatch.setattr(onnx_latency, "time_models", fake_time)
    monkeypatch.setattr(onnx_latency, "onnx_parameters", lambda path: 123)
    path = tmp_path / "i.json"
    raw = qm.part_i(path, tmp_path / "runs", [0])
    assert [name for name, _ in seen] == ["minilm_dense.yaml"] + ["minilm_structured.yaml"] * 3
    assert all(o["seed"] == "0" for _, o in seen)
    assert timed == [(list(qm.I_RUNS), 128)]  # all four models in one timing run
    assert raw["dense"]["recall@1"] == 0.56  # the shipped model, not the dense run's own
    row = raw["rows"]["magnitude per MAC"]["0"]
    assert row["heads_removed"] == 3.0 and row["neurons_removed"] == 700.0 and row["parameters"] == 17e6
    assert qm.part_i(path, tmp_path / "runs", [0]) == qm.load(path) and len(seen) == 4  # resumed
    text = "\n".join(qm.i_tables(qm.load(path)))
    assert (
        "| group OBS per MAC, unit blocks | 0.5300 (1 seed) |" in text
        and "| 94.6% | 88.3% | 3 | 700 |" in text
    )
    assert "| dense, 1 epoch | 123 | 2000.00 ms |" in text and "| 2.00x | 2.00x | 2.00x | 2.00x |" in text
    for name, _ in qm.I_RUNS.values():
        assert (ROOT / "recipes" / f"{name}.yaml").is_file()


def test_part_k_gives_every_method_the_same_pool_and_tabulates_the_claim(job, tmp_path, monkeypatch):
    monkeypatch.setattr(qm, "K_POOL", 24)
    monkeypatch.setattr(qm, "K_STRUCTURES", ["50%", "2:4"])
    monkeypatch.setattr(
        qm,
        "K_PLAN",
        [("SparseGPT", ["50%", "2:4"], [0, 1]), ("Wanda", ["50%"], [0]), ("M-FAC 16x8 R1", ["50%"], [0, 1])],
    )
    seen: list[list[int]] = []
    original = qm.Job.one_shot

    def spy(self, modifier, seed, data=None):
        seen.append(list(data.indices))
        return original(self, modifier, seed, data)

    monkeypatch.setattr(qm.Job, "one_shot", spy)
    magnitude = {"0": _m(0.3)}
    qm.save(tmp_path / "quality_minilm_g.json", {"rows": {"magnitude global | 50%": magnitude}})
    raw = qm.part_k(job, tmp_path / "quality_minilm_k.json")
    assert raw["rows"]["magnitude global | 50%"] == magnitude  # data-free: part g's row
    for key in ("SparseGPT | 50%", "SparseGPT | 2:4", "M-FAC 16x8 R1 | 50%"):
        assert set(raw["rows"][key]) == {"0", "1"}
    pools = {
        seed: [p for p, s in zip(seen, [0, 0, 1, 1, 0, 0, 1], strict=True) if s == seed] for seed in (0, 1)
    }
    assert all(p == pools[0][0] and len(p) == 24 for p in pools[0])  # one pool per seed, for every method
    assert pools[1][0] != pools[0][0]
    sparse = raw["rows"]["SparseGPT | 50%"]["0"]
    assert sparse["sparsity"] == pytest.approx(0.5, abs=1e-6) and sparse["prune_peak_mb"] >= 0
    text = "\n".join(qm.k_tables(raw))
    assert "## k)" in text and "| M-FAC 16x8 R1 |" in text and "| vs M-FAC 16x8 R1 |" in text
