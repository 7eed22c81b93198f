"""Headless Chromium with the network blocked: open an HTML file, see what it requested and logged.

A tiny DevTools-protocol client over ``--remote-debugging-pipe`` (JSON messages ending in NUL on
file descriptors 3 and 4), standard library and numpy only. A `Tab` records every request the
page makes, console errors and uncaught exceptions, runs JavaScript, moves the mouse, and takes
full-page screenshots as pixels.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """Headless Chromium driven through its DevTools pipe, network blocked; `events` collects (method, params).

    with Chromium() as browser:
        tab = browser.open(path)
        tab.wait_for("document.readyState === 'complete'")
        tab.requests, tab.errors, tab.screenshot()
    """

    def __enter__(self) -> "Chromium":
        self.profile = tempfile.TemporaryDirectory()
        self.events: list[tuple[str, dict]] = []
        self.next_id = 0
        self.buffer = b""
        commands_read, self.commands = os.pipe()
        self.replies, replies_write = os.pipe()
        # chromium reads commands on fd 3 and writes replies on fd 4: bash moves the pipe ends
        # there from numbers (>= 10) that cannot collide with 3 and 4
        child_ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_read, replies_write)]
        for fd in (commands_read, replies_write):
            os.close(fd)
        move = "3<&{0} 4>&{1} {0}<&- {1}>&-".format(*child_ends)
        flags = [
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={self.profile.name}",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--window-size=1280,900",
            "about:blank",
        ]
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" {move}', CHROMIUM, *flags],
            pass_fds=child_ends,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in child_ends:
            os.close(fd)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.replies)
        self.profile.cleanup()

    def open(self, path: Path) -> "Tab":
        """A new tab showing the file at `path`, recording its requests, console and log from the start."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        tab = Tab(self, self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            tab.send(f"{domain}.enable")
        self.events.clear()
        tab.send("Page.navigate", {"url": path.resolve().as_uri()})
        return tab

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 20.0) -> dict:
        """Send one command and return its result (events that arrive meanwhile go to `events`)."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self.events.append((reply["method"], reply.get("params", {})))

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            if not select.select([self.replies], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("no reply from chromium")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                raise OSError("chromium closed its DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)


@dataclass
class Tab:
    browser: Chromium
    session: str

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.browser.send(method, params, session=self.session)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-like values only)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0):
        """Poll `expression` until it is truthy and return its value (TimeoutError after `timeout` s)."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"still falsy after {timeout} s: {expression}")
            time.sleep(0.1)
        return value

    def move_mouse(self, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def screenshot(self) -> np.ndarray:
        """The whole page (not only the window) as pixels [height, width, channel] uint8."""
        width, height = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
        shot = self.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            },
        )
        return decode_png(base64.b64decode(shot["data"]))

    @property
    def requests(self) -> list[str]:
        """The URL of every request made since the tab opened (the page itself included)."""
        return [params["request"]["url"] for method, params in self._events() if method == "Network.requestWillBeSent"]

    @property
    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries since the tab opened."""
        found = []
        for method, params in self._events():
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                found.append(params["exceptionDetails"].get("exception", {}).get("description", "exception"))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found

    def _events(self) -> list[tuple[str, dict]]:
        self.evaluate("0")  # a round trip, so that events sent before now have arrived
        return self.browser.events


def decode_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB or RGBA PNG (what Chromium writes) as pixels [height, width, channel] uint8."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks, offset = {}, 8
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        kind = data[offset + 4 : offset + 8]
        chunks[kind] = chunks.get(kind, b"") + data[offset + 8 : offset + 8 + length]
        offset += 12 + length
    width, height = int.from_bytes(chunks[b"IHDR"][:4], "big"), int.from_bytes(chunks[b"IHDR"][4:8], "big")
    depth, colour, interlace = chunks[b"IHDR"][8], chunks[b"IHDR"][9], chunks[b"IHDR"][12]
    assert depth == 8 and colour in (2, 6) and interlace == 0, f"unsupported PNG: depth {depth}, colour type {colour}"
    channels = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + width * channels)
    pixels = np.zeros((height, width * channels), np.int32)
    above = np.zeros(width * channels, np.int32)
    for y in range(height):
        line = raw[y, 1:].astype(np.int32)
        match raw[y, 0]:
            case 0:
                row = line
            case 1:
                row = np.cumsum(line.reshape(width, channels), axis=0).reshape(-1) % 256
            case 2:
                row = (line + above) % 256
            case kind:
                row = _unfilter_sequential(kind, line, above, channels)
        pixels[y] = above = row
    return pixels.reshape(height, width, channels).astype(np.uint8)


def _unfilter_sequential(kind: int, line: np.ndarray, above: np.ndarray, channels: int) -> np.ndarray:
    """PNG filters 3 (average) and 4 (Paeth), which depend on the pixel just decoded."""
    row = [0] * len(line)
    line, above = line.tolist(), above.tolist()
    for i, value in enumerate(line):
        left = row[i - channels] if i >= channels else 0
        upper_left = above[i - channels] if i >= channels else 0
        if kind == 3:
            row[i] = (value + (left + above[i]) // 2) % 256
        else:
            guess = left + above[i] - upper_left
            distances = abs(guess - left), abs(guess - above[i]), abs(guess - upper_left)
            nearest = (left, above[i], upper_left)[distances.index(min(distances))]
            row[i] = (value + nearest) % 256
    return np.array(row, np.int32)
