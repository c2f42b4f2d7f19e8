"""Portable recipes: export, JSON files, and a rebuild elsewhere with the same choices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.build.timing import FakeTimer
from engine.builder import build
from engine.config import BuilderConfig, Precision, ShapeProfile
from engine.onnx_io import load
from engine.recipe import (
    RECIPE_VERSION,
    SOURCE_SHA256_KEY,
    RecipeError,
    check_source,
    config_from_recipe,
    exact_pattern,
    export_recipe,
    file_sha256,
    load_recipe,
    save_recipe,
)
from engine.zoo import build as build_zoo


def _shortest_name_wins(layer, tactic: str) -> float:
    return float(len(tactic))


def _longest_name_wins(layer, tactic: str) -> float:
    return 100.0 - len(tactic)


@pytest.fixture(scope="module")
def engine():
    config = BuilderConfig(
        timing_cache_path="/nonexistent/local/cache.json",
        layer_precisions=(("*fc*", Precision.FP32),),
    )
    return build(load(build_zoo("resnet")), config, timer=FakeTimer(_shortest_name_wins))


def test_the_recipe_holds_config_precisions_and_every_tactic(engine) -> None:
    recipe = export_recipe(engine)
    assert json.loads(json.dumps(recipe)) == recipe
    assert recipe["recipe_version"] == RECIPE_VERSION
    assert recipe["tactic_pins"] == {layer.name: layer.tactic for layer in engine.plan.layers}
    assert recipe["layer_precisions"] == {
        layer.name: layer.precision.value for layer in engine.plan.layers
    }
    assert recipe["quantization"] == {"scales": {}}  # an fp32 engine quantizes nothing
    assert recipe["sparsity"] == {"layers": {}}
    # A timing cache is a file of the machine that built; the recipe does not carry its path.
    assert recipe["config"] == {**engine.config.to_json(), "timing_cache_path": None}
    assert recipe["built_on"] == engine.device
    assert recipe["source_model_sha256"] is None


def test_config_from_recipe_pins_every_layer_exactly(engine) -> None:
    config = config_from_recipe(export_recipe(engine))
    assert config.optimization_level == engine.config.optimization_level
    assert config.layer_precisions[0] == ("*fc*", Precision.FP32)
    assert config.timing_cache_path is None
    for layer in engine.plan.layers:
        assert config.tactic_pin(layer.name) == layer.tactic
        assert config.precision_override(layer.name) == layer.precision


def test_a_rebuild_from_the_recipe_keeps_the_tactics_whatever_the_timer_says(
    engine, tmp_path: Path
) -> None:
    path = save_recipe(export_recipe(engine), tmp_path / "resnet.recipe.json")
    config = config_from_recipe(load_recipe(path))
    timer = FakeTimer(_longest_name_wins)
    rebuilt = build(load(build_zoo("resnet")), config, timer=timer)
    assert [(layer.name, layer.tactic) for layer in rebuilt.plan.layers] == [
        (layer.name, layer.tactic) for layer in engine.plan.layers
    ]
    # Without the recipe the other timer would have chosen differently.
    free = build(load(build_zoo("resnet")), timer=FakeTimer(_longest_name_wins))
    assert [layer.tactic for layer in free.plan.layers] != [
        layer.tactic for layer in engine.plan.layers
    ]


def test_exact_patterns_match_only_their_own_name() -> None:
    import fnmatch

    for name in ("/layer1/Conv", "a*b", "x?[0]", "plain"):
        pattern = exact_pattern(name)
        assert fnmatch.fnmatchcase(name, pattern)
    assert not fnmatch.fnmatchcase("aXb", exact_pattern("a*b"))
    assert not fnmatch.fnmatchcase("x?0", exact_pattern("x?[0]"))
    config = BuilderConfig(tactic_pins=((exact_pattern("a*b"), "direct"),))
    assert config.tactic_pin("a*b") == "direct" and config.tactic_pin("aXb") is None


def test_the_source_model_hash_travels_and_is_checked(tmp_path: Path) -> None:
    source = tmp_path / "resnet.onnx"
    source.write_bytes(build_zoo("resnet").SerializeToString())
    model = load(source)
    model.metadata_props[SOURCE_SHA256_KEY] = file_sha256(source)
    engine = build(model, timer=FakeTimer(_shortest_name_wins))
    recipe = export_recipe(engine)
    assert recipe["source_model_sha256"] == file_sha256(source)
    check_source(recipe, source)
    other = tmp_path / "other.onnx"
    other.write_bytes(build_zoo("resnet", seed=1).SerializeToString())
    with pytest.raises(RecipeError, match="the recipe was made for another model"):
        check_source(recipe, other)


def test_recipes_keep_profiles(tmp_path: Path) -> None:
    profile = ShapeProfile("input", (1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64))
    engine = build(
        load(build_zoo("resnet")),
        BuilderConfig(profiles=(profile,)),
        timer=FakeTimer(_shortest_name_wins),
    )
    config = config_from_recipe(load_recipe(save_recipe(engine, tmp_path / "r.json")))
    assert config.profiles == (profile,)


def test_bad_recipes_are_refused_with_a_reason(engine, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(RecipeError, match="broken.json: not a JSON recipe"):
        load_recipe(broken)
    future = {**export_recipe(engine), "recipe_version": RECIPE_VERSION + 1}
    with pytest.raises(RecipeError, match=f"recipe version {RECIPE_VERSION + 1}, this engine"):
        config_from_recipe(future)
    with pytest.raises(RecipeError, match="not a GIE recipe"):
        config_from_recipe({"config": {}})
    odd = {**export_recipe(engine), "layer_precisions": {"conv": "fp7"}}
    with pytest.raises(RecipeError, match="layer 'conv' has unknown precision 'fp7'"):
        config_from_recipe(odd)
