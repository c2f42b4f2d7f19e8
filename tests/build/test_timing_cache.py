"""The timing cache: a warm cache times nothing and picks the same tactics; its key follows
what timings depend on; concurrent writers leave valid JSON with every entry; a corrupt file
is reported and replaced."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
from pathlib import Path

import onnx_ir as ir
import pytest

from engine import zoo
from engine.build.log import BuildLog
from engine.build.plan import TacticTiming, lower
from engine.build.selector import select_tactics
from engine.build.timing import FakeTimer, TimingCache, key_digest, timing_key
from engine.config import BuilderConfig, Precision
from engine.device import device_identity
from engine.onnx_io import load
from engine.passes import optimize

COSTS = {"reference": 3.0, "im2col_gemm": 2.0, "direct": 1.0, "winograd_f2x3": 1.5}
DEVICE = device_identity()


@pytest.fixture(scope="module")
def resnet() -> ir.Model:
    return optimize(load(zoo.build("resnet")), "O2").model


def test_a_warm_cache_times_nothing_and_picks_the_same_tactics(
    resnet: ir.Model, tmp_path: Path
) -> None:
    config = BuilderConfig(timing_cache_path=str(tmp_path / "cache.json"))
    cold, cold_timer = lower(resnet), FakeTimer(COSTS)
    cold_stats = select_tactics(cold, config, BuildLog(), timer=cold_timer)
    assert cold_stats.timed == len(cold_timer.calls) > 0 and cold_stats.cache_hits == 0

    warm, warm_timer, log = lower(resnet), FakeTimer({}), BuildLog()  # other costs: unused
    warm_stats = select_tactics(warm, config, log, timer=warm_timer)
    assert warm_timer.calls == [] and warm_stats.timed == 0
    assert warm_stats.cache_hits == sum(1 for layer in cold.layers if layer.candidates)
    assert [layer.tactic for layer in warm.layers] == [layer.tactic for layer in cold.layers]
    assert [layer.candidates for layer in warm.layers] == [
        layer.candidates for layer in cold.layers
    ]
    assert any("from timing cache" in line for line in log.lines())

    document = json.loads((tmp_path / "cache.json").read_text())
    assert document["format"] == "gie-timing-cache" and document["version"] == 1
    entry = next(iter(document["entries"].values()))
    assert {"key", "timings", "winner"} <= set(entry)
    assert entry["key"]["device"] == dict(sorted(DEVICE.items()))


def test_a_restricted_tactic_source_still_hits_the_cache(resnet: ir.Model, tmp_path: Path) -> None:
    path = str(tmp_path / "cache.json")
    select_tactics(
        lower(resnet), BuilderConfig(timing_cache_path=path), BuildLog(), FakeTimer(COSTS)
    )
    config = BuilderConfig(
        timing_cache_path=path, tactic_sources=frozenset({"reference", "im2col", "blas"})
    )
    plan, timer = lower(resnet), FakeTimer(COSTS)
    select_tactics(plan, config, BuildLog(), timer=timer)
    assert timer.calls == []
    assert {layer.tactic for layer in plan.layers if layer.op_type == "ConvAct"} == {"im2col_gemm"}


def test_the_key_changes_with_shape_precision_and_device(resnet: ir.Model) -> None:
    one, two = lower(resnet), lower(resnet, {"input": (2, 3, 64, 64)})
    layer = one.layers[0]
    base = key_digest(timing_key(layer, one, DEVICE))
    assert key_digest(timing_key(lower(resnet).layers[0], one, DEVICE)) == base
    assert key_digest(timing_key(two.layers[0], two, DEVICE)) != base
    assert key_digest(timing_key(layer, one, {**DEVICE, "device": "Other CPU"})) != base
    assert key_digest(timing_key(layer, one, {**DEVICE, "threads": "64"})) != base
    assert key_digest(timing_key(layer, one, {**DEVICE, "numpy": "0.0"})) != base
    layer.precision = Precision.FP16
    assert key_digest(timing_key(layer, one, DEVICE)) != base
    key = timing_key(one.layers[0], one, DEVICE)
    assert key["op"] == "gie::ConvAct" and key["epilogue"]["activation"] == "Relu"
    assert key["inputs"][0] == {"shape": [1, 3, 64, 64], "dtype": "FLOAT", "constant": False}
    assert key["inputs"][1]["constant"] is True


def test_layers_of_the_same_geometry_share_one_entry(resnet: ir.Model) -> None:
    plan = lower(resnet)
    layer = plan.layers[1]
    twin = dataclasses.replace(layer, name="another/conv", index=99, origins=("x",))
    assert key_digest(timing_key(twin, plan, DEVICE)) == key_digest(timing_key(layer, plan, DEVICE))


def _write_entries(path: str, worker: int, count: int) -> None:
    for i in range(count):
        cache = TimingCache(path)
        timing = TacticTiming("reference", float(i), 5)
        cache.store({"worker": worker, "entry": i}, [timing], "reference")
        cache.save()


def test_concurrent_writers_leave_valid_json_with_every_entry(tmp_path: Path) -> None:
    path = str(tmp_path / "shared" / "cache.json")
    workers, count = 4, 15
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_write_entries, args=(path, w, count)) for w in range(workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    document = json.loads(Path(path).read_text())
    assert len(document["entries"]) == workers * count
    cache = TimingCache(path)
    assert not cache.warnings
    for w in range(workers):
        for i in range(count):
            assert cache.lookup({"worker": w, "entry": i}) is not None
    leftovers = [p.name for p in Path(path).parent.iterdir()]
    assert sorted(leftovers) == ["cache.json", "cache.json.lock"]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"format": "gie-timing-cache", "version": 1, "entr', "is not valid JSON"),
        ('{"hello": 1}', "is not a GIE timing cache"),
        ('{"format": "gie-timing-cache", "version": 99, "entries": {}}', "format version 99"),
        ('{"format": "gie-timing-cache", "version": 1, "entries": {"a": 1}}', "malformed"),
    ],
)
def test_a_corrupt_cache_is_reported_and_replaced(
    resnet: ir.Model, tmp_path: Path, text: str, why: str
) -> None:
    path = tmp_path / "cache.json"
    path.write_text(text)
    cache = TimingCache(path)
    assert len(cache) == 0 and len(cache.warnings) == 1 and why in cache.warnings[0]
    log, timer = BuildLog(), FakeTimer(COSTS)
    stats = select_tactics(lower(resnet), BuilderConfig(), log, timer=timer, cache=cache)
    assert stats.timed > 0
    assert any(why in line and "starting empty" in line for line in log.lines())
    rewritten = TimingCache(path)
    assert not rewritten.warnings and len(rewritten) > 0


def test_save_merges_entries_written_meanwhile(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    first, second = TimingCache(path), TimingCache(path)
    first.store({"k": 1}, [TacticTiming("reference", 1.0, 5)], "reference")
    second.store({"k": 2}, [TacticTiming("direct", 2.0, 5)], "direct")
    first.save()
    second.save()
    merged = TimingCache(path)
    assert merged.lookup({"k": 1}) is not None
    assert merged.lookup({"k": 2}) == ([TacticTiming("direct", 2.0, 5)], "direct")
    assert second.lookup({"k": 1}) is not None  # the saver sees what others wrote
