"""A real ``jupyter lab`` on 127.0.0.1 and Debian's Chromium driven by Playwright, offline.

Shared by the browser tests (tests/e2e) and ``bench/graph_render.py``. The server gets its own
settings, runtime, config, workspaces and IPython folders under a temporary folder (news and
update checks off), a random token and a free port; :class:`LabServer` polls ``/api/status``
until it answers and shuts down through ``/api/shutdown`` (then SIGTERM/SIGKILL of its own
process group, if it lingers). :func:`new_context` routes every request of a browser context:
anything that is not on 127.0.0.1 / localhost / ``data:`` / ``blob:`` is aborted and recorded,
so a test can assert that nothing left the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: Chromium flags for a headless, quiet, offline browser (see ../shared/notes/jupyterlab.md).
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
#: Tall enough that a notebook's graph, timeline and node panel are all on screen.
VIEWPORT = {"width": 1400, "height": 2200}
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})
LOCAL_SCHEMES = frozenset({"data", "blob", "about"})
#: The repository: kernels import ``engine`` and ``studio`` from here even when the project is
#: not pip-installed.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: npm package name of the extension under test.
EXTENSION_NAME = "gie-studio"
STARTUP_TIMEOUT_S = 90.0
SHUTDOWN_TIMEOUT_S = 20.0


def chromium_path() -> str | None:
    """Debian's Chromium on PATH (``chromium``), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def installed_extension() -> Path | None:
    """The folder of the installed prebuilt ``gie-studio`` labextension, or None."""
    from jupyter_core.paths import jupyter_path

    for base in jupyter_path("labextensions"):
        folder = Path(base) / EXTENSION_NAME
        if (folder / "package.json").is_file():
            return folder
    return None


def is_local(url: str) -> bool:
    """True for URLs that stay on this machine."""
    parts = urlsplit(url)
    if parts.scheme in LOCAL_SCHEMES:
        return True
    return parts.scheme in ("http", "https", "ws", "wss") and parts.hostname in LOCAL_HOSTS


def kernel_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the repository first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    paths = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_listening(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1))


@dataclass
class LabServer:
    """One ``jupyter lab`` process serving ``root_dir`` (see the module docstring)."""

    root_dir: Path
    state_dir: Path
    port: int = 0
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    exit_code: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lab_url(self, path: str = "") -> str:
        """URL of the lab page (optionally opening ``path``), token included."""
        tree = f"/tree/{path}" if path else ""
        return f"{self.base_url}/lab{tree}?token={self.token}&reset"

    def _environment(self) -> dict[str, str]:
        env = kernel_environment()
        folders = {
            "JUPYTERLAB_SETTINGS_DIR": "settings",
            "JUPYTERLAB_WORKSPACES_DIR": "workspaces",
            "JUPYTER_RUNTIME_DIR": "runtime",
            "JUPYTER_CONFIG_DIR": "config",
            "IPYTHONDIR": "ipython",
        }
        for variable, name in folders.items():
            folder = self.state_dir / name
            folder.mkdir(parents=True, exist_ok=True)
            env[variable] = str(folder)
        env.pop("JUPYTER_TOKEN", None)
        return env

    def _write_settings(self) -> None:
        settings = self.state_dir / "settings"
        _write_json(
            settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings",
            {"fetchNews": "false", "checkForUpdates": False},
        )
        _write_json(
            self.state_dir / "config" / "jupyter_server_config.json",
            {
                "LabApp": {
                    "news_url": None,
                    "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
                }
            },
        )

    def start(self) -> LabServer:
        self.port = free_port()
        self._write_settings()
        self.log_path = self.state_dir / "jupyter-lab.log"
        command = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--port-retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root_dir}",
            "--ServerApp.terminals_enabled=False",
            "--LabApp.expose_app_in_browser=True",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.root_dir,
                env=self._environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited early:\n{self.log()}")
            try:
                self.api("GET", "/api/status")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.25)
        self.stop()
        waited = f"{STARTUP_TIMEOUT_S:.0f} s"
        raise RuntimeError(f"jupyter lab did not answer in {waited}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the server's REST API with the token; the decoded JSON answer (or None)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
        return json.loads(text) if text else None

    def shutdown_kernels(self) -> None:
        """Delete every session and kernel (the saved notebooks stay)."""
        for session in self.api("GET", "/api/sessions"):
            self.api("DELETE", f"/api/sessions/{session['id']}")
        for kernel in self.api("GET", "/api/kernels"):
            self.api("DELETE", f"/api/kernels/{kernel['id']}")

    def stop(self) -> None:
        """Shut the server (and its kernels) down; afterwards nothing listens on the port."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                self.api("POST", "/api/shutdown")
            except (OSError, urllib.error.URLError):
                pass
            try:
                process.wait(timeout=SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        self.exit_code = process.returncode

    def leftover_processes(self) -> list[str]:
        """Command lines of live processes that name this server's state folder (its kernels
        carry their connection file there); empty after a clean :meth:`stop`."""
        marker = str(self.state_dir)
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in command:
                found.append(command.strip())
        return found

    def __enter__(self) -> LabServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def launch_browser(playwright: Any) -> Any:
    """Debian's Chromium through Playwright (never a downloaded browser)."""
    executable = chromium_path()
    if executable is None:
        raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
    return playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))


def new_context(browser: Any, blocked: list[str]) -> Any:
    """A browser context with a tall viewport whose non-local requests are aborted and
    appended to ``blocked`` (web sockets included)."""
    context = browser.new_context(viewport=VIEWPORT, service_workers="block")

    def route(route: Any) -> None:
        url = route.request.url
        if is_local(url):
            route.fallback()
        else:
            blocked.append(url)
            route.abort()

    def web_socket(socket_route: Any) -> None:
        url = socket_route.url
        if is_local(url):
            socket_route.connect_to_server()
        else:
            blocked.append(url)
            socket_route.close()

    context.route("**/*", route)
    context.route_web_socket("**/*", web_socket)
    return context


def evaluate_until(
    page: Any, expression: str, predicate: Callable[[Any], bool], timeout_s: float
) -> Any:
    """Evaluate ``expression`` in the page until ``predicate`` accepts its value."""
    deadline = time.monotonic() + timeout_s
    value = page.evaluate(expression)
    while not predicate(value):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{expression!r} is still {value!r} after {timeout_s:.0f} s")
        page.wait_for_timeout(200)
        value = page.evaluate(expression)
    return value


def open_lab(page: Any, server: LabServer, path: str = "") -> None:
    """Open the lab (and ``path`` in it) and wait until the application has started."""
    page.goto(server.lab_url(path), wait_until="domcontentloaded")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.started", timeout=60_000)
    page.evaluate("() => window.jupyterapp.started")
    page.wait_for_selector("#jp-main-dock-panel", timeout=60_000)


_OPEN_NOTEBOOK = """async ({path, kernel}) => {
  const app = window.jupyterapp;
  await app.restored;
  const panel = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
  await panel.context.ready;
  if (kernel) {
    await panel.sessionContext.ready;
    while (panel.sessionContext.session?.kernel?.status !== 'idle') {
      await new Promise(resolve => setTimeout(resolve, 100));
    }
  }
  window.gieE2E = window.gieE2E || {};
  window.gieE2E[path] = panel;
  return panel.sessionContext.session?.kernel?.name ?? null;
}"""

_RUN_CELLS = """async ({path, index}) => {
  const app = window.jupyterapp;
  const panel = window.gieE2E[path];
  app.shell.activateById(panel.id);
  if (index === null) {
    return await app.commands.execute('notebook:run-all-cells');
  }
  panel.content.activeCellIndex = index;
  return await app.commands.execute('notebook:run-cell');
}"""

_CELL_OUTPUT = """({path, index}) => {
  const cell = window.gieE2E[path].content.widgets[index];
  const output = cell.node.querySelector('.jp-OutputArea');
  return {count: cell.model.executionCount, text: output?.textContent ?? ''};
}"""


def open_notebook(page: Any, path: str, kernel: bool = True) -> str | None:
    """Open the notebook at ``path`` (relative to the root) in the lab; with ``kernel``, wait
    until its kernel is idle. Returns the kernel's name (None without one)."""
    return page.evaluate(_OPEN_NOTEBOOK, {"path": path, "kernel": kernel})


def run_all_cells(page: Any, path: str) -> None:
    """Run every cell (``notebook:run-all-cells``); returns when the kernel has run them."""
    page.evaluate(_RUN_CELLS, {"path": path, "index": None})


def run_cell(page: Any, path: str, index: int, timeout_s: float = 60.0) -> str:
    """Run cell ``index`` again and return its output text once it has executed."""
    before = page.evaluate(_CELL_OUTPUT, {"path": path, "index": index})["count"]
    page.evaluate(_RUN_CELLS, {"path": path, "index": index})
    expression = f"({_CELL_OUTPUT})({json.dumps({'path': path, 'index': index})})"
    done = evaluate_until(
        page,
        expression,
        lambda value: value["count"] is not None and value["count"] != before,
        timeout_s,
    )
    return str(done["text"])


def cell(page: Any, path: str, index: int) -> Any:
    """Playwright locator of cell ``index`` of the open notebook ``path``."""
    panel_id = page.evaluate("(path) => window.gieE2E[path].id", path)
    return page.locator(f"[id='{panel_id}'] .jp-Notebook .jp-Cell").nth(index)
