"""Parameter names: wrapper prefixes, exact/glob/regex patterns, errors naming the closest names."""

from __future__ import annotations

import pytest
import torch

from compressor.core.params import PatternError, match_params, normalize, tied_aliases

NAMES = ["conv1.weight", "conv1.bias", "conv2.weight", "fc1.weight", "fc1.bias", "fc2.weight"]


def _shuffled(items: list[str], gen: torch.Generator) -> list[str]:
    return [items[i] for i in torch.randperm(len(items), generator=gen).tolist()]


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("module.fc.weight", "fc.weight"),
        ("_orig_mod.fc.weight", "fc.weight"),
        ("module._orig_mod.fc.weight", "fc.weight"),
        ("_orig_mod.module.fc.weight", "fc.weight"),
        ("block.module.weight", "block.module.weight"),
        ("fc.weight", "fc.weight"),
    ],
)
def test_normalize_strips_leading_wrapper_prefixes_only(raw: str, clean: str) -> None:
    assert normalize(raw) == clean


def test_exact_glob_and_regex_patterns_in_model_order_without_duplicates(gen: torch.Generator) -> None:
    patterns = _shuffled(["fc2.weight", "conv*.weight", "re:fc\\d\\.bias", "conv1.weight"], gen)
    assert match_params(patterns, NAMES) == [
        "conv1.weight",
        "conv2.weight",
        "fc1.bias",
        "fc2.weight",
    ]


def test_wrapped_names_and_patterns_compare_after_normalize(gen: torch.Generator) -> None:
    wrapped = ["module." + n for n in NAMES]
    patterns = _shuffled(["module.fc1.weight", "_orig_mod.conv2.*", "re:conv1\\..*"], gen)
    assert match_params(patterns, wrapped) == ["conv1.weight", "conv1.bias", "conv2.weight", "fc1.weight"]


def test_regex_must_match_the_whole_name() -> None:
    assert match_params(["re:.*weight"], NAMES) == [n for n in NAMES if n.endswith("weight")]
    with pytest.raises(PatternError):
        match_params(["re:conv1"], NAMES)


def test_a_pattern_matching_nothing_names_itself_and_the_closest_names() -> None:
    with pytest.raises(PatternError) as info:
        match_params(["conv1.weight", "fc3.weigth"], NAMES)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.pattern == "fc3.weigth"
    assert len(err.closest) == 3 and err.closest[0] in ("fc1.weight", "fc2.weight")
    assert "fc3.weigth" in str(err) and all(name in str(err) for name in err.closest)


def test_an_invalid_regex_is_a_pattern_error() -> None:
    with pytest.raises(PatternError, match="regular expression"):
        match_params(["re:conv(1"], NAMES)


class TiedLM(torch.nn.Module):
    """A token embedding that is also the output layer (one tensor under two names), as GPT-2's."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, width)
        self.body = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.wte(tokens))))


def test_tied_aliases_map_each_later_name_of_a_tensor_to_its_first() -> None:
    model = TiedLM()
    assert tied_aliases(model.named_parameters(remove_duplicate=False)) == {"head.weight": "wte.weight"}
    wrapped = torch.nn.Sequential(TiedLM())  # two levels; names normalized
    assert tied_aliases(wrapped.named_parameters(remove_duplicate=False)) == {"0.head.weight": "0.wte.weight"}
    assert tied_aliases(torch.nn.Linear(3, 2).named_parameters(remove_duplicate=False)) == {}


def test_a_pattern_naming_only_a_tied_alias_names_the_listed_tensor() -> None:
    model = TiedLM()
    names = [n for n, _ in model.named_parameters()]
    aliases = tied_aliases(model.named_parameters(remove_duplicate=False))
    with pytest.raises(PatternError, match=r"tied to 'wte\.weight'") as info:
        match_params(["head.weight"], names, aliases)
    assert "select 'wte.weight'" in str(info.value) and "changes both" in str(info.value)
    assert info.value.tied_to == "wte.weight"
    with pytest.raises(PatternError) as plain:  # without aliases: the usual closest-name message
        match_params(["head.weight"], names)
    assert plain.value.closest and "tied" not in str(plain.value)
    # a pattern that also selects listed names is not an error: the listed tensor is selected once
    assert match_params(["re:(head|body)\\.weight"], names, aliases) == ["body.weight"]


def test_a_session_pruning_a_tied_tensor_warns_and_refuses_its_alias() -> None:
    from compressor.lifecycle.session import Session
    from modifiers.magnitude import MagnitudePruning

    def session(params: list[str]) -> Session:
        model = TiedLM()
        modifier = MagnitudePruning(params=params, start=0, end=0, final_sparsity=0.5)
        return Session([modifier], model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=1)

    with pytest.warns(UserWarning, match=r"wte\.weight is also head\.weight"):
        pruned = session(["wte.weight"])
    pruned.before_step()
    model = pruned.model
    assert model.head.weight is model.wte.weight and float((model.head.weight == 0).float().mean()) == 0.5
    with pytest.raises(PatternError, match=r"tied to 'wte\.weight'"):
        session(["head.weight"])


def test_a_recipe_pattern_naming_a_tied_alias_is_an_error_at_its_line(tmp_path) -> None:
    from compressor.recipe import RecipeError, load_recipe

    recipe = tmp_path / "tied.yaml"
    recipe.write_text(
        "version: 1\nmodifiers:\n  - type: MagnitudePruning\n"
        '    params: ["body.weight", "head.weight"]\n    start: 0\n    end: 0\n    final_sparsity: 0.5\n'
    )
    model = TiedLM()
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(RecipeError) as info:
        load_recipe(
            recipe, param_names=names, aliases=tied_aliases(model.named_parameters(remove_duplicate=False))
        )
    assert [str(issue) for issue in info.value.issues] == [
        f"{recipe}:4:29: modifiers[0].params[1]: parameter pattern 'head.weight' matches only 'head.weight', "
        "which is tied to 'wte.weight' (one tensor, listed under that name): select 'wte.weight' "
        "(pruning it changes both)"
    ]
    with pytest.raises(RecipeError) as plain:  # no tied weights known: the usual closest-name message
        load_recipe(recipe, param_names=names)
    assert "'head.weight' matches no parameter" in str(plain.value) and "tied to" not in str(plain.value)
