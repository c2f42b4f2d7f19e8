"""Netron on 127.0.0.1, network-silent: one model's bytes plus Netron's own static files.

:func:`start_netron` serves ``model_bytes`` and the viewer shipped in the installed ``netron``
package through our own ``http.server`` handler, bound to 127.0.0.1 on a free port, in a
daemon thread. Netron's page is not offline-safe as shipped; the handler serves patched copies
of three of its files (every patch must match exactly once, else :class:`NetronPatchError`,
so a Netron upgrade that moves the code is caught by the tests, not by users):

- ``browser.js``: the start-up checks ``age`` (an endless "please update" modal once the build
  is 180 days old), ``consent`` (fetches https://ipinfo.io/json, then a modal that blocks the
  graph until a ``consent`` cookie exists) and ``telemetry`` (Google Analytics) become no-ops;
  opening a GitHub gist (``?gist=``, a fetch from api.github.com) is refused.
- ``base.js``: ``Telemetry.send`` no longer builds the analytics URL nor calls ``sendBeacon``.
- ``index.html``: the ``<meta name="version">`` tag becomes the meta tags Netron's own Python
  server writes (type, version, model file, name), with every value HTML-escaped.

Every response carries a Content-Security-Policy that limits scripts, connections, images and
workers to the page's own origin plus ``data:``/``blob:``, so even a code path we did not
patch cannot reach another host. Requests whose ``Host`` header is not 127.0.0.1/localhost at
our port are refused (DNS rebinding).

Lifetime: the Session keeps its servers and calls :meth:`NetronServer.stop` in ``close()``;
a server that is garbage collected stops too (``weakref.finalize``) and frees its port.
"""

from __future__ import annotations

import html
import http.server
import logging
import os
import re
import socketserver
import threading
import urllib.parse
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from IPython.display import IFrame

logger = logging.getLogger(__name__)

#: Host the server binds to; never anything else.
LOOPBACK = "127.0.0.1"

#: The Content-Security-Policy sent with every response.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' data: blob:",
        "connect-src 'self' data: blob:",
        "img-src 'self' data: blob:",
        "worker-src 'self' blob:",
        "style-src 'self' 'unsafe-inline'",
        "font-src 'self' data:",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'none'",
    ]
)

#: Static file types served from the netron package (anything else is 404).
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".svg": "image/svg+xml",
}

#: URL prefix of the served model (Netron's own server uses the same).
DATA_PREFIX = "/data/"


class NetronPatchError(RuntimeError):
    """A patch point in Netron's files was not found exactly once (Netron changed)."""


@dataclass(frozen=True)
class _Patch:
    """Replace the text matching ``pattern`` (a regex, DOTALL) in ``file`` by ``replacement``."""

    file: str
    what: str
    pattern: str
    replacement: str


_STUB = "async () => Promise.resolve(); // GIE Studio: {why}\n"

#: Netron's start-up checks in browser.js are three local functions; each becomes a no-op.
_PATCHES: tuple[_Patch, ...] = (
    _Patch(
        "browser.js",
        "update check (endless 'please update' modal after 180 days)",
        r"const age = async \(\) => \{.*?\n(?=        const consent = )",
        "const age = " + _STUB.format(why="no update check offline"),
    ),
    _Patch(
        "browser.js",
        "consent modal and its ipinfo.io lookup",
        r"const consent = async \(\) => \{.*?\n(?=        const telemetry = )",
        "const consent = " + _STUB.format(why="no cookies, no IP lookup, no consent modal"),
    ),
    _Patch(
        "browser.js",
        "Google Analytics session start",
        r"const telemetry = async \(\) => \{.*?\n(?=        const capabilities = )",
        "const telemetry = " + _STUB.format(why="no analytics"),
    ),
    _Patch(
        "browser.js",
        "opening a gist from api.github.com",
        r"const url = `https://api\.github\.com/gists/\$\{gist\}`;",
        "throw new Error('Opening a gist is disabled (GIE Studio serves Netron offline).');",
    ),
    _Patch(
        "base.js",
        "analytics beacon",
        r"const url = `https://analytics\.google\.com/g/collect\?\$\{this\._cache\}`;\s*"
        r"this\._navigator\.sendBeacon\(url, body\);",
        "void body; // GIE Studio: analytics disabled, nothing is sent",
    ),
)


def netron_static_dir() -> Path:
    """The folder of the installed ``netron`` package (its viewer's HTML/JS/CSS)."""
    import netron

    return Path(os.path.dirname(os.path.realpath(netron.__file__)))


def patched_sources(static_dir: Path) -> dict[str, bytes]:
    """``{file name: patched content}`` for the Netron files we change (see the module doc).

    Raises :class:`NetronPatchError` when a patch point is missing or ambiguous.
    """
    texts: dict[str, str] = {}
    for patch in _PATCHES:
        text = texts.get(patch.file)
        if text is None:
            text = (static_dir / patch.file).read_text(encoding="utf-8")
        matches = list(re.finditer(patch.pattern, text, flags=re.DOTALL))
        if len(matches) != 1:
            raise NetronPatchError(
                f"netron {patch.file}: the {patch.what} was found {len(matches)} times "
                "(expected 1); this Netron version is not supported by studio.netron"
            )
        start, end = matches[0].span()
        texts[patch.file] = text[:start] + patch.replacement + text[end:]
    return {name: text.encode("utf-8") for name, text in texts.items()}


def _index_html(static_dir: Path, model_file: str, title: str) -> bytes:
    """Netron's index.html with the meta tags its Python server writes, values escaped."""
    text = (static_dir / "index.html").read_text(encoding="utf-8")
    match = re.search(r'<meta name="version" content="([^"]*)">', text)
    if match is None:
        raise NetronPatchError('netron index.html: no <meta name="version"> tag')
    meta = "\n".join(
        [
            '<meta name="type" content="Python">',
            f'<meta name="version" content="{html.escape(match.group(1))}">',
            f'<meta name="file" content="{html.escape(DATA_PREFIX + model_file)}">',
            f'<meta name="name" content="{html.escape(title)}">',
            f'<meta name="identifier" content="{html.escape(model_file)}">',
        ]
    )
    return text.replace(match.group(0), meta, 1).encode("utf-8")


def safe_file_name(name: str) -> str:
    """A URL- and file-safe model file name from ``name``; ``.onnx`` added when it has no
    extension (Netron picks the format from the extension)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(name)).strip("._") or "model"
    return base if "." in base else base + ".onnx"


class _Server(http.server.ThreadingHTTPServer):
    """The HTTP server and what it serves (read-only after construction)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, model_bytes: bytes, model_file: str, title: str) -> None:
        static_dir = netron_static_dir()
        overrides = patched_sources(static_dir)  # before binding: a failure leaks no socket
        overrides["index.html"] = _index_html(static_dir, model_file, title)
        super().__init__((LOOPBACK, 0), _Handler)
        self.static_dir = static_dir
        self.model_bytes = bytes(model_bytes)
        self.model_path = DATA_PREFIX + model_file
        self.overrides = overrides
        port = self.server_address[1]
        self.allowed_hosts = {f"{LOOPBACK}:{port}", f"localhost:{port}"}

    def server_bind(self) -> None:
        """Bind without HTTPServer's ``socket.getfqdn`` (a DNS lookup that stalls offline)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name = LOOPBACK
        self.server_port = int(self.server_address[1])


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD only: the model at ``/data/<file>``, Netron's files (patched ones replaced)."""

    server: _Server
    protocol_version = "HTTP/1.0"

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def do_GET(self) -> None:
        self._respond(head=False)

    def _respond(self, head: bool) -> None:
        if self.headers.get("Host", "") not in self.server.allowed_hosts:
            self._send(403, "text/plain; charset=utf-8", b"forbidden host", head)
            return
        path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
        if path == self.server.model_path:
            self._send(200, "application/octet-stream", self.server.model_bytes, head)
            return
        name = "index.html" if path in ("", "/") else path.lstrip("/")
        content = self._static(name)
        if content is None:
            self._send(404, "text/plain; charset=utf-8", b"not found", head)
            return
        extension = os.path.splitext(name)[1]
        self._send(200, STATIC_TYPES[extension], content, head)

    def _static(self, name: str) -> bytes | None:
        """A file of the netron package folder itself (no sub-folders, known types only)."""
        if "/" in name or "\\" in name or name.startswith("."):
            return None
        if os.path.splitext(name)[1] not in STATIC_TYPES:
            return None
        if name in self.server.overrides:
            return self.server.overrides[name]
        file = self.server.static_dir / name
        if not file.is_file():
            return None
        return file.read_bytes()

    def _send(self, status: int, content_type: str, body: bytes, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("netron %s: " + format, self.address_string(), *args)


def _shutdown(server: _Server, thread: threading.Thread) -> None:
    """Stop serving, close the socket (frees the port) and wait for the serving thread."""
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


class NetronServer:
    """Netron showing one model, served on ``http://127.0.0.1:<port>/`` until :meth:`stop`.

    Use as a context manager, or keep it and call :meth:`stop`; a server that is garbage
    collected is stopped too. :attr:`url` is the viewer page, :attr:`model_url` the raw bytes.
    """

    def __init__(self, model_bytes: bytes, name: str) -> None:
        self.file_name = safe_file_name(name)
        self._server = _Server(model_bytes, self.file_name, name)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"netron-{self.port}",
            daemon=True,
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._server, self._thread)
        logger.debug("serving %s for Netron at %s", self.file_name, self.url)

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1 (chosen free by the OS)."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The viewer page."""
        return f"http://{LOOPBACK}:{self.port}/"

    @property
    def model_url(self) -> str:
        """Where the model's bytes are served (the page loads them from here)."""
        return f"http://{LOOPBACK}:{self.port}{DATA_PREFIX}{self.file_name}"

    @property
    def running(self) -> bool:
        """True until :meth:`stop` (or garbage collection) shut the server down."""
        return self._finalizer.alive

    def stop(self) -> None:
        """Stop serving and free the port; calling it again does nothing."""
        self._finalizer()

    def iframe(self, width: str | int = "100%", height: int = 600) -> IFrame:
        """An ``IPython.display.IFrame`` of the viewer (height in pixels)."""
        from IPython.display import IFrame

        return IFrame(self.url, width=width, height=height)

    def __enter__(self) -> NetronServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"NetronServer({self.file_name!r}, {self.url}, {state})"


def start_netron(model_bytes: bytes, name: str) -> NetronServer:
    """Serve ``model_bytes`` (an ONNX file's bytes) to Netron on 127.0.0.1 at a free port.

    ``name`` is the title shown and, made file-safe, the served file name (``.onnx`` added
    when it has no extension).
    """
    return NetronServer(model_bytes, name)


__all__ = [
    "CONTENT_SECURITY_POLICY",
    "LOOPBACK",
    "NetronPatchError",
    "NetronServer",
    "netron_static_dir",
    "patched_sources",
    "safe_file_name",
    "start_netron",
]
