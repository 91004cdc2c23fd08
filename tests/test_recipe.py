"""Recipe: defaults, shipped recipes, every error class, replace, round trip."""
import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from lowrank_attn.errors import RecipeError
from lowrank_attn.recipe import Recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
FIELDS = [f.name for f in dataclasses.fields(Recipe)]


def test_defaults_valid():
    r = Recipe()
    assert r.model == "smollm2-135m" and r.mode == "auto" and r.policy == "budget"
    assert r.rank_ratio == 0.75 and r.max_tokens == 32768 and r.heldout_tokens == 4096 and r.text == ()
    assert (r.k_bits, r.v_bits, r.v_rank_ratio) == (4, 4, 1.0)  # the whole KV cache: 4-bit keys and values
    assert Recipe.from_dict({}) == r
    assert Recipe(k_bits=16, v_bits=16).k_bits is None and Recipe(v_bits=16).v_bits is None  # 16: not quantised


def test_value_width_lists():
    """A list of value widths (for the fidelity policy) is kept sorted, a single one is an int, a bad one refused
    by name; to_dict gives a list back."""
    assert Recipe(v_bits=[4, 3, 4]).v_bits == (3, 4) and Recipe(v_bits=[4]).v_bits == 4
    assert Recipe(v_bits=[3, 16]).value_bit_options == (3, None) and Recipe(v_bits=2).value_bit_options == (2,)
    assert Recipe(v_bits=[3, 4]).one_value_width().v_bits == 4 and Recipe(v_bits=3).one_value_width().v_bits == 3
    assert Recipe(v_bits=[3, 16]).one_value_width().v_bits is None
    assert Recipe(v_bits=[3, 4]).with_value_bits(3).v_bits == 3 and Recipe(v_bits=[4, 3]).to_dict()["v_bits"] == [3, 4]
    with pytest.raises(RecipeError, match="v_bits: must be one of"):
        Recipe(v_bits=[3, 5])
    with pytest.raises(RecipeError, match="v_bits: expected an int or a list of ints"):
        Recipe(v_bits="3,4")
    with pytest.raises(RecipeError, match="v_bits: expected"):
        Recipe(v_bits=[])


def test_shipped_recipes_present():
    names = {p.stem for p in RECIPES}
    assert {"smollm2-135m", "qwen2.5-0.5b", "gemma3-270m", "tiny-llama"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_loads(path):
    r = Recipe.from_yaml(path)
    assert r.model == path.stem
    assert isinstance(r.ridge, float)  # "1.0e-4" / "1e-4" are floats, not strings


def test_exponent_without_dot_is_a_float(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("ridge: 1e-4\ntau: 5E-1\n")
    r = Recipe.from_yaml(p)
    assert r.ridge == 1e-4 and r.tau == 0.5


def test_coercions():
    r = Recipe.from_dict({"rank_ratio": 1, "text": "a.txt", "max_tokens": None})
    assert r.rank_ratio == 1.0 and isinstance(r.rank_ratio, float)
    assert r.text == ("a.txt",) and r.max_tokens is None
    assert Recipe(text=["a", "b"]).text == ("a", "b")


def _raises(match, fn, *args, **kw):
    with pytest.raises(RecipeError, match=match) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_suggests():
    msg = _raises(r"^rnak_ratio: unknown", Recipe.from_dict, {"rnak_ratio": 0.5})
    assert "did you mean 'rank_ratio'" in msg
    msg = _raises(r"^zzzzzz: unknown", Recipe.from_dict, {"zzzzzz": 1})
    assert "valid fields" in msg
    _raises(r"^1: unknown", Recipe.from_dict, {1: 2})


@pytest.mark.parametrize("field,value,expected", [
    ("rank_ratio", "half", "float"), ("min_rank", 2.0, "int"), ("model", 3, "str"),
    ("text", [1], r"list\[str\]"), ("text", None, r"list\[str\]"), ("rank_ratio", None, "float"),
    ("k_bits", "4", "int or null"), ("seed", [0], "int"),
])
def test_wrong_type(field, value, expected):
    msg = _raises(rf"^{field}: expected {expected}", Recipe.from_dict, {field: value})
    assert repr(value)[:20] in msg


@pytest.mark.parametrize("field", ["min_rank", "seed", "exact_window", "max_tokens", "k_bits", "rank_ratio"])
def test_bool_is_not_a_number(field):
    _raises(rf"^{field}: expected .*True \(bool\)", Recipe.from_dict, {field: True})


@pytest.mark.parametrize("field", ["rank_ratio", "tau", "epsilon", "ridge"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_rejected(field, value):
    _raises(rf"^{field}: must be a finite number", Recipe.from_dict, {field: value})


def test_huge_int_for_float():
    _raises(r"^tau: number too large", Recipe.from_dict, {"tau": 10**400})


OUT_OF_RANGE = [
    ("model", ""), ("mode", "pre-rope"), ("policy", "greedy"),
    ("rank_ratio", 0), ("rank_ratio", 1.5), ("rank_ratio", -0.1),
    ("tau", 0.0), ("tau", 1.01), ("epsilon", 0), ("epsilon", 2.0), ("max_kl", 0), ("max_kl", -1.0), ("max_kv_fraction", 0), ("max_kv_fraction", 1.01),
    ("min_rank", 0), ("granularity", 3), ("granularity", 32), ("ridge", -1e-9), ("ridge", 1.0),
    ("weighting", "uniform"), ("fit", "svd"), ("signal", "loss"), ("exact_window", -1), ("exact_sink", -1), ("k_bits", 32), ("k_bits", 1), ("k_group", 0), ("k_group", 12), ("v_bits", 5), ("v_group", 12), ("v_rank_ratio", 0.0), ("v_window", -1),
    ("v_rotation", "random"), ("k_clip", "percentile"), ("v_clip", "max"),
    ("text", [""]), ("seq_len", 1), ("serve_len", 1), ("max_tokens", 0), ("heldout_tokens", -1),
    ("seed", -1), ("seed", 2**32), ("device", ""), ("dtype", "float64"),
]


@pytest.mark.parametrize("field,value", OUT_OF_RANGE)
def test_out_of_range(field, value):
    msg = _raises(rf"^{field}: must be ", Recipe.from_dict, {field: value})
    assert msg.endswith(repr(value))


def test_every_constrained_field_has_an_out_of_range_case():
    assert {f for f, _ in OUT_OF_RANGE} | {"max_rank"} == set(FIELDS)


def test_message_example():
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({"rank_ratio": 1.5})
    assert str(info.value) == "rank_ratio: must be in (0, 1], got 1.5"


def test_max_rank_vs_min_rank():
    _raises(r"^max_rank: must be >= min_rank \(4\), got 2", Recipe.from_dict, {"min_rank": 4, "max_rank": 2})
    _raises(r"^max_rank: must be >= min_rank", Recipe.from_dict, {"max_rank": 0})
    assert Recipe(min_rank=4, max_rank=4).max_rank == 4


def test_yaml_invalid_has_line_number(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: smollm2-135m\npolicy: budget\ntext: [a, b\nseed: 1\n")
    msg = _raises(r"invalid YAML", Recipe.from_yaml, p)
    assert "line " in msg and str(p) in msg
    p.write_text("model: x\n  bad: indent\n")
    _raises(r"invalid YAML .* line 2", Recipe.from_yaml, p)
    p.write_text("rank_ratio: 0.5\nrank_ratio: 0.25\n")  # plain YAML keeps the last: a typo'd copy-paste passes
    _raises(r"invalid YAML .* line 2: field 'rank_ratio' given twice", Recipe.from_yaml, p)


@pytest.mark.parametrize("body", ["- a\n- b\n", "just a string\n", "42\n"])
def test_yaml_top_level_not_mapping(tmp_path, body):
    p = tmp_path / "r.yaml"
    p.write_text(body)
    _raises(r"top level must be a mapping", Recipe.from_yaml, p)


def test_yaml_missing_unreadable_empty(tmp_path):
    _raises(r"recipe file not found", Recipe.from_yaml, tmp_path / "nope.yaml")
    _raises(r"cannot read recipe file", Recipe.from_yaml, tmp_path)  # a directory
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\xff\xfe\x00bad")
    _raises(r"cannot read recipe file", Recipe.from_yaml, p)
    p = tmp_path / "empty.yaml"
    p.write_text("# only a comment\n")
    assert Recipe.from_yaml(p) == Recipe()


def test_yaml_field_errors_propagate(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("rank_ratio: 2\n")
    _raises(r"^rank_ratio: must be in \(0, 1\], got 2.0", Recipe.from_yaml, p)


def test_yaml_is_safe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    _raises(r"invalid YAML", Recipe.from_yaml, p)


def test_replace():
    r = Recipe()
    r2 = r.replace(rank_ratio=0.25, tau=None, max_tokens=None, text="x.txt")
    assert r2.rank_ratio == 0.25 and r2.tau == r.tau and r2.max_tokens == 32768 and r2.text == ("x.txt",)
    assert r.rank_ratio == 0.75  # original untouched
    _raises(r"^rank_ratio: must be in", r.replace, rank_ratio=3)
    _raises(r"^min_rank: expected int", r.replace, min_rank=True)
    msg = _raises(r"^rank_ration: unknown", r.replace, rank_ration=0.3)
    assert "rank_ratio" in msg
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.rank_ratio = 0.1


def test_round_trip(tmp_path):
    r = Recipe(model="qwen2.5-0.5b", text=["a.txt", "b/*.txt"], ridge=1e-4, k_bits=4, max_rank=32,
               seq_len=1024, max_tokens=None, policy="bound", epsilon=0.01)
    d = r.to_dict()
    assert list(d) == FIELDS and d["text"] == ["a.txt", "b/*.txt"]
    assert Recipe.from_dict(d) == r
    assert Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r
    p = tmp_path / "r.yaml"
    p.write_text(r.to_yaml())
    assert Recipe.from_yaml(p) == r
    assert hash(r) == hash(Recipe.from_dict(d))


JUNK = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(), st.lists(st.text(), max_size=3))
KEYS = st.one_of(st.sampled_from(FIELDS), st.sampled_from(FIELDS), st.text(max_size=12))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(KEYS, JUNK, max_size=8))
def test_from_dict_only_raises_recipe_error(d):
    try:
        r = Recipe.from_dict(d)
    except RecipeError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(r, Recipe) and Recipe.from_dict(r.to_dict()) == r


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), JUNK, max_size=6))
def test_replace_only_raises_recipe_error(d):
    try:
        r = Recipe().replace(**d)
    except RecipeError:
        pass
    else:
        assert all(getattr(r, k) == getattr(Recipe(), k) for k, v in d.items() if v is None)
