"""Helpers shared by the CLI tests: run `python -m engine.cli` and judge its exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gie(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """Run ``python -m engine.cli ARGS`` from the repository root."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result


def clean_error(result: subprocess.CompletedProcess[str], *mentions: str) -> str:
    """Exit 2 with exactly one 'gie: error:' line naming ``mentions`` and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gie: error: "), result.stderr
    for mention in mentions:
        assert mention in lines[0], (mention, lines[0])
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]
