"""Bundled example models: the classic networks that ship inside the onnx wheel.

``python -m engine.examples NAME`` prints the path of one (``resnet50`` by default), which is
how ``make demo`` finds its model without downloading anything; ``python -m engine.examples
NAME --calib-npz FILE`` also writes seeded int8 calibration data for it (the demo's int8 build).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = (
    "bvlc_alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
)


def light_model_path(name: str) -> Path:
    """Path of a light model (``resnet50``, ``vgg19``...) inside the installed onnx wheel."""
    if name not in LIGHT_MODELS:
        raise KeyError(f"unknown example {name!r}; choose from {', '.join(LIGHT_MODELS)}")
    return LIGHT_DIR / f"light_{name}.onnx"


def light_expected_output_path(name: str) -> Path:
    """The reference output (TensorProto .pb) stored next to a light model."""
    return light_model_path(name).with_name(f"light_{name}_output_0.pb")


def light_model_inputs(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The inputs onnx's backend runner feeds a light model: ``arange(n) / n`` in float32,
    shaped as declared (unknown dims 1), for every graph input that is not an initializer."""
    initializer_names = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        shape = tuple(d.dim_value or 1 for d in value.type.tensor_type.shape.dim)
        count = int(np.prod(shape))
        feeds[value.name] = (np.arange(count).reshape(shape) / count).astype(np.float32)
    return feeds


def write_calibration_npz(name: str, path: str | Path, samples: int = 4, seed: int = 0) -> Path:
    """Seeded standard-normal calibration samples for a light model: one array per input,
    ``samples`` along the first axis (the shape declared for one sample after it)."""
    model = onnx.load(light_model_path(name), load_external_data=False)
    rng = np.random.default_rng(seed)
    arrays = {
        input_name: rng.standard_normal((samples, *array.shape[1:])).astype(np.float32)
        for input_name, array in light_model_inputs(model).items()
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez(target, **arrays)
    return target


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    calib = None
    if "--calib-npz" in args:
        at = args.index("--calib-npz")
        if at + 1 >= len(args):
            sys.stderr.write("--calib-npz needs a file name\n")
            return 2
        calib = args[at + 1]
        args = args[:at] + args[at + 2 :]
    name = args[0] if args else "resnet50"
    try:
        path = light_model_path(name)
    except KeyError as error:
        sys.stderr.write(f"{error.args[0]}\n")
        return 2
    if calib is not None:
        write_calibration_npz(name, calib)
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
