"""The ``.gie`` engine file: data, never code (a zip of JSON, ONNX structure and ``.npy`` tensors).

Layout (format version 1)::

    manifest.json      format_version, engine_version, created (UTC ISO), source, config,
                       device (identity the engine was built and timed on), libraries,
                       inputs/outputs, lowering_shapes, layers (the layer table: name, op,
                       precision, tactic, origins, candidate timings), memory (MemoryPlan),
                       log (the build log), graph {file, sha256}, tensors [{index, name, file,
                       dtype, shape, stored_as, sha256}]
    graph.onnx         the optimized model WITHOUT weight data: main-graph initializers keep
                       name, dtype and dims; their data lives in tensors/
    tensors/<i>.npy    one constant each (np.save; read with allow_pickle=False). Dtypes numpy
                       cannot store natively (bfloat16, float8, int4...) are stored as the
                       unsigned-integer view of the same width and reinterpreted on load.

Writing is atomic (temp file in the target's folder, then ``os.replace``). Loading refuses,
each with its own :class:`EngineFileError` naming the file: not a zip, truncated, no manifest,
another format version, a corrupted graph or tensor (SHA-256 or the zip's CRC-32), and an engine
built for another device. Then it rebuilds the :class:`~engine.runtime.Engine` without any
re-optimization or re-timing: graph.onnx + tensors -> onnx-ir model -> ``lower`` at the stored
shapes -> the stored per-layer precision/tactic/candidates, memory plan and log.

Device rule: the backend must match and be available here. For the NumPy backend (portable:
it computes the same results on any CPU) a different CPU model, machine, thread count or
library version is only a warning in the loaded engine's log (stage ``load``): the tactics were
timed elsewhere and may not be the fastest here. For any other backend (GPU) a different
device or machine is refused; only library-version differences are warnings.

:func:`refit` (engine.recipe, re-exported here) swaps weights through the same rebuild path
(:func:`structure_proto` -> :func:`assemble_model` -> :func:`restore_engine`).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import math
import os
import platform
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir

from engine.build.log import BuildLog
from engine.build.plan import Plan, TacticTiming, lower
from engine.config import BuilderConfig, Precision
from engine.device import ENGINE_VERSION, device_identity
from engine.recipe import (
    RefitError,
    config_from_recipe,
    export_recipe,
    load_recipe,
    refit,
    refittable_weights,
    save_recipe,
)

if TYPE_CHECKING:
    from engine.runtime import Engine

__all__ = [
    "FORMAT_VERSION",
    "EngineFileError",
    "RefitError",
    "check_device",
    "config_from_recipe",
    "export_recipe",
    "load_engine",
    "load_recipe",
    "read_manifest",
    "refit",
    "refittable_weights",
    "save_engine",
    "save_recipe",
]

#: The .gie layout this engine writes and reads.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "graph.onnx"
#: Backends whose results do not depend on the device they run on (device changes only warn).
PORTABLE_BACKENDS = frozenset({"numpy"})
#: Identity keys naming the hardware (a mismatch refuses a non-portable engine).
HARDWARE_KEYS = ("backend", "device", "machine")
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


class EngineFileError(ValueError):
    """A .gie file that cannot be loaded; the message names the file and says why."""


def library_versions() -> dict[str, str]:
    """Versions of the libraries an engine's results depend on."""
    import ml_dtypes

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "onnx_ir": ir.__version__,
        "ml_dtypes": ml_dtypes.__version__,
    }


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as the strings "inf", "-inf", "nan" (strict JSON has
    none; ``float()`` reads them back, e.g. an aborted candidate's ``median_ms``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weight_values(model: ir.Model) -> list[ir.Value]:
    """Main-graph initializers whose data goes to tensors/ (strings stay inline in the graph)."""
    return [
        value
        for value in model.graph.initializers.values()
        if value.const_value is not None and value.const_value.dtype != ir.DataType.STRING
    ]


def _npy_bytes(array: np.ndarray) -> tuple[bytes, str]:
    """``.npy`` bytes of ``array`` and how it is stored ("native" or the uint view's dtype)."""
    stored, stored_as = array, "native"
    if array.dtype.kind not in "biufc" or array.dtype.isbuiltin == 2:  # 2: ml_dtypes types
        stored = array.view(np.dtype(f"u{array.dtype.itemsize}"))
        stored_as = stored.dtype.str
    buffer = io.BytesIO()
    np.save(buffer, stored, allow_pickle=False)
    return buffer.getvalue(), stored_as


def lowering_shapes(plan: Plan) -> dict[str, list[int]]:
    """The input shapes the plan was lowered at (each profile's ``opt``; symbolic dims as 1)."""
    shapes = {}
    for name in plan.inputs:
        spec = plan.specs.get(name)
        if spec is not None and spec.shape is not None and spec.is_static:
            shapes[name] = [int(dim) for dim in spec.shape]  # type: ignore[arg-type]
    return shapes


def structure_proto(model: ir.Model, weights: list[ir.Value]) -> onnx.ModelProto:
    """The model as ONNX with the data of ``weights`` removed (names, dtypes, dims kept)."""
    proto = ir.to_proto(model)
    files = {value.name: f"tensors/{i}.npy" for i, value in enumerate(weights)}
    for tensor in proto.graph.initializer:
        if tensor.name in files:
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                tensor.ClearField(field)
            tensor.ClearField("uint64_data")
            tensor.doc_string = f"gie: data in {files[tensor.name]}"
    return proto


def save_engine(engine: Engine, path: str | os.PathLike[str]) -> Path:
    """Write ``engine`` to ``path`` (conventionally ``*.gie``) atomically; returns the path."""
    target = Path(path)
    plan = engine.plan
    weights = weight_values(plan.model)
    tensor_rows: list[dict[str, Any]] = []
    handle, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".partial", dir=target.parent
    )
    os.close(handle)
    try:
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive:
            for index, value in enumerate(weights):
                array = value.const_value.numpy()  # type: ignore[union-attr]
                data, stored_as = _npy_bytes(array)
                member = f"tensors/{index}.npy"
                archive.writestr(member, data)
                tensor_rows.append(
                    {
                        "index": index,
                        "name": value.name,
                        "file": member,
                        "dtype": value.const_value.dtype.name,  # type: ignore[union-attr]
                        "shape": list(array.shape),
                        "stored_as": stored_as,
                        "sha256": _sha256(data),
                    }
                )
            graph_bytes = structure_proto(plan.model, weights).SerializeToString()
            archive.writestr(GRAPH, graph_bytes, zipfile.ZIP_DEFLATED)
            manifest = {
                "format": "gie-engine",
                "format_version": FORMAT_VERSION,
                "engine_version": ENGINE_VERSION,
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "source": plan.model.meta.get("source"),
                "config": engine.config.to_json(),
                "device": dict(engine.device),
                "libraries": library_versions(),
                "inputs": list(plan.inputs),
                "outputs": list(plan.outputs),
                "lowering_shapes": lowering_shapes(plan),
                "layers": [layer.to_json() for layer in plan.layers],
                "memory": engine.memory.to_json(),
                "log": engine.log.to_json(),
                "graph": {"file": GRAPH, "sha256": _sha256(graph_bytes)},
                "tensors": tensor_rows,
            }
            text = json.dumps(json_safe(manifest), indent=1, allow_nan=False)
            archive.writestr(MANIFEST, text, zipfile.ZIP_DEFLATED)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private; an engine file is for sharing
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target


def _open(path: Path) -> zipfile.ZipFile:
    label = str(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise EngineFileError(f"{label}: no such file") from None
    if path.is_dir():
        raise EngineFileError(f"{label}: is a directory, not a .gie engine file")
    if size == 0:
        raise EngineFileError(f"{label}: empty file, not a .gie engine file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    try:
        return zipfile.ZipFile(path)
    except _ZIP_ERRORS as error:
        if magic == b"PK\x03\x04":
            raise EngineFileError(
                f"{label}: truncated or damaged .gie file (the zip archive is incomplete: "
                f"{error}); write it again"
            ) from error
        raise EngineFileError(
            f"{label}: not a .gie engine file (not a zip archive; starts with {magic!r})"
        ) from error


def _read_member(archive: zipfile.ZipFile, member: str, label: str, what: str) -> bytes:
    try:
        return archive.read(member)
    except KeyError:
        raise EngineFileError(f"{label}: {what} is missing from the archive") from None
    except _ZIP_ERRORS as error:
        raise EngineFileError(
            f"{label}: {what} is corrupted: the zip's CRC-32 check failed ({error})"
        ) from error


def _read_manifest(archive: zipfile.ZipFile, label: str) -> dict[str, Any]:
    if MANIFEST not in archive.namelist():
        raise EngineFileError(f"{label}: no {MANIFEST}; not a GIE engine file")
    raw = _read_member(archive, MANIFEST, label, MANIFEST)
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EngineFileError(f"{label}: {MANIFEST} is not valid JSON ({error})") from error
    if not isinstance(manifest, dict):
        raise EngineFileError(f"{label}: {MANIFEST} is not a JSON object")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise EngineFileError(f"{label}: {MANIFEST} has no integer format_version")
    if version != FORMAT_VERSION:
        writer = manifest.get("engine_version", "unknown")
        raise EngineFileError(
            f"{label}: built with format {version} (engine {writer}), this engine "
            f"({ENGINE_VERSION}) reads format {FORMAT_VERSION}; rebuild it or use a matching engine"
        )
    missing = [
        key
        for key in ("config", "device", "layers", "memory", "graph", "tensors")
        if key not in manifest
    ]
    if missing:
        raise EngineFileError(f"{label}: {MANIFEST} lacks {', '.join(missing)}")
    return manifest


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked manifest of a .gie file (what ``gie inspect ENGINE`` shows), no rebuild."""
    with _open(Path(path)) as archive:
        return _read_manifest(archive, str(path))


def check_device(stored: Mapping[str, Any], label: str = "engine") -> list[str]:
    """Compare an engine's device identity with this machine's (see the module docstring).

    Returns warnings for differences that do not prevent running; raises
    :class:`EngineFileError` (both identities in the message) for those that do.
    """
    backend = str(stored.get("backend", ""))
    current = device_identity(backend) if backend else device_identity()

    def describe(identity: Mapping[str, Any]) -> str:
        return ", ".join(f"{k}={identity[k]}" for k in sorted(identity))

    hardware = [k for k in HARDWARE_KEYS if str(stored.get(k)) != str(current.get(k))]
    others = sorted(
        k
        for k in set(stored) | set(current)
        if k not in HARDWARE_KEYS and str(stored.get(k)) != str(current.get(k))
    )
    if hardware and backend not in PORTABLE_BACKENDS:
        raise EngineFileError(
            f"{label}: built for another device ({', '.join(hardware)} differ): engine "
            f"[{describe(stored)}], this machine [{describe(current)}]; rebuild it here "
            "(export a recipe to reproduce its choices)"
        )
    warnings = []
    if hardware or others:
        changed = ", ".join(
            f"{k} {stored.get(k)!s} -> {current.get(k)!s}" for k in [*hardware, *others]
        )
        warnings.append(
            f"built on another machine ({changed}); results are unchanged on the "
            f"{backend} backend, tactics were timed there and may not be the fastest here"
        )
    return warnings


def _load_tensor(archive: zipfile.ZipFile, row: Mapping[str, Any], label: str) -> np.ndarray:
    what = f"tensor '{row['name']}' ({row['file']})"
    data = _read_member(archive, str(row["file"]), label, what)
    if _sha256(data) != row.get("sha256"):
        raise EngineFileError(f"{label}: {what} is corrupted: SHA-256 mismatch")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise EngineFileError(f"{label}: {what} is not a readable .npy ({error})") from error
    try:
        dtype = ir.DataType[str(row["dtype"])].numpy()
    except (KeyError, TypeError) as error:
        raise EngineFileError(f"{label}: {what} has unknown dtype {row['dtype']!r}") from error
    if row.get("stored_as", "native") != "native":
        array = array.view(dtype)
    if array.dtype != dtype or list(array.shape) != list(row["shape"]):
        raise EngineFileError(
            f"{label}: {what} holds {array.dtype}{list(array.shape)}, the manifest says "
            f"{row['dtype']}{row['shape']}"
        )
    return array


def assemble_model(
    proto: onnx.ModelProto, arrays: Mapping[str, np.ndarray], source: str | None
) -> ir.Model:
    """An onnx-ir model from a weightless structure proto and its weight arrays."""
    model = ir.from_proto(proto)
    for name, array in arrays.items():
        value = model.graph.initializers.get(name)
        if value is None:
            raise KeyError(name)
        value.const_value = ir.Tensor(array, name=name)
    if source:
        model.meta["source"] = source
    return model


def restore_engine(
    model: ir.Model,
    shapes: Mapping[str, list[int]],
    rows: list[Mapping[str, Any]],
    memory: Any,
    config: BuilderConfig,
    log: BuildLog,
    device: Mapping[str, Any],
    label: str,
) -> Engine:
    """Lower ``model`` and restore the stored per-layer choices: an Engine, no timing."""
    from engine.runtime import Engine

    try:
        plan = lower(model, {name: tuple(shape) for name, shape in shapes.items()})
    except ValueError as error:
        raise EngineFileError(f"{label}: {GRAPH} cannot be lowered here: {error}") from error
    if [layer.name for layer in plan.layers] != [row.get("name") for row in rows]:
        raise EngineFileError(f"{label}: the layer table does not match {GRAPH}")
    for layer, row in zip(plan.layers, rows):
        if layer.qualified_op != row.get("op"):
            raise EngineFileError(
                f"{label}: layer '{layer.name}' is {layer.qualified_op} in {GRAPH} but "
                f"{row.get('op')} in the layer table"
            )
        try:
            layer.precision = Precision(row["precision"])
            layer.tactic = str(row["tactic"])
            layer.candidates = [TacticTiming.from_json(c) for c in row.get("candidates", [])]
        except (KeyError, TypeError, ValueError) as error:
            raise EngineFileError(
                f"{label}: layer '{layer.name}' has a malformed row in the layer table ({error})"
            ) from error
    try:
        if config.backend in ("cuda", "cuda-shim"):
            from engine.backends.cuda.engine import CudaEngine

            return CudaEngine(plan, memory, config, log, dict(device))
        return Engine(plan, memory, config, log, dict(device))
    except ValueError as error:  # e.g. a tactic this engine version does not have
        raise EngineFileError(f"{label}: cannot rebuild the engine: {error}") from error


def load_engine(path: str | os.PathLike[str]) -> Engine:
    """Load a .gie file (checks and rebuild described in the module docstring)."""
    from engine.build.memory import MemoryPlan

    label = str(path)
    with _open(Path(path)) as archive:
        manifest = _read_manifest(archive, label)
        warnings = check_device(manifest["device"], label)
        graph_row = manifest["graph"]
        graph_bytes = _read_member(archive, str(graph_row["file"]), label, GRAPH)
        if _sha256(graph_bytes) != graph_row.get("sha256"):
            raise EngineFileError(f"{label}: {GRAPH} is corrupted: SHA-256 mismatch")
        arrays = {
            str(row["name"]): _load_tensor(archive, row, label) for row in manifest["tensors"]
        }
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(graph_bytes)
        model = assemble_model(proto, arrays, manifest.get("source"))
    except KeyError as error:
        raise EngineFileError(f"{label}: tensor {error} has no initializer in {GRAPH}") from error
    except Exception as error:  # protobuf and onnx-ir raise many types for a bad graph
        raise EngineFileError(f"{label}: {GRAPH} cannot be read ({error})") from error
    try:
        config = BuilderConfig.from_json(manifest["config"])
        memory = MemoryPlan.from_json(manifest["memory"])
        log = BuildLog.from_json(manifest.get("log", []))
    except (KeyError, TypeError, ValueError) as error:
        raise EngineFileError(f"{label}: {MANIFEST} is malformed ({error})") from error
    log.add("load", f"loaded from {label} (format {FORMAT_VERSION}, no re-timing)")
    for warning in warnings:
        log.add("load", warning)
    return restore_engine(
        model,
        manifest.get("lowering_shapes", {}),
        manifest["layers"],
        memory,
        config,
        log,
        manifest["device"],
        label,
    )
