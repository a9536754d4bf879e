"""Parameter names: wrapper prefixes, exact/glob/regex patterns, errors naming the closest names."""

from __future__ import annotations

import pytest
import torch

from compressor.core.params import PatternError, match_params, normalize

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
