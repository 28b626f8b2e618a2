"""Target matching as a pure function: a table of module names against target specs, with the expected
answer written down, checked against peftlab and (peer tests) against peft's own function.

Rules under test (peft's): a list entry matches the full name or a dotted suffix; a string is a regex that
must match the whole name; ``exclude_modules`` and ``modules_to_save`` are checked first;
``layers_to_transform`` keeps only names whose first ``<layers_pattern>.<index>.`` has a wanted index (an
exact full name in the list skips that filter); ``rank_pattern``/``alpha_pattern`` keys match the end of
a name.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from peftlab.tuners import matching

HAS_PEFT = importlib.util.find_spec("peft") is not None
peer = pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")

# (key, target_modules, layers_to_transform, layers_pattern, exclude_modules, expected)
MATCH_CASES = [
    # list entries: exact name or dotted suffix, never a substring
    ("", [], None, None, None, False),
    ("", ["foo"], None, None, None, False),
    ("foo", [], None, None, None, False),
    ("foo", ["foo"], None, None, None, True),
    ("foo", ["bar"], None, None, None, False),
    ("foo", ["foo", "bar"], None, None, None, True),
    ("foo.bar", ["bar"], None, None, None, True),
    ("foo.bar", ["ar"], None, None, None, False),
    ("foo.bar.baz", ["bar.baz"], None, None, None, True),
    ("foo.bar.baz", ["ar.baz"], None, None, None, False),
    ("foo.bar.baz", ["foo.bar"], None, None, None, False),
    ("model.layers.0.self_attn.q_proj", ["q_proj", "v_proj"], None, None, None, True),
    ("model.layers.0.self_attn.q_proj_extra", ["q_proj"], None, None, None, False),
    ("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"], None, None, None, True),
    ("model.layers.0.self_attn.q_proj", ["layers.0.self_attn.q_proj"], None, None, None, True),
    # a string is a regex matched against the whole name
    ("foo", "foo", None, None, None, True),
    ("foo", ".*oo", None, None, None, True),
    ("foo", "fo", None, None, None, False),
    ("foo", "oo", None, None, None, False),
    ("foo.bar", "bar", None, None, None, False),
    ("foo.bar", r".*\.bar", None, None, None, True),
    ("model.layers.1.self_attn.v_proj", r".*layers\.[01]\..*(q|v)_proj", None, None, None, True),
    ("model.layers.2.self_attn.v_proj", r".*layers\.[01]\..*(q|v)_proj", None, None, None, False),
    ("model.decoder.layers.0.fc1", r"model\.decoder\.layers\.\d+\.fc\d", None, None, None, True),
    # layers_to_transform with an explicit layers_pattern
    ("blocks.1.bar", ["bar"], [1], "blocks", None, True),
    ("blocks.1.bar", ["bar"], [0], "blocks", None, False),
    ("model.blocks.1.bar", ["bar"], [1], "blocks", None, True),
    ("model.blocks.1.bar", ["bar"], [0, 2], "blocks", None, False),
    ("model.blocks.1.bar", ["bar"], 1, "blocks", None, True),
    ("model.blocks.10.bar", ["bar"], 1, "blocks", None, False),
    ("model.layers.3.self_attn.q_proj", ["q_proj"], [3], "layers", None, True),
    ("model.layers.3.self_attn.q_proj", ["q_proj"], [3], "blocks", None, False),
    ("model.layers.3.self_attn.q_proj", ["q_proj"], [3], ["blocks", "layers"], None, True),
    ("transformer.h.1.attn.c_attn", ["c_attn"], [1], ["layers", "h"], None, True),
    ("transformer.h.1.attn.c_attn", ["c_attn"], [0], ["layers", "h"], None, False),
    ("model.mylayers.1.q", ["q"], [1], "layers", None, False),  # the pattern is a whole segment
    # without layers_pattern: the first "<name>.<index>." after at least one dot
    ("transformer.h.1.attn.c_attn", ["c_attn"], [1], None, None, True),
    ("transformer.h.1.attn.c_attn", ["c_attn"], [0], None, None, False),
    ("h.1.attn.c_attn", ["c_attn"], [1], None, None, False),  # needs a segment before "h"
    ("model.layers.1.mlp.experts.0.up_proj", ["up_proj"], [1], None, None, True),  # first index, not the expert
    ("model.layers.1.mlp.experts.0.up_proj", ["up_proj"], [0], None, None, False),
    ("model.layers.1.mlp.experts.0.up_proj", ["up_proj"], [1], "layers", None, True),
    ("model.layers.1.mlp.experts.0.up_proj", ["up_proj"], [0], "experts", None, True),
    ("model.layers.1.mlp.experts.0.up_proj", ["up_proj"], [1], "", None, True),  # empty pattern: any
    ("model.layers.1.mlp.experts.0.up_proj", ["up_proj"], [], "layers", None, True),  # empty list: no filter
    ("lm_head", ["lm_head"], [0], None, None, True),  # exact full name: no layer filter
    ("model.lm_head", ["lm_head"], [0], None, None, False),  # suffix match, but no layer index
    ("model.layers.0.q_proj", ["model.layers.0.q_proj"], [5], "layers", None, True),
    # exclude_modules: same rules, checked first
    ("model.layers.0.q_proj", ["q_proj"], None, None, ["layers.0.q_proj"], False),
    ("model.layers.1.q_proj", ["q_proj"], None, None, ["layers.0.q_proj"], True),
    ("model.layers.0.q_proj", ["q_proj"], None, None, ["q_proj"], False),
    ("model.layers.0.q_proj", ["q_proj"], None, None, ["proj"], True),  # no substring exclusion either
    ("model.layers.0.q_proj", ["q_proj"], None, None, r".*layers\.0\..*", False),
    ("model.layers.1.q_proj", ["q_proj"], None, None, r".*layers\.0\..*", True),
    ("model.layers.0.q_proj", r".*q_proj", None, None, ["model.layers.0.q_proj"], False),
    ("model.layers.1.q_proj", ["q_proj"], [1], "layers", ["model.layers.1.q_proj"], False),
]

# (key, modules_to_save, expected): a module inside a modules_to_save module is never a target
MODULES_TO_SAVE_CASES = [
    ("classifier", ["classifier"], False),
    ("classifier.dense", ["classifier"], False),
    ("model.classifier.dense", ["classifier"], False),
    ("model.classifier_extra.dense", ["classifier"], True),
    ("score", ["classifier", "score"], False),
    ("model.layers.0.q_proj", ["classifier"], True),
]

# (pattern keys, module name, expected key): the first key whose regex matches the end of the name
PATTERN_CASES = [
    (["lin0"], "lin0", "lin0"),
    (["lin0"], "model.lin0", "lin0"),
    (["lin0"], "model.xlin0", "model.xlin0"),
    (["lin0"], "lin1", "lin1"),
    (["q_proj", "v_proj"], "model.layers.0.self_attn.v_proj", "v_proj"),
    ([r"layers\.0\.self_attn\.q_proj"], "model.layers.0.self_attn.q_proj", r"layers\.0\.self_attn\.q_proj"),
    ([r"layers\.0\.self_attn\.q_proj"], "model.layers.10.self_attn.q_proj", "model.layers.10.self_attn.q_proj"),
    (["proj"], "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"),
    ([".*proj"], "model.layers.0.self_attn.q_proj", ".*proj"),
    (["q_proj", ".*proj"], "model.layers.0.self_attn.q_proj", "q_proj"),
    ([".*proj", "q_proj"], "model.layers.0.self_attn.q_proj", ".*proj"),
    ([r"layers\.\d+\.mlp\.down_proj"], "model.layers.1.mlp.down_proj", r"layers\.\d+\.mlp\.down_proj"),
]


def _config(target_modules, layers_to_transform=None, layers_pattern=None, exclude_modules=None,
            modules_to_save=None) -> SimpleNamespace:
    """The attributes the matching function reads (a plain namespace: the function is pure, and some rows
    combine options a LoraConfig would refuse, e.g. a regex with layers_to_transform)."""
    return SimpleNamespace(target_modules=target_modules, layers_to_transform=layers_to_transform,
                           layers_pattern=layers_pattern, exclude_modules=exclude_modules,
                           modules_to_save=modules_to_save, target_parameters=None)


def _ids(rows):
    return [f"{i}-{r[0] or 'empty'}" for i, r in enumerate(rows)]


@pytest.mark.parametrize("key,targets,layers,pattern,exclude,expected", MATCH_CASES, ids=_ids(MATCH_CASES))
def test_check_target_module_exists(key, targets, layers, pattern, exclude, expected):
    config = _config(targets, layers, pattern, exclude)
    assert bool(matching.check_target_module_exists(config, key)) is expected


@pytest.mark.parametrize("key,modules_to_save,expected", MODULES_TO_SAVE_CASES, ids=_ids(MODULES_TO_SAVE_CASES))
def test_modules_to_save_are_never_targets(key, modules_to_save, expected):
    targets = [key.rsplit(".", 1)[-1]]
    config = _config(targets, modules_to_save=modules_to_save)
    assert bool(matching.check_target_module_exists(config, key)) is expected


@pytest.mark.parametrize("keys,name,expected", PATTERN_CASES, ids=[str(i) for i in range(len(PATTERN_CASES))])
def test_get_pattern_key(keys, name, expected):
    assert matching.get_pattern_key(keys, name) == expected


def test_layer_index():
    assert matching.layer_index("model.layers.3.self_attn.q_proj", None) == 3
    assert matching.layer_index("model.layers.3.mlp.experts.7.w1", None) == 3
    assert matching.layer_index("model.layers.3.mlp.experts.7.w1", "experts") == 7
    assert matching.layer_index("lm_head", None) is None
    assert matching.layer_index("transformer.h.11.attn", ["layers", "h"]) == 11


def test_near_misses_names_close_modules():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"]
    assert "q_proj" in matching.near_misses(["q_prj"], names)
    fallback = matching.near_misses(["zzzz"], names)  # nothing close: the leaf names that exist
    assert fallback and set(fallback) <= {"q_proj", "v_proj", "up_proj"}


# ---------------------------------------------------------------------------------------------------
# peer: the same tables through peft's functions
# ---------------------------------------------------------------------------------------------------
@pytest.mark.peer
@peer
@pytest.mark.parametrize("key,targets,layers,pattern,exclude,expected", MATCH_CASES, ids=_ids(MATCH_CASES))
def test_check_target_module_exists_matches_peft(key, targets, layers, pattern, exclude, expected):
    from peft.tuners.tuners_utils import check_target_module_exists

    config = _config(targets, layers, pattern, exclude)
    assert bool(check_target_module_exists(config, key)) is expected
    assert bool(matching.check_target_module_exists(config, key)) is bool(check_target_module_exists(config, key))


@pytest.mark.peer
@peer
@pytest.mark.parametrize("key,modules_to_save,expected", MODULES_TO_SAVE_CASES, ids=_ids(MODULES_TO_SAVE_CASES))
def test_modules_to_save_rule_matches_peft(key, modules_to_save, expected):
    from peft.tuners.tuners_utils import check_target_module_exists

    config = _config([key.rsplit(".", 1)[-1]], modules_to_save=modules_to_save)
    assert bool(check_target_module_exists(config, key)) is expected


@pytest.mark.peer
@peer
@pytest.mark.parametrize("keys,name,expected", PATTERN_CASES, ids=[str(i) for i in range(len(PATTERN_CASES))])
def test_get_pattern_key_matches_peft(keys, name, expected):
    from peft.utils.other import get_pattern_key

    assert get_pattern_key(keys, name) == expected


@pytest.mark.peer
@peer
def test_divergence_modules_to_save_names_are_literal():
    """Known divergence: peft puts a modules_to_save entry into a regex unescaped, so its dots match any
    character and "classifier.dense" also shields "classifier_dense"; peftlab reads the entry literally."""
    from peft.tuners.tuners_utils import check_target_module_exists

    config = _config(["classifier_dense"], modules_to_save=["classifier.dense"])
    assert not check_target_module_exists(config, "model.classifier_dense")  # peft: excluded
    assert matching.check_target_module_exists(config, "model.classifier_dense")  # peftlab: a target
