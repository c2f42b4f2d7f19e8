"""`gie build`, `gie inspect/run/profile ENGINE` end to end (subprocess, real files), and the
progress bar."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_testing import ROOT, clean_error, gie, ok
from onnx import TensorProto, helper, numpy_helper

from engine.examples import light_model_path
from engine.progress import ProgressBar, progress

RESNET50 = light_model_path("resnet50")
FAST_TIMING = ("--timing-iterations", "1", "--timing-warmup", "0")


def small_cnn(path: Path) -> Path:
    """x[N,3,8,8] -> Conv -> Relu -> Flatten -> Gemm -> y[N,10], symbolic batch."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in (("w", (4, 3, 3, 3)), ("b", (4,)), ("gw", (256, 10)), ("gb", (10,)))
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu1"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def resnet_engine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Light ResNet-50 built once for the module: (engine path, build --json summary)."""
    folder = tmp_path_factory.mktemp("resnet50")
    engine = folder / "resnet50.gie"
    summary = folder / "build.json"
    result = ok(gie("build", RESNET50, "-o", engine, "--json", summary, *FAST_TIMING))
    assert "layers:" in result.stdout and "tactics chosen:" in result.stdout
    assert "memory: arena" in result.stdout and "timing-cache hits" in result.stdout
    return engine, json.loads(summary.read_text())


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The small CNN and an engine of it with a batch profile 1..8 (opt 4)."""
    folder = tmp_path_factory.mktemp("cnn")
    model = small_cnn(folder / "cnn.onnx")
    engine = folder / "cnn.gie"
    ok(gie("build", model, "--shapes", "x:1x3x8x8,4x3x8x8,8x3x8x8", "-o", engine, *FAST_TIMING))
    return model, engine


# --------------------------------------------------------------------------- build


def test_build_summary_json(resnet_engine: tuple[Path, dict]) -> None:
    engine, summary = resnet_engine
    assert zipfile.is_zipfile(engine)
    assert summary["engine"] == str(engine)
    assert summary["layers"] == sum(summary["tactics"].values()) == sum(summary["ops"].values())
    assert 0 < summary["arena_bytes"] <= summary["naive_bytes"]
    assert summary["timed"] is not None and summary["cache_hits"] == 0
    assert summary["config"]["optimization_level"] == "O2"
    assert summary["config"]["timing_iterations"] == 1
    assert any(entry["stage"] == "tactics" for entry in summary["log"])


def test_build_config_options_reach_the_engine(tmp_path: Path) -> None:
    model = small_cnn(tmp_path / "cnn.onnx")
    result = ok(
        gie(
            "build",
            model,
            "-O1",
            "--fp16",
            "--layer-precision",
            "fc=fp16",
            "--layer-precision",
            "conv*=fp32",
            "--pin",
            "fc=reference",
            "--json",
            "-",
            *FAST_TIMING,
        )
    )
    data = json.loads(result.stdout)  # --json -: stdout holds only the JSON
    assert "layers:" in result.stderr  # the text report moved to stderr
    assert (tmp_path / "cnn.gie").is_file()  # default output: MODEL with .gie
    config = data["config"]
    assert config["optimization_level"] == "O1"
    assert config["precisions"] == ["fp16", "fp32"]
    assert config["layer_precisions"] == [["fc", "fp16"], ["conv*", "fp32"]]
    assert config["tactic_pins"] == [["fc", "reference"]]
    inspected = json.loads(ok(gie("inspect", tmp_path / "cnn.gie", "--json", "-")).stdout)
    assert inspected["config"] == config
    layer = next(row for row in inspected["layers"] if row["name"] == "fc")
    assert layer["tactic"] == "reference"


def test_timing_cache_second_build_hits(tmp_path: Path) -> None:
    model = small_cnn(tmp_path / "cnn.onnx")
    cache = tmp_path / "timing.json"
    first = json.loads(
        ok(gie("build", model, "--timing-cache", cache, "--json", "-", *FAST_TIMING)).stdout
    )
    assert cache.is_file()
    second = json.loads(
        ok(gie("build", model, "--timing-cache", cache, "--json", "-", *FAST_TIMING)).stdout
    )
    assert second["timed"] == 0
    assert second["cache_hits"] >= 1 and first["cache_hits"] == 0


@pytest.mark.parametrize(
    ("shapes", "mention"),
    [
        ("x=1x3x8x8", "INPUT:MIN,OPT,MAX"),
        ("x:1x3x8x8,4x3x8x8", "INPUT:MIN,OPT,MAX"),
        ("x:1x3x8xa,4x3x8x8,8x3x8x8", "bad shape"),
        ("x:1x3x8x8,4x3x8x8,2x3x8x8", "min <= opt <= max"),
        ("y0:1x3x8x8,4x3x8x8,8x3x8x8", "no input 'y0'"),
        ("x:1x3x8,4x3x8,8x3x8", "rank 4"),
        ("x:1x4x8x8,4x4x8x8,8x4x8x8", "fixed at 3"),
    ],
)
def test_bad_shapes_exit_2(tmp_path: Path, shapes: str, mention: str) -> None:
    model = small_cnn(tmp_path / "cnn.onnx")
    clean_error(gie("build", model, "--shapes", shapes, "-o", tmp_path / "e.gie"), mention)
    assert not (tmp_path / "e.gie").exists()


def test_bad_precision_and_assignment_exit_2(tmp_path: Path) -> None:
    model = small_cnn(tmp_path / "cnn.onnx")
    clean_error(gie("build", model, "--layer-precision", "fc=fp8"), "unknown precision 'fp8'")
    clean_error(gie("build", model, "--pin", "fc"), "--pin", "NAME=VALUE")
    clean_error(gie("build", tmp_path / "absent.onnx"), "absent.onnx")


# --------------------------------------------------------------------------- inspect, run


def test_inspect_engine_json_has_layer_table_and_memory_plan(
    resnet_engine: tuple[Path, dict],
) -> None:
    engine, summary = resnet_engine
    result = ok(gie("inspect", engine, "--json", "-"))
    data = json.loads(result.stdout)
    assert len(data["layers"]) == summary["layers"]
    for row in data["layers"]:
        assert {"name", "op", "precision", "tactic", "origins"} <= set(row)
    assert any(row["origins"] for row in data["layers"])
    memory = data["memory"]
    assert memory["arena_bytes"] == summary["arena_bytes"]
    assert memory["naive_bytes"] == summary["naive_bytes"]
    assert data["device"]["backend"] == "numpy"
    assert data["inputs"] == {"gpu_0/data_0": {"shape": [1, 3, 224, 224], "dtype": "float32"}}
    assert data["outputs"] == ["gpu_0/softmax_1"]
    assert "memory plan: arena" in result.stderr and "layers (" in result.stderr


def onnxruntime_run(model: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_run_engine_matches_onnxruntime(resnet_engine: tuple[Path, dict], tmp_path: Path) -> None:
    engine, _ = resnet_engine
    ours = ok(
        gie(
            "run",
            engine,
            "--save-outputs",
            tmp_path / "e.npz",
            "--save-inputs",
            tmp_path / "in.npz",
            "--iterations",
            "2",
        )
    )
    assert "output gpu_0/softmax_1: float32[1,1000]" in ours.stdout
    assert "latency over 2 iteration(s)" in ours.stdout
    assert "random, seed 0" in ours.stdout
    with np.load(tmp_path / "in.npz") as inputs, np.load(tmp_path / "e.npz") as outputs:
        assert inputs["gpu_0/data_0"].shape == (1, 3, 224, 224)
        (want,) = onnxruntime_run(RESNET50, dict(inputs))
        np.testing.assert_allclose(outputs["gpu_0/softmax_1"], want, rtol=1e-4, atol=1e-5)


def test_run_engine_inside_and_outside_its_profile(
    cnn_files: tuple[Path, Path], tmp_path: Path
) -> None:
    model, engine = cnn_files
    for batch in (1, 3, 8):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 8, 8)).astype(np.float32)
        np.savez(tmp_path / "x.npz", x=x)
        result = ok(
            gie("run", engine, "--inputs", tmp_path / "x.npz", "--save-outputs", tmp_path / "y.npz")
        )
        assert f"output y: float32[{batch},10]" in result.stdout
        assert f"from {tmp_path / 'x.npz'}" in result.stdout
        with np.load(tmp_path / "y.npz") as got:
            np.testing.assert_allclose(
                got["y"], onnxruntime_run(model, {"x": x})[0], rtol=1e-4, atol=1e-5
            )
    np.savez(tmp_path / "big.npz", x=np.zeros((9, 3, 8, 8), np.float32))
    clean_error(gie("run", engine, "--inputs", tmp_path / "big.npz"), "x", "profile")
    np.savez(tmp_path / "int.npz", x=np.zeros((2, 3, 8, 8), np.int64))
    clean_error(gie("run", engine, "--inputs", tmp_path / "int.npz"), "dtype")
    np.savez(tmp_path / "other.npz", z=np.zeros((2, 3, 8, 8), np.float32))
    clean_error(gie("run", engine, "--inputs", tmp_path / "other.npz"), "'z'")
    inspected = ok(gie("inspect", engine))
    assert "profile [1, 3, 8, 8]..[8, 3, 8, 8]" in inspected.stdout


# --------------------------------------------------------------------------- profile


def test_profile_table_and_exports(resnet_engine: tuple[Path, dict], tmp_path: Path) -> None:
    engine, summary = resnet_engine
    report, info = tmp_path / "profile.json", tmp_path / "layers.json"
    result = ok(
        gie(
            "profile",
            engine,
            "--iterations",
            "2",
            "--warmup",
            "1",
            "--export-profile",
            report,
            "--export-layer-info",
            info,
        )
    )
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    total = next(i for i, line in enumerate(lines) if line.startswith("total "))
    assert total - header - 1 == 21  # top 20 + "(N more)"
    assert "more)" in lines[total - 1]
    medians = [float(line.split()[-5]) for line in lines[header + 1 : header + 21]]
    assert medians == sorted(medians, reverse=True)
    assert "p90" in result.stdout and "p99" in result.stdout and "inferences/s" in result.stdout
    data = json.loads(report.read_text())
    assert len(data["layers"]) == summary["layers"]
    assert {"mean_ms", "median_ms", "p90_ms", "p99_ms", "throughput"} <= set(data["end_to_end"])
    assert data["end_to_end"]["iterations"] == 2 and data["warmup"] == 1
    layer_info = json.loads(info.read_text())
    assert len(layer_info["layers"]) == summary["layers"]
    assert layer_info["memory"]["arena_bytes"] == summary["arena_bytes"]


def test_profile_json_to_stdout_and_top(cnn_files: tuple[Path, Path]) -> None:
    _, engine = cnn_files
    result = ok(gie("profile", engine, "--iterations", "1", "--top", "1", "--export-profile", "-"))
    data = json.loads(result.stdout)
    assert data["input_shapes"] == {"x": [4, 3, 8, 8]}  # the profile's opt
    assert "total" in result.stderr


# --------------------------------------------------------------------------- bad engines


def test_tampered_truncated_and_foreign_engines_exit_2(
    cnn_files: tuple[Path, Path], tmp_path: Path
) -> None:
    model, engine = cnn_files
    tampered = tmp_path / "tampered.gie"
    with zipfile.ZipFile(engine) as source, zipfile.ZipFile(tampered, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.startswith("tensors/") and item.filename.endswith(".npy"):
                data = data[:-4] + bytes(b ^ 0xFF for b in data[-4:])
            target.writestr(item, data)
    for command in ("run", "inspect", "profile"):
        clean_error(gie(command, tampered), "tampered.gie")
    future = tmp_path / "future.gie"
    with zipfile.ZipFile(engine) as source, zipfile.ZipFile(future, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "manifest.json":
                manifest = json.loads(data)
                manifest["format_version"] = 99
                data = json.dumps(manifest).encode()
            target.writestr(item, data)
    clean_error(gie("inspect", future), "future.gie", "format 99")
    truncated = tmp_path / "truncated.gie"
    truncated.write_bytes(engine.read_bytes()[: engine.stat().st_size // 2])
    clean_error(gie("run", truncated), "truncated.gie")
    clean_error(gie("profile", model), "cnn.onnx")  # an ONNX model is not an engine
    npz = tmp_path / "arrays.gie"
    np.savez(npz.open("wb"), a=np.zeros(3))  # a zip, but no manifest
    clean_error(gie("inspect", npz), "arrays.gie")


# --------------------------------------------------------------------------- progress bar


def test_progress_bar_draws_only_when_enabled() -> None:
    stream = io.StringIO()
    with ProgressBar("tactics", 4, stream=stream, enabled=True, min_interval=0) as bar:
        for _ in range(4):
            bar.advance()
    text = stream.getvalue()
    assert "\r" in text and text.endswith("\n")
    assert "tactics [" in text and "4/4 100%" in text
    quiet = io.StringIO()  # not a terminal, not forced: nothing drawn
    with ProgressBar("tactics", 4, stream=quiet) as bar:
        bar.advance(4)
    assert quiet.getvalue() == ""


def test_progress_callback_draws_one_bar_per_stage() -> None:
    stream = io.StringIO()
    callback = progress(stream=stream, enabled=True)
    for stage, total in (("optimize", 1), ("tactics", 3)):
        for done in range(total + 1):
            callback(stage, done, total)
    callback.close()
    lines = stream.getvalue().split("\n")
    assert lines[0].split("\r")[-1].startswith("optimize [")
    assert lines[1].split("\r")[-1].startswith("tactics [") and "3/3" in lines[1]
    assert lines[2] == ""


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_build_draws_progress_bars_on_a_terminal_only(tmp_path: Path) -> None:
    model = small_cnn(tmp_path / "cnn.onnx")
    primary, secondary = os.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "engine.cli", "build", str(model), *FAST_TIMING]
    with os.fdopen(primary, "rb", buffering=0) as terminal:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=secondary
        )
        os.close(secondary)
        drawn = b""
        while True:
            try:
                chunk = terminal.read(4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
        stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 0
    text = drawn.decode()
    assert "optimize [" in text and "tactics [" in text and "\r" in text
    assert b"\r" not in stdout and b"tactics [" not in stdout  # bars go to stderr only
    piped = ok(gie("build", model, *FAST_TIMING))
    assert "\r" not in piped.stderr and "tactics [" not in piped.stderr
