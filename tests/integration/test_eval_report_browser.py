"""report.html in real headless Chromium: no console errors, no network requests, and it renders.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: fd 3 in, fd 4 out,
NUL-separated JSON), so no extra package is needed. Only the page's own events are watched; the browser's
background traffic is not the page's doing and is switched off by flags anyway. Skipped without Chromium.

Also a script: ``python tests/integration/test_eval_report_browser.py REPORT.html SHOT.png`` checks a report
and writes a full-page screenshot (how docs/ got its picture).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-extensions", "--disable-default-apps", "--mute-audio",
    "--remote-debugging-pipe",
]


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class DevTools:
    """A minimal DevTools-protocol client over the two pipes Chromium opens with --remote-debugging-pipe."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_fds() -> None:
            # Child side: CDP reads fd 3 and writes fd 4. Move both ends out of the way first (either may be
            # 3 or 4 already); dup2's copies are inheritable, everything else Python opened closes on exec.
            read_end, write_end = (fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (to_chrome_r, from_chrome_w))
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            close_fds=False, preexec_fn=wire_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.time() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next_id += 1
        request = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            request["sessionId"] = session
        os.write(self._to_chrome, json.dumps(request).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            message = self._read_message(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            message = self._read_message(deadline)
            self.events.append(message)
            if message.get("method") == method:
                return message

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def inspect_page(binary: str, page: Path, screenshot: Path | None = None, width: int = 1280) -> dict:
    """Open ``page``; return its console errors, exceptions, requests, and (optionally) a full-page PNG."""
    with tempfile.TemporaryDirectory() as profile:
        tools = DevTools(binary, Path(profile))
        try:
            target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                tools.send(f"{domain}.enable", session=session)
            tools.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session)
            tools.events.clear()
            tools.send("Page.navigate", {"url": page.resolve().as_uri()}, session)
            tools.wait_for("Page.loadEventFired")
            time.sleep(0.5)  # late console messages or requests, if any
            tools.send("Runtime.evaluate", {"expression": "1"}, session)  # flush pending events
            if screenshot is not None:
                size = tools.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
                shot = tools.send(
                    "Page.captureScreenshot",
                    {"format": "png", "captureBeyondViewport": True,
                     "clip": {"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1}},
                    session,
                )
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            title = tools.send("Runtime.evaluate", {"expression": "document.title"}, session)["result"]["value"]
            images = tools.send(
                "Runtime.evaluate",
                {"expression": "Array.from(document.images).map(i => i.naturalWidth > 0 && i.complete).join(',')"}, session,
            )["result"]["value"]
        finally:
            tools.close()
    page_events = [e for e in tools.events if e.get("sessionId") == session]
    console_errors = [
        e["params"] for e in page_events
        if (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert", "warning"))
        or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] in ("error", "warning"))
        or e["method"] == "Runtime.exceptionThrown"
    ]
    requests = [e["params"]["request"]["url"] for e in page_events if e["method"] == "Network.requestWillBeSent"]
    return {
        "title": title,
        "console_errors": console_errors,
        "requests": requests,
        "external_requests": [u for u in requests if not u.startswith(("file:", "data:"))],
        "images_loaded": [flag == "true" for flag in images.split(",")] if images else [],
    }


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = find_chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return binary


def test_inspector_catches_errors_and_requests(tmp_path, chromium):
    """The check itself works: a page that logs an error and fetches from the network is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><title>bad</title><img src="http://127.0.0.1:9/x.png"><script>console.error("boom")</script>')
    seen = inspect_page(chromium, bad)
    assert any("boom" in json.dumps(e) for e in seen["console_errors"])
    assert "http://127.0.0.1:9/x.png" in seen["external_requests"]


def test_report_opens_cleanly(tmp_path, chromium, tiny_config):
    from tuneloop import evaluate, train

    config = tiny_config(bootstrap_samples=100, regression_max_new_tokens=6)
    train.run(config)
    result = evaluate.run(config)
    shot = tmp_path / "report.png"
    seen = inspect_page(chromium, result.report_path, shot)
    assert seen["title"].startswith("tuneloop evaluation")
    assert seen["console_errors"] == []
    assert seen["external_requests"] == []
    # the page itself and its embedded images, nothing else
    assert [u for u in seen["requests"] if not u.startswith("data:")] == [result.report_path.resolve().as_uri()]
    assert len(seen["images_loaded"]) >= 3 and all(seen["images_loaded"])  # headline, loss, confusion at least
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


if __name__ == "__main__":
    report, target = Path(sys.argv[1]), Path(sys.argv[2])
    binary = find_chromium()
    if binary is None:
        sys.exit("Chromium is not installed")
    found = inspect_page(binary, report, target)
    print(json.dumps({k: v for k, v in found.items() if k != "requests"}, indent=1))
    sys.exit(1 if found["console_errors"] or found["external_requests"] else 0)
