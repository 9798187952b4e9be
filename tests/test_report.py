"""The HTML report: self-contained, and working in a real headless browser; PNG images."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from avel.inference import Localization, merge_spans
from avel.viz.images import encode_png, write_png
from avel.viz.report import ReportEntry, render_report, write_report

from _support.png import decode_png, read_png

CHROMIUM = Path("/usr/bin/chromium")
NAMES = ["Bell", "Bird", "background"]
FACTS = {"model": "av_att", "task": "supervised", "checkpoint": "/runs/demo",
         "feature_spec": {"audio": {"backbone": "logmel", "dim": 128, "grid": [], "weights": "none"},
                          "visual": {"backbone": "efficientnet-lite0", "dim": 1280, "grid": [4, 4],
                                     "weights": "imagenet-lite0-wheel", "frames_per_segment": 16}}}


def _result(T: int = 8, seed: int = 0, name: str = "clip.mp4") -> Localization:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(T, 3)) * 2
    logits[2:5, 0] += 4
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    att = rng.uniform(size=(T, 4, 4))
    att /= att.sum((1, 2), keepdims=True)
    return Localization(name, T, NAMES, probs.astype(np.float32), [NAMES[c] for c in probs.argmax(1)],
                        merge_spans(probs, NAMES), att.astype(np.float32), {"padded_audio": True}, float(T))


def _frames(T: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:48, 0:64]
    base = np.stack([x * 4, y * 5, (x + y) * 2], -1)
    return np.stack([np.clip(base + rng.integers(0, 40, (48, 64, 3)), 0, 255) for _ in range(T)]).astype(np.uint8)


def _entries():
    return [ReportEntry(_result(8, 0, "a.mp4"), truth=[2, 2, 0, 0, 0, 2, 2, 2], frames=_frames(8)),
            ReportEntry(_result(3, 1, "b.mp4"), frames=None)]


# ---------------------------------------------------------------------------------------------- PNG

@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png_roundtrip(channels, tmp_path):
    rng = np.random.default_rng(channels)
    img = rng.integers(0, 256, (9, 11, channels), dtype=np.uint8)
    data = encode_png(img)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(decode_png(data), img)
    assert np.array_equal(read_png(write_png(tmp_path / "x.png", img)), img)
    if channels == 1:
        assert np.array_equal(decode_png(encode_png(img[:, :, 0])), img)     # [H, W] is grey too


def test_png_rejects_garbage():
    with pytest.raises(ValueError):
        decode_png(b"GIF89a....")
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 5), np.uint8))


# ---------------------------------------------------------------------------------------------- HTML

def test_report_is_self_contained(tmp_path):
    html = render_report(_entries(), facts=FACTS, summary={"test segment accuracy": "0.875"},
                         failures=[{"video": "bad.mp4", "error": "bad.mp4: file not found"}])
    # No external resource of any kind.
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:|#)""", html)
    assert "<link" not in html and "@import" not in html and "url(" not in html
    assert "http://" not in html and "https://" not in html
    # Timeline cells: 8 + 8 (prediction + truth) for a.mp4, 3 for b.mp4.
    assert html.count('class="timeline"') == 2
    assert len(re.findall(r'<rect class="cell', html)) == 8 + 8 + 3
    assert html.count('class="probs"') == 2
    assert html.count("data:image/png;base64,") == 8
    for fact in ("av_att", "supervised", "efficientnet-lite0", "/runs/demo", "avel version", "logmel"):
        assert fact in html
    assert "bad.mp4: file not found" in html and "ground truth" in html and "0.875" in html
    path = write_report(tmp_path / "r.html", _entries(), facts=FACTS)
    assert path.read_text().startswith("<!DOCTYPE html>")


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line]


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs headless chromium at /usr/bin/chromium "
                                                  "(apt-get install -y chromium)")
def test_report_in_headless_browser(tmp_path):
    path = write_report(tmp_path / "report.html", _entries(), facts=FACTS,
                        summary={"test segment accuracy": "0.875"})
    url = path.resolve().as_uri()

    dom = _chromium(["--dump-dom", url], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert _console_lines(dom.stderr) == [], _console_lines(dom.stderr)
    # The page's script ran to the end without console errors or uncaught exceptions.
    assert re.search(r'<html[^>]*data-status="ok"', html), html[:300]
    assert re.search(r'<div id="avel-errors"></div>', html)
    assert "2 video(s), 8 overlay image(s)" in html          # written by the page's JS
    assert len(re.findall(r'<svg class="timeline"', html)) == 2
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) == 8

    shot = tmp_path / "shot.png"
    res = _chromium(["--screenshot=" + str(shot), "--window-size=1200,1600", url], tmp_path / "profile-shot")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert _console_lines(res.stderr) == [], _console_lines(res.stderr)
    img = read_png(shot)
    assert img.shape[:2] == (1600, 1200)
    rgb = img[..., :3].astype(np.float64)
    assert rgb.std() > 20                                   # not a blank page
    assert len(np.unique(rgb.reshape(-1, 3)[::97], axis=0)) > 50   # text, plots and images, not a few flat colours


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs headless chromium at /usr/bin/chromium")
def test_browser_check_catches_errors(tmp_path):
    """The checks above would see a broken page: the status stays 'error' and the error is recorded."""
    html = render_report(_entries()[1:], facts=FACTS).replace("</body>", "<script>console.error('boom')</script></body>")
    page = tmp_path / "broken.html"
    page.write_text(html)
    dom = _chromium(["--dump-dom", page.resolve().as_uri()], tmp_path / "profile")
    assert any("boom" in line for line in _console_lines(dom.stderr))
    assert "boom" in dom.stdout.split('id="avel-errors"', 1)[1][:200]

