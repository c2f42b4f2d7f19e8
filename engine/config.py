"""BuilderConfig: everything that decides how a model becomes an engine (TensorRT's builder config).

Frozen and JSON-serialisable, so an engine records the exact config it was built with and a
recipe can rebuild it elsewhere. Per-layer choices (precision overrides, tactic pins) match
layer names exactly or by glob (``fnmatch``: ``"*attention*"``, ``"/layer1/*"``).
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


class Precision(enum.StrEnum):
    """Numeric precision of a layer's computation."""

    FP32 = "fp32"
    TF32 = "tf32"
    FP16 = "fp16"
    INT8 = "int8"


class PrecisionMode(enum.StrEnum):
    """``prefer``: overrides are hints (refusals logged); ``obey``: a refusal fails the build."""

    PREFER = "prefer"
    OBEY = "obey"


class SparsityMode(enum.StrEnum):
    """2:4 sparsity: ``off``; ``on`` (sparse tactics for layers already 2:4); ``force`` (prune)."""

    OFF = "off"
    ON = "on"
    FORCE = "force"


@dataclass(frozen=True)
class ShapeProfile:
    """Optimization profile of one input: min/opt/max shapes (TensorRT's kMIN/kOPT/kMAX).

    The engine accepts any shape between ``min`` and ``max`` (per dim); tactics are timed at
    ``opt`` and the memory plan is sized for ``max``.
    """

    input_name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"profile of '{self.input_name}': min/opt/max ranks differ")
        for low, mid, high in zip(self.min, self.opt, self.max):
            if not 0 <= low <= mid <= high:
                raise ValueError(
                    f"profile of '{self.input_name}': need min <= opt <= max per dim, "
                    f"got {self.min}, {self.opt}, {self.max}"
                )

    def contains(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(
            low <= dim <= high for low, dim, high in zip(self.min, shape, self.max)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.input_name,
            "min": list(self.min),
            "opt": list(self.opt),
            "max": list(self.max),
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> ShapeProfile:
        return ShapeProfile(
            str(data["input"]), tuple(data["min"]), tuple(data["opt"]), tuple(data["max"])
        )


@dataclass(frozen=True)
class BuilderConfig:
    """How to build an engine.

    ``precisions`` are the precisions the builder may use (FP32 always); ``layer_precisions``
    are (name-or-glob, precision) overrides applied in order (last match wins);
    ``tactic_sources`` limits tactic families (None: all); ``tactic_pins`` are (layer
    name-or-glob, tactic name) and override timing; ``timing_iterations``/``timing_warmup`` are
    per candidate; ``timing_cache_path`` is a JSON file reused across builds.

    INT8 post-training quantization: ``calibrator`` (entropy, minmax, percentile or mse) picks
    each activation's threshold from its histogram, ``percentile`` is the percentile
    calibrator's (99.99 by default), ``calibration_cache_path`` a JSON calibration cache written
    after calibrating and reused when no data is given. ``fp16_overflow_fallback`` keeps in fp32
    the layers whose activations exceeded the float16 range on the calibration data.
    Precision semantics are in :mod:`engine.build.precision`.

    ``backend``: ``numpy`` (the reference backend's tactics), ``cuda`` (CUDA kernels on a GPU
    through CuPy) or ``cuda-shim`` (the same CUDA kernels compiled for the CPU shim: checks the
    lowering without a GPU; slow, tiny models only). ``cuda_streams`` is how many CUDA streams
    independent branches may spread over (1: one stream, program order); ``cuda_graphs``
    captures a whole run as one CUDA graph when every layer runs on the GPU;
    ``timing_flush_l2`` flushes the GPU's L2 cache before every timed tactic sample (cold-cache
    timings for layers whose working set would otherwise stay in L2 between samples).

    2:4 sparsity (``sparsity``): ``on`` offers the sparse tactic to layers whose weights already
    are 2:4 (kept only when faster); ``force`` first prunes every eligible layer (constant
    weight, K a multiple of 4, not depthwise, at least ``sparsity_min_channels`` input channels:
    NVIDIA's guidance is 256) to 2:4 by magnitude, then as ``on``.
    """

    optimization_level: str = "O2"
    precisions: frozenset[Precision] = frozenset({Precision.FP32})
    precision_mode: PrecisionMode = PrecisionMode.PREFER
    layer_precisions: tuple[tuple[str, Precision], ...] = ()
    sparsity: SparsityMode = SparsityMode.OFF
    tactic_sources: frozenset[str] | None = None
    tactic_pins: tuple[tuple[str, str], ...] = ()
    timing_cache_path: str | None = None
    timing_iterations: int = 5
    timing_warmup: int = 1
    profiles: tuple[ShapeProfile, ...] = ()
    backend: str = "numpy"
    disabled_passes: tuple[str, ...] = ()
    calibrator: str = "entropy"
    percentile: float = 99.99
    calibration_cache_path: str | None = None
    fp16_overflow_fallback: bool = True
    sparsity_min_channels: int = 256
    cuda_streams: int = 1
    cuda_graphs: bool = True
    timing_flush_l2: bool = False
    extras: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def with_changes(self, **changes: Any) -> BuilderConfig:
        """A copy with some fields replaced (the config itself is frozen)."""
        return replace(self, **changes)

    def precision_override(self, layer_name: str) -> Precision | None:
        """The requested precision for a layer (last matching override), or None."""
        chosen = None
        for pattern, precision in self.layer_precisions:
            if layer_name == pattern or fnmatch.fnmatchcase(layer_name, pattern):
                chosen = precision
        return chosen

    def tactic_pin(self, layer_name: str) -> str | None:
        """The pinned tactic for a layer (last matching pin), or None."""
        chosen = None
        for pattern, tactic in self.tactic_pins:
            if layer_name == pattern or fnmatch.fnmatchcase(layer_name, pattern):
                chosen = tactic
        return chosen

    def profile_for(self, input_name: str) -> ShapeProfile | None:
        return next((p for p in self.profiles if p.input_name == input_name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "optimization_level": self.optimization_level,
            "precisions": sorted(p.value for p in self.precisions),
            "precision_mode": self.precision_mode.value,
            "layer_precisions": [[name, p.value] for name, p in self.layer_precisions],
            "sparsity": self.sparsity.value,
            "tactic_sources": None if self.tactic_sources is None else sorted(self.tactic_sources),
            "tactic_pins": [list(pin) for pin in self.tactic_pins],
            "timing_cache_path": self.timing_cache_path,
            "timing_iterations": self.timing_iterations,
            "timing_warmup": self.timing_warmup,
            "profiles": [p.to_json() for p in self.profiles],
            "backend": self.backend,
            "disabled_passes": list(self.disabled_passes),
            "calibrator": self.calibrator,
            "percentile": self.percentile,
            "calibration_cache_path": self.calibration_cache_path,
            "fp16_overflow_fallback": self.fp16_overflow_fallback,
            "sparsity_min_channels": self.sparsity_min_channels,
            "cuda_streams": self.cuda_streams,
            "cuda_graphs": self.cuda_graphs,
            "timing_flush_l2": self.timing_flush_l2,
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> BuilderConfig:
        sources = data.get("tactic_sources")
        return BuilderConfig(
            optimization_level=str(data.get("optimization_level", "O2")),
            precisions=frozenset(Precision(p) for p in data.get("precisions", ["fp32"])),
            precision_mode=PrecisionMode(data.get("precision_mode", "prefer")),
            layer_precisions=tuple(
                (str(name), Precision(p)) for name, p in data.get("layer_precisions", [])
            ),
            sparsity=SparsityMode(data.get("sparsity", "off")),
            tactic_sources=None if sources is None else frozenset(sources),
            tactic_pins=tuple((str(a), str(b)) for a, b in data.get("tactic_pins", [])),
            timing_cache_path=data.get("timing_cache_path"),
            timing_iterations=int(data.get("timing_iterations", 5)),
            timing_warmup=int(data.get("timing_warmup", 1)),
            profiles=tuple(ShapeProfile.from_json(p) for p in data.get("profiles", [])),
            backend=str(data.get("backend", "numpy")),
            disabled_passes=tuple(data.get("disabled_passes", [])),
            calibrator=str(data.get("calibrator", "entropy")),
            percentile=float(data.get("percentile", 99.99)),
            calibration_cache_path=data.get("calibration_cache_path"),
            fp16_overflow_fallback=bool(data.get("fp16_overflow_fallback", True)),
            sparsity_min_channels=int(data.get("sparsity_min_channels", 256)),
            cuda_streams=int(data.get("cuda_streams", 1)),
            cuda_graphs=bool(data.get("cuda_graphs", True)),
            timing_flush_l2=bool(data.get("timing_flush_l2", False)),
        )
