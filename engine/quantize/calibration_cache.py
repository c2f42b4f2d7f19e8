"""The calibration cache: a versioned JSON file that lets a build skip calibration.

Layout (``version`` 1)::

    {"format": "gie-calibration", "version": 1, "calibrator": "entropy",
     "percentile": 99.99, "model_sha256": null | "<hex>",
     "tensors": {name: {"threshold": f, "scale": f, "amax": f,
                        "thresholds": {method: f}, "histogram": {...}}}}

The histograms (:meth:`TensorHistogram.to_json`) travel with the thresholds, so a cached
result can switch calibrator or percentile without data, exactly like a fresh one. JSON
floats round-trip exactly. Writing is atomic (a temporary file in the same folder, then
``os.replace``); reading a file of another format, a newer version or a malformed one raises
:class:`CalibrationCacheError` naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from engine.quantize.calibrate import CalibrationResult, TensorCalibration
from engine.quantize.calibrators import parse_calibrator
from engine.quantize.histogram import TensorHistogram

FORMAT = "gie-calibration"
VERSION = 1


class CalibrationCacheError(ValueError):
    """A calibration cache file that cannot be used; the message names the file."""


def cache_to_json(result: CalibrationResult) -> dict[str, Any]:
    """The cache document of ``result`` (a JSON-ready dict)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "calibrator": result.calibrator,
        "percentile": result.percentile,
        "model_sha256": result.model_sha256,
        "tensors": {
            name: {
                "threshold": tensor.threshold,
                "scale": tensor.scale,
                "amax": tensor.histogram.amax,
                "thresholds": dict(tensor.thresholds),
                "histogram": tensor.histogram.to_json(),
            }
            for name, tensor in result.tensors.items()
        },
    }


def save_cache(result: CalibrationResult, path: str | os.PathLike[str]) -> None:
    """Write ``result`` to ``path`` atomically (a reader never sees a half-written file)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(cache_to_json(result), allow_nan=False)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; a cache is shared like an engine
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def load_cache(
    path: str | os.PathLike[str], expect_model_sha256: str | None = None
) -> CalibrationResult:
    """Read a cache written by :func:`save_cache`.

    With ``expect_model_sha256`` a cache recorded for another model is refused (a cache
    without a recorded hash is accepted).
    """
    source = Path(path)
    try:
        document = json.loads(source.read_text(encoding="utf-8"))
    except OSError as error:
        raise CalibrationCacheError(f"cannot read calibration cache {source}: {error}") from error
    except ValueError as error:
        raise CalibrationCacheError(
            f"calibration cache {source} is not valid JSON: {error}"
        ) from error
    return cache_from_json(document, str(source), expect_model_sha256)


def cache_from_json(
    document: Any, source: str = "<cache>", expect_model_sha256: str | None = None
) -> CalibrationResult:
    """Rebuild a :class:`CalibrationResult` from a cache document (see :func:`load_cache`)."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise CalibrationCacheError(
            f"{source} is not a GIE calibration cache (format {found!r}, expected {FORMAT!r})"
        )
    version = document.get("version")
    if version != VERSION:
        raise CalibrationCacheError(
            f"calibration cache {source} has version {version!r}; this GIE reads version {VERSION}"
        )
    recorded = document.get("model_sha256")
    if expect_model_sha256 is not None and recorded is not None and recorded != expect_model_sha256:
        raise CalibrationCacheError(
            f"calibration cache {source} was made for another model (sha256 {recorded}, "
            f"this model {expect_model_sha256})"
        )
    try:
        tensors = {
            str(name): _tensor_from_json(str(name), entry)
            for name, entry in dict(document["tensors"]).items()
        }
        calibrator = parse_calibrator(str(document["calibrator"])).value
        return CalibrationResult(calibrator, float(document["percentile"]), tensors, recorded)
    except (KeyError, TypeError, ValueError) as error:
        raise CalibrationCacheError(f"calibration cache {source} is malformed: {error}") from error


def _tensor_from_json(name: str, entry: dict[str, Any]) -> TensorCalibration:
    histogram = TensorHistogram.from_json(entry["histogram"])
    if histogram.name != name:
        raise ValueError(f"tensor '{name}' holds the histogram of '{histogram.name}'")
    thresholds = {str(k): float(v) for k, v in dict(entry["thresholds"]).items()}
    return TensorCalibration(
        name, histogram, thresholds, float(entry["threshold"]), float(entry["scale"])
    )
