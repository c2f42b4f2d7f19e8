"""studio.netron: Netron served on 127.0.0.1 with its network calls patched out."""

from __future__ import annotations

import gc
import http.client
import re
import socket
import urllib.request

import pytest

from studio.netron import (
    CONTENT_SECURITY_POLICY,
    NetronServer,
    netron_static_dir,
    start_netron,
)

MODEL = bytes(range(256)) * 40 + b"\x00tail"

#: Places where a page or script makes the browser load or send something, with an http(s)
#: literal as the target (a script/link/img source, CSS url(), import, fetch/XHR/beacon, or a
#: ``url = "https://..."`` that is then fetched, as Netron writes its calls).
_LOAD_PATTERNS = [
    r"""\bsrc\s*=\s*["'`]https?://[^"'`]*""",
    r"""<link[^>]*\bhref\s*=\s*["']https?://[^"']*""",
    r"""\burl\(\s*["']?https?://[^)"']*""",
    r"""\bimport\s*\(?\s*["'`]https?://[^"'`]*""",
    r"""fetch\(\s*["'`]https?://[^"'`]*""",
    r"""\bopen\(\s*["']\w+["']\s*,\s*["'`]https?://[^"'`]*""",
    r"""\bsendBeacon\(""",
    r"""\burl\s*=\s*["'`]https?://[^"'`]*""",
    r"""setAttribute\(\s*["'](?:src|href)["']\s*,\s*["'`]https?://[^"'`]*""",
]

#: What Netron 9.3 contacts on its own as shipped; every one of them is patched out.
_PATCHED_OUT = ["ipinfo.io", "analytics.google.com", "api.github.com", "sendBeacon"]


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def _external_loads(text: str) -> list[str]:
    found = []
    for pattern in _LOAD_PATTERNS:
        for match in re.finditer(pattern, text):
            if "://127.0.0.1" not in match.group(0):
                found.append(match.group(0))
    return found


@pytest.fixture
def server():
    with start_netron(MODEL, "resnet step 3") as running:
        yield running


def test_binds_loopback_on_a_free_port(server: NetronServer) -> None:
    assert server.url == f"http://127.0.0.1:{server.port}/"
    assert server.port > 0
    assert server._server.server_address[0] == "127.0.0.1"
    assert server.running


def test_model_url_returns_exactly_the_bytes(server: NetronServer) -> None:
    assert server.model_url.startswith(server.url)
    assert server.model_url.endswith(".onnx")
    status, headers, body = _get(server.model_url)
    assert status == 200
    assert body == MODEL
    assert headers["Content-Type"] == "application/octet-stream"


def test_index_page_points_netron_at_the_model(server: NetronServer) -> None:
    status, headers, body = _get(server.url)
    page = body.decode("utf-8")
    assert status == 200
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    path = server.model_url[len(server.url) - 1 :]
    assert f'<meta name="file" content="{path}">' in page
    assert '<meta name="type" content="Python">' in page
    assert '<script type="text/javascript" src="index.js"></script>' in page


def test_nothing_served_loads_from_outside_loopback(server: NetronServer) -> None:
    """Every HTML/JS/CSS file the viewer can load: no external load/fetch/beacon targets."""
    static = sorted(
        path.name
        for path in netron_static_dir().iterdir()
        if path.suffix in (".js", ".html", ".css")
    )
    assert "browser.js" in static and "index.html" in static
    offenders: dict[str, list[str]] = {}
    for name in static:
        status, headers, body = _get(server.url + name)
        assert status == 200, name
        assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        text = body.decode("utf-8", errors="replace")
        found = _external_loads(text) + [word for word in _PATCHED_OUT if word in text]
        if found:
            offenders[name] = found
    assert offenders == {}


def test_the_scan_would_see_what_netron_ships() -> None:
    """The scan above is not vacuous: on Netron's unpatched files it finds the calls."""
    browser = (netron_static_dir() / "browser.js").read_text(encoding="utf-8")
    base = (netron_static_dir() / "base.js").read_text(encoding="utf-8")
    assert any("ipinfo.io" in hit for hit in _external_loads(browser))
    assert any("api.github.com" in hit for hit in _external_loads(browser))
    assert any("analytics.google.com" in hit for hit in _external_loads(base))


def test_startup_checks_are_gone(server: NetronServer) -> None:
    _, _, body = _get(server.url + "browser.js")
    script = body.decode("utf-8")
    assert "Please update to the newest version." not in script
    assert "This app uses cookies" not in script
    assert "const consent = async () => Promise.resolve();" in script
    assert "const telemetry = async () => Promise.resolve();" in script


def test_csp_limits_everything_to_self() -> None:
    directives = dict(
        part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";") if part
    )
    for name in ("connect-src", "script-src", "img-src"):
        assert directives[name] == "'self' data: blob:"
    assert "http" not in CONTENT_SECURITY_POLICY


def test_refuses_other_hosts_and_files_outside_the_viewer(server: NetronServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/", headers={"Host": "evil.example:80"})
    assert connection.getresponse().status == 403
    connection.close()
    for path in ("/server.py", "/../../../etc/passwd", "/%2e%2e/server.py", "/__pycache__/x"):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("GET", path)
        assert connection.getresponse().status == 404, path
        connection.close()


def test_hostile_name_is_escaped_in_the_page() -> None:
    with start_netron(MODEL, '"><script>alert(1)</script>') as server:
        _, _, body = _get(server.url)
        page = body.decode("utf-8")
        assert "<script>alert(1)</script>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "/" not in server.file_name and server.file_name.endswith(".onnx")


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def test_stop_closes_the_port() -> None:
    server = start_netron(MODEL, "m.onnx")
    port = server.port
    assert not _refused(port)
    server.stop()
    assert not server.running
    assert _refused(port)
    server.stop()  # idempotent


def test_context_manager_stops() -> None:
    with start_netron(MODEL, "m.onnx") as server:
        port = server.port
    assert _refused(port)


def test_garbage_collected_server_stops() -> None:
    server = start_netron(MODEL, "m.onnx")
    port = server.port
    del server
    gc.collect()
    assert _refused(port)


def test_second_server_gets_another_port(server: NetronServer) -> None:
    with start_netron(b"other", "other.onnx") as second:
        assert second.port != server.port
        assert _get(second.model_url)[2] == b"other"
        assert _get(server.model_url)[2] == MODEL


def test_iframe_shows_the_viewer(server: NetronServer) -> None:
    frame = server.iframe(height=480)
    assert frame.src == server.url
    assert frame.height == 480
    assert frame.width == "100%"
