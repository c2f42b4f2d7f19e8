"""Rebuilding an engine's parts without the builder: portable recipes, and refit.

Recipes
-------
A recipe is a small JSON document (TensorRT users keep the equivalent as a builder script plus
a timing cache; Polygraphy calls it a "config"): the :class:`BuilderConfig` the engine was built
with, every compute layer's precision and chosen tactic, the int8 scale of every quantized
tensor (read from the engine's own graph, so it works for a loaded engine too), sparsity
decisions (empty until the sparsity issue fills them), and the SHA-256 of the source model when
the builder recorded it. :func:`config_from_recipe` turns it back into a ``BuilderConfig`` whose
per-layer overrides and tactic pins reproduce the same choices on another machine, so the
rebuild does no timing for the pinned layers; :func:`scales_from_recipe` gives the int8 scales
to pass to ``build(..., scales=...)`` so it needs no calibration data.

The timing-cache path is a local file, so a recipe drops it (``config.timing_cache_path`` is
``null``); pass one to :func:`config_from_recipe` to use a cache on the rebuilding machine.

Refit
-----
:func:`refit` gives an engine new values for existing weights (TensorRT's refitter): same
names, shapes and dtypes, no optimization, no timing; layers, tactics and the memory plan are
kept. The names are the OPTIMIZED graph's constants (:func:`refittable_weights`), not the
source model's: see there.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.config import BuilderConfig, Precision
from engine.device import ENGINE_VERSION

if TYPE_CHECKING:
    from engine.runtime import Engine

#: Version of the recipe JSON layout; bumped when a reader of the old one would misread it.
RECIPE_VERSION = 1

#: ``metadata_props`` key under which the builder may record the source ONNX file's SHA-256.
SOURCE_SHA256_KEY = "gie.source_sha256"

_GLOB_SPECIALS = {"*": "[*]", "?": "[?]", "[": "[[]"}


class RecipeError(ValueError):
    """A recipe file or document that cannot be used; the message says why."""


class RefitError(ValueError):
    """Weights that do not fit the engine (unknown name, other shape or dtype)."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def exact_pattern(name: str) -> str:
    """A ``fnmatch`` pattern matching exactly ``name`` (glob characters escaped as ``[*]``)."""
    return "".join(_GLOB_SPECIALS.get(char, char) for char in name)


def source_sha256(engine: Any) -> str | None:
    """The source model's SHA-256 if the builder recorded it on the optimized model, else None."""
    model = getattr(getattr(engine, "plan", None), "model", None)
    if model is None:
        return None
    return model.metadata_props.get(SOURCE_SHA256_KEY) or None


def export_recipe(engine: Any) -> dict[str, Any]:
    """The engine's recipe (JSON-able; see the module docstring for what it holds)."""
    config = engine.config.with_changes(timing_cache_path=None)
    layers = engine.plan.layers
    return {
        "recipe_version": RECIPE_VERSION,
        "engine_version": ENGINE_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source_model_sha256": source_sha256(engine),
        "built_on": dict(engine.device),
        "config": config.to_json(),
        "layer_precisions": {
            layer.name: layer.precision.value for layer in layers if layer.role == "compute"
        },
        "tactic_pins": {layer.name: layer.tactic for layer in layers if layer.role == "compute"},
        "quantization": {"scales": plan_scales(engine.plan)},
        "sparsity": {"layers": {}},
    }


#: Where the int8 layers of engine.ops.gie_quant keep (tensor input, its scale input).
_SCALED_INPUTS = {"QConv": ((0, 1),), "QGemm": ((0, 1),), "QMatMul": ((0, 1), (2, 3))}
_OUTPUT_SCALE = {"QConv": 6, "QGemm": 6, "QMatMul": 4}


def plan_scales(plan: Any) -> dict[str, float]:
    """The int8 scale of every tensor the plan quantizes (model names, ``::`` suffixes of the
    precision rewrite stripped), read from its QuantizeLinear layers and int8 ops."""
    scales: dict[str, float] = {}

    def note(tensor: str, scale_name: str) -> None:
        if tensor and scale_name in plan.constants:
            scales[tensor.split("::", 1)[0]] = float(np.asarray(plan.constants[scale_name]))

    for layer in plan.layers:
        if layer.op_type == "QuantizeLinear" and layer.domain == "" and len(layer.inputs) > 1:
            note(layer.inputs[0], layer.inputs[1])
        elif layer.domain == "gie" and layer.op_type in _SCALED_INPUTS:
            for tensor, scale in _SCALED_INPUTS[layer.op_type]:
                note(layer.inputs[tensor], layer.inputs[scale])
            index = _OUTPUT_SCALE[layer.op_type]
            if len(layer.inputs) > index and layer.inputs[index]:
                note(layer.outputs[0], layer.inputs[index])
    return dict(sorted(scales.items()))


def scales_from_recipe(recipe: Mapping[str, Any]) -> dict[str, float]:
    """The recipe's int8 scales (tensor name -> scale) for ``build(..., scales=...)``."""
    validate_recipe(recipe)
    quantization = recipe.get("quantization") or {}
    raw = quantization.get("scales", {}) if isinstance(quantization, Mapping) else {}
    try:
        return {str(name): float(value) for name, value in raw.items()}
    except (AttributeError, TypeError, ValueError) as error:
        raise RecipeError(f"recipe: its quantization scales cannot be read: {error}") from error


def validate_recipe(recipe: Mapping[str, Any], label: str = "recipe") -> None:
    """Raise :class:`RecipeError` when ``recipe`` is not a recipe this engine can use."""
    if not isinstance(recipe, Mapping):
        raise RecipeError(f"{label}: a recipe is a JSON object, got {type(recipe).__name__}")
    version = recipe.get("recipe_version")
    if not isinstance(version, int):
        raise RecipeError(f"{label}: not a GIE recipe (no integer 'recipe_version')")
    if version != RECIPE_VERSION:
        raise RecipeError(
            f"{label}: written as recipe version {version}, this engine reads version "
            f"{RECIPE_VERSION}"
        )
    for key in ("config", "layer_precisions", "tactic_pins"):
        if not isinstance(recipe.get(key), Mapping):
            raise RecipeError(f"{label}: '{key}' is missing or not a JSON object")
    for name, precision in recipe["layer_precisions"].items():
        if precision not in {p.value for p in Precision}:
            raise RecipeError(f"{label}: layer '{name}' has unknown precision {precision!r}")


def config_from_recipe(
    recipe: Mapping[str, Any], timing_cache_path: str | None = None
) -> BuilderConfig:
    """A BuilderConfig reproducing the recipe: its config plus one exact precision override and
    one exact tactic pin per layer (appended last, so they win over the config's globs)."""
    validate_recipe(recipe)
    try:
        base = BuilderConfig.from_json(recipe["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise RecipeError(f"recipe: its config cannot be read: {error}") from error
    precisions = tuple(
        (exact_pattern(name), Precision(value))
        for name, value in recipe["layer_precisions"].items()
    )
    pins = tuple(
        (exact_pattern(name), str(tactic)) for name, tactic in recipe["tactic_pins"].items()
    )
    return base.with_changes(
        layer_precisions=base.layer_precisions + precisions,
        tactic_pins=base.tactic_pins + pins,
        timing_cache_path=timing_cache_path,
    )


def check_source(recipe: Mapping[str, Any], model_path: str | os.PathLike[str]) -> None:
    """Raise :class:`RecipeError` when the recipe names a source model and ``model_path`` is not
    that file (compared by SHA-256); a recipe without a recorded hash accepts any model."""
    expected = recipe.get("source_model_sha256")
    if not expected:
        return
    actual = file_sha256(model_path)
    if actual != expected:
        raise RecipeError(
            f"{model_path}: SHA-256 {actual[:16]}... differs from the recipe's source model "
            f"{str(expected)[:16]}...: the recipe was made for another model"
        )


def save_recipe(recipe: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a recipe (or build one from an engine first) as JSON, atomically."""
    document = recipe if isinstance(recipe, Mapping) else export_recipe(recipe)
    validate_recipe(document)
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        temporary.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def load_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a recipe JSON file."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecipeError(f"{path}: not a JSON recipe ({error})") from error
    validate_recipe(document, str(path))
    return document


def refittable_weights(engine: Engine) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The engine's weights by name with (shape, dtype): what :func:`refit` accepts.

    These are the weights of the OPTIMIZED graph: after BatchNorm folding a conv's weight and
    bias are the folded ones (often renamed, e.g. ``conv1.weight_2``), so refitting from a
    training checkpoint means folding the same way first (or building at O0/O1, where weights
    keep their original names and values).
    """
    return {
        name: (tuple(array.shape), array.dtype) for name, array in engine.plan.constants.items()
    }


def refit(engine: Engine, weights: Mapping[str, np.ndarray]) -> Engine:
    """A new engine with some weights replaced; layers, tactics and memory plan unchanged.

    Every name must be one of :func:`refittable_weights` and every array must have the same
    shape and dtype; anything else raises :class:`RefitError`. ``engine`` is not modified.
    """
    from engine.build.log import BuildLog
    from engine.build.memory import MemoryPlan
    from engine.serialize import (
        assemble_model,
        lowering_shapes,
        restore_engine,
        structure_proto,
        weight_values,
    )

    known = refittable_weights(engine)
    for name, array in weights.items():
        if name not in known:
            listed = ", ".join(sorted(known)[:12]) + (", ..." if len(known) > 12 else "")
            raise RefitError(
                f"refit: '{name}' is not a weight of this engine (its weights are the optimized "
                f"graph's, see refittable_weights): {listed}"
            )
        shape, dtype = known[name]
        given = np.asarray(array)
        if given.shape != shape or given.dtype != dtype:
            raise RefitError(
                f"refit: weight '{name}' is {dtype}{list(shape)}, got "
                f"{given.dtype}{list(given.shape)}; refit keeps shapes and dtypes (rebuild instead)"
            )
    plan = engine.plan
    stored = weight_values(plan.model)
    arrays = {v.name or "": v.const_value.numpy() for v in stored}  # type: ignore[union-attr]
    arrays.update({name: np.array(array, copy=True) for name, array in weights.items()})
    model = assemble_model(
        structure_proto(plan.model, stored), arrays, plan.model.meta.get("source")
    )
    log = BuildLog(list(engine.log.entries))
    log.add("refit", f"{len(weights)} weights replaced: {', '.join(sorted(weights)) or 'none'}")
    return restore_engine(
        model,
        lowering_shapes(plan),
        [layer.to_json() for layer in plan.layers],
        MemoryPlan.from_json(engine.memory.to_json()),
        engine.config,
        log,
        engine.device,
        "refit",
    )
