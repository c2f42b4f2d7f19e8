"""`gie build --int8/--fp16 ...`, `gie export-qdq` and `gie sensitivity` end to end: the real
``python -m engine.cli`` in a subprocess, real files under tmp_path.

Failures must exit 2 with one ``gie: error:`` line naming the culprit (file, input, layer) and
must leave no half-written engine behind.
"""

from __future__ import annotations

import json
import stat
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_testing import clean_error, gie, ok

from engine import zoo
from engine.config import Precision
from engine.serialize import load_engine

FAST_TIMING = ("--timing-iterations", "1", "--timing-warmup", "0")
PRECISION_LINE = "precisions: "


def _samples(count: int, seed: int) -> np.ndarray:
    """``count`` samples of zoo resnet's input [3, 64, 64] (first axis = samples)."""
    return np.random.default_rng(seed).standard_normal((count, 3, 64, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The zoo resnet as an ONNX file and a valid calibration .npz (8 samples)."""
    folder = tmp_path_factory.mktemp("precision_cli")
    model = folder / "resnet.onnx"
    onnx.save(zoo.build("resnet"), model)
    calib = folder / "calib.npz"
    np.savez(calib, input=_samples(8, 0))
    return {"model": model, "calib": calib}


@pytest.fixture(scope="module")
def int8_build(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `gie build --int8 --calib --calib-cache` run: its result and files."""
    folder = tmp_path_factory.mktemp("int8_build")
    engine, cache = folder / "m.gie", folder / "c.json"
    result = gie(
        "build", files["model"], "--int8", "--calib", files["calib"],
        "--calib-cache", cache, "-o", engine, *FAST_TIMING,
    )  # fmt: skip
    return {"result": result, "engine": engine, "cache": cache}


def _precision_counts(stdout: str) -> dict[str, int]:
    """``precisions: int8 11, fp32 3; 3 conversion layers`` -> {"int8": 11, "fp32": 3}."""
    line = next(x for x in stdout.splitlines() if x.startswith(PRECISION_LINE))
    counts = line[len(PRECISION_LINE) :].split(";")[0]
    return {p: int(n) for p, n in (item.split() for item in counts.split(","))}


def _int8_layers(engine_path: Path) -> list[str]:
    engine = load_engine(engine_path)
    return [
        layer.name
        for layer in engine.plan.layers
        if layer.role == "compute" and layer.precision == Precision.INT8
    ]


# --------------------------------------------------------------------------- build --int8


def test_int8_build_prints_precisions_and_writes_engine_and_cache(
    int8_build: dict[str, Any],
) -> None:
    result = ok(int8_build["result"])
    counts = _precision_counts(result.stdout)
    assert counts.get("int8", 0) > 0
    assert "calibration cache written" in result.stdout
    assert int8_build["engine"].is_file() and int8_build["cache"].is_file()
    assert json.loads(int8_build["cache"].read_text())  # a JSON document
    assert len(_int8_layers(int8_build["engine"])) == counts["int8"]


def test_a_second_build_reads_the_cache_without_data(
    int8_build: dict[str, Any], files: dict[str, Path], tmp_path: Path
) -> None:
    first = ok(int8_build["result"])
    engine = tmp_path / "again.gie"
    result = ok(
        gie(
            "build",
            files["model"],
            "--int8",
            "--calib-cache",
            int8_build["cache"],
            "-o",
            engine,
            *FAST_TIMING,
        )
    )
    assert "read from calibration cache" in result.stdout
    assert _precision_counts(result.stdout) == _precision_counts(first.stdout)
    feeds = {"input": _samples(1, 7)}
    want = load_engine(int8_build["engine"]).run(feeds)
    got = load_engine(engine).run(feeds)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)


def test_the_calibration_cache_is_as_shareable_as_the_engine(int8_build: dict[str, Any]) -> None:
    ok(int8_build["result"])
    cache_mode = stat.S_IMODE(int8_build["cache"].stat().st_mode)
    engine_mode = stat.S_IMODE(int8_build["engine"].stat().st_mode)
    assert cache_mode == engine_mode, (oct(cache_mode), oct(engine_mode))


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "mse"])
def test_every_calibrator_is_accepted(
    calibrator: str, files: dict[str, Path], tmp_path: Path
) -> None:
    result = ok(
        gie(
            "build",
            files["model"],
            "--int8",
            "--calib",
            files["calib"],
            "--calibrator",
            calibrator,
            "-o",
            tmp_path / "m.gie",
            *FAST_TIMING,
        )
    )
    assert f"{calibrator} calibration" in result.stdout
    assert _precision_counts(result.stdout).get("int8", 0) > 0


def test_accuracy_budget_prints_the_mixed_precision_summary(
    files: dict[str, Path], tmp_path: Path
) -> None:
    result = ok(
        gie(
            "build",
            files["model"],
            "--int8",
            "--calib",
            files["calib"],
            "--accuracy-budget",
            "cosine=0.999",
            "-o",
            tmp_path / "m.gie",
            *FAST_TIMING,
        )
    )
    summary = next(x for x in result.stdout.splitlines() if x.startswith("mixed precision: "))
    assert "int8-capable layers stay int8" in summary and "cosine>=0.999" in summary
    assert (tmp_path / "m.gie").is_file()


def test_accuracy_budget_needs_calibration_data(files: dict[str, Path], tmp_path: Path) -> None:
    engine = tmp_path / "m.gie"
    result = gie(
        "build", files["model"], "--int8", "--accuracy-budget", "cosine=0.999", "-o", engine
    )
    clean_error(result, "--accuracy-budget", "--calib")
    assert not engine.exists()


@pytest.mark.parametrize("budget", ["cosine0.999", "cosine=abc", "latency=3", "cosine=2"])
def test_a_malformed_budget_is_a_clean_error(
    budget: str, files: dict[str, Path], tmp_path: Path
) -> None:
    engine = tmp_path / "m.gie"
    result = gie(
        "build", files["model"], "--int8", "--calib", files["calib"],
        "--accuracy-budget", budget, "-o", engine,
    )  # fmt: skip
    clean_error(result, budget)
    assert not engine.exists()


# --------------------------------------------------------------------------- bad calibration data


def _bad_data(kind: str, folder: Path) -> tuple[Path, list[str]]:
    """A broken calibration file of ``kind`` and what the error must name."""
    path = folder / f"{kind}.npz"
    good = _samples(4, 1)
    if kind == "nan":
        good[2, 1, 5, 5] = np.nan
        np.savez(path, input=good)
        return path, [path.name, "'input'", "NaN"]
    if kind == "inf":
        good[1, 0, 0, 0] = -np.inf
        np.savez(path, input=good)
        return path, [path.name, "'input'", "Inf"]
    if kind == "shape":
        np.savez(path, input=good[:, :, :32, :])
        return path, [path.name, "'input'", "shape"]
    if kind == "empty":
        np.savez(path)
        return path, [path.name, "empty"]
    if kind == "unknown":
        np.savez(path, pixels=good)
        return path, [path.name, "pixels"]
    if kind == "missing":
        return path, [path.name, "does not exist"]
    if kind == "not_npz":
        path.write_bytes(b"this is not a zip archive")
        return path, [path.name]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "empty", "unknown", "missing", "not_npz"])
def test_bad_calibration_data_is_a_clean_error_and_writes_nothing(
    kind: str, files: dict[str, Path], tmp_path: Path
) -> None:
    path, mentions = _bad_data(kind, tmp_path)
    engine, cache = tmp_path / "m.gie", tmp_path / "c.json"
    result = gie(
        "build", files["model"], "--int8", "--calib", path, "--calib-cache", cache, "-o", engine
    )
    clean_error(result, *mentions)
    assert not engine.exists() and not cache.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if kind == "missing" else [path.name])


def test_a_corrupt_calibration_cache_is_a_clean_error(
    files: dict[str, Path], tmp_path: Path
) -> None:
    cache, engine = tmp_path / "c.json", tmp_path / "m.gie"
    cache.write_text('{"format": 1, truncated')
    result = gie("build", files["model"], "--int8", "--calib-cache", cache, "-o", engine)
    clean_error(result, str(cache))
    assert not engine.exists()


def test_a_cache_of_another_format_is_a_clean_error(files: dict[str, Path], tmp_path: Path) -> None:
    cache, engine = tmp_path / "c.json", tmp_path / "m.gie"
    cache.write_text(json.dumps({"hello": "world"}))
    result = gie("build", files["model"], "--int8", "--calib-cache", cache, "-o", engine)
    clean_error(result, str(cache))
    assert not engine.exists()


# --------------------------------------------------------------------------- export-qdq


def test_export_qdq_writes_a_model_onnxruntime_runs(
    int8_build: dict[str, Any], tmp_path: Path
) -> None:
    ok(int8_build["result"])
    output = tmp_path / "q.onnx"
    result = ok(gie("export-qdq", int8_build["engine"], "-o", output))
    assert str(output) in result.stdout
    model = onnx.load(output)
    onnx.checker.check_model(model)
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    feeds = {"input": _samples(1, 3)}
    (theirs,) = session.run(None, feeds)
    ours = load_engine(int8_build["engine"]).run(feeds)["output"]
    assert theirs.shape == ours.shape
    assert np.allclose(theirs, ours, atol=np.abs(ours).max() / 127)


def test_export_qdq_of_a_missing_or_corrupt_engine_is_a_clean_error(tmp_path: Path) -> None:
    output = tmp_path / "q.onnx"
    clean_error(gie("export-qdq", tmp_path / "absent.gie", "-o", output), "absent.gie")
    corrupt = tmp_path / "corrupt.gie"
    corrupt.write_bytes(b"garbage, not an engine")
    clean_error(gie("export-qdq", corrupt, "-o", output), "corrupt.gie")
    assert not output.exists()


# --------------------------------------------------------------------------- sensitivity


def test_sensitivity_json_has_one_row_per_int8_capable_layer(
    int8_build: dict[str, Any], files: dict[str, Path]
) -> None:
    ok(int8_build["result"])
    result = ok(gie("sensitivity", files["model"], "--calib", files["calib"], "--json", "-"))
    document = json.loads(result.stdout)
    rows = document["layers"]
    assert sorted(row["layer"] for row in rows) == sorted(_int8_layers(int8_build["engine"]))
    cosines = [row["cosine"] for row in rows]
    assert cosines == sorted(cosines)  # most sensitive first
    assert all(-1.0 <= c <= 1.0 + 1e-9 for c in cosines)


# --------------------------------------------------------------------------- layer precision


def test_fp16_build_with_one_fp32_layer_in_strict_mode(
    files: dict[str, Path], tmp_path: Path
) -> None:
    engine = tmp_path / "m.gie"
    result = ok(
        gie(
            "build",
            files["model"],
            "--fp16",
            "--layer-precision",
            "/conv1/Conv=fp32",
            "--strict-precision",
            "-o",
            engine,
            *FAST_TIMING,
        )
    )
    counts = _precision_counts(result.stdout)
    assert counts.get("fp16", 0) > 0 and counts.get("fp32", 0) >= 1
    layers = load_engine(engine).plan.layers
    first_conv = [layer for layer in layers if "/conv1/Conv" in layer.origins]
    assert len(first_conv) == 1
    assert first_conv[0].precision == Precision.FP32


def test_strict_int8_on_a_layer_without_int8_kernel_names_it(
    files: dict[str, Path], tmp_path: Path
) -> None:
    engine = tmp_path / "m.gie"
    result = gie(
        "build", files["model"], "--int8", "--calib", files["calib"],
        "--layer-precision", "/maxpool/MaxPool=int8", "--strict-precision", "-o", engine,
    )  # fmt: skip
    clean_error(result, "/maxpool/MaxPool", "int8")
    assert not engine.exists()
