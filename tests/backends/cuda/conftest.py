"""Fixtures for the CUDA backend checks that need no GPU (NVRTC and the CPU shim).

Compiled kernels and shim libraries are cached in pytest's cache folder (.pytest_cache), so a
second run of this folder compiles nothing. A test skips only when its tool is missing: NVRTC
(the dev extra's cuda-toolkit / cuda-bindings wheels) or g++.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.backends.cuda import nvrtc, shim_runner


def _cache_folder(request: pytest.FixtureRequest, name: str) -> Path:
    """pytest's cache folder, or a session temp folder when the cache plugin is off."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir(name))
    return request.getfixturevalue("tmp_path_factory").mktemp(name)


@pytest.fixture(scope="session")
def nvrtc_cache(request: pytest.FixtureRequest) -> nvrtc.CompileCache:
    reason = nvrtc.nvrtc_available()
    if reason is not None:
        pytest.skip(reason)
    return nvrtc.CompileCache(_cache_folder(request, "gie-cuda-nvrtc"))


@pytest.fixture(scope="session")
def shim_cache(request: pytest.FixtureRequest) -> Path:
    reason = shim_runner.compiler_available()
    if reason is not None:
        pytest.skip(reason)
    return _cache_folder(request, "gie-cuda-shim")
