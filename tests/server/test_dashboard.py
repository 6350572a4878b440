"""The live page (issue 23, ``--dashboard``): a real in-process run's page loaded in headless Chromium while it runs
and after its last round shows the state, the rounds table and the plots, and the browser fetches the plots as PNGs;
everything from the files is escaped; nothing but the page, its plots and /metrics is served.

Runs the real ServerApp and ClientApp in this process (tests/server_harness.py) on the tiny BERT.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message
from server_harness import (
    InProcessGrid,
    run_server,
    server_run_config,
    server_scenario_file,
    task_identity,  # noqa: F401  (autouse: messages need Flower's task identity)
)

from server import dashboard, monitoring
from simulations.processes import free_port

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Dom(HTMLParser):
    """The parts of a page the tests look at: the rounds table's body rows, the images, the state line."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[str] = []
        self.ids: dict[str, str] = {}
        self._in: list[str] = []
        self._body = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(str(attributes.get("src")))
        if tag == "tbody":
            self._body = True
        if tag == "tr" and self._body:
            self.rows.append([])
        if attributes.get("id"):
            self._in.append(str(attributes["id"]))
            self.ids.setdefault(str(attributes["id"]), "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._body = False
        if tag in ("p", "ul", "table") and self._in:
            self._in.pop()

    def handle_data(self, data: str) -> None:
        if self._body and self.rows:
            self.rows[-1].append(data)
        for name in self._in:
            self.ids[name] += data


def browser_dom(url: str, profile: Path) -> str:
    """The DOM headless Chromium builds for ``url`` once the page (and its images) loaded."""
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
    command += ["--dump-dom", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    return result.stdout


class BrowsingGrid(InProcessGrid):
    """Loads the live page in Chromium as round 3 sends its messages (two rounds done)."""

    def __init__(self, port: int, profile: Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.url = f"http://127.0.0.1:{port}/"
        self.profile = profile
        self.pages: list[str] = []
        self.rounds = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.rounds += 1
        if self.rounds == 3:
            self.pages.append(browser_dom(self.url, self.profile))
        return super().push_messages(messages)


def need_chromium() -> None:
    """Skip without Chromium, except in CI (.ci/run installs it and sets FEDADAPT_REQUIRE_BROWSER=1): fail there."""
    if shutil.which("chromium") is None:
        if os.environ.get("FEDADAPT_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed: apt-get install chromium (Debian's package)")
        pytest.skip("needs Debian's chromium (.ci/run installs it)")


def test_the_live_page_renders_in_a_browser_during_and_after_a_run(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_chromium()
    port = free_port()
    scenario = server_scenario_file(tmp_path, tiny_bert, rounds=3)
    config = server_run_config(scenario, tmp_path / "run", **{"metrics-port": port, "dashboard": True})
    grid = BrowsingGrid(port, tmp_path / "profile", 3, config)
    served: list[tuple[str, str, str]] = []  # (path and query, status, content type) of every request
    call, stop = monitoring.MonitorApp.__call__, monitoring.MetricsServer.stop

    def recording(app: monitoring.MonitorApp, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]]) -> Any:
            path = environ["PATH_INFO"] + ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else "")
            served.append((path, status, dict(headers)["Content-Type"]))
            return start_response(status, headers)

        return call(app, environ, start)

    def last_page_then_stop(server: monitoring.MetricsServer) -> None:
        grid.pages.append(browser_dom(grid.url, grid.profile))
        stop(server)

    monkeypatch.setattr(monitoring.MonitorApp, "__call__", recording)
    monkeypatch.setattr(monitoring.MetricsServer, "stop", last_page_then_stop)
    metrics = run_server(grid)
    during, after = (Dom(page) for page in grid.pages)
    assert during.ids["state"].startswith("running, training in round 3")
    assert [row[0] for row in during.rows] == ["2", "1"]  # newest first
    assert during.rows[0][1] == f"{metrics['rounds'][1]['accuracy']:.4f}"
    assert during.images == ["accuracy.png?round=2", "bytes.png?round=2"]
    assert after.ids["state"].startswith("finished") and [row[0] for row in after.rows] == ["3", "2", "1"]
    assert after.images == ["accuracy.png?round=3", "bytes.png?round=3"]
    assert "no update rejected" in after.ids["rejections"]
    for image in [*during.images, *after.images]:  # the browser fetched every plot, and got a PNG
        assert (f"/{image}", "200 OK", "image/png") in served
    assert (tmp_path / "run" / "accuracy.png").read_bytes().startswith(PNG_SIGNATURE)


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def served_folder(folder: Path, dashboard_on: bool = True) -> tuple[monitoring.MetricsServer, str]:
    port = free_port()
    endpoint = monitoring.MetricsEndpoint(port=port, dashboard=dashboard_on)
    registry = monitoring.RunMetrics(monitoring.RunFacts("tiny", "none", 2)).registry
    server = monitoring.MetricsServer(endpoint, registry, folder)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def test_the_page_escapes_what_it_reads_and_serves_only_its_own_files(tmp_path: Path) -> None:
    hostile = "<script>alert(1)</script>"
    record = {"round": 1, "accuracy": 0.5, "accepted": 1, "clients": 2, "bytes_up": 1, "bytes_down": 2, "seconds": 1.0}
    record["rejected"] = [{"client": hostile, "reason": "client error: " + hostile}]
    metrics = {"scenario": {"name": hostile, "rounds": 2}, "privacy": hostile, "complete": True, "rounds": [record]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "accuracy.png").write_bytes(PNG_SIGNATURE + b"plot")
    (tmp_path / "secret.txt").write_text("not for the page")
    server, base = served_folder(tmp_path)
    try:
        status, content_type, body = get(base + "/")
        page = body.decode()
        assert status == 200 and content_type.startswith("text/html")
        assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "client_error: 1" in page and "alert(1)</" not in page  # reasons only as classes
        assert get(base + "/accuracy.png") == (200, "image/png", PNG_SIGNATURE + b"plot")
        for path in (
            "/secret.txt",
            "/metrics.json",
            "/status.json",
            "/../secret.txt",
            "/%2e%2e/secret.txt",
            "/bytes.png",
        ):
            assert get(base + path)[0] == 404, path
        assert get(base + "/metrics")[0] == 200
        request = urllib.request.Request(base + "/", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 405
    finally:
        server.stop()
    server, base = served_folder(tmp_path, dashboard_on=False)
    try:
        assert get(base + "/")[0] == get(base + "/accuracy.png")[0] == 404 and get(base + "/metrics")[0] == 200
    finally:
        server.stop()


def test_a_page_over_an_unreadable_run_says_so(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text("[" * 1000)
    page = dashboard.page(tmp_path)
    assert "cannot read the run" in page and "nested" in page
