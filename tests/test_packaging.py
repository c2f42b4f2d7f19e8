"""The project's set-up files agree with each other."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_pip_list_matches_pyproject_dependencies() -> None:
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict)]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip section"
    conda_pip = {r for r in pip_sections[0] if not r.startswith("-e")}
    assert conda_pip == set(_pyproject()["project"]["dependencies"])
    assert "python=3.11" in environment["dependencies"]


def test_product_dependencies_and_cuda_extras_are_declared() -> None:
    project = _pyproject()["project"]
    names = {r.split(">")[0].split("=")[0].split("<")[0] for r in project["dependencies"]}
    for required in (
        "jupyterlab",
        "ipywidgets",
        "netron",
        "onnx",
        "plotly",
        "onnx-ir",
        "onnxscript",
        "numpy",
        "onnxruntime",
        "ml_dtypes",
    ):
        assert required in names, required
    extras = project["optional-dependencies"]
    assert any(r.startswith("cupy-cuda12x") for r in extras["cuda12"])
    assert any(r.startswith("cupy-cuda13x") for r in extras["cuda13"])
    assert project["scripts"]["gie"] == "engine.cli:main"


def test_readme_opens_with_the_two_commands_and_ci_runs_make_test() -> None:
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:15])
    assert "make demo" in head and "make test" in head
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_engine_imports_without_jupyter_or_cupy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, engine, engine.ops; engine.ops.default_registry();"
        "bad = [m for m in ('cupy', 'jupyterlab', 'ipywidgets', 'studio') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
