"""The sentence-embedding contrastive task on a tiny BERT sentence encoder (no download): batches,
loss against an explicit cross entropy, whole-split retrieval metrics, the dense reference, and
recipes that prune, resume and report the dense figures beside the pruned ones."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from test_hf_models import WORDS, _config, _save_sentence_layout, _save_tokenizer
from torch.utils.data import Dataset

from compressor.data import CodePairs
from compressor.data import builtin as datasets
from compressor.engine import evaluate, run
from compressor.models import builtin as models
from compressor.recipe import RecipeError
from compressor.tasks import TaskError, build_task, retrieval
from compressor.tasks.contrastive import ContrastiveTask, embed

ENCODER_LINEARS = r"re:.*encoder\.layer\.\d+\..*(query|key|value|dense)\.weight"


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny BertModel with a word-level vocabulary, laid out as sentence-transformers does."""
    directory = tmp_path_factory.mktemp("tiny") / "encoder"
    torch.manual_seed(0)
    transformers.BertModel(_config()).save_pretrained(str(directory))
    _save_tokenizer(directory)
    _save_sentence_layout(directory)
    return directory


class Items(Dataset):
    """A list as a map-style Dataset."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def _pairs(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` made-up (query, document) pairs over the tiny vocabulary, of varied lengths."""
    gen = torch.Generator().manual_seed(seed)

    def text(lo: int, hi: int) -> str:
        length = int(torch.randint(lo, hi, (1,), generator=gen))
        return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=gen))

    return [{"query": text(2, 6), "document": text(4, 30)} for _ in range(n)]


def _model(encoder_dir: Path) -> torch.nn.Module:
    return models.build_model(f"hf:{encoder_dir}", (), 0)


def test_collate_tokenizes_both_sides_and_keeps_the_texts(encoder_dir: Path) -> None:
    model = _model(encoder_dir)
    task = ContrastiveTask(max_length=12)
    with pytest.raises(TaskError, match=r"no tokenizer yet; call task\.prepare"):
        task.collate(_pairs(2, 0))
    task.prepare(model)
    samples = _pairs(5, 1)
    batch = task.collate(samples)
    assert batch["texts"] == (tuple(s["query"] for s in samples), tuple(s["document"] for s in samples))
    for side in ("query", "document"):
        ids, mask = batch[side]["input_ids"], batch[side]["attention_mask"]
        assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape and ids.shape[0] == 5
        assert ids.shape[1] <= 12 and int(mask.sum(1).max()) == ids.shape[1]  # padded to the longest
    assert batch["document"]["input_ids"].shape[1] == 12  # 30-word documents truncated
    assert task.batch_size(batch) == 5
    assert task.model_inputs(batch).keys() == {"input_ids", "attention_mask"}
    assert [x["input_ids"].shape for x in task.example_inputs(batch)] == [
        batch["query"]["input_ids"].shape,
        batch["document"]["input_ids"].shape,
    ]


def test_loss_is_the_cross_entropy_of_scaled_cosines_with_the_own_document_as_target(
    encoder_dir: Path,
) -> None:
    model = _model(encoder_dir).double()
    task = ContrastiveTask(scale=7.5, reference=False)
    task.prepare(model)
    batch = task.collate(_pairs(6, 2))
    queries, documents = task.forward(model, batch)
    assert queries.shape == documents.shape == (6, model.hidden_size)
    expected = 0.0
    for i in range(6):  # -log softmax_j(scale * cos(q_i, d_j)) at j = i, by hand
        logits = [
            7.5 * torch.nn.functional.cosine_similarity(queries[i], documents[j], dim=0) for j in range(6)
        ]
        expected -= float((logits[i] - torch.logsumexp(torch.stack(logits), 0)).detach())
    assert float(task.loss((queries, documents), batch).detach()) == pytest.approx(expected / 6, rel=1e-10)
    task.loss((queries, documents), batch).backward()
    assert model.auto_model.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_split_metrics_rank_among_the_whole_split_whatever_the_eval_batches(encoder_dir: Path) -> None:
    model = _model(encoder_dir)
    task = ContrastiveTask(max_length=model.max_seq_length)  # as model.encode truncates
    data = _pairs(23, 3)
    small, large = evaluate(model, data, task, batch_size=4), evaluate(model, data, task, batch_size=64)
    assert small.keys() == {"loss", "recall@1", "mrr@10", "mean_cosine"}
    q = model.encode([d["query"] for d in data])
    d = model.encode([d["document"] for d in data])
    expected = retrieval.retrieval_metrics(q, d)
    for got in (small, large):
        assert got["recall@1"] == pytest.approx(expected["recall@1"], abs=1e-12)
        assert got["mrr@10"] == pytest.approx(expected["mrr@10"], abs=1e-12)
        assert got["mean_cosine"] == pytest.approx(1.0, abs=1e-6)  # the model is its own reference
    assert small["loss"] != pytest.approx(large["loss"])  # in-batch negatives: the loss does depend


def test_mean_cosine_compares_with_the_model_as_it_was_prepared(encoder_dir: Path) -> None:
    model = _model(encoder_dir)
    task = ContrastiveTask(max_length=model.max_seq_length)
    task.prepare(model)
    dense = {t: e for t, e in zip(*_texts_and_embeddings(model, _pairs(9, 4)), strict=True)}
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "encoder" in name and weight.dim() == 2:
                weight.normal_(0, 0.5)
    task.prepare(model)  # a second call keeps the first reference
    data = _pairs(9, 4)
    got = evaluate(model, data, task)
    texts, now = _texts_and_embeddings(model, data)
    expected = torch.nn.functional.cosine_similarity(now, torch.stack([dense[t] for t in texts]), dim=1)
    assert got["mean_cosine"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert got["mean_cosine"] < 0.999


def _texts_and_embeddings(
    model: torch.nn.Module, data: list[dict[str, str]]
) -> tuple[list[str], torch.Tensor]:
    texts = [d["query"] for d in data] + [d["document"] for d in data]
    return texts, model.encode(texts)


def test_embed_pools_a_plain_transformers_output_and_refuses_others(encoder_dir: Path) -> None:
    sentence = _model(encoder_dir).eval()
    plain = transformers.AutoModel.from_pretrained(str(encoder_dir), local_files_only=True).eval()
    tokens = sentence.tokenizer(["the cat sat on the mat", "dog"], padding=True, return_tensors="pt")
    inputs = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(embed(plain, inputs), embed(sentence, inputs), rtol=1e-5, atol=1e-6)
    with pytest.raises(TaskError, match=r"returned a tensor of shape \(2, 3, 4\); expected sentence"):
        embed(lambda **kw: torch.zeros(2, 3, 4), inputs)


def test_bad_options_samples_and_models_are_clear_errors(encoder_dir: Path) -> None:
    with pytest.raises(TaskError, match="max_length must be an integer"):
        ContrastiveTask(max_length=1)
    with pytest.raises(TaskError, match="scale must be a number"):
        ContrastiveTask(scale=0)
    with pytest.raises(TaskError, match=r"task .contrastive.: bad task_options: .*.maxlen."):
        build_task("contrastive", options={"maxlen": 3})
    assert build_task("contrastive", options={"max_length": 9}).max_length == 9
    with pytest.raises(TaskError, match="has no tokenizer; use a sentence encoder"):
        ContrastiveTask().prepare(torch.nn.Linear(2, 2))
    task = ContrastiveTask()
    task.prepare(_model(encoder_dir))
    with pytest.raises(TaskError, match="a sample must be a mapping with 'query' and 'document' texts"):
        task.collate([("a", "b")])
    with pytest.raises(TaskError, match="a batch must be a mapping with tokenized 'query' and 'document'"):
        task.forward(torch.nn.Linear(2, 2), {"query": torch.zeros(2)})


RECIPE = """\
version: 1
variables: {{epochs: 2, target: 0.5}}
train:
  model: hf:{model}
  data: "{module}:data"
  task: contrastive
  task_options: {{max_length: 16}}
  epochs: ${{epochs}}
  batch_size: 8
  eval_at_start: true
  optimizer: {{type: AdamW, lr: 1.0e-3}}
modifiers:
  - type: {pruner}
    params: ["{pattern}"]
    start: 0
    end: 0
    final_sparsity: ${{target}}
{extra}"""


@pytest.fixture
def pairs_module(monkeypatch: pytest.MonkeyPatch) -> str:
    """A module whose ``data()`` returns 40 train / 24 test made-up pairs."""
    module = types.ModuleType("tiny_pairs_data")
    module.data = lambda: (Items(_pairs(40, 10)), Items(_pairs(24, 11)))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


def _recipe(
    tmp_path: Path, encoder_dir: Path, module: str, pruner: str, extra: str = "", name: str = "r"
) -> Path:
    path = tmp_path / f"{name}.yaml"
    text = RECIPE.format(
        model=encoder_dir,
        module=module,
        pruner=pruner,
        pattern=ENCODER_LINEARS.replace("\\", "\\\\"),
        extra=extra,
    )
    path.write_text(text)
    return path


def test_a_recipe_prunes_with_mfac_and_reports_dense_and_pruned_figures(
    encoder_dir: Path, pairs_module: str, tmp_path: Path
) -> None:
    mfac = "    num_grads: 8\n    grad_batch_size: 4\n    block_size: 16\n"
    recipe = _recipe(tmp_path, encoder_dir, pairs_module, "MFACPruning", mfac)
    summary = run(recipe, tmp_path / "out", progress=False, allow_imports=[pairs_module])
    dense = summary["dense_eval"]
    assert dense.keys() == {"loss", "recall@1", "mrr@10", "mean_cosine"}
    assert dense["mean_cosine"] == pytest.approx(1.0, abs=1e-6)  # evaluated before the pruning step
    assert summary["eval"]["mean_cosine"] < 0.999 and summary["dense_eval_accuracy"] is None
    assert summary["sparsity"]["global"] == pytest.approx(0.5, abs=1e-4)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["dense_eval"] == pytest.approx(dense)
    rows = (tmp_path / "out" / "metrics.csv").read_text().splitlines()
    assert any(r.startswith("0,0.0,eval,recall@1,") for r in rows)
    untouched = _model(encoder_dir)  # the dense model's own test figures, directly
    direct = evaluate(untouched, _pairs(24, 11), ContrastiveTask(max_length=16))
    assert dense["recall@1"] == pytest.approx(direct["recall@1"]) and dense["mrr@10"] == pytest.approx(
        direct["mrr@10"]
    )


def test_a_resumed_contrastive_run_ends_as_the_uninterrupted_one(
    encoder_dir: Path, pairs_module: str, tmp_path: Path
) -> None:
    whole = run(
        _recipe(tmp_path, encoder_dir, pairs_module, "MagnitudePruning"),
        tmp_path / "whole",
        progress=False,
        allow_imports=[pairs_module],
    )
    first = _recipe(tmp_path, encoder_dir, pairs_module, "MagnitudePruning", name="first")
    run(first, tmp_path / "cut", progress=False, allow_imports=[pairs_module], overrides={"epochs": "1"})
    resumed = run(
        _recipe(tmp_path, encoder_dir, pairs_module, "MagnitudePruning", name="again"),
        tmp_path / "cut",
        progress=False,
        resume=True,
        allow_recipe_change=True,
        allow_imports=[pairs_module],
    )
    assert resumed["steps"] == whole["steps"] == 10
    assert resumed["eval"] == pytest.approx(whole["eval"], abs=1e-6)
    assert resumed["dense_eval"] == pytest.approx(whole["dense_eval"], abs=1e-9)
    assert resumed["sparsity"]["per_parameter"] == whole["sparsity"]["per_parameter"]


def test_the_cli_reports_retrieval_metrics_and_a_model_without_tokenizer_exits_1(
    encoder_dir: Path, pairs_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from compressor.cli import app

    monkeypatch.setitem(sys.modules, "tiny_pairs_data", sys.modules[pairs_module])
    recipe = _recipe(tmp_path, encoder_dir, pairs_module, "MagnitudePruning")
    args = ["run", str(recipe), "-o", str(tmp_path / "out"), "--no-progress", "--allow-import", pairs_module]
    result = CliRunner().invoke(app, [*args, "--set", "epochs=1"])
    assert result.exit_code == 0, result.output
    assert (
        "done: recall@1 " in result.output and "(dense " in result.output and "mean_cosine" in result.output
    )
    bare = tmp_path / "bare"
    transformers.BertModel(_config()).save_pretrained(str(bare))  # no tokenizer saved
    _save_sentence_layout(bare)
    recipe.write_text(recipe.read_text().replace(str(encoder_dir), str(bare)))
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "bad")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "train.task: task 'contrastive' cannot run the model" in " ".join(result.output.split())


def test_code_pairs_is_built_in_data_of_texts() -> None:
    bundle = datasets.load_data("code_pairs")
    assert (len(bundle.train), len(bundle.test), bundle.input_shape, bundle.num_classes) == (
        4462,
        1215,
        (),
        0,
    )
    assert isinstance(bundle.train, CodePairs) and bundle.test[0].keys() == {"query", "document"}


def test_a_factory_of_dict_samples_gets_no_shape_and_its_declared_classes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Declared(Items):
        num_classes = 5

    module = types.ModuleType("dict_samples_data")
    module.plain = lambda: (Items([{"a": torch.zeros(3)}]), Items([{"a": torch.ones(3)}]))  # type: ignore[attr-defined]
    module.declared = lambda: (Declared([{"a": 1}]), Declared([{"a": 2}]))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    plain = datasets.load_data("dict_samples_data:plain")
    assert (plain.input_shape, plain.num_classes) == ((), 0)
    assert datasets.load_data("dict_samples_data:declared").num_classes == 5


def test_an_unknown_task_option_in_a_recipe_is_reported_at_its_field(
    encoder_dir: Path, pairs_module: str, tmp_path: Path
) -> None:
    recipe = _recipe(tmp_path, encoder_dir, pairs_module, "MagnitudePruning")
    recipe.write_text(recipe.read_text().replace("max_length: 16", "max_len: 16"))
    with pytest.raises(
        RecipeError, match=r"r.yaml:\d+:\d+: train.task: task 'contrastive': bad task_options"
    ):
        run(recipe, tmp_path / "out", progress=False, allow_imports=[pairs_module])
