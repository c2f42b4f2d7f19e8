"""`gie sparsity check|prune|advise` and `gie build --sparsity` through the real CLI."""

from __future__ import annotations

import json

import onnx

from engine import zoo
from engine.onnx_io import load
from engine.sparsity.check import check_model
from tests.cli_testing import clean_error, gie, ok


def _model(tmp_path):
    path = tmp_path / "resnet.onnx"
    onnx.save(zoo.build("resnet"), path)
    return path


def test_check_lists_every_weight_layer_with_a_reason(tmp_path) -> None:
    path = _model(tmp_path)
    result = ok(gie("sparsity", "check", path, "--min-channels", "16", "--json", "-"))
    layers = json.loads(result.stdout)["layers"]
    assert len(layers) == 11
    assert {"name", "eligible", "reason", "is_2_4", "compliant_fraction"} <= set(layers[0])
    assert layers[0]["reason"] == "K = 3 is not a multiple of 4"
    default = ok(gie("sparsity", "check", path)).stdout
    assert "too small to benefit" in default


def test_prune_writes_a_2_4_model_and_check_agrees(tmp_path) -> None:
    path = _model(tmp_path)
    pruned = tmp_path / "pruned.onnx"
    result = ok(gie("sparsity", "prune", path, "-o", pruned, "--permute", "--min-channels", "16"))
    assert "10 layers pruned to 2:4" in result.stdout
    layers = check_model(load(pruned), min_channels=16)
    assert all(layer.is_2_4 for layer in layers if layer.eligible)


def test_advise_and_build_force_report_errors(tmp_path) -> None:
    path = _model(tmp_path)
    report = json.loads(
        ok(gie("sparsity", "advise", path, "--min-channels", "16", "--json", "-")).stdout
    )
    assert len(report["layers"]) == 11
    engine = tmp_path / "sparse.gie"
    args = ["build", path, "--sparsity", "force", "--sparsity-min-channels", "16", "-o", engine]
    text = ok(gie(*args)).stdout
    assert "10 layers pruned to 2:4" in text
    assert "output vs the dense model (seeded inputs): cosine" in text
    assert engine.is_file()
    ok(gie("run", engine))


def test_bad_input_is_one_clear_line(tmp_path) -> None:
    clean_error(gie("sparsity", "check", tmp_path / "missing.onnx"), "missing.onnx")
    refused = gie("build", _model(tmp_path), "--sparsity", "sometimes")
    assert refused.returncode == 2 and "invalid choice: 'sometimes'" in refused.stderr
