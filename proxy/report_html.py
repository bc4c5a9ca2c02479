"""Self-contained HTML reports: inline CSS and inline SVG charts, no JavaScript, no fetches.

Why hand-written SVG: a report is an artifact people mail around and open years later; it must
render from the file alone, offline, in any browser, and diff as text. The charts are the few
kinds the replay and eval reports need to compare models at a glance: grouped horizontal bars
(rates per detector, per model), histograms (score distributions), box plots (latency) and
reliability diagrams (calibration: accuracy against confidence).

Every chart is ``<figure class="chart" data-chart=ID data-kind=KIND>`` with an ``<svg>`` whose
marks are ``<rect class="bar|box">`` carrying ``data-series``/``data-label``/``data-value`` and a
``<title>`` tooltip, so tests and people can find them. All text is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PALETTE = ("#2f6fb0", "#d9822b", "#3a9b5a", "#c23b3b", "#7a5bb5", "#8c6d3f", "#d16fae", "#6b7b8c")
WIDTH = 760
LABEL_W = 230
ROW_H = 16

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;
color:#1d232a;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde3ea;
padding-bottom:4px}.sub{color:#5b6875;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}.card{border:1px solid #dde3ea;border-radius:6px;
padding:8px 14px;min-width:110px}.card b{display:block;font-size:20px}.card span{color:#5b6875;font-size:12px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border-bottom:1px solid #e7ebf0;
padding:4px 10px;text-align:left;vertical-align:top}th{background:#f5f7f9}td.n{text-align:right;
font-variant-numeric:tabular-nums}figure.chart{margin:10px 0 18px}figcaption{font-weight:600;margin-bottom:4px}
.legend{display:flex;flex-wrap:wrap;gap:14px;font-size:12px;margin:2px 0 6px}.legend i{display:inline-block;
width:11px;height:11px;margin-right:5px;vertical-align:-1px;border-radius:2px}
svg text{font:11px system-ui,sans-serif;fill:#1d232a}svg .axis{stroke:#c7d0d9}svg .grid{stroke:#eef1f4}
.note{color:#5b6875;font-size:12px}.bad{color:#b3261e}.good{color:#1e7b34}
td.good{font-weight:600}tr:target{background:#fff6d6}svg .diag{stroke:#9aa6b2;stroke-dasharray:4 3}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def page(title: str, subtitle: str, parts: Sequence[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><p class=\"sub\">{esc(subtitle)}</p>"
            + "\n".join(parts) + "</body></html>\n")


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{esc(title)}</h2>" + "".join(parts) + "</section>"


def cards(items: Sequence[tuple[str, str]]) -> str:
    return "<div class=\"cards\">" + "".join(
        f"<div class=\"card\"><b>{esc(v)}</b><span>{esc(k)}</span></div>" for k, v in items) + "</div>"


def note(text: str) -> str:
    return f"<p class=\"note\">{esc(text)}</p>"


@dataclass(frozen=True)
class Marked:
    """A table cell with a CSS class (``good``, ``bad``) and an optional tooltip."""

    text: str
    cls: str
    title: str = ""


@dataclass(frozen=True)
class Linked:
    """A table cell: text, then links (label, in-page anchor) after it."""

    text: str
    links: tuple[tuple[str, str], ...]


def _cell(v: Any) -> str:
    if isinstance(v, Marked):
        title = f" title=\"{esc(v.title)}\"" if v.title else ""
        return f"<td class=\"{esc(v.cls)}\"{title}>{esc(v.text)}</td>"
    if isinstance(v, Linked):
        links = " ".join(f"<a href=\"#{esc(href)}\">{esc(label)}</a>" for label, href in v.links)
        return f"<td>{esc(v.text)}{' ' + links if links else ''}</td>"
    numeric = isinstance(v, int | float) and not isinstance(v, bool)
    return f"<td class=\"n\">{esc(v)}</td>" if numeric else f"<td>{esc(v)}</td>"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], row_ids: Sequence[str] | None = None,
          table_id: str | None = None) -> str:
    """Cells are escaped text, or ``Marked`` / ``Linked``; ``row_ids`` make rows link targets."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    ids = list(row_ids or [])
    body = "".join((f"<tr id=\"{esc(ids[i])}\">" if i < len(ids) else "<tr>") + "".join(_cell(v) for v in r)
                   + "</tr>" for i, r in enumerate(rows))
    tid = f" id=\"{esc(table_id)}\"" if table_id else ""
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def legend(names: Sequence[str]) -> str:
    if len(names) < 2:
        return ""
    return "<div class=\"legend\">" + "".join(
        f"<span><i style=\"background:{color(i)}\"></i>{esc(n)}</span>" for i, n in enumerate(names)) + "</div>"


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return m * exp
    return 10 * exp


def _fmt(v: float, unit: str) -> str:
    if unit == "%":
        return f"{100 * v:.1f}%"
    if abs(v) >= 100 or float(v).is_integer():
        return f"{v:,.0f}{unit}"
    return f"{v:.2f}{unit}"


def bar_chart(chart_id: str, caption: str, labels: Sequence[str], series: Mapping[str, Sequence[float | None]],
              unit: str = "%", max_value: float | None = None) -> str:
    """Grouped horizontal bars: one group per label, one bar per series (e.g. per model).
    ``unit="%"`` means values are fractions of 1 and the axis runs 0..100%."""
    names = list(series)
    n = max(1, len(names))
    group_h = n * ROW_H + 10
    plot_w = WIDTH - LABEL_W - 70
    top = 18
    height = top + len(labels) * group_h + 10
    values = [v for vs in series.values() for v in vs if v is not None]
    vmax = max_value if max_value is not None else (1.0 if unit == "%" else _nice_max(max(values, default=0.0)))
    out = [f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" "
           f"viewBox=\"0 0 {WIDTH} {height}\" role=\"img\" aria-label=\"{esc(caption)}\">"]
    for t in range(5):
        x = LABEL_W + plot_w * t / 4
        out.append(f"<line class=\"grid\" x1=\"{x:.1f}\" y1=\"{top - 4}\" x2=\"{x:.1f}\" y2=\"{height - 8}\"/>")
        out.append(f"<text x=\"{x:.1f}\" y=\"12\" text-anchor=\"middle\">{esc(_fmt(vmax * t / 4, unit))}</text>")
    out.append(f"<line class=\"axis\" x1=\"{LABEL_W}\" y1=\"{top - 4}\" x2=\"{LABEL_W}\" y2=\"{height - 8}\"/>")
    for gi, label in enumerate(labels):
        y0 = top + gi * group_h
        out.append(f"<text x=\"{LABEL_W - 8}\" y=\"{y0 + group_h / 2 + 1:.1f}\" text-anchor=\"end\" "
                   f"dominant-baseline=\"middle\">{esc(label[:38])}</text>")
        for si, name in enumerate(names):
            vs = series[name]
            v = vs[gi] if gi < len(vs) else None
            y = y0 + 4 + si * ROW_H
            if v is None:
                out.append(f"<text x=\"{LABEL_W + 4}\" y=\"{y + ROW_H / 2:.1f}\" dominant-baseline=\"middle\" "
                           f"class=\"note\">n/a</text>")
                continue
            w = max(0.0, min(1.0, v / vmax if vmax else 0.0)) * plot_w
            w_draw = max(w, 1.5)  # a zero is still a visible mark
            out.append(f"<rect class=\"bar\" x=\"{LABEL_W}\" y=\"{y:.1f}\" width=\"{w_draw:.1f}\" "
                       f"height=\"{ROW_H - 3}\" fill=\"{color(si)}\" data-series=\"{esc(name)}\" "
                       f"data-label=\"{esc(label)}\" data-value=\"{v:.6g}\"><title>{esc(name)} · {esc(label)}: "
                       f"{esc(_fmt(v, unit))}</title></rect>")
            out.append(f"<text x=\"{LABEL_W + w_draw + 4:.1f}\" y=\"{y + ROW_H / 2:.1f}\" "
                       f"dominant-baseline=\"middle\">{esc(_fmt(v, unit))}</text>")
    out.append("</svg>")
    return (f"<figure class=\"chart\" data-chart=\"{esc(chart_id)}\" data-kind=\"bar\">"
            f"<figcaption>{esc(caption)}</figcaption>{legend(names)}{''.join(out)}</figure>")


def histogram(chart_id: str, caption: str, series: Mapping[str, Sequence[float]], lo: float, hi: float,
              bins: int = 10) -> str:
    """Share of each series' values per bin, bars side by side per bin."""
    names = list(series)
    n = max(1, len(names))
    plot_w = WIDTH - 90
    plot_h = 180
    left, top = 50, 10
    width_bin = plot_w / bins
    counts: dict[str, list[float]] = {}
    for name, vals in series.items():
        c = [0] * bins
        for v in vals:
            i = int((v - lo) / (hi - lo) * bins) if hi > lo else 0
            c[min(bins - 1, max(0, i))] += 1
        total = max(1, len(vals))
        counts[name] = [x / total for x in c]
    ymax = _nice_max(max((x for c in counts.values() for x in c), default=0.0))
    height = top + plot_h + 34
    out = [f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" "
           f"viewBox=\"0 0 {WIDTH} {height}\" role=\"img\" aria-label=\"{esc(caption)}\">"]
    for t in range(5):
        y = top + plot_h - plot_h * t / 4
        out.append(f"<line class=\"grid\" x1=\"{left}\" y1=\"{y:.1f}\" x2=\"{left + plot_w}\" y2=\"{y:.1f}\"/>")
        out.append(f"<text x=\"{left - 6}\" y=\"{y + 4:.1f}\" text-anchor=\"end\">{100 * ymax * t / 4:.0f}%</text>")
    for b in range(bins):
        x0 = left + b * width_bin
        for si, name in enumerate(names):
            v = counts[name][b]
            h = plot_h * (v / ymax if ymax else 0)
            bw = (width_bin - 4) / n
            x = x0 + 2 + si * bw
            out.append(f"<rect class=\"bar\" x=\"{x:.1f}\" y=\"{top + plot_h - max(h, 1):.1f}\" width=\"{bw:.1f}\" "
                       f"height=\"{max(h, 1):.1f}\" fill=\"{color(si)}\" data-series=\"{esc(name)}\" "
                       f"data-label=\"{lo + (hi - lo) * b / bins:.3g}\" data-value=\"{v:.6g}\"><title>{esc(name)}: "
                       f"{100 * v:.1f}% in [{lo + (hi - lo) * b / bins:.2f}, {lo + (hi - lo) * (b + 1) / bins:.2f})"
                       f"</title></rect>")
        out.append(f"<text x=\"{x0:.1f}\" y=\"{top + plot_h + 14}\" text-anchor=\"middle\">"
                   f"{lo + (hi - lo) * b / bins:.2g}</text>")
    out.append(f"<text x=\"{left + plot_w:.1f}\" y=\"{top + plot_h + 14}\" text-anchor=\"middle\">{hi:.2g}</text>")
    out.append(f"<line class=\"axis\" x1=\"{left}\" y1=\"{top + plot_h}\" x2=\"{left + plot_w}\" "
               f"y2=\"{top + plot_h}\"/></svg>")
    return (f"<figure class=\"chart\" data-chart=\"{esc(chart_id)}\" data-kind=\"histogram\">"
            f"<figcaption>{esc(caption)}</figcaption>{legend(names)}{''.join(out)}</figure>")


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default); ``values`` need not be sorted."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def box_plot(chart_id: str, caption: str, series: Mapping[str, Sequence[float]], unit: str = " ms") -> str:
    """One horizontal box per series: whiskers p5..p95, box p25..p75, line at the median,
    dot at p99."""
    names = [n for n, v in series.items() if v]
    plot_w = WIDTH - LABEL_W - 60
    top = 20
    row = 30
    height = top + len(names) * row + 12
    vmax = _nice_max(max((max(series[n]) for n in names), default=1.0))
    out = [f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" "
           f"viewBox=\"0 0 {WIDTH} {height}\" role=\"img\" aria-label=\"{esc(caption)}\">"]

    def sx(v: float) -> float:
        return LABEL_W + plot_w * min(1.0, max(0.0, v / vmax))

    for t in range(5):
        x = LABEL_W + plot_w * t / 4
        out.append(f"<line class=\"grid\" x1=\"{x:.1f}\" y1=\"{top - 4}\" x2=\"{x:.1f}\" y2=\"{height - 8}\"/>")
        out.append(f"<text x=\"{x:.1f}\" y=\"12\" text-anchor=\"middle\">{esc(_fmt(vmax * t / 4, unit))}</text>")
    for i, name in enumerate(names):
        vals = series[name]
        p5, p25, p50, p75, p95, p99 = (quantile(vals, q) for q in (0.05, 0.25, 0.5, 0.75, 0.95, 0.99))
        y = top + i * row
        mid = y + row / 2 - 2
        out.append(f"<text x=\"{LABEL_W - 8}\" y=\"{mid:.1f}\" text-anchor=\"end\" dominant-baseline=\"middle\">"
                   f"{esc(name[:38])}</text>")
        out.append(f"<line x1=\"{sx(p5):.1f}\" y1=\"{mid:.1f}\" x2=\"{sx(p95):.1f}\" y2=\"{mid:.1f}\" "
                   f"stroke=\"{color(i)}\"/>")
        out.append(f"<rect class=\"box\" x=\"{sx(p25):.1f}\" y=\"{mid - 8:.1f}\" "
                   f"width=\"{max(sx(p75) - sx(p25), 1.5):.1f}\" height=\"16\" fill=\"{color(i)}\" "
                   f"fill-opacity=\"0.35\" stroke=\"{color(i)}\" data-series=\"{esc(name)}\" "
                   f"data-value=\"{p50:.6g}\"><title>{esc(name)}: p50 {esc(_fmt(p50, unit))}, p95 "
                   f"{esc(_fmt(p95, unit))}, p99 {esc(_fmt(p99, unit))}</title></rect>")
        out.append(f"<line x1=\"{sx(p50):.1f}\" y1=\"{mid - 8:.1f}\" x2=\"{sx(p50):.1f}\" y2=\"{mid + 8:.1f}\" "
                   f"stroke=\"{color(i)}\" stroke-width=\"2\"/>")
        out.append(f"<circle cx=\"{sx(p99):.1f}\" cy=\"{mid:.1f}\" r=\"2.5\" fill=\"{color(i)}\"/>")
        out.append(f"<text x=\"{max(sx(p95), sx(p99)) + 8:.1f}\" y=\"{mid:.1f}\" dominant-baseline=\"middle\">"
                   f"p50 {esc(_fmt(p50, unit))}</text>")
    out.append("</svg>")
    return (f"<figure class=\"chart\" data-chart=\"{esc(chart_id)}\" data-kind=\"box\">"
            f"<figcaption>{esc(caption)}</figcaption>{''.join(out)}</figure>")


def reliability_diagram(chart_id: str, caption: str,
                        series: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Accuracy against confidence per confidence bin, one line of points per series (model);
    the dashed diagonal is perfect calibration, a point below it is overconfidence. A
    point's area grows with the answers in its bin. Bins are dicts with ``lo``, ``hi``,
    ``n``, ``confidence`` (mean) and ``accuracy``; empty bins are skipped."""
    names = list(series)
    size, left, top = 300, 50, 12
    height = top + size + 40
    width = left + size + 30

    def px(v: float) -> float:
        return left + size * min(1.0, max(0.0, v))

    def py(v: float) -> float:
        return top + size * (1.0 - min(1.0, max(0.0, v)))

    out = [f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" "
           f"viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"{esc(caption)}\">"]
    for t in range(6):
        v = t / 5
        out.append(f"<line class=\"grid\" x1=\"{px(v):.1f}\" y1=\"{top}\" x2=\"{px(v):.1f}\" y2=\"{top + size}\"/>")
        out.append(f"<line class=\"grid\" x1=\"{left}\" y1=\"{py(v):.1f}\" x2=\"{left + size}\" y2=\"{py(v):.1f}\"/>")
        out.append(f"<text x=\"{px(v):.1f}\" y=\"{top + size + 14}\" text-anchor=\"middle\">{100 * v:.0f}%</text>")
        out.append(f"<text x=\"{left - 6}\" y=\"{py(v) + 4:.1f}\" text-anchor=\"end\">{100 * v:.0f}%</text>")
    out.append(f"<line class=\"diag\" x1=\"{px(0):.1f}\" y1=\"{py(0):.1f}\" x2=\"{px(1):.1f}\" y2=\"{py(1):.1f}\"/>")
    out.append(f"<text x=\"{left + size / 2:.1f}\" y=\"{top + size + 32}\" text-anchor=\"middle\">confidence</text>")
    out.append(f"<text x=\"12\" y=\"{top + size / 2:.1f}\" text-anchor=\"middle\" "
               f"transform=\"rotate(-90 12 {top + size / 2:.1f})\">accuracy</text>")
    for si, name in enumerate(names):
        pts = [b for b in series[name] if b.get("n")]
        total = sum(int(b["n"]) for b in pts) or 1
        if len(pts) > 1:
            path = " ".join(f"{px(float(b['confidence'])):.1f},{py(float(b['accuracy'])):.1f}" for b in pts)
            out.append(f"<polyline points=\"{path}\" fill=\"none\" stroke=\"{color(si)}\" stroke-width=\"1.5\"/>")
        for b in pts:
            conf, acc, n = float(b["confidence"]), float(b["accuracy"]), int(b["n"])
            r = 3 + 9 * math.sqrt(n / total)
            out.append(f"<circle class=\"point\" cx=\"{px(conf):.1f}\" cy=\"{py(acc):.1f}\" r=\"{r:.1f}\" "
                       f"fill=\"{color(si)}\" fill-opacity=\"0.7\" data-series=\"{esc(name)}\" "
                       f"data-label=\"{float(b['lo']):.1f}-{float(b['hi']):.1f}\" data-value=\"{acc:.6g}\" "
                       f"data-confidence=\"{conf:.6g}\" data-n=\"{n}\"><title>{esc(name)}: {n} answers at "
                       f"{100 * conf:.0f}% confidence, {100 * acc:.0f}% right</title></circle>")
    out.append("</svg>")
    return (f"<figure class=\"chart\" data-chart=\"{esc(chart_id)}\" data-kind=\"reliability\">"
            f"<figcaption>{esc(caption)}</figcaption>{legend(names)}{''.join(out)}</figure>")
