"""RUN/report.html: one self-contained page (inline SVG charts, base64 images) with the metric table,
ROC and PR curves, the score histogram of good vs defect images, and the worst false positives and false
negatives at the stored image threshold, each with its heat-map overlay."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from destseg.checkpoint import atomic_write_text
from destseg.data.images import read_rgb, resize_rgb
from destseg.metrics import METRIC_NAMES, precision_recall, roc_curve
from destseg.visualize import overlay, png_b64

W, H, PAD = 320, 240, 36


def _svg_curve(xs, ys, title: str, xlabel: str, ylabel: str) -> str:
    pts = " ".join(f"{PAD + x * (W - 2 * PAD):.1f},{H - PAD - y * (H - 2 * PAD):.1f}" for x, y in zip(xs, ys))
    return (f'<svg width="{W}" height="{H}" role="img" aria-label="{title}">'
            f'<rect x="{PAD}" y="{PAD}" width="{W - 2 * PAD}" height="{H - 2 * PAD}" fill="#fafafa" stroke="#999"/>'
            f'<polyline points="{pts}" fill="none" stroke="#c0392b" stroke-width="2"/>'
            f'<text x="{W / 2}" y="20" text-anchor="middle" font-weight="bold">{title}</text>'
            f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">{xlabel}</text>'
            f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle">{ylabel}</text>'
            f'<text x="{PAD}" y="{H - PAD + 14}" font-size="10">0</text>'
            f'<text x="{W - PAD}" y="{H - PAD + 14}" font-size="10" text-anchor="end">1</text></svg>')


def _svg_histogram(good: np.ndarray, bad: np.ndarray, threshold: float | None) -> str:
    lo, hi = float(min(good.min(initial=np.inf), bad.min(initial=np.inf))), float(max(good.max(initial=-np.inf), bad.max(initial=-np.inf)))
    hi = hi if hi > lo else lo + 1
    bins = np.linspace(lo, hi, 21)
    hg, _ = np.histogram(good, bins)
    hb, _ = np.histogram(bad, bins)
    top = max(hg.max(initial=1), hb.max(initial=1))
    bw = (W - 2 * PAD) / 20
    bars = []
    for i in range(20):
        for counts, color, off in ((hg, "#2e86c1", 0), (hb, "#c0392b", bw / 2)):
            h = counts[i] / top * (H - 2 * PAD)
            bars.append(f'<rect x="{PAD + i * bw + off:.1f}" y="{H - PAD - h:.1f}" width="{bw / 2:.1f}" '
                        f'height="{h:.1f}" fill="{color}"/>')
    line = ""
    if threshold is not None:
        x = PAD + (threshold - lo) / (hi - lo) * (W - 2 * PAD)
        line = f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD}" y2="{H - PAD}" stroke="black" stroke-dasharray="4"/>'
    return (f'<svg width="{W}" height="{H}" role="img" aria-label="score histogram">'
            f'<text x="{W / 2}" y="20" text-anchor="middle" font-weight="bold">Image scores</text>'
            + "".join(bars) + line +
            f'<text x="{PAD}" y="{H - 8}" fill="#2e86c1">good ({good.size})</text>'
            f'<text x="{W - PAD}" y="{H - 8}" fill="#c0392b" text-anchor="end">defect ({bad.size})</text></svg>')


def _trained(result: dict) -> str:
    """The steps trained, against the plan and per stage."""
    trained, planned = result.get("steps_trained"), result.get("steps_planned")
    if trained is None:
        return html.escape(result.get("training_note", ""))
    stages = ", ".join(f"{html.escape(s['name'])} {s['trained']}/{s['planned']}" for s in result.get("stages") or [])
    return f"Trained {trained} of {planned} planned steps ({stages})."


def write_report(path: Path, result: dict, outputs, samples, size: int, n_worst: int = 6) -> None:
    labels, scores = outputs.labels.astype(bool), outputs.scores
    thr = result.get("thresholds", {}).get("image")
    parts = [f"<h1>destseg report: {html.escape(result['model'])} ({html.escape(result['teacher'])})</h1>",
             f"<p>{result['n_test']} test images, {result['precision']} on {html.escape(result['device'])}, "
             f"{result['images_per_s']:.1f} images/s. {_trained(result)}</p>"]
    if result.get("undertrained"):
        parts.append('<p class="warning"><b>Undertrained</b>: the time budget cut training below half of its '
                     "plan; these metrics are not what the schedule would reach.</p>")
    if "i_auroc" in result:
        head = "".join(f"<th>{m}</th>" for m in METRIC_NAMES)
        def row(name, prefix):
            cells = "".join("<td>%.1f</td>" % (100 * result[prefix + m]) if result.get(prefix + m) is not None
                            else "<td>-</td>" for m in METRIC_NAMES)
            return f"<tr><td>{name}</td>{cells}</tr>"

        rows = row("anomaly map", "") + (row("DeST map", "dest_") if "dest_i_auroc" in result else "")
        parts.append(f'<table id="metrics"><tr><th></th>{head}</tr>{rows}</table>')
        fpr, tpr = roc_curve(scores, labels)
        prec, rec, _ = precision_recall(scores, labels)
        parts.append('<div class="charts">' + _svg_curve(fpr, tpr, "Image ROC", "false-positive rate", "true-positive rate")
                     + _svg_curve(rec, prec, "Image precision-recall", "recall", "precision")
                     + _svg_histogram(scores[~labels], scores[labels], thr) + "</div>")
    from destseg.infer import decisions_lines

    parts.append('<pre id="decisions">' + html.escape("\n".join(decisions_lines(result))) + "</pre>")
    if result.get("note"):
        parts.append(f'<p id="note">{html.escape(result["note"])}</p>')
    if thr is not None:
        vmax = float(np.quantile(outputs.maps, 0.999)) or 1.0
        for title, mask_sel, order in (("Worst false positives (good images scored highest)", ~labels, -1),
                                       ("Worst false negatives (defect images scored lowest)", labels, 1)):
            idx = np.flatnonzero(mask_sel)
            idx = idx[np.argsort(order * scores[idx])][:n_worst]
            wrong = [i for i in idx if (scores[i] >= thr) != labels[i]]
            cells = []
            for i in idx:
                img = resize_rgb(read_rgb(samples[i].path), size)
                over = overlay(img, outputs.maps[i], 0.0, vmax, mask=outputs.masks[i])
                tag = "misclassified" if i in wrong else "correct"
                cells.append(f'<figure class="{tag}"><img src="data:image/png;base64,{png_b64(over)}" width="160">'
                             f"<figcaption>{html.escape(samples[i].defect)}/{html.escape(samples[i].path.name)}<br>"
                             f"score {scores[i]:.4f} ({tag})</figcaption></figure>")
            parts.append(f"<h2>{title}</h2><p>threshold {thr:.4f}</p><div class=\"grid\">{''.join(cells)}</div>")
    style = ("body{font-family:sans-serif;margin:24px;max-width:1100px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}.charts,.grid{display:flex;"
             "flex-wrap:wrap;gap:12px}figure{margin:0;font-size:12px}.misclassified img{outline:3px solid #c0392b}"
             ".warning{color:#c0392b}")
    atomic_write_text(path, f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>destseg report</title>"
                            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
