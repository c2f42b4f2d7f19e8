"""Every CUDA lowering and catalogue extension, collected from the ``lower_*`` modules.

Each ``lower_<family>`` module defines ``LOWERINGS`` (tactic name -> lowering function) and
``TACTICS`` (tactics it adds to :data:`engine.backends.cuda.tactics.CATALOGUE`). A tactic
without a lowering is never a candidate (the selector says "no lowering yet").
"""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

from engine.backends.cuda.lowering import LowerFunction

#: The lowering modules, in the order their tactics join the catalogue.
MODULES = (
    "lower_gemm",
    "lower_cublas",
    "lower_conv",
    "lower_misc",
    "lower_gemm_fast",
    "lower_gemm_int8_fast",
    "lower_conv_tc",
    "lower_attention",
    "lower_data_movement",
    "lower_resize",
    "lower_rnn",
)


@cache
def _modules() -> tuple[ModuleType, ...]:
    found = []
    for name in MODULES:
        try:
            found.append(importlib.import_module(f"engine.backends.cuda.{name}"))
        except ModuleNotFoundError as error:
            if error.name != f"engine.backends.cuda.{name}":
                raise
    return tuple(found)


@cache
def all_lowerings() -> dict[str, LowerFunction]:
    """Tactic name -> lowering function, over every module."""
    table: dict[str, LowerFunction] = {}
    for module in _modules():
        table.update(getattr(module, "LOWERINGS", {}))
    return table


def extra_tactics() -> list:
    """The tactics the lowering modules add to the catalogue."""
    return [t for module in _modules() for t in getattr(module, "TACTICS", [])]


__all__ = ["MODULES", "all_lowerings", "extra_tactics"]
