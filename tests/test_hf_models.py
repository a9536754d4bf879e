"""Pretrained transformers models named by a recipe (``hf:DIRECTORY`` / ``hf:package``), on a tiny BERT.

The models are built here from a ``BertConfig`` and saved with ``save_pretrained`` (no download).
"""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers  # the hf extra: install.sh installs it for the tests

from compressor.builders import build_train
from compressor.core.factories import ZooError
from compressor.core.params import match_params
from compressor.models import build_model
from compressor.models import pretrained as hf_models
from compressor.models.pretrained import MissingExtraError, SentenceEncoder, load_tokenizer, resolve_source
from compressor.recipe import RecipeError, check_imports, load_recipe

HIDDEN, LAYERS, INTERMEDIATE = 32, 2, 48
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "def",
    "return",
    "x",
    "y",
    "if",
    "else",
    "for",
    "in",
    "print",
    "value",
    "list",
]
ENCODER_LINEARS = r"re:.*encoder\.layer\.\d+\..*(query|key|value|dense)\.weight"


def _config() -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=64,
    )


def _save_tokenizer(directory: Path) -> None:
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(directory))


def _save_sentence_layout(directory: Path, pooling: str = "mean_tokens", normalize: bool = True) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    modes = {f"pooling_mode_{m}": m == pooling for m in ("cls_token", "mean_tokens", "max_tokens")}
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": HIDDEN, **modes})
    )
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))


@pytest.fixture
def bert_dir(tmp_path: Path) -> Path:
    """A saved tiny BertModel (with pooler) and its tokenizer, laid out as sentence-transformers does."""
    directory = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    transformers.BertModel(_config()).save_pretrained(str(directory))
    _save_tokenizer(directory)
    _save_sentence_layout(directory)
    return directory


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences, the second padded: ids int64 (2, 7), mask (2, 7)."""
    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 3], [2, 10, 11, 3, 0, 0, 0]])
    return ids, (ids != 0).long()


def test_sentence_encoder_is_mean_pooling_and_l2_norm_of_the_auto_model(bert_dir: Path) -> None:
    model = build_model(f"hf:{bert_dir}", (), 0)
    assert isinstance(model, SentenceEncoder) and model.training
    assert (model.pooling, model.normalize, model.max_seq_length, model.hidden_size) == (
        "mean",
        True,
        16,
        HIDDEN,
    )
    model.eval()
    reference = transformers.AutoModel.from_pretrained(str(bert_dir), local_files_only=True).eval()
    ids, mask = _batch()
    with torch.no_grad():
        got = model(ids, mask)
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        short = model(ids[1:, :4], mask[1:, :4])  # the padded row without its padding
    expected = torch.stack([hidden[0].mean(0), hidden[1, :4].mean(0)])
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert got.shape == (2, HIDDEN) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(short[0], got[1], rtol=1e-5, atol=1e-6)


def test_cls_pooling_without_normalize_follows_the_saved_layout(tmp_path: Path) -> None:
    directory = tmp_path / "cls"
    transformers.BertModel(_config()).save_pretrained(str(directory))
    _save_sentence_layout(directory, pooling="cls_token", normalize=False)
    model = build_model(f"hf:{directory}", (), 0).eval()
    ids, mask = _batch()
    with torch.no_grad():
        hidden = model.auto_model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(model(ids, mask), hidden[:, 0])


def test_unsupported_pooling_is_a_clear_error(tmp_path: Path) -> None:
    directory = tmp_path / "max"
    transformers.BertModel(_config()).save_pretrained(str(directory))
    _save_sentence_layout(directory, pooling="max_tokens")
    with pytest.raises(ZooError, match="only mean or CLS pooling"):
        build_model(f"hf:{directory}", (), 0)


def test_recipe_patterns_select_exactly_the_encoder_linear_weights(bert_dir: Path) -> None:
    model = build_model(f"hf:{bert_dir}", (), 0)
    names = [name for name, _ in model.named_parameters()]
    assert not any("pooler" in name for name in names)  # unused by the embedding: not built
    selected = match_params([ENCODER_LINEARS], names)
    params = dict(model.named_parameters())
    assert len(selected) == LAYERS * 6
    assert all(params[n].dim() == 2 and "embeddings" not in n and "LayerNorm" not in n for n in selected)
    per_layer = 4 * HIDDEN * HIDDEN + 2 * HIDDEN * INTERMEDIATE
    assert sum(params[n].numel() for n in selected) == LAYERS * per_layer
    assert "auto_model.encoder.layer.0.attention.self.query.weight" in selected


def test_state_dict_round_trip_restores_the_embeddings(bert_dir: Path, tmp_path: Path) -> None:
    model = build_model(f"hf:{bert_dir}", (), 0).eval()
    with torch.no_grad():
        model.auto_model.encoder.layer[0].attention.self.query.weight.mul_(0.5)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = build_model(f"hf:{bert_dir}", (), 0).eval()
    ids, mask = _batch()
    with torch.no_grad():
        before = fresh(ids, mask)
        fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
        assert not torch.allclose(before, model(ids, mask))
        torch.testing.assert_close(fresh(ids, mask), model(ids, mask))


def test_tokenizer_encode_and_copies(bert_dir: Path) -> None:
    model = build_model(f"hf:{bert_dir}", (), 0)
    tokens = model.tokenizer(["the cat sat", "dog"], padding=True, return_tensors="pt")
    assert tokens["input_ids"].shape == (2, 5) and tokens["attention_mask"].sum().item() == 8
    out = model.encode(["the cat sat on the mat", "def x return y", "zebra"], batch_size=2)
    assert out.shape == (3, HIDDEN) and model.training
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(clone.encode(["zebra"]), out[2:])
    assert isinstance(load_tokenizer(f"hf:{bert_dir}"), transformers.PreTrainedTokenizerBase)


def test_a_plain_directory_builds_its_saved_architecture(tmp_path: Path) -> None:
    directory = tmp_path / "clf"
    config = _config()
    config.num_labels = 3
    transformers.BertForSequenceClassification(config).save_pretrained(str(directory))
    model = build_model(f"hf:{directory}", (), 0)
    assert type(model).__name__ == "BertForSequenceClassification" and model.training
    ids, mask = _batch()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.dim() == 0


def test_an_installed_package_is_found_without_importing_it(
    bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site" / "tiny_model_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / "model").symlink_to(bert_dir, target_is_directory=True)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_source("hf:tiny_model_pkg") == bert_dir.resolve()
    assert isinstance(build_model("hf:tiny_model_pkg", (), 0), SentenceEncoder)
    assert "tiny_model_pkg" not in sys.modules
    with pytest.raises(ZooError, match=r"no installed package 'no_such_pkg_xyz'.*hf:./no_such_pkg_xyz"):
        resolve_source("hf:no_such_pkg_xyz")
    (package / "model").unlink()
    with pytest.raises(ZooError, match=r"holds no pretrained model: no config.json"):
        resolve_source("hf:tiny_model_pkg")


def _recipe(tmp_path: Path, model: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            train:
              data: digits
              model: {json.dumps(model)}
              epochs: 1
              optimizer: {{type: SGD, lr: 0.1}}
            modifiers: []
            """
        )
    )
    return path


def test_hf_names_need_no_import_opt_in_and_build_through_the_recipe(bert_dir: Path, tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, f"hf:{bert_dir}"))
    check_imports(recipe)  # data, not code: no --allow-import needed
    _, model = build_train(recipe)
    assert isinstance(model, SentenceEncoder)


def test_a_missing_directory_is_reported_at_the_recipe_field(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "hf:./no/such/dir")
    with pytest.raises(RecipeError) as err:
        build_train(load_recipe(path))
    assert str(err.value) == (
        f"{path}:4:10: train.model: model directory './no/such/dir' does not exist "
        f"(looked in {Path.cwd() / 'no/such/dir'})"
    )


def test_a_directory_without_config_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZooError, match=r"has no config.json; expected a directory written by"):
        build_model(f"hf:{tmp_path / 'empty'}", (), 0)


@pytest.mark.parametrize(
    ("model", "message"),
    [("hf:", "names no model"), ("hf:my model", "neither a directory (write 'hf:./my model'")],
)
def test_malformed_hf_names_fail_validation_at_their_line(tmp_path: Path, model: str, message: str) -> None:
    path = _recipe(tmp_path, model)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert [(i.line, i.col, i.path) for i in err.value.issues] == [(4, 10, "train.model")]
    assert message in str(err.value)


def test_a_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    directory = tmp_path / "no-tokenizer"
    transformers.BertModel(_config()).save_pretrained(str(directory))
    model = SentenceEncoder.from_pretrained(directory)
    with pytest.raises(ZooError, match="has no tokenizer"):
        _ = model.tokenizer
    with pytest.raises(ZooError, match="has no tokenizer"):
        load_tokenizer(f"hf:{directory}")


def test_without_transformers_the_error_says_how_to_install(
    bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install compressor\[hf\]"):
        hf_models.load_pretrained(f"hf:{bert_dir}")
    with pytest.raises(RecipeError, match=r"4:10: train.model: .*pip install compressor\[hf\]"):
        build_train(load_recipe(_recipe(tmp_path, f"hf:{bert_dir}")))


def test_the_engine_does_not_import_transformers() -> None:
    code = (
        "import sys, compressor, compressor.models, compressor.engine, compressor.models.pretrained\n"
        "import compressor.recipe, compressor.cli\n"
        "compressor.models.build_model('digits-mlp', (1, 8, 8), 10)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'tokenizers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_checkpoint_round_trips_and_inspect_reports_its_sparsity(bert_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from compressor.cli import app
    from compressor.core.checkpoint import load_checkpoint, save_checkpoint

    model = build_model(f"hf:{bert_dir}", (), 0).eval()
    query = model.auto_model.encoder.layer[1].attention.self.query.weight
    with torch.no_grad():
        query[:, : HIDDEN // 2] = 0.0  # half of one tensor pruned
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": model.state_dict(), "epoch": 1})
    fresh = build_model(f"hf:{bert_dir}", (), 0).eval()
    fresh.load_state_dict(load_checkpoint(tmp_path / "checkpoint.pt")["model"])
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, mask), model(ids, mask))
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "checkpoint.pt")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line for line in result.output.splitlines() if "auto_model." in line}
    assert "50.0%" in rows["auto_model.encoder.layer.1.attention.self.query.weight"]
    assert "0.0%" in rows["auto_model.encoder.layer.0.attention.self.query.weight"]
    assert "auto_model.embeddings.word_embeddings.weight" in rows


def test_every_parameter_gets_a_gradient_from_the_embedding(bert_dir: Path) -> None:
    """No unused parameters (the pooler is not built): DDP and gradient sampling see them all."""
    model = build_model(f"hf:{bert_dir}", (), 0)
    ids, mask = _batch()
    anchor, positive = model(ids, mask), model(ids.flip(0), mask.flip(0))
    loss = torch.nn.functional.cross_entropy(20 * anchor @ positive.T, torch.arange(2))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []
    query = model.auto_model.encoder.layer[0].attention.self.query.weight
    assert query.grad.abs().sum() > 0


def test_the_cli_run_stops_with_exit_1_and_no_traceback_on_a_missing_directory(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from compressor.cli import app

    path = _recipe(tmp_path, f"hf:{tmp_path / 'nope'}")
    result = CliRunner().invoke(app, ["run", str(path), "--output", str(tmp_path / "out")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"{path}:4:10: train.model: model directory" in result.output
    assert "does not exist" in result.output and "Traceback" not in result.output
