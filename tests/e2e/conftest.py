"""Fixtures of the browser tests: one ``jupyter lab`` per module, Debian's Chromium, offline.

Every test gets a :class:`Guard` (autouse) that records what must never happen: a request that
leaves 127.0.0.1 (aborted by the route of :func:`lab_harness.new_context`), a JavaScript dialog
(alert/confirm/prompt) and an uncaught page error; each list must be empty when the test ends.
The tests skip, with the reason, when Chromium, Python Playwright or the built ``gie-studio``
labextension is missing (``make test`` installs Chromium when it runs as root).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from lab_harness import (
    LabServer,
    chromium_path,
    installed_extension,
    is_listening,
    launch_browser,
    new_context,
)

#: Screenshots of the browser tests (the repository's out/ folder is git-ignored).
ARTIFACTS = Path(__file__).resolve().parents[2] / "out" / "e2e"


def _missing_requirement() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Python playwright is not installed (pip install -e '.[dev]')"
    if chromium_path() is None:
        return "chromium is not installed (as root: apt-get install -y chromium; make test does it)"
    if installed_extension() is None:
        return (
            "the gie-studio labextension is not built/installed "
            "(jupyter labextension list shows no gie-studio)"
        )
    return None


@pytest.fixture(scope="module")
def requirements() -> None:
    reason = _missing_requirement()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def lab(requirements: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """A ``jupyter lab`` serving an empty temporary folder; checked to leave no port behind."""
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    root.mkdir()
    server = LabServer(root_dir=root, state_dir=base / "state")
    with server:
        yield server
    assert not is_listening(server.port), f"port {server.port} still listens after shutdown"
    assert server.exit_code is not None
    assert server.leftover_processes() == []


@pytest.fixture(scope="module")
def browser(requirements: None) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch_browser(playwright)
        yield chromium
        chromium.close()


@dataclass
class Guard:
    """What a browser context did that it must not do (see the module docstring)."""

    blocked: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    pages: list[Any] = field(default_factory=list)

    def watch(self, page: Any) -> Any:
        self.pages.append(page)

        def on_dialog(dialog: Any) -> None:
            self.dialogs.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        return page

    def check(self) -> None:
        assert self.blocked == [], f"requests outside 127.0.0.1: {self.blocked}"
        assert self.dialogs == [], f"JavaScript dialogs fired: {self.dialogs}"
        assert self.page_errors == [], f"uncaught errors in the page: {self.page_errors}"

    def screenshot(self, name: str) -> None:
        """Full screenshots of the open pages (for a failed test)."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for index, page in enumerate(self.pages):
            if not page.is_closed():
                page.screenshot(path=str(ARTIFACTS / f"{name}-failed-{index}.png"))


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "report_call", None)
    return report is not None and report.failed


@pytest.fixture(scope="module")
def module_guard() -> Guard:
    """The guard of the module-scoped context (the resnet notebook shared by several tests)."""
    return Guard()


@pytest.fixture(autouse=True)
def guard(module_guard: Guard, request: pytest.FixtureRequest) -> Iterator[Guard]:
    """Per test: a fresh guard for the test's own contexts; both must stay clean. A failed
    test leaves screenshots of its pages in out/e2e/."""
    own = Guard()
    yield own
    if _failed(request) and module_guard.pages and "context" not in request.fixturenames:
        module_guard.screenshot(request.node.name)
    own.check()
    module_guard.check()


@pytest.fixture
def context(browser: Any, guard: Guard, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context for one test (its own storage, routed, tall viewport)."""
    created = new_context(browser, guard.blocked)
    yield created
    if _failed(request):
        guard.screenshot(request.node.name)
    created.close()


@pytest.fixture(scope="module")
def module_context(browser: Any, module_guard: Guard) -> Iterator[Any]:
    created = new_context(browser, module_guard.blocked)
    yield created
    created.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so a failing test can leave a screenshot."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report
