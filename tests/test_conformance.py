"""ONNX conformance on the reference backend: no regressions, and no failing supported case.

The expected-pass list (tests/data/conformance_expected_pass.txt) is regenerated with
``python -m engine.conformance --write-pass-list tests/data/conformance_expected_pass.txt``
after a change that makes more cases pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.conformance import KINDS, run_conformance

EXPECTED_PASS = Path(__file__).parent / "data" / "conformance_expected_pass.txt"
SHARDS = {"node": ["node"], "files": [k for k in KINDS if k != "node"]}


def _expected() -> set[str]:
    return set(EXPECTED_PASS.read_text().split())


def test_expected_pass_list_is_substantial() -> None:
    expected = _expected()
    assert len(expected) >= 1300
    light = {
        "test_resnet50",
        "test_vgg19",
        "test_densenet121",
        "test_inception_v1",
        "test_inception_v2",
        "test_shufflenet",
        "test_squeezenet",
        "test_bvlc_alexnet",
        "test_zfnet512",
    }
    assert light <= expected


@pytest.mark.slow
@pytest.mark.parametrize("shard", sorted(SHARDS))
def test_conformance_shard(shard: str) -> None:
    results = run_conformance(SHARDS[shard])
    by_name = {r.name: r for r in results}
    regressions = [
        f"{name}: {by_name[name].status} {by_name[name].reason[:200]}"
        for name in sorted(_expected() & set(by_name))
        if by_name[name].status != "passed"
    ]
    assert not regressions, "cases on the expected-pass list stopped passing:\n" + "\n".join(
        regressions
    )
    # Every case whose ops all have kernels must pass; only 'unsupported' may remain.
    failed = [f"{r.name}: {r.reason[:200]}" for r in results if r.status == "failed"]
    assert not failed, "supported cases fail:\n" + "\n".join(failed)
