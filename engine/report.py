"""The per-layer profile report of an engine, with its columns declared once (:data:`COLUMNS`).

A report holds one row per layer (from a profiling pass that times every layer) and the
end-to-end latency of plain runs (timed separately, so per-layer timing does not distort
them), like trtexec's ``--dumpProfile`` next to its latency summary. FLOPs and bytes come from
the op registry's cost rules at the shapes of the profiled run; achieved GFLOP/s and GB/s
divide them by the median layer latency.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Column:
    """One declared report column: its key, its unit ('' when none) and what it means."""

    name: str
    unit: str
    meaning: str


COLUMNS: tuple[Column, ...] = (
    Column("layer", "", "layer name (the optimized graph's node name)"),
    Column("op", "", "op type, 'domain::Op' for the engine's fused ops"),
    Column("origins", "", "names of the original ONNX nodes the layer came from"),
    Column("precision", "", "numeric precision the layer computes in (fp32, tf32, fp16, int8)"),
    Column("tactic", "", "the implementation the builder chose for the layer"),
    Column("latency_ms_mean", "ms", "mean wall time of the layer over the profiling pass"),
    Column("latency_ms_median", "ms", "median wall time of the layer over the profiling pass"),
    Column(
        "flops", "FLOP", "operations per run by the cost rule (multiply-add = 2); null if unknown"
    ),
    Column(
        "bytes",
        "B",
        "main-memory bytes read plus written per run by the cost rule; null if unknown",
    ),
    Column("gflops", "GFLOP/s", "achieved: flops / median latency; null if unknown"),
    Column("gbs", "GB/s", "achieved: bytes / median latency; null if unknown"),
    Column("output_shape", "", "shape of each output at the profiled input shapes"),
)

COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)


@dataclass(frozen=True)
class LayerProfile:
    """One row of the report; fields are exactly :data:`COLUMNS` (same names, same order)."""

    layer: str
    op: str
    origins: tuple[str, ...]
    precision: str
    tactic: str
    latency_ms_mean: float
    latency_ms_median: float
    flops: int | None
    bytes: int | None
    gflops: float | None
    gbs: float | None
    output_shape: tuple[tuple[int, ...], ...]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["origins"] = list(self.origins)
        data["output_shape"] = [list(shape) for shape in self.output_shape]
        return data

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> LayerProfile:
        values = {name: data.get(name) for name in COLUMN_NAMES}
        values["origins"] = tuple(values["origins"] or ())
        values["output_shape"] = tuple(tuple(s) for s in values["output_shape"] or ())
        return LayerProfile(**values)


def achieved(amount: int | None, median_ms: float) -> float | None:
    """Giga-units per second for ``amount`` done in ``median_ms`` (None when unknown or 0 ms)."""
    if amount is None or median_ms <= 0:
        return None
    return amount / (median_ms * 1e-3) / 1e9


@dataclass(frozen=True)
class LatencyStats:
    """End-to-end latency of plain runs (ms) and throughput (inferences per second).

    Throughput is ``1000 / mean_ms`` runs per second (each run being one inference at the
    profiled shapes, whatever its batch)."""

    iterations: int
    mean_ms: float
    median_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    throughput: float

    @staticmethod
    def of(samples_ms: Sequence[float]) -> LatencyStats:
        if not samples_ms:
            raise ValueError("no latency samples")
        values = np.asarray(samples_ms, dtype=np.float64)
        mean = float(values.mean())
        return LatencyStats(
            iterations=len(values),
            mean_ms=mean,
            median_ms=float(np.median(values)),
            p90_ms=float(np.percentile(values, 90)),
            p99_ms=float(np.percentile(values, 99)),
            min_ms=float(values.min()),
            max_ms=float(values.max()),
            throughput=1000.0 / mean if mean > 0 else 0.0,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> LatencyStats:
        return LatencyStats(**{k: data[k] for k in LatencyStats.__dataclass_fields__})


@dataclass(frozen=True)
class ProfileReport:
    """Per-layer rows, end-to-end stats, and what was profiled (input shapes, device)."""

    layers: tuple[LayerProfile, ...]
    end_to_end: LatencyStats
    warmup: int
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> tuple[Column, ...]:
        return COLUMNS

    def rows(self) -> list[dict[str, Any]]:
        """The layer rows as dicts keyed by column name (a DataFrame's records)."""
        return [row.to_json() for row in self.layers]

    @property
    def layer_ms_total(self) -> float:
        """Sum of the layers' median latencies (ms) in the profiling pass."""
        return float(sum(row.latency_ms_median for row in self.layers))

    def to_json(self) -> dict[str, Any]:
        return {
            "columns": [asdict(c) for c in COLUMNS],
            "layers": self.rows(),
            "end_to_end": self.end_to_end.to_json(),
            "warmup": self.warmup,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "device": dict(self.device),
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> ProfileReport:
        return ProfileReport(
            layers=tuple(LayerProfile.from_json(row) for row in data["layers"]),
            end_to_end=LatencyStats.from_json(data["end_to_end"]),
            warmup=int(data.get("warmup", 0)),
            input_shapes={k: tuple(v) for k, v in data.get("input_shapes", {}).items()},
            device=dict(data.get("device", {})),
        )

    def table_lines(self) -> list[str]:
        """A fixed-width text table of the layers, then the end-to-end summary."""
        header = (
            "layer",
            "op",
            "precision",
            "tactic",
            "median ms",
            "mean ms",
            "GFLOP/s",
            "GB/s",
            "output",
        )
        body = [
            (
                row.layer,
                row.op,
                row.precision,
                row.tactic,
                f"{row.latency_ms_median:.4f}",
                f"{row.latency_ms_mean:.4f}",
                "-" if row.gflops is None else f"{row.gflops:.2f}",
                "-" if row.gbs is None else f"{row.gbs:.2f}",
                " ".join("x".join(str(d) for d in s) or "scalar" for s in row.output_shape),
            )
            for row in self.layers
        ]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        numeric = {4, 5, 6, 7}

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(
                c.rjust(w) if i in numeric else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        e2e = self.end_to_end
        return [
            fmt(header),
            fmt(["-" * w for w in widths]),
            *(fmt(r) for r in body),
            "",
            f"layers: {len(self.layers)}, sum of layer medians {self.layer_ms_total:.3f} ms "
            f"(profiling pass)",
            f"end to end over {e2e.iterations} runs (after {self.warmup} warm-up): "
            f"mean {e2e.mean_ms:.3f} ms, median {e2e.median_ms:.3f} ms, p90 {e2e.p90_ms:.3f} ms, "
            f"p99 {e2e.p99_ms:.3f} ms, throughput {e2e.throughput:.1f} inferences/s",
        ]
