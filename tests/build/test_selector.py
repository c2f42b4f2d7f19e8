"""Tactic selection: the fake timer makes it deterministic; pins override timing; every
candidate's timing is kept; clearly slower candidates are abandoned early; and the plan runs
with the chosen tactics to the reference interpreter's outputs."""

from __future__ import annotations

import time

import numpy as np
import onnx_ir as ir
import pytest

from engine import zoo
from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.build.log import BuildLog
from engine.build.plan import Layer, Plan, lower
from engine.build.selector import determinism_check, select_tactics, winner_of
from engine.build.tactics import candidate_tactics, tactic_kernel
from engine.build.timing import PROBE_RUNS, FakeTimer, WallClockTimer
from engine.config import BuilderConfig
from engine.onnx_io import load
from engine.passes import optimize

CONFIG = BuilderConfig()
#: Fake costs (ms) that make every non-reference tactic win somewhere.
COSTS = {
    "reference": 3.0,
    "im2col_gemm": 2.0,
    "direct": 1.5,
    "winograd_f2x3": 1.0,
    "matmul": 2.5,
    "einsum": 4.0,
    "transposed_b": 1.0,
    "batched": 2.0,
    "per_head": 1.0,
}


@pytest.fixture(scope="module")
def resnet() -> ir.Model:
    return optimize(load(zoo.build("resnet")), "O2").model


@pytest.fixture(scope="module")
def bert() -> ir.Model:
    return optimize(load(zoo.build("bert_opset17")), "O3").model


def _timed_layers(plan: Plan) -> list[Layer]:
    return [layer for layer in plan.layers if len(candidate_tactics(layer, plan, CONFIG)) > 1]


def _run_plan(plan: Plan, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute the plan layer by layer with each layer's chosen tactic."""
    values = {**plan.constants, **feeds}
    for layer in plan.layers:
        inputs = [values[name] if name else None for name in layer.inputs]
        outputs = tactic_kernel(layer)(inputs, layer.attrs, layer.context)
        values.update(zip(layer.outputs, outputs))
    return {name: values[name] for name in plan.outputs}


def test_fake_timer_picks_the_cheapest_and_keeps_all_candidates(resnet: ir.Model) -> None:
    plan, log, timer = lower(resnet), BuildLog(), FakeTimer(COSTS)
    stats = select_tactics(plan, CONFIG, log, timer=timer)
    timed = _timed_layers(plan)
    assert timed and stats.timed == len(timer.calls) > 0
    for layer in timed:
        names = candidate_tactics(layer, plan, CONFIG)
        assert [c.tactic for c in layer.candidates] == names
        assert layer.tactic == min(names, key=lambda n: (COSTS[n], names.index(n)))
        entry = log.for_layer(layer.name)[-1].message
        assert entry.startswith(f"tactic {layer.tactic} chosen, {len(names)} candidates, margin")
    tactics = {layer.tactic for layer in timed}
    assert {"winograd_f2x3", "direct", "transposed_b"} <= tactics
    untimed = [layer for layer in plan.layers if layer not in timed]
    assert untimed and all(
        layer.tactic == "reference" and not layer.candidates for layer in untimed
    )
    assert {name for name, _ in timer.calls} == {layer.name for layer in timed}
    again = lower(resnet)
    select_tactics(again, CONFIG, BuildLog(), timer=FakeTimer(COSTS))
    assert [layer.tactic for layer in again.layers] == [layer.tactic for layer in plan.layers]


def test_margin_is_the_runner_up_slowdown(resnet: ir.Model) -> None:
    plan, log = lower(resnet), BuildLog()
    select_tactics(plan, CONFIG, log, timer=FakeTimer({"reference": 1.0, "im2col_gemm": 1.08}))
    first = plan.layers[0]  # the 7x7 stem: reference, im2col_gemm, direct (1 ms default)
    assert first.tactic == "reference"
    assert log.for_layer(first.name)[-1].message.endswith("margin 0%")
    _, margin = winner_of(first.candidates)
    assert margin == 0.0
    stem = [c for c in first.candidates if c.tactic != "direct"]
    assert winner_of(stem) == ("reference", pytest.approx(8.0))


def test_pins_override_timing(resnet: ir.Model) -> None:
    config = BuilderConfig(tactic_pins=(("*layer1*", "im2col_gemm"), ("/relu/Relu/ConvAct", "x")))
    plan, log, timer = lower(resnet), BuildLog(), FakeTimer(COSTS)
    stats = select_tactics(plan, config, log, timer=timer)
    pinned = [layer for layer in plan.layers if "layer1" in layer.name]
    assert pinned and stats.pinned == len(pinned)
    for layer in pinned:
        assert layer.tactic == "im2col_gemm" and not layer.candidates
        assert log.for_layer(layer.name)[-1].message == "tactic im2col_gemm pinned"
        assert all(name != layer.name for name, _ in timer.calls)
    stem = plan.layer("/relu/Relu/ConvAct")  # an unknown pinned tactic is ignored, with why
    assert "pin x ignored: " in log.for_layer(stem.name)[0].message
    assert stem.tactic == "direct" and stem.candidates


def test_an_inapplicable_pin_is_ignored_with_its_reason(resnet: ir.Model) -> None:
    config = BuilderConfig(tactic_pins=(("/relu/Relu/ConvAct", "winograd_f2x3"),))
    plan, log = lower(resnet), BuildLog()
    select_tactics(plan, config, log, timer=FakeTimer(COSTS))
    messages = [e.message for e in log.for_layer("/relu/Relu/ConvAct")]
    assert messages[0] == "pin winograd_f2x3 ignored: winograd_f2x3 needs a 3x3 kernel (got 7x7)"
    assert plan.layer("/relu/Relu/ConvAct").tactic == "direct"


def test_clearly_slower_candidates_are_aborted_early(resnet: ir.Model) -> None:
    timer = FakeTimer({"reference": 1.0, "im2col_gemm": 1.5}, default_ms=2.5, iterations=7)
    plan = lower(resnet)
    stats = select_tactics(plan, CONFIG, BuildLog(), timer=timer)
    assert stats.aborted > 0
    for layer in _timed_layers(plan):
        by_name = {c.tactic: c for c in layer.candidates}
        assert layer.tactic == "reference"
        assert by_name["reference"].samples == 7 and not by_name["reference"].aborted
        if "im2col_gemm" in by_name:  # 1.5 ms: slower, but within 2x of the best
            assert by_name["im2col_gemm"].samples == 7 and not by_name["im2col_gemm"].aborted
        slow = [c for c in layer.candidates if c.median_ms == 2.5]
        assert slow and all(c.aborted and c.samples == PROBE_RUNS for c in slow)


def test_a_failing_candidate_is_recorded_and_skipped(resnet: ir.Model) -> None:
    class Failing(FakeTimer):
        def time(self, layer, tactic, run, abort_above_ms=None):
            if tactic == "direct":
                raise MemoryError("too big")
            return super().time(layer, tactic, run, abort_above_ms)

    plan, log = lower(resnet), BuildLog()
    select_tactics(plan, CONFIG, log, timer=Failing(COSTS))
    stem = plan.layer("/relu/Relu/ConvAct")
    failed = next(c for c in stem.candidates if c.tactic == "direct")
    assert failed.samples == 0 and failed.note == "failed: too big"
    assert (
        stem.tactic == "im2col_gemm" and "(direct failed)" in log.for_layer(stem.name)[-1].message
    )


def _feeds(model: ir.Model, plan: Plan) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    feeds = {}
    for name in plan.inputs:
        spec = plan.specs[name]
        dtype = spec.dtype.numpy()
        shape = tuple(spec.shape)
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = np.ones(shape, dtype=dtype)
    return feeds


@pytest.mark.parametrize("fixture", ["resnet", "bert"])
def test_the_chosen_tactics_compute_the_reference_outputs(fixture: str, request) -> None:
    model = request.getfixturevalue(fixture)
    plan = lower(model)
    select_tactics(plan, CONFIG, BuildLog(), timer=FakeTimer(COSTS, execute=True))
    chosen = {layer.tactic for layer in plan.layers}
    assert chosen - {"reference"}, chosen
    feeds = _feeds(model, plan)
    want = ReferenceInterpreter(model).run(feeds).outputs
    got = _run_plan(plan, feeds)
    for name, value in got.items():
        np.testing.assert_allclose(value, want[name], rtol=1e-4, atol=1e-4)


def test_wall_clock_selection_times_real_kernels(resnet: ir.Model) -> None:
    plan, log = lower(resnet), BuildLog()
    timer = WallClockTimer(warmup=1, iterations=3, min_sample_ms=0.0)
    stats = select_tactics(plan, CONFIG, log, timer=timer)
    assert stats.timed >= len(_timed_layers(plan)) * 2 and stats.cache_hits == 0
    for layer in _timed_layers(plan):
        assert all(c.median_ms > 0 and c.samples in (1, PROBE_RUNS, 3) for c in layer.candidates)
        assert layer.tactic in {c.tactic for c in layer.candidates}


def test_wall_clock_timer_warms_up_repeats_and_aborts(resnet: ir.Model) -> None:
    layer, calls = lower(resnet).layers[0], []
    timer = WallClockTimer(warmup=1, iterations=4, min_sample_ms=0.0)
    assert len(timer.time(layer, "t", lambda: calls.append(0))) == 4 and len(calls) == 5

    def slow_after_warmup() -> None:
        calls.append(0)
        if len(calls) > 1:
            time.sleep(0.02)

    calls.clear()  # warm-up fast, first timed runs 20 ms > 5 ms: stop after the probe runs
    samples = timer.time(layer, "t", slow_after_warmup, abort_above_ms=5.0)
    assert len(samples) == PROBE_RUNS and len(calls) == 1 + PROBE_RUNS and min(samples) >= 20

    calls.clear()  # already the warm-up is far above the limit: stop there
    samples = timer.time(layer, "t", lambda: (calls.append(0), time.sleep(0.02)), 1.0)
    assert len(samples) == 1 and len(calls) == 1

    calls.clear()  # microsecond kernels: each sample averages back-to-back runs
    repeating = WallClockTimer(warmup=1, iterations=3, min_sample_ms=5.0, max_repeats=10)
    assert len(repeating.time(layer, "t", lambda: calls.append(0))) == 3
    assert len(calls) == 1 + 3 * 10


def test_progress_reports_every_layer(resnet: ir.Model) -> None:
    plan, seen = lower(resnet), []
    select_tactics(
        plan, CONFIG, BuildLog(), timer=FakeTimer(COSTS), progress=lambda *a: seen.append(a)
    )
    total = len(plan.layers)
    assert seen[0] == ("tactics", 0, total) and seen[-1] == ("tactics", total, total)


def test_determinism_check_reports_flips_with_margins(resnet: ir.Model) -> None:
    assert determinism_check(resnet, CONFIG, lambda: FakeTimer(COSTS)) == []
    builds = iter([{"reference": 1.0, "direct": 1.1}, {"reference": 1.2, "direct": 1.0}])

    def factory() -> FakeTimer:
        return FakeTimer(next(builds), default_ms=5.0)

    flips = determinism_check(resnet, CONFIG, factory)
    convs = [layer for layer in lower(resnet).layers if layer.op_type == "ConvAct"]
    assert {f.layer for f in flips} == {layer.name for layer in convs}
    flip = flips[0]
    assert (flip.first, flip.second) == ("reference", "direct")
    assert flip.first_margin_pct == pytest.approx(10.0)
    assert flip.second_margin_pct == pytest.approx(20.0)
    assert flip.to_json()["layer"] == flip.layer
