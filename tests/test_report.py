"""The profile report: declared columns, latency statistics, JSON round trip, text table."""

from __future__ import annotations

import dataclasses
import json

import pytest

from engine.report import (
    COLUMN_NAMES,
    COLUMNS,
    LatencyStats,
    LayerProfile,
    ProfileReport,
    achieved,
)


def _row(name: str, median: float, flops: int | None) -> LayerProfile:
    return LayerProfile(
        layer=name,
        op="gie::ConvAct",
        origins=(f"{name}/Conv", f"{name}/Relu"),
        precision="fp32",
        tactic="reference",
        latency_ms_mean=median * 1.1,
        latency_ms_median=median,
        flops=flops,
        bytes=None if flops is None else flops // 10,
        gflops=achieved(flops, median),
        gbs=achieved(None if flops is None else flops // 10, median),
        output_shape=((1, 64, 56, 56),),
    )


def test_columns_are_declared_once_with_units_and_match_the_row_fields() -> None:
    assert tuple(f.name for f in dataclasses.fields(LayerProfile)) == COLUMN_NAMES
    assert len(set(COLUMN_NAMES)) == len(COLUMNS)
    units = {c.name: c.unit for c in COLUMNS}
    assert units["latency_ms_median"] == "ms" and units["gflops"] == "GFLOP/s"
    assert units["gbs"] == "GB/s" and units["bytes"] == "B" and units["flops"] == "FLOP"
    assert all(c.meaning for c in COLUMNS)


def test_achieved_rates_are_giga_units_per_second_of_the_median() -> None:
    assert achieved(2_000_000_000, 1000.0) == pytest.approx(2.0)
    assert achieved(3_000_000, 1.0) == pytest.approx(3.0)
    assert achieved(None, 1.0) is None and achieved(10, 0.0) is None


def test_latency_stats_percentiles_and_throughput() -> None:
    stats = LatencyStats.of([float(v) for v in range(1, 101)])  # 1 .. 100 ms
    assert stats.iterations == 100
    assert stats.mean_ms == pytest.approx(50.5)
    assert stats.median_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01)
    assert (stats.min_ms, stats.max_ms) == (1.0, 100.0)
    assert stats.throughput == pytest.approx(1000 / 50.5)
    with pytest.raises(ValueError, match="no latency samples"):
        LatencyStats.of([])


def test_report_round_trips_through_json_and_prints_a_table() -> None:
    report = ProfileReport(
        layers=(_row("conv1", 2.0, 4_000_000), _row("pool", 0.5, None)),
        end_to_end=LatencyStats.of([2.4, 2.6, 2.5]),
        warmup=2,
        input_shapes={"x": (1, 3, 224, 224)},
        device={"name": "cpu"},
    )
    data = json.loads(json.dumps(report.to_json()))
    assert [c["name"] for c in data["columns"]] == list(COLUMN_NAMES)
    assert data["layers"][0]["gflops"] == pytest.approx(2.0)
    assert data["layers"][1]["flops"] is None
    assert data["end_to_end"]["median_ms"] == pytest.approx(2.5)
    assert ProfileReport.from_json(data) == report
    assert report.layer_ms_total == pytest.approx(2.5)
    lines = report.table_lines()
    assert lines[0].split()[:4] == ["layer", "op", "precision", "tactic"]
    assert "1x64x56x56" in lines[2] and lines[3].split()[6:8] == ["-", "-"]
    assert "p99" in lines[-1] and "inferences/s" in lines[-1]
