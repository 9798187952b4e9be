"""One self-contained HTML report of localization results.

Everything is inline: CSS, a little JavaScript, SVG plots, and the attention overlays as
``data:image/png;base64`` URIs. No external resource is referenced, so the file opens offline and
can be mailed around. Per video: the event timeline (prediction, and ground truth when known), the
class probabilities over time (SVG lines), the attention overlay of every second, the event spans.
At the top: the model and feature facts (model, task, feature spec, checkpoint, avel version).

The page's script records ``console.error`` calls and uncaught errors in ``#avel-errors`` and sets
``data-status="ok"`` on ``<html>`` once it ran without any (``"error"`` otherwise), so a headless
browser run can check that the page works.
"""
from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._version import __version__
from ..io import atomic_write
from .attention import PALETTE, class_colour, fit, overlays
from .images import encode_png

TILE_SIDE = 176      # attention tiles are scaled down to this longer side in the report


@dataclass
class ReportEntry:
    """One video of the report: its :class:`~avel.inference.Localization`, optionally the ground truth
    per second (class indices or names) and the middle frame of each second (uint8 [T, H, W, 3])."""

    result: object
    truth: Sequence | None = None
    frames: np.ndarray | None = None
    title: str | None = None


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _hex(rgb) -> str:
    r, g, b = (int(v) for v in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def _png_uri(img: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(img)).decode("ascii")


def _truth_indices(truth, class_names: list[str], T: int) -> np.ndarray | None:
    if truth is None:
        return None
    idx = {n: i for i, n in enumerate(class_names)}
    out = []
    for v in list(truth)[:T]:
        if isinstance(v, str):
            if v not in idx:
                raise ValueError(f"ground-truth class {v!r} is not one of the model's classes")
            out.append(idx[v])
        else:
            out.append(int(v))
    return np.asarray(out, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- SVG

def timeline_svg(classes: np.ndarray, probs: np.ndarray, class_names: list[str], *, truth: np.ndarray | None,
                 vid: int) -> str:
    """Rows of one coloured cell per second: prediction (and ground truth), with tick labels."""
    T = len(classes)
    bg = len(class_names) - 1
    left, cell, row_h, gap = 92, max(14.0, min(60.0, 860.0 / max(T, 1))), 26, 6
    rows = [("prediction", classes)] + ([("ground truth", truth)] if truth is not None else [])
    width = left + cell * T + 10
    height = len(rows) * (row_h + gap) + 22
    parts = [f'<svg class="timeline" id="timeline-{vid}" viewBox="0 0 {width:.0f} {height}" width="{width:.0f}" '
             f'height="{height}" role="img" aria-label="event timeline">']
    for r, (name, seq) in enumerate(rows):
        y = r * (row_h + gap)
        parts.append(f'<text x="{left - 8}" y="{y + row_h * 0.68:.1f}" text-anchor="end" class="rowlabel">{_e(name)}</text>')
        for t in range(T):
            c = int(seq[t])
            x = left + t * cell
            tip = f"{t}-{t + 1} s: {class_names[c]}"
            if name == "prediction":
                tip += f" ({probs[t, c]:.2f})"
            elif classes[t] != c:
                tip += " (missed)"
            cls = "cell bg" if c == bg else "cell"
            parts.append(f'<rect class="{cls}" data-video="{vid}" data-second="{t}" data-row="{_e(name)}" '
                         f'x="{x:.1f}" y="{y}" width="{cell - 1:.1f}" height="{row_h}" '
                         f'fill="{_hex(class_colour(c, bg))}"><title>{_e(tip)}</title></rect>')
        # Span labels over runs wide enough to hold them.
        t = 0
        while t < T:
            u = t
            while u < T and int(seq[u]) == int(seq[t]):
                u += 1
            c = int(seq[t])
            label = class_names[c]
            if c != bg and (u - t) * cell >= 7 * min(len(label), 14):
                parts.append(f'<text x="{left + (t + u) / 2 * cell:.1f}" y="{y + row_h * 0.68:.1f}" '
                             f'text-anchor="middle" class="spanlabel">{_e(label[:14])}</text>')
            t = u
    y = len(rows) * (row_h + gap) + 12
    step = 1 if T <= 20 else 5 if T <= 100 else 10
    for t in range(0, T + 1, step):
        parts.append(f'<text x="{left + t * cell:.1f}" y="{y}" text-anchor="middle" class="tick">{t}</text>')
    parts.append("</svg>")
    return "".join(parts)


def probs_svg(probs: np.ndarray, class_names: list[str], *, vid: int) -> str:
    """Probability of every class over time: one polyline per class (background dashed)."""
    T, C = probs.shape
    bg = C - 1
    left, right, top, bottom = 40, 12, 10, 26
    w_plot = max(200.0, min(860.0, 60.0 * T))
    h_plot = 170.0
    width, height = left + w_plot + right, top + h_plot + bottom

    def X(t):
        return left + (t + 0.5) / T * w_plot

    def Y(p):
        return top + (1 - p) * h_plot

    parts = [f'<svg class="probs" id="probs-{vid}" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" '
             f'height="{height:.0f}" role="img" aria-label="class probabilities over time">']
    for p in (0.0, 0.5, 1.0):
        parts.append(f'<line x1="{left}" x2="{left + w_plot:.1f}" y1="{Y(p):.1f}" y2="{Y(p):.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{Y(p) + 4:.1f}" text-anchor="end" class="tick">{p:g}</text>')
    step = 1 if T <= 20 else 5 if T <= 100 else 10
    for t in range(0, T + 1, step):
        x = left + t / T * w_plot
        parts.append(f'<text x="{x:.1f}" y="{top + h_plot + 16:.1f}" text-anchor="middle" class="tick">{t}</text>')
    order = [c for c in range(C) if c != bg] + [bg]
    for c in order:
        if c != bg and probs[:, c].max() < 0.02:
            continue      # classes that never rise above 2 % only clutter the plot
        pts = " ".join(f"{X(t):.1f},{Y(float(probs[t, c])):.1f}" for t in range(T))
        dash = ' stroke-dasharray="5 4"' if c == bg else ""
        colour = _hex(class_colour(c, bg) if c != bg else (120, 120, 120))
        if T == 1:
            parts.append(f'<circle class="series" data-class="{c}" cx="{X(0):.1f}" cy="{Y(float(probs[0, c])):.1f}" '
                         f'r="4" fill="{colour}"><title>{_e(class_names[c])}</title></circle>')
        else:
            parts.append(f'<polyline class="series" data-class="{c}" points="{pts}" fill="none" stroke="{colour}" '
                         f'stroke-width="2"{dash}><title>{_e(class_names[c])}</title></polyline>')
    parts.append("</svg>")
    return "".join(parts)


def legend_html(class_names: list[str], used: set[int], *, vid: int) -> str:
    bg = len(class_names) - 1
    items = []
    for c in sorted(used):
        items.append(f'<button type="button" class="legend-item" data-video="{vid}" data-class="{c}">'
                     f'<span class="swatch" style="background:{_hex(class_colour(c, bg))}"></span>'
                     f'{_e(class_names[c])}</button>')
    return f'<div class="legend" title="click a class to hide or show its probability line">{"".join(items)}</div>'


# ---------------------------------------------------------------------------------------------- page

_CSS = """
:root{--fg:#1d232b;--muted:#5d6b7a;--line:#dde3ea;--accent:#1f6fb2}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;color:var(--fg);
 margin:0;background:#f6f8fa}
header{background:#1d232b;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px}
header .sub{color:#b9c4cf;font-size:13px}
main{padding:16px 24px;max-width:1200px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 18px;margin:0 0 16px}
h2{font-size:16px;margin:0 0 8px}
h3{font-size:14px;margin:14px 0 6px;color:var(--muted)}
table{border-collapse:collapse}
td,th{padding:3px 10px 3px 0;text-align:left;vertical-align:top}
th{color:var(--muted);font-weight:600;white-space:nowrap}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f0f3f6;padding:1px 4px;border-radius:3px}
svg text{font:11px system-ui,sans-serif;fill:var(--fg)}
svg .tick{fill:var(--muted)}
svg .rowlabel{font-weight:600}
svg .spanlabel{fill:#fff;font-weight:600;pointer-events:none}
svg .grid{stroke:var(--line);stroke-width:1}
svg .cell{cursor:pointer}
svg .cell.sel{stroke:#000;stroke-width:2}
.series.hidden{display:none}
.legend{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0}
.legend-item{border:1px solid var(--line);background:#fff;border-radius:12px;padding:1px 9px 1px 5px;font:12px system-ui,sans-serif;cursor:pointer}
.legend-item.off{opacity:.4}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.tiles{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;border:1px solid var(--line);border-radius:6px;overflow:hidden;background:#fff}
figure img{display:block;image-rendering:auto}
figure.sel{outline:3px solid var(--accent)}
figcaption{font-size:12px;padding:3px 6px;border-top:5px solid #ccc}
figcaption .wrong{color:#b3261e;font-weight:600}
.kpi{display:flex;gap:24px;flex-wrap:wrap}
.kpi div{min-width:140px}
.kpi b{display:block;font-size:22px}
.fail{color:#b3261e}
#avel-errors{display:none;color:#b3261e;white-space:pre-wrap}
#avel-errors:not(:empty){display:block}
.spans td{padding-right:16px}
"""

# Runs first: record console.error and uncaught errors in #avel-errors.
_JS_HEAD = """
(function(){
  var errors = [];
  window.__avelErrors = errors;
  function show(){ var n = document.getElementById('avel-errors'); if (n) n.textContent = errors.join('\\n'); }
  var orig = console.error;
  console.error = function(){ errors.push(Array.prototype.map.call(arguments, String).join(' ')); show();
    return orig.apply(console, arguments); };
  window.addEventListener('error', function(e){ errors.push('uncaught: ' + (e.message || e)); show();
    document.documentElement.setAttribute('data-status', 'error'); });
})();
"""

# Runs last: interactions (click a timeline cell -> its overlay; legend toggles lines), then the status.
_JS_BODY = """
(function(){
  function all(sel, root){ return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }
  function select(v, s){
    all('.cell.sel, figure.sel').forEach(function(n){ n.classList.remove('sel'); });
    all('.cell[data-video="' + v + '"][data-second="' + s + '"]').forEach(function(n){ n.classList.add('sel'); });
    var fig = document.getElementById('tile-' + v + '-' + s);
    if (fig) { fig.classList.add('sel'); fig.scrollIntoView({block: 'nearest'}); }
  }
  all('.cell').forEach(function(n){
    n.addEventListener('click', function(){ select(n.getAttribute('data-video'), n.getAttribute('data-second')); });
  });
  all('figure[data-second]').forEach(function(f){
    f.addEventListener('mouseenter', function(){ select(f.getAttribute('data-video'), f.getAttribute('data-second')); });
  });
  all('.legend-item').forEach(function(b){
    b.addEventListener('click', function(){
      var v = b.getAttribute('data-video'), c = b.getAttribute('data-class');
      b.classList.toggle('off');
      all('#probs-' + v + ' .series[data-class="' + c + '"]').forEach(function(s){ s.classList.toggle('hidden'); });
    });
  });
  var videos = all('section.video').length, images = all('figure img').length;
  document.getElementById('avel-stats').textContent = videos + ' video(s), ' + images + ' overlay image(s)';
  if (!window.__avelErrors.length) document.documentElement.setAttribute('data-status', 'ok');
  else document.documentElement.setAttribute('data-status', 'error');
})();
"""


def _facts_html(facts: dict) -> str:
    rows = []

    def row(k, v):
        if v is not None and v != "" and v != {}:
            rows.append(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>")

    row("model", f"<code>{_e(facts.get('model'))}</code>")
    row("task", _e(facts.get("task", "")))
    if facts.get("model_kwargs"):
        row("model arguments", ", ".join(f"{_e(k)}={_e(v)}" for k, v in facts["model_kwargs"].items()))
    spec = facts.get("feature_spec")
    if spec:
        for name in ("audio", "visual"):
            s = spec.get(name, {})
            bits = [f"<code>{_e(s.get('backbone'))}</code>", f"dim {_e(s.get('dim'))}"]
            if s.get("grid"):
                bits.append("grid " + "&times;".join(_e(g) for g in s["grid"]))
            if s.get("weights"):
                bits.append(f"weights {_e(s['weights'])}")
            if s.get("frames_per_segment", 1) > 1:
                bits.append(f"{_e(s['frames_per_segment'])} frames/s averaged")
            if s.get("sample_rate"):
                bits.append(f"{_e(s['sample_rate'])} Hz")
            if s.get("preprocessing"):
                bits.append(f"preprocessing {_e(s['preprocessing'])}")
            row(f"{name} features", ", ".join(bits))
    else:
        row("features", "no feature spec recorded")
    if facts.get("checkpoint"):
        row("checkpoint", f"<code>{_e(facts['checkpoint'])}</code>")
    row("avel version", _e(facts.get("avel_version", "")) + (
        f" (checkpoint written by {_e(facts['checkpoint_avel_version'])})" if facts.get("checkpoint_avel_version") else ""))
    if facts.get("epoch"):
        row("best epoch", _e(facts["epoch"]))
    vm = facts.get("val_metrics") or {}
    if "accuracy" in vm:
        row("validation segment accuracy", f"{float(vm['accuracy']):.4f}")
    classes = facts.get("classes")
    if classes:
        row("classes", ", ".join(_e(c) for c in classes))
    for k, v in (facts.get("extra") or {}).items():
        row(k, _e(v))
    return f"<table class='facts'>{''.join(rows)}</table>"


def _video_html(entry: ReportEntry, vid: int) -> str:
    r = entry.result
    names = list(r.class_names)
    bg = len(names) - 1
    classes = np.asarray(r.classes)
    probs = np.asarray(r.probs)
    truth = _truth_indices(entry.truth, names, r.seconds)
    title = entry.title or Path(str(r.video)).name
    out = [f'<section class="video" id="video-{vid}"><h2>{_e(title)}</h2>']
    meta = [f"{r.seconds} s"]
    if getattr(r, "duration", None):
        meta.append(f"file duration {r.duration:.2f} s")
    if truth is not None and len(truth) == len(classes):
        acc = float((truth == classes).mean())
        meta.append(f"segment accuracy <b>{acc:.2f}</b> ({int((truth == classes).sum())}/{len(classes)})")
    if r.flags:
        meta.append("flags: " + ", ".join(_e(k) if v is True else f"{_e(k)}={_e(v)}" for k, v in r.flags.items()))
    out.append(f'<div class="meta">{" &middot; ".join(meta)} &middot; <code>{_e(r.video)}</code></div>')
    out.append("<h3>Event timeline</h3>")
    out.append(timeline_svg(classes, probs, names, truth=truth, vid=vid))
    used = set(int(c) for c in classes) | (set(int(c) for c in truth) if truth is not None else set())
    used |= {c for c in range(len(names)) if probs[:, c].max() >= 0.02}
    out.append(legend_html(names, used, vid=vid))
    if r.spans:
        rows = "".join(f"<tr><td>{s.start}&ndash;{s.end} s</td><td>{_e(s.label)}</td><td>{s.score:.2f}</td></tr>"
                       for s in r.spans)
        out.append(f'<table class="spans"><tr><th>span</th><th>class</th><th>score</th></tr>{rows}</table>')
    else:
        out.append("<p>No event: every second is background.</p>")
    out.append("<h3>Class probabilities over time</h3>")
    out.append(probs_svg(probs, names, vid=vid))
    if entry.frames is not None and r.attention is not None:
        out.append("<h3>Audio-guided attention, middle frame of each second</h3><div class='tiles'>")
        frames = np.stack([fit(f, TILE_SIDE) for f in np.asarray(entry.frames)[: r.seconds]])
        imgs = overlays(frames, np.asarray(r.attention)[: len(frames)])
        for t, img in enumerate(imgs):
            c = int(classes[t])
            cap = f"{t} s &middot; {_e(names[c])} {probs[t, c]:.2f}"
            if truth is not None and t < len(truth) and int(truth[t]) != c:
                cap += f' <span class="wrong">(truth: {_e(names[int(truth[t])])})</span>'
            out.append(f'<figure id="tile-{vid}-{t}" data-video="{vid}" data-second="{t}" '
                       f'style="width:{img.shape[1] + 2}px">'
                       f'<img alt="attention overlay, second {t}" width="{img.shape[1]}" height="{img.shape[0]}" '
                       f'src="{_png_uri(img)}"><figcaption style="border-top-color:{_hex(class_colour(c, bg))}">'
                       f'{cap}</figcaption></figure>')
        out.append("</div>")
    elif r.attention is None:
        out.append("<p class='note'>This model has no attention maps to show.</p>")
    out.append("</section>")
    return "".join(out)


def render_report(entries: Sequence[ReportEntry], *, facts: dict, title: str = "avel localization report",
                  summary: dict | None = None, failures: Sequence[dict] = ()) -> str:
    """The HTML text of the report (see the module docstring)."""
    facts = {"avel_version": __version__, **facts}
    body = [f"<header><h1>{_e(title)}</h1><div class='sub'>avel {_e(facts['avel_version'])} &middot; "
            f"<span id='avel-stats'></span></div></header><main>", '<div id="avel-errors"></div>']
    if summary:
        kpis = "".join(f"<div><b>{_e(v)}</b>{_e(k)}</div>" for k, v in summary.items())
        body.append(f"<section><h2>Summary</h2><div class='kpi'>{kpis}</div></section>")
    body.append(f"<section><h2>Model and features</h2>{_facts_html(facts)}</section>")
    if failures:
        items = "".join(f"<li><code>{_e(f.get('video'))}</code>: {_e(f.get('error'))}</li>" for f in failures)
        body.append(f"<section class='fail'><h2>Videos that could not be localized</h2><ul>{items}</ul></section>")
    for i, entry in enumerate(entries):
        body.append(_video_html(entry, i))
    body.append("</main>")
    return ("<!DOCTYPE html>\n<html lang='en' data-status='loading'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{_CSS}</style><script>{_JS_HEAD}</script></head><body>"
            + "".join(body)
            + f"<script>{_JS_BODY}</script></body></html>\n")


def write_report(path: str | Path, entries: Sequence[ReportEntry], *, facts: dict,
                 title: str = "avel localization report", summary: dict | None = None,
                 failures: Sequence[dict] = ()) -> Path:
    """Write the report to ``path`` (atomically) and return it."""
    path = Path(path)
    atomic_write(path, render_report(entries, facts=facts, title=title, summary=summary, failures=failures))
    return path


__all__ = ["ReportEntry", "render_report", "write_report", "timeline_svg", "probs_svg", "PALETTE"]
