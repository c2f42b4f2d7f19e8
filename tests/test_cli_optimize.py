"""`gie optimize` end to end: timeline, per-step ONNX export, JSON, disabling, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx

from engine.zoo import build


def _gie(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, check=False
    )


def _resnet(tmp_path: Path) -> Path:
    path = tmp_path / "resnet.onnx"
    onnx.save(build("resnet"), path)
    return path


def test_steps_dir_holds_a_loadable_onnx_and_text_per_step(tmp_path: Path) -> None:
    model = _resnet(tmp_path)
    steps_dir = tmp_path / "steps"
    result = _gie(
        "optimize",
        str(model),
        "-O2",
        "--steps-dir",
        str(steps_dir),
        "--json",
        str(tmp_path / "o.json"),
        "--check",
    )
    assert result.returncode == 0, result.stderr
    steps = json.loads((tmp_path / "o.json").read_text())["steps"]
    exported = sorted(steps_dir.glob("step_*.onnx"))
    assert len(exported) == len(steps) + 1  # the original plus one per step
    assert len(sorted(steps_dir.glob("step_*.txt"))) == len(exported)
    last = onnx.load(exported[-1])
    onnx.checker.check_model(last)
    assert any(node.domain == "gie" for node in last.graph.node)
    assert any(o.domain == "gie" for o in last.opset_import)
    assert all(step["numeric_check"]["max_abs"] < 1e-3 for step in steps)
    assert "max|diff|" in result.stdout


def test_json_op_counts_use_domain_prefixes_and_disable_skips_rules(tmp_path: Path) -> None:
    model = _resnet(tmp_path)
    full = _gie("optimize", str(model), "-O2", "--json", "-")
    assert full.returncode == 0, full.stderr
    counts = json.loads(full.stdout[full.stdout.index("{") :])["op_counts"]
    assert counts.get("gie::ConvAct") == 10 and "BatchNormalization" not in counts
    disabled = _gie(
        "optimize",
        str(model),
        "-O2",
        "--disable",
        "fold_batchnorm_into_conv",
        "--disable",
        "lower_conv_to_conv_act",
        "--json",
        str(tmp_path / "d.json"),
    )
    assert disabled.returncode == 0, disabled.stderr
    counts = json.loads((tmp_path / "d.json").read_text())["op_counts"]
    assert counts["BatchNormalization"] == 10


def test_o0_records_nothing_and_list_rules_names_passes(tmp_path: Path) -> None:
    result = _gie("optimize", str(_resnet(tmp_path)), "-O0")
    assert result.returncode == 0 and "steps: 0" in result.stdout
    rules = _gie("optimize", "--list-rules")
    assert rules.returncode == 0
    assert "fuse_epilogue:" in rules.stdout and "fold_batchnorm_into_conv" in rules.stdout


def test_bad_model_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    result = _gie("optimize", str(bad), "-O3")
    assert result.returncode == 2
    assert result.stderr.startswith("gie: error: ") and "bad.onnx" in result.stderr
    assert "Traceback" not in result.stderr
