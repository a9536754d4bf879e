"""The decoder-LM job: the codelm model, the code_text data, perplexity, and train.init_from."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.core.checkpoint import load_checkpoint, save_checkpoint
from compressor.core.factories import ZooError
from compressor.data import load_data
from compressor.data.code_pairs import load_code_pairs
from compressor.data.code_text import EOS, IGNORE, PAD, VOCAB_SIZE, ByteTokenizer, CodeText
from compressor.engine import evaluate, run
from compressor.engine.init_weights import load_initial_weights
from compressor.models import build_model
from compressor.models.codelm import MAX_PARAMETERS, gpt2_lm
from compressor.recipe import RecipeError, parse_recipe
from compressor.tasks import ModelLossTask, TaskError, build_task

needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="codelm needs transformers (the hf extra)"
)


def tiny_lm(positions: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return gpt2_lm(VOCAB_SIZE, positions, n_embd=32, n_layer=2, n_head=2, n_inner=64).eval()


@pytest.fixture(scope="module")
def bundle():
    return load_data("code_text")


# ---------------------------------------------------------------------- the model


@needs_hf
def test_codelm_is_a_small_seeded_gpt2_with_tied_embeddings() -> None:
    state = torch.random.get_rng_state()
    model = build_model("codelm", (128,), VOCAB_SIZE, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded without touching the global RNG
    assert type(model).__name__ == "GPT2LMHeadModel"
    count = sum(p.numel() for p in model.parameters())  # the tied matrix counted once
    assert count <= MAX_PARAMETERS and count == 1_853_952
    wte, head = model.transformer.wte.weight, model.lm_head.weight
    assert head is wte and head.data_ptr() == wte.data_ptr()  # one tensor, one storage
    assert tuple(wte.shape) == (VOCAB_SIZE, 192) and model.config.n_positions == 128
    again = build_model("codelm", (128,), VOCAB_SIZE, seed=3).state_dict()
    other = build_model("codelm", (128,), VOCAB_SIZE, seed=4).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    assert not torch.equal(model.state_dict()["lm_head.weight"], other["lm_head.weight"])
    with pytest.raises(ZooError, match=r"codelm takes blocks of token ids.*train it on code_text"):
        build_model("codelm", (1, 8, 8), 10)


@needs_hf
def test_the_model_is_causal_and_returns_its_own_shifted_loss() -> None:
    model = tiny_lm()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 16), generator=gen)
    with torch.no_grad():
        base = model(input_ids=ids, labels=ids)
        for t in (0, 7, 14):
            changed = ids.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1) % 256
            logits = model(input_ids=changed).logits
            assert torch.allclose(logits[:, : t + 1], base.logits[:, : t + 1], atol=1e-6, rtol=0)
            assert not torch.allclose(logits[:, t + 1], base.logits[:, t + 1])
    expected = nn.functional.cross_entropy(base.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(base.loss, expected, atol=1e-6)


# ---------------------------------------------------------------------- the data


def test_code_text_splits_are_disjoint_by_function(bundle) -> None:
    assert bundle.name == "code_text" and bundle.input_shape == (128,) and bundle.num_classes == VOCAB_SIZE
    train, test = set(bundle.train.functions), set(bundle.test.functions)
    assert len(train) == len(load_code_pairs("train")) and len(test) == len(load_code_pairs("test"))
    assert not train & test
    assert not train & set(CodeText("validation", limit=200).functions)


def test_blocks_are_fixed_length_and_labels_masked_at_padding(bundle) -> None:
    for data in (bundle.train, bundle.test):
        item = data[0]
        assert set(item) == {"input_ids", "attention_mask", "labels"}
        assert all(v.shape == (128,) and v.dtype == torch.int64 for v in item.values())
        mask = data.attention_mask.bool()
        assert torch.equal(data.labels[mask], data.input_ids[mask])
        assert (data.labels[~mask] == IGNORE).all() and (data.input_ids[~mask] == PAD).all()
        assert torch.equal(mask, mask.cummin(dim=1).values)  # padding only at the end of a block
        assert (mask.sum(1) >= 1).all() and int(data.input_ids.max()) < VOCAB_SIZE


def test_a_function_is_eos_bytes_eos_cut_into_blocks() -> None:
    pairs = load_code_pairs("test", limit=4)
    data = CodeText("test", block_size=16, limit=4)
    tokenizer = ByteTokenizer()
    first = 0
    for pair in pairs:
        tokens = tokenizer.encode(pair["document"])
        assert tokens[0] == tokens[-1] == EOS and bytes(tokens[1:-1]) == pair["document"].encode()
        count = math.ceil(len(tokens) / 16)
        rows = slice(first, first + count)
        assert set(data.functions[rows]) == {f"{pair['module']}:{pair['qualname']}"}
        joined = data.input_ids[rows].reshape(-1)
        assert joined[: len(tokens)].tolist() == tokens and (joined[len(tokens) :] == PAD).all()
        assert tokenizer.decode(joined) == pair["document"]
        first += count
    assert first == len(data)
    assert tokenizer.decode([EOS, 0xC3, 0xA9, PAD], skip_special_tokens=False) == "<|endoftext|>é<pad>"


# ---------------------------------------------------------------------- perplexity


@needs_hf
def test_perplexity_is_exp_of_the_token_weighted_mean_loss() -> None:
    model = tiny_lm()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (5, 16), generator=gen)
    lengths = [16, 3, 9, 16, 2]  # padding differs between batches: token and sample weights differ
    mask = (torch.arange(16) < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, PAD)
    labels = ids.masked_fill(mask == 0, IGNORE)
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(5)]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    scored = labels[:, 1:] != IGNORE
    losses = nn.functional.cross_entropy(logits[:, :-1][scored], labels[:, 1:][scored], reduction="none")
    assert scored.sum() == sum(lengths) - 5
    hand = float(losses.double().mean())

    task = build_task("model-loss", options={"perplexity": True})
    metrics = evaluate(model, data, task, batch_size=2)  # batches of 2, 2 and 1 samples
    assert metrics["token_loss"] == pytest.approx(hand, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(hand), rel=1e-5)
    assert abs(metrics["loss"] - hand) > 0.01  # the sample-weighted mean of batch means is another number
    batch = task.collate(data[:2])
    assert task.scored_tokens(batch) == lengths[0] + lengths[1] - 2
    assert ModelLossTask(perplexity=True, shift_labels=False).scored_tokens(batch) == lengths[0] + lengths[1]
    assert set(evaluate(model, data, ModelLossTask(), batch_size=2)) == {"loss"}  # off by default
    with pytest.raises(TaskError, match="perplexity counts the scored tokens of the batch's 'labels'"):
        task.scored_tokens({"input_ids": ids})


# ---------------------------------------------------------------------- train.init_from

RECIPE = """version: 1
train:
  model: digits-mlp
  data: digits
  epochs: 0
  seed: {seed}
  optimizer: {{type: SGD, lr: 0.1}}
  init_from: {init}
modifiers: []
"""


def test_init_from_loads_exactly_the_saved_weights(tmp_path: Path) -> None:
    saved = build_model("digits-mlp", (1, 8, 8), 10, seed=5)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": saved.state_dict(), "epoch": 1})
    recipe = parse_recipe(RECIPE.format(seed=0, init=path), file="r.yaml")
    model = build_model("digits-mlp", (1, 8, 8), 10, seed=0)
    assert load_initial_weights(recipe, model) == path
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.state_dict().items())
    nothing = parse_recipe(RECIPE.format(seed=0, init="null"), file="r.yaml")
    assert load_initial_weights(nothing, model) is None


def test_init_from_errors_at_its_line(tmp_path: Path) -> None:
    model = build_model("digits-mlp", (1, 8, 8), 10)
    missing = parse_recipe(RECIPE.format(seed=0, init="no/such/checkpoint.pt"), file="r.yaml")
    where = r"r\.yaml:8:14: train\.init_from: "
    with pytest.raises(RecipeError, match=where + r"'no/such/checkpoint\.pt' does not exist"):
        load_initial_weights(missing, model)
    other = tmp_path / "cnn.pt"
    save_checkpoint(other, {"model": build_model("digits-cnn", (1, 8, 8), 10).state_dict()})
    with pytest.raises(RecipeError, match=where + r".*cnn\.pt does not fit the model 'digits-mlp'"):
        load_initial_weights(parse_recipe(RECIPE.format(seed=0, init=other), file="r.yaml"), model)
    foreign = tmp_path / "plain.pt"
    torch.save({"model": model.state_dict()}, foreign)
    with pytest.raises(RecipeError, match="not a compressor checkpoint"):
        load_initial_weights(parse_recipe(RECIPE.format(seed=0, init=foreign), file="r.yaml"), model)


def test_a_run_starts_from_another_runs_checkpoint(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    (tmp_path / "a.yaml").write_text(RECIPE.format(seed=1, init="null"))
    run(tmp_path / "a.yaml", first, progress=False)
    (tmp_path / "b.yaml").write_text(RECIPE.format(seed=2, init=first / "checkpoint.pt"))
    summary = run(tmp_path / "b.yaml", second, progress=False)
    a, b = (load_checkpoint(out / "checkpoint.pt")["model"] for out in (first, second))
    assert all(torch.equal(v, a[k]) for k, v in b.items())
    fresh = build_model("digits-mlp", (1, 8, 8), 10, seed=2).state_dict()
    assert not torch.equal(b["fc1.weight"], fresh["fc1.weight"])
    assert summary["eval"] == json.loads((first / "summary.json").read_text())["eval"]
    (first / "checkpoint.pt").unlink()  # a resumed run takes its own checkpoint, not init_from's
    assert run(None, second, resume=True, progress=False)["eval"] == summary["eval"]
