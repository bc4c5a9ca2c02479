"""The HTML reports render in a real browser: headless Chromium lays out every chart with visible
marks, and a screenshot shows the model colours.

A copy of each report gets a small probe script (the reports themselves carry no JavaScript)
that measures each ``figure.chart`` after layout; ``--dump-dom`` returns the result. Chromium
is a test dependency: without it the test fails and names the Debian package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.cli import main as cli_main
from proxy.report_html import PALETTE

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

PROBE = """<script>
(function () {
  var out = [];
  document.querySelectorAll('figure.chart').forEach(function (fig) {
    var svg = fig.querySelector('svg');
    var r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    var marks = svg ? Array.prototype.slice.call(svg.querySelectorAll('rect.bar, rect.box, circle.point')) : [];
    var drawn = marks.filter(function (m) { var b = m.getBBox(); return b.width > 0 && b.height > 0; });
    out.push({chart: fig.getAttribute('data-chart'), kind: fig.getAttribute('data-kind'),
              width: r.width, height: r.height, marks: marks.length, drawn: drawn.length,
              fills: Array.from(new Set(drawn.map(function (m) { return m.getAttribute('fill'); })))});
  });
  var pre = document.createElement('pre');
  pre.id = 'gapwatch-probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"""


def chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        pytest.fail("headless Chromium is required for this test: apt-get install -y chromium")
    return path


def run_chromium(tmp: Path, *args: str) -> str:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def probe(tmp: Path, page: Path) -> list[dict[str, Any]]:
    probed = page.with_name(page.stem + "-probe.html")
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = run_chromium(tmp, "--dump-dom", "--virtual-time-budget=5000", "--window-size=1200,1800",
                       probed.as_uri())
    m = re.search(r'<pre id="gapwatch-probe">(.*?)</pre>', dom, re.S)
    assert m, "the probe did not run"
    import html

    return json.loads(html.unescape(m.group(1)))


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) to RGB pixels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and ctype in (2, 6) and interlace == 0
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    pixels: list[tuple[int, int, int]] = []
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        pixels += [tuple(line[x * bpp:x * bpp + 3]) for x in range(width)]  # type: ignore[misc]
        prev = line
    return width, height, pixels


def hex_rgb(c: str) -> tuple[int, int, int]:
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


def test_reports_render_with_charts_in_headless_chromium(sim, monkeypatch, tmp_path):
    chromium()
    monkeypatch.setenv("GAPWATCH_EVAL_UPSTREAM", f"{sim.url}/v1")
    eval_html, eval_json = tmp_path / "eval.html", tmp_path / "eval.json"
    state = tmp_path / "state.jsonl"
    assert cli_main(["eval", str(EXAMPLES / "support" / "suite.yaml"), "--config",
                     str(EXAMPLES / "eval-config.yaml"), "--model", "sim-grounded", "--model", "sim-ungrounded",
                     "--adversarial", "--concurrency", "8", "--repeats", "2", "--no-progress", "--resume", str(state),
                     "--html", str(eval_html), "--json", str(eval_json)]) == 0
    replay_html = tmp_path / "replay.html"
    # the eval's state file carries labels (``expected``) and two models: every replay chart
    assert cli_main(["replay", str(state), "--html", str(replay_html)]) == 0

    charts = {c["chart"]: c for c in probe(tmp_path, eval_html)}
    assert set(charts) == {"reliability", "paraphrase", "task-pass", "detector-rates", "transparency", "robustness",
                           "consistency", "latency", "tokens"}
    for c in charts.values():
        assert c["width"] > 300 and c["height"] > 40, c
        assert c["drawn"] == c["marks"] > 0, c
    # one colour per model, the same in every chart
    models = orjson.loads(eval_json.read_bytes())["models"]
    assert set(charts["task-pass"]["fills"]) == set(PALETTE[:len(models)])
    assert charts["latency"]["marks"] == len(models)

    rcharts = {c["chart"]: c for c in probe(tmp_path, replay_html)}
    assert {"detector-rates", "category-counts", "label-scores", "grounding-scores", "classifications",
            "live-agreement"} <= set(rcharts)
    for c in rcharts.values():
        assert c["width"] > 300 and c["drawn"] == c["marks"] > 0, c

    shot = tmp_path / "eval.png"
    run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1800", "--hide-scrollbars",
                 eval_html.as_uri())
    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 1800)
    counts = {c: sum(1 for p in pixels if p == hex_rgb(c)) for c in PALETTE[:2]}
    # both models' marks are on screen in their colours (the scorecard, the reliability diagram
    # and the first bar charts fill the first screens)
    assert all(n > 500 for n in counts.values()), counts
