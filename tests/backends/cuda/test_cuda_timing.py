"""CUDA timing without a GPU: the event timer's logic on a fake clock, and the timing-cache key
extended with the GPU and its software stack (fake devices)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx_ir as ir
import pytest

from engine import zoo
from engine.backends.cuda import timing
from engine.backends.cuda.device_info import fake_device
from engine.backends.cuda.timing import CudaEventTimer, cuda_timing_key
from engine.build.plan import Plan, lower
from engine.build.timing import TimingCache, key_digest, summarize, timing_key
from engine.device import device_identity
from engine.passes import optimize


class FakeClock:
    """Returns the scripted milliseconds in order; counts runs and L2 flushes."""

    def __init__(self, times: list[float]) -> None:
        self.times = list(times)
        self.runs = 0
        self.flushes = 0
        self.events: list[str] = []

    def elapsed_ms(self, run: Callable[[], object]) -> float:
        run()
        self.runs += 1
        self.events.append("run")
        return self.times.pop(0)

    def flush_l2(self) -> None:
        self.flushes += 1
        self.events.append("flush")


@pytest.fixture(scope="module")
def plan() -> Plan:
    model = ir.serde.deserialize_model(zoo.build("resnet"))
    return lower(optimize(model, "O2", estimate_costs=False).model)


def test_samples_follow_the_warmup_and_flush_before_each(plan) -> None:
    clock = FakeClock([9.0, 8.0, 3.0, 1.0, 2.0, 5.0, 4.0])
    calls: list[int] = []
    timer = CudaEventTimer(warmup=2, iterations=5, flush_l2=True, clock=clock)
    samples = timer.time(plan.layers[0], "t", lambda: calls.append(1))
    assert samples == [3.0, 1.0, 2.0, 5.0, 4.0]  # warm-up runs are not samples
    assert summarize("t", samples, timer.iterations).median_ms == 3.0
    assert len(calls) == clock.runs == 7
    assert clock.flushes == 5
    assert clock.events[:3] == ["run", "run", "flush"]  # no flush before warm-ups


def test_no_flush_unless_asked(plan) -> None:
    clock = FakeClock([1.0] * 4)
    CudaEventTimer(warmup=1, iterations=3, clock=clock).time(plan.layers[0], "t", lambda: None)
    assert clock.flushes == 0


def test_hopeless_warmup_aborts_at_once(plan) -> None:
    clock = FakeClock([10.0, 9.0] + [1.0] * 10)
    timer = CudaEventTimer(warmup=2, iterations=5, clock=clock)
    samples = timer.time(plan.layers[0], "t", lambda: None, abort_above_ms=2.0)
    assert samples == [9.0]  # 9 > 2 x 2 ms: the fastest warm-up run is the only sample
    assert clock.runs == 2
    assert summarize("t", samples, timer.iterations).aborted


def test_clearly_slower_probe_runs_abort(plan) -> None:
    clock = FakeClock([3.0, 3.5, 3.2] + [3.0] * 5)
    timer = CudaEventTimer(warmup=1, iterations=5, clock=clock)
    samples = timer.time(plan.layers[0], "t", lambda: None, abort_above_ms=2.0)
    assert samples == [3.5, 3.2]  # both probe runs above the limit: stop after two
    assert clock.runs == 3


def test_one_fast_probe_run_keeps_timing(plan) -> None:
    clock = FakeClock([1.5, 3.0, 1.0, 1.0, 1.0, 1.0])
    timer = CudaEventTimer(warmup=1, iterations=5, clock=clock)
    samples = timer.time(plan.layers[0], "t", lambda: None, abort_above_ms=2.0)
    assert len(samples) == 5


def test_timer_needs_no_cupy_until_it_times() -> None:
    timer = CudaEventTimer()  # the default clock is made on first use only
    assert timer.iterations == 10
    with pytest.raises(ValueError, match="iterations"):
        CudaEventTimer(iterations=0)


# --------------------------------------------------------------------------- keys


def test_key_is_stable_and_differs_from_the_cpu_key(plan) -> None:
    layer = plan.layers[0]
    first = cuda_timing_key(layer, plan, fake_device())
    assert first == cuda_timing_key(layer, plan, fake_device())
    assert key_digest(first) != key_digest(timing_key(layer, plan, device_identity()))
    device = first["device"]
    assert device["device"] == "NVIDIA H100 80GB HBM3"
    assert device["compute_capability"] == "9.0"
    assert "threads" not in device  # host CPU threads do not change GPU timings


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "NVIDIA H200"),
        ("compute_capability", (8, 0)),
        ("sm_count", 114),
        ("driver_version", "12.9"),
        ("runtime_version", "12.4"),
        ("nvrtc_version", "13.0"),
        ("cupy_version", "13.6.0"),
    ],
)
def test_key_changes_with_every_device_field(plan, field, value) -> None:
    layer = plan.layers[0]
    base = fake_device()
    changed = dataclasses.replace(base, **{field: value})
    assert key_digest(cuda_timing_key(layer, plan, base)) != key_digest(
        cuda_timing_key(layer, plan, changed)
    )


def test_key_changes_with_the_catalogue_version(plan, monkeypatch) -> None:
    layer = plan.layers[0]
    before = key_digest(cuda_timing_key(layer, plan, fake_device()))
    monkeypatch.setattr(timing, "CATALOGUE_VERSION", "cuda-tactics-test")
    assert key_digest(cuda_timing_key(layer, plan, fake_device())) != before


def test_layers_get_different_keys_and_the_cache_round_trips(plan, tmp_path) -> None:
    from engine.build.plan import TacticTiming

    device = fake_device()
    keys = [cuda_timing_key(layer, plan, device) for layer in plan.layers[:3]]
    assert len({key_digest(k) for k in keys}) == 3
    cache = TimingCache(tmp_path / "cache.json")
    cache.store(keys[0], [TacticTiming("gemm_mma_f16", 0.5, 10)], "gemm_mma_f16")
    cache.save()
    stored = TimingCache(tmp_path / "cache.json").lookup(keys[0])
    assert stored is not None and stored[1] == "gemm_mma_f16"
    other_gpu = cuda_timing_key(plan.layers[0], plan, fake_device(name="NVIDIA A100"))
    assert TimingCache(tmp_path / "cache.json").lookup(other_gpu) is None
