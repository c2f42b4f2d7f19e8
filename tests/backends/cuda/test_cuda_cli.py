"""``gie build --backend cuda|cuda-shim`` from the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.backends.cuda.device_info import probe

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cli_testing import clean_error, gie, ok

pytestmark = pytest.mark.xdist_group("cuda-shim")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ],
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")],
    )
    path = tmp_path / "small.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_cuda_shim_engine_builds_profiles_and_compares(model: Path, tmp_path: Path) -> None:
    engine = tmp_path / "small.gie"
    result = ok(gie("build", model, "--backend", "cuda-shim", "-o", engine))
    assert "conv_igemm_f32_64x64" in result.stdout and engine.is_file()
    profile = ok(gie("profile", engine, "--iterations", "1"))
    assert "conv_igemm_f32_64x64" in profile.stdout
    ok(gie("compare", model, engine))


def test_cuda_backend_without_a_gpu_is_a_clear_error(model: Path, tmp_path: Path) -> None:
    if probe() is not None:
        pytest.skip("this machine has a GPU")
    engine = tmp_path / "small.gie"
    clean_error(gie("build", model, "--backend", "cuda", "-o", engine), "--backend cuda", "GPU")
    assert not engine.exists()


def test_cuda_streams_must_be_positive(model: Path) -> None:
    clean_error(gie("build", model, "--backend", "cuda-shim", "--cuda-streams", "0"), "streams")
