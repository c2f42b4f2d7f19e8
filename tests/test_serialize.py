""".gie engine files: bitwise round trips, the manifest, atomic writes, each refusal, refit."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from engine.backends.numpy_ref import ReferenceInterpreter
from engine.build.plan import TacticTiming
from engine.build.timing import FakeTimer
from engine.builder import build
from engine.config import BuilderConfig, ShapeProfile
from engine.device import ENGINE_VERSION, device_identity
from engine.examples import LIGHT_MODELS, light_model_path
from engine.onnx_io import load
from engine.recipe import config_from_recipe, export_recipe
from engine.serialize import (
    FORMAT_VERSION,
    EngineFileError,
    RefitError,
    load_engine,
    read_manifest,
    refit,
    refittable_weights,
    save_engine,
)
from engine.zoo import ZOO, make_inputs
from engine.zoo import build as build_zoo

ROOT = Path(__file__).resolve().parents[1]


def _timer() -> FakeTimer:
    """Deterministic, non-trivial choices: the tactic with the shortest name wins."""
    return FakeTimer(lambda layer, tactic: float(len(tactic)))


def _build(model: ir.Model, config: BuilderConfig | None = None):
    return build(model, config or BuilderConfig(), timer=_timer())


@pytest.fixture(scope="module")
def resnet_engine():
    proto = build_zoo("resnet")
    return _build(load(proto)), make_inputs(proto, 0)


def _assert_same_outputs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name], equal_nan=True), f"output {name} differs"


def _assert_same_engine(a, b) -> None:
    """Same layer table (precision, tactic, candidates), memory plan and config."""
    assert [layer.to_json() for layer in a.plan.layers] == [
        layer.to_json() for layer in b.plan.layers
    ]
    assert a.memory == b.memory
    assert a.config == b.config
    assert sorted(a.plan.constants) == sorted(b.plan.constants)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_save_load_run_is_bitwise_identical_on_every_zoo_model(name: str, tmp_path: Path) -> None:
    proto = build_zoo(name)
    engine = _build(load(proto))
    feeds = make_inputs(proto, 0)
    path = save_engine(engine, tmp_path / f"{name}.gie")
    loaded = load_engine(path)
    _assert_same_outputs(engine.run(feeds), loaded.run(feeds))
    _assert_same_engine(engine, loaded)
    assert loaded.log.entries[: len(engine.log.entries)] == engine.log.entries
    assert any(e.stage == "load" and "no re-timing" in e.message for e in loaded.log.entries)


def test_light_resnet50_round_trip_is_bitwise_identical(tmp_path: Path) -> None:
    engine = _build(load(light_model_path("resnet50")))
    feeds = engine.example_feeds(seed=1)
    loaded = load_engine(save_engine(engine, tmp_path / "resnet50.gie"))
    _assert_same_outputs(engine.run(feeds), loaded.run(feeds))
    _assert_same_engine(engine, loaded)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in LIGHT_MODELS if n != "resnet50"])
def test_every_light_model_round_trips_bitwise(name: str, tmp_path: Path) -> None:
    engine = _build(load(light_model_path(name)))
    feeds = engine.example_feeds(seed=1)
    loaded = load_engine(save_engine(engine, tmp_path / f"{name}.gie"))
    _assert_same_outputs(engine.run(feeds), loaded.run(feeds))


def test_an_engine_with_a_batch_profile_round_trips_at_every_batch(tmp_path: Path) -> None:
    profile = ShapeProfile("input", (1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64))
    engine = _build(load(build_zoo("resnet")), BuilderConfig(profiles=(profile,)))
    loaded = load_engine(save_engine(engine, tmp_path / "batch.gie"))
    _assert_same_engine(engine, loaded)
    assert loaded.memory.input_shapes == {"input": (4, 3, 64, 64)}
    for batch in (1, 3, 4):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64)).astype(np.float32)
        _assert_same_outputs(engine.run({"input": x}), loaded.run({"input": x}))
    with pytest.raises(ValueError, match="outside its profile range"):
        loaded.run({"input": np.zeros((5, 3, 64, 64), np.float32)})


def test_manifest_records_config_device_layers_memory_log_and_checksums(
    resnet_engine, tmp_path: Path
) -> None:
    engine, _ = resnet_engine
    path = save_engine(engine, tmp_path / "resnet.gie")
    manifest = read_manifest(path)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["engine_version"] == ENGINE_VERSION
    assert manifest["created"].endswith("+00:00")
    assert manifest["config"] == engine.config.to_json()
    assert manifest["device"] == device_identity("numpy")
    assert {"numpy", "onnx", "onnx_ir", "python"} <= set(manifest["libraries"])
    assert manifest["layers"] == [layer.to_json() for layer in engine.plan.layers]
    assert manifest["memory"]["arena_bytes"] == engine.memory.arena_bytes
    assert manifest["log"] == engine.log.to_json()
    with zipfile.ZipFile(path) as archive:
        graph = archive.read("graph.onnx")
        assert hashlib.sha256(graph).hexdigest() == manifest["graph"]["sha256"]
        rows = manifest["tensors"]
        assert {row["name"] for row in rows} == set(engine.plan.constants)
        for row in rows:
            data = archive.read(row["file"])
            assert hashlib.sha256(data).hexdigest() == row["sha256"]
            array = np.load(io.BytesIO(data), allow_pickle=False)
            assert np.array_equal(array, engine.plan.constants[row["name"]])
    proto = onnx.load_from_string(graph)
    # The graph holds the structure only: initializers keep names and dims, not data.
    assert proto.graph.initializer and all(
        not t.raw_data and not t.float_data and not t.int64_data for t in proto.graph.initializer
    )
    assert len(graph) < 0.2 * sum(a.nbytes for a in engine.plan.constants.values())


def test_non_finite_timings_are_strict_json_and_round_trip(tmp_path: Path) -> None:
    engine = _build(load(build_zoo("mobilenetv2_block")))
    layer = engine.plan.layers[0]
    layer.candidates = [*layer.candidates, TacticTiming("direct", math.inf, 2, True, "aborted")]
    path = save_engine(engine, tmp_path / "inf.gie")
    with zipfile.ZipFile(path) as archive:
        text = archive.read("manifest.json").decode()

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    json.loads(text, parse_constant=refuse)
    assert load_engine(path).plan.layers[0].candidates == layer.candidates


def test_dtypes_numpy_cannot_store_round_trip_through_uint_views(tmp_path: Path) -> None:
    import ml_dtypes

    weight = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [
                onnx.helper.make_node("Cast", ["w"], ["wf"], to=onnx.TensorProto.FLOAT, name="c"),
                onnx.helper.make_node("Add", ["x", "wf"], ["y"], name="add"),
            ],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 4])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 4])],
            [onnx.numpy_helper.from_array(weight.astype(ml_dtypes.bfloat16), "w")],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    engine = _build(load(proto), BuilderConfig(optimization_level="O0"))
    loaded = load_engine(save_engine(engine, tmp_path / "bf16.gie"))
    assert loaded.plan.constants["w"].dtype == ml_dtypes.bfloat16
    x = np.ones((3, 4), np.float32)
    _assert_same_outputs(engine.run({"x": x}), loaded.run({"x": x}))
    row = read_manifest(tmp_path / "bf16.gie")["tensors"][0]
    assert (row["dtype"], row["stored_as"]) == ("BFLOAT16", "<u2")


# ---------------------------------------------------------------- atomic writes


def test_a_failed_save_leaves_the_old_file_and_no_temporary(resnet_engine, tmp_path: Path) -> None:
    engine, feeds = resnet_engine
    path = save_engine(engine, tmp_path / "resnet.gie")
    before = path.read_bytes()
    engine.device["unserializable"] = object()  # json.dumps fails after the tensors are written
    try:
        with pytest.raises(TypeError):
            save_engine(engine, path)
    finally:
        del engine.device["unserializable"]
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet.gie"]
    assert path.stat().st_mode & 0o777 == 0o644
    _assert_same_outputs(engine.run(feeds), load_engine(path).run(feeds))


# ---------------------------------------------------------------- refusals


def _member_data_offset(path: Path, member: str) -> int:
    """Byte offset of a stored member's data inside the zip (after its local header)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    name_length = int.from_bytes(header[26:28], "little")
    extra_length = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_length + extra_length


def _rewrite(path: Path, target: Path, replace: dict[str, bytes]) -> Path:
    """A copy of the .gie at ``path`` with some members' bytes replaced (CRCs recomputed)."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(target, "w") as out:
        for info in source.infolist():
            out.writestr(info.filename, replace.get(info.filename, source.read(info.filename)))
    return target


def _with_manifest(path: Path, target: Path, **changes) -> Path:
    manifest = read_manifest(path)
    manifest.update(changes)
    return _rewrite(path, target, {"manifest.json": json.dumps(manifest).encode()})


@pytest.fixture
def saved(resnet_engine, tmp_path: Path) -> Path:
    return save_engine(resnet_engine[0], tmp_path / "resnet.gie")


def _first_weight_row(path: Path) -> dict:
    return next(r for r in read_manifest(path)["tensors"] if len(r["shape"]) == 4)


def test_a_tampered_tensor_byte_is_refused_naming_the_tensor(saved: Path) -> None:
    row = _first_weight_row(saved)
    with zipfile.ZipFile(saved) as archive:
        size = archive.getinfo(row["file"]).file_size
    data = bytearray(saved.read_bytes())
    data[_member_data_offset(saved, row["file"]) + size - 3] ^= 0x40
    saved.write_bytes(bytes(data))
    with pytest.raises(EngineFileError) as caught:
        load_engine(saved)
    message = str(caught.value)
    assert f"tensor '{row['name']}' ({row['file']}) is corrupted" in message
    assert str(saved) in message


def test_a_tensor_replaced_behind_the_manifest_fails_its_sha256(saved: Path) -> None:
    row = _first_weight_row(saved)
    forged = io.BytesIO()
    np.save(forged, np.zeros(row["shape"], np.float32))
    tampered = _rewrite(saved, saved.with_name("forged.gie"), {row["file"]: forged.getvalue()})
    with pytest.raises(EngineFileError) as caught:
        load_engine(tampered)
    assert str(caught.value) == (
        f"{tampered}: tensor '{row['name']}' ({row['file']}) is corrupted: SHA-256 mismatch"
    )


def test_a_replaced_graph_fails_its_sha256(saved: Path) -> None:
    tampered = _rewrite(saved, saved.with_name("graph.gie"), {"graph.onnx": b"\x08\x07"})
    with pytest.raises(EngineFileError, match=r"graph\.onnx is corrupted: SHA-256 mismatch"):
        load_engine(tampered)


def test_a_truncated_file_is_refused(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineFileError, match=r"truncated or damaged \.gie file") as caught:
        load_engine(saved)
    assert str(saved) in str(caught.value)


def test_files_that_are_not_engines_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.gie"
    text.write_text("hello")
    with pytest.raises(EngineFileError, match=r"notes\.gie: not a \.gie engine file \(not a zip"):
        load_engine(text)
    empty = tmp_path / "empty.gie"
    empty.write_bytes(b"")
    with pytest.raises(EngineFileError, match="empty file"):
        load_engine(empty)
    with pytest.raises(EngineFileError, match="no such file"):
        load_engine(tmp_path / "missing.gie")
    other = tmp_path / "other.gie"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("readme.txt", "not an engine")
    with pytest.raises(EngineFileError, match=r"other\.gie: no manifest\.json"):
        load_engine(other)


def test_another_format_version_is_refused(saved: Path) -> None:
    future = _with_manifest(saved, saved.with_name("future.gie"), format_version=2)
    with pytest.raises(EngineFileError) as caught:
        load_engine(future)
    assert f"{future}: built with format 2" in str(caught.value)
    assert "reads format 1" in str(caught.value)


def test_a_tactic_this_engine_does_not_have_is_refused(saved: Path) -> None:
    layers = read_manifest(saved)["layers"]
    layers[0]["tactic"] = "warp_drive"
    odd = _with_manifest(saved, saved.with_name("odd.gie"), layers=layers)
    with pytest.raises(EngineFileError, match=r"cannot rebuild the engine: .*'warp_drive'"):
        load_engine(odd)


def test_an_engine_built_for_another_device_is_refused_with_both_identities(saved: Path) -> None:
    gpu = {
        "backend": "cuda",
        "device": "NVIDIA H100 80GB HBM3",
        "machine": "x86_64",
        "compute_capability": "9.0",
        "engine": ENGINE_VERSION,
    }
    config = {**read_manifest(saved)["config"], "backend": "cuda"}
    foreign = _with_manifest(saved, saved.with_name("gpu.gie"), device=gpu, config=config)
    with pytest.raises(EngineFileError) as caught:
        load_engine(foreign)
    message = str(caught.value)
    assert "built for another device" in message
    assert "NVIDIA H100 80GB HBM3" in message
    # this machine's identity for the cuda backend: its GPU, or that it has none
    here = device_identity("cuda")["device"]
    assert here in message and "backend=cuda" in message


def test_a_numpy_engine_from_another_cpu_loads_with_a_warning(resnet_engine, saved: Path) -> None:
    engine, feeds = resnet_engine
    device = {**read_manifest(saved)["device"], "device": "Imaginary CPU 9000", "threads": "512"}
    moved = _with_manifest(saved, saved.with_name("moved.gie"), device=device)
    loaded = load_engine(moved)
    _assert_same_outputs(engine.run(feeds), loaded.run(feeds))
    warnings = [e.message for e in loaded.log.entries if e.stage == "load"]
    assert any("Imaginary CPU 9000" in w and "timed there" in w for w in warnings)


def test_loading_imports_no_jupyter_module(saved: Path) -> None:
    script = (
        "import sys\n"
        "from engine.serialize import load_engine\n"
        f"engine = load_engine({str(saved)!r})\n"
        "engine.run(engine.example_feeds())\n"
        "banned = {'IPython', 'ipykernel', 'ipywidgets', 'jupyterlab', 'jupyter_server',\n"
        "          'jupyter_client', 'notebook', 'studio', 'plotly', 'netron'}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in banned)\n"
        "assert not loaded, loaded\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- refit


def _new_weights(engine, seed: int) -> dict[str, np.ndarray]:
    """Every float weight scaled elementwise by a factor in [0.5, 1.5) (signs kept, so BatchNorm
    variances stay positive and outputs finite)."""
    rng = np.random.default_rng(seed)
    return {
        name: (array * rng.uniform(0.5, 1.5, array.shape)).astype(array.dtype)
        for name, array in engine.plan.constants.items()
        if np.issubdtype(array.dtype, np.floating)
    }


def test_refittable_weights_are_the_optimized_fused_ones(resnet_engine) -> None:
    engine, _ = resnet_engine
    weights = refittable_weights(engine)
    assert weights == {
        name: (array.shape, array.dtype) for name, array in engine.plan.constants.items()
    }
    original = {t.name for t in build_zoo("resnet").graph.initializer}
    assert not any("running_mean" in name for name in weights)  # BatchNorm was folded away
    assert set(weights) - original, "expected folded (renamed) conv weights"


def test_refit_equals_rebuilding_with_the_new_weights(tmp_path: Path) -> None:
    proto = build_zoo("resnet")
    config = BuilderConfig(optimization_level="O0")  # weights keep the source model's names
    engine = _build(load(proto), config)
    feeds = make_inputs(proto, 0)
    new = _new_weights(engine, seed=7)
    refitted = refit(engine, new)
    # Rebuild from a source model whose initializers were replaced, pinned to the same tactics.
    edited = load(proto)
    for name, array in new.items():
        edited.graph.initializers[name].const_value = ir.Tensor(array, name=name)
    rebuilt = build(edited, config_from_recipe(export_recipe(engine)), timer=_timer())
    assert [layer.tactic for layer in rebuilt.plan.layers] == [
        layer.tactic for layer in engine.plan.layers
    ]
    _assert_same_outputs(refitted.run(feeds), rebuilt.run(feeds))
    assert all(np.isfinite(v).all() for v in refitted.run(feeds).values())
    reference = ReferenceInterpreter(edited).run(feeds).outputs
    for name, want in reference.items():
        np.testing.assert_allclose(refitted.run(feeds)[name], want, rtol=1e-4, atol=1e-5)


def test_refit_of_a_fused_engine_matches_the_reference_on_the_edited_graph(resnet_engine) -> None:
    engine, feeds = resnet_engine
    before = engine.run(feeds)
    new = _new_weights(engine, seed=3)
    refitted = refit(engine, new)
    _assert_same_engine(engine, refitted)
    assert all(np.array_equal(refitted.plan.constants[n], a) for n, a in new.items())
    edited = ir.from_proto(ir.to_proto(engine.plan.model))
    for name, array in new.items():
        edited.graph.initializers[name].const_value = ir.Tensor(array, name=name)
    ours = refitted.run(feeds)
    for name, want in ReferenceInterpreter(edited).run(feeds).outputs.items():
        np.testing.assert_allclose(ours[name], want, rtol=1e-4, atol=1e-5)
        assert not np.allclose(ours[name], before[name])
    _assert_same_outputs(engine.run(feeds), before)  # the original engine is untouched
    assert any(e.stage == "refit" for e in refitted.log.entries)


def test_a_refitted_engine_saves_and_loads_bitwise(resnet_engine, tmp_path: Path) -> None:
    engine, feeds = resnet_engine
    refitted = refit(engine, _new_weights(engine, seed=5))
    loaded = load_engine(save_engine(refitted, tmp_path / "refit.gie"))
    _assert_same_outputs(refitted.run(feeds), loaded.run(feeds))


def test_refit_refuses_other_shapes_dtypes_and_names(resnet_engine) -> None:
    engine, _ = resnet_engine
    name, (shape, dtype) = next(
        (n, s) for n, s in refittable_weights(engine).items() if len(s[0]) == 4
    )
    wrong_shape = np.zeros((shape[0] + 1, *shape[1:]), dtype)
    with pytest.raises(RefitError) as caught:
        refit(engine, {name: wrong_shape})
    assert str(caught.value).startswith(f"refit: weight '{name}' is float32{list(shape)}, got")
    with pytest.raises(RefitError, match=rf"'{name}' is float32.*got float64"):
        refit(engine, {name: np.zeros(shape, np.float64)})
    with pytest.raises(RefitError, match=r"'conv1\.weight' is not a weight of this engine"):
        refit(engine, {"conv1.weight": np.zeros(shape, dtype)})
