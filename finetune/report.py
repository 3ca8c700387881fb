"""The eval report: ``metrics.json`` (the source), and ``grid.png`` and ``index.html`` rendered from it.

``metrics.json`` is written first and holds everything: settings, versions with lineage, the report's columns
(version × LoRA scale), every image with its scores, the aggregated comparison, and notes. The grid and the HTML are
pure renderings of that document plus the image files it names, so a report can be re-rendered from a copy of the
folder. Every file is written atomically (temporary file, then rename).

Document layout (``schema`` = ``finetune.eval/1``)::

    settings   {base_model, steps, width, height, guidance, seeds, lora_scales, max_sequence_length, dtype, ...}
    versions   [{ref, label, kind, id, trigger_word, base_model, lineage}]
    columns    [{key, label, version (index), lora_scale}]
    prompts    [{template, has_trigger}]
    images     [{column, prompt_index, seed, prompt, file, cached, scores {metric: value}}]
    metrics    {metric: {label, higher_is_better, description}}       only the metrics that were computed
    aggregate  {column key: {metric: {mean, ci95 [low, high], n, win_rate, pairs}}}
    reference_column, notes [str], warnings [str], timings {}, counters {}

Edit reports (``finetune eval --inputs``) add ``edit`` {inputs, layout, instructions, targets,
direction_source_caption, output_size}; each ``prompts`` row is then one edit with ``name``, ``inputs`` [files under
``inputs/``, fitted as the model saw them], ``input_sources``, ``input_sha256``, ``instruction_source``, ``target``
(file or null), ``target_source``, ``width``, ``height``. The grid and the image table then show per edit × seed the
input, each column's output, and the target when there is one.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.files import write_atomic

__all__ = ["SCHEMA", "best_values", "render_grid", "render_html", "wrap_label", "write_report"]

SCHEMA = "finetune.eval/1"
GRID_CELL_PX = 320  # longest side of one image in grid.png
GRID_LABEL_PX = 160  # columns widen up to this for a column label's widest unbreakable piece (a name, a version id)
THUMB_PX = 256  # longest side of a thumbnail in index.html


def best_values(doc: dict) -> dict[str, float]:
    """Per metric, the best aggregated mean over the report's columns (max, or min when lower is better)."""
    best: dict[str, float] = {}
    for metric, info in doc["metrics"].items():
        means = [agg[metric]["mean"] for agg in doc["aggregate"].values() if metric in agg]
        if means:
            best[metric] = max(means) if info["higher_is_better"] else min(means)
    return best


def _png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _rows(doc: dict) -> list[tuple[int, int]]:
    return [(p, seed) for p in range(len(doc["prompts"])) for seed in doc["settings"]["seeds"]]


def _has_targets(doc: dict) -> bool:
    return any(row.get("target") for row in doc["prompts"])


def _layout(doc: dict) -> tuple[list[str], list[tuple[str, list[str | None]]]]:
    """The grid's column labels and rows (label, image file per column or None). Text-to-image: one column per report
    column. Edits: the input first, then the report columns, then the target when some row has one."""
    images = _image_index(doc)
    edit = "edit" in doc
    labels = [c["label"] for c in doc["columns"]]
    if edit:
        labels = ["input", *labels, *(["target"] if _has_targets(doc) else [])]
    rows = []
    for prompt_index, seed in _rows(doc):
        prompt = doc["prompts"][prompt_index]
        files = [(images.get((c["key"], prompt_index, seed)) or {}).get("file") for c in doc["columns"]]
        if edit:
            files = [prompt["inputs"][0], *files, *([prompt.get("target")] if _has_targets(doc) else [])]
            label = f"{prompt['name']}: {prompt['template']}  (seed {seed})"
        else:
            label = f"{prompt['template']}  (seed {seed})"
        rows.append((label, files))
    return labels, rows


def _image_index(doc: dict) -> dict[tuple[str, int, int], dict]:
    return {(im["column"], im["prompt_index"], im["seed"]): im for im in doc["images"]}


def wrap_label(text: str, width: float, measure: Callable[[str], float] = len) -> list[str]:
    """``text`` in lines no wider than ``width`` (as ``measure`` counts), broken only at spaces and after ``/`` or
    ``:``, so a reference ``owner/name:version`` never splits inside a name or an id.

    Greedy, like ``textwrap.wrap`` but with those break points: a piece that is wider than ``width`` on its own
    gets a line to itself, whole. Joining the lines (a space where a space was) gives ``text`` back.
    """
    lines: list[str] = []
    line = ""
    for word in text.split():
        for i, piece in enumerate(re.findall(r"[^/:]*[/:]|[^/:]+", word)):
            joined = line + (" " if line and i == 0 else "") + piece
            if line and measure(joined) > width:
                lines.append(line)
                joined = piece
            line = joined
    return [*lines, line] if line else lines


def _shorten(text: str, width: float, measure: Callable[[str], float]) -> str:
    """``text``, cut with a trailing "…" if it is wider than ``width`` (a 64-character Replicate version id in a
    small cell); the full reference is in index.html."""
    if measure(text) <= width:
        return text
    while len(text) > 1 and measure(text + "…") > width:
        text = text[:-1]
    return text + "…"


def render_grid(doc: dict, folder: Path) -> Any:
    """The comparison grid: one row per prompt × seed, one column per report column, labelled. An edit report has one
    row per edit × seed and columns input | each report column | target (when there is one); edits of another aspect
    ratio are fitted into the cell whole, centred.

    Column labels wrap at spaces, ``/`` and ``:`` (``wrap_label``); the header grows to hold every line, and the
    columns widen (up to ``GRID_LABEL_PX``) to hold the widest piece, so a version id shows whole.
    """
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    font = ImageFont.load_default()
    width, height = doc["settings"]["width"], doc["settings"]["height"]
    scale = min(1.0, GRID_CELL_PX / max(width, height))
    cell_w, cell_h = max(1, round(width * scale)), max(1, round(height * scale))
    label_w, line_h, pad = 220, 11, 4
    columns, rows = _layout(doc)
    px = font.getlength
    text_w = cell_w + pad - 2  # a label may use its column's gap to the next one
    widest = max((px(line) for c in columns for line in wrap_label(c, text_w, px)), default=0)
    text_w = max(text_w, min(math.ceil(widest), GRID_LABEL_PX))
    col_w = text_w + 2 - pad
    headers = [[_shorten(line, text_w, px) for line in wrap_label(c, text_w, px)] for c in columns]
    header_h = max(36, 3 + line_h * max((len(lines) for lines in headers), default=0))
    grid = Image.new(
        "RGB", (label_w + len(columns) * (col_w + pad), header_h + len(rows) * (cell_h + pad)), (255, 255, 255)
    )
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(headers):
        x = label_w + c * (col_w + pad)
        for i, line in enumerate(lines):
            draw.text((x + 2, 2 + i * line_h), line, fill=(0, 0, 0), font=font)
    for r, (label, files) in enumerate(rows):
        y = header_h + r * (cell_h + pad)
        for i, line in enumerate(textwrap.wrap(label, 34)[: max(1, cell_h // 11)]):
            draw.text((4, y + 2 + i * 11), line, fill=(0, 0, 0), font=font)
        for c, file in enumerate(files):
            if file is None:
                continue
            x = label_w + c * (col_w + pad)
            with Image.open(folder / file) as im:
                if "edit" in doc:  # each edit has its input's aspect ratio: whole in the cell, centred
                    cell = ImageOps.contain(im.convert("RGB"), (cell_w, cell_h), Image.BICUBIC)
                    grid.paste(cell, (x + (cell_w - cell.width) // 2, y + (cell_h - cell.height) // 2))
                else:
                    grid.paste(im.convert("RGB").resize((cell_w, cell_h), Image.BICUBIC), (x, y))
    return grid


def _data_uri(image: Any, max_px: int | None = None) -> str:
    if max_px is not None and max(image.size) > max_px:
        image = image.copy()
        image.thumbnail((max_px, max_px))
    return "data:image/png;base64," + base64.b64encode(_png_bytes(image.convert("RGB"))).decode("ascii")


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
td.best{background:#d9f2d9;font-weight:bold}.ci{color:#777;font-size:.85em}.note{background:#fff6d5;padding:.4em}
.warn{background:#fde2e2;padding:.4em}pre{background:#f6f6f6;padding:.5em;overflow:auto;max-height:20em}
img.grid{max-width:100%}figure{display:inline-block;margin:.3em;font-size:.8em}
"""


def render_html(doc: dict, folder: Path, grid_png: bytes | None = None) -> str:
    """A self-contained page (every image is a data URI) rendering the eval document."""
    from PIL import Image

    esc = html.escape
    metrics = doc["metrics"]
    best = best_values(doc)
    edit = doc.get("edit")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>finetune eval</title>',
        f"<style>{_CSS}</style></head><body>",
        f"<h1>finetune eval</h1><p>{esc(doc['created_at'])} · {len(doc['versions'])} version(s), "
        f"{len(doc['prompts'])} {'edit' if edit else 'prompt'}(s), "
        f"seeds {esc(', '.join(map(str, doc['settings']['seeds'])))}</p>",
    ]
    if edit:
        out.append(
            f'<p id="edit">Edits of <b>{esc(edit["inputs"])}</b> ({esc(edit["layout"])}), instructions from '
            f"{esc(edit['instructions'])}; {edit['targets']} with a target. {esc(edit['output_size'])}.</p>"
        )
    for warning in doc["warnings"]:
        out.append(f'<p class="warn">Warning: {esc(warning)}</p>')
    for note in doc["notes"]:
        out.append(f'<p class="note">Note: {esc(note)}</p>')

    reference = next(c["label"] for c in doc["columns"] if c["key"] == doc["reference_column"])
    out.append(f"<h2>Metrics</h2><p>Mean with bootstrap 95% interval; win rate against <b>{esc(reference)}</b>, ")
    paired = "edit and seed" if edit else "prompt and seed (diversity: by prompt)"
    out.append(f"paired by {paired}. Best per column marked.</p>")
    out.append('<table id="metrics"><tr><th>version</th>')
    out += [f"<th>{esc(info['label'])} ({'↑' if info['higher_is_better'] else '↓'})</th>" for info in metrics.values()]
    out += [f"<th>win rate: {esc(info['label'])}</th>" for info in metrics.values()]
    out.append("</tr>")
    for column in doc["columns"]:
        agg = doc["aggregate"].get(column["key"], {})
        out.append(f"<tr><td>{esc(column['label'])}</td>")
        for metric in metrics:
            s = agg.get(metric)
            if s is None:
                out.append("<td>–</td>")
                continue
            mark = ' class="best"' if s["mean"] == best.get(metric) else ""
            out.append(
                f'<td{mark} data-metric="{esc(metric)}">{s["mean"]:.4f} '
                f'<span class="ci">[{s["ci95"][0]:.4f}, {s["ci95"][1]:.4f}]</span></td>'
            )
        for metric in metrics:
            s = agg.get(metric)
            out.append(f"<td>{_fmt(None if s is None else s['win_rate'])}</td>")
        out.append("</tr>")
    out.append("</table>")
    out.append(
        "<dl>" + "".join(f"<dt>{esc(i['label'])}</dt><dd>{esc(i['description'])}</dd>" for i in metrics.values())
    )
    out.append("</dl>")

    if grid_png is not None:
        uri = "data:image/png;base64," + base64.b64encode(grid_png).decode("ascii")
        out.append(f'<h2>Grid</h2><img class="grid" alt="comparison grid" src="{uri}">')

    targets = bool(edit) and _has_targets(doc)

    def figure(file: str, alt: str, caption: str = "") -> str:
        with Image.open(folder / file) as im:
            uri = _data_uri(im, THUMB_PX)
        img = f'<img alt="{esc(alt)}" title="{esc(alt)}" src="{uri}">'
        return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"

    first = "<th>edit</th><th>instruction</th><th>seed</th><th>input</th>" if edit else "<th>prompt</th><th>seed</th>"
    out.append(f'<h2>Images</h2><table id="images"><tr>{first}')
    out += [f"<th>{esc(c['label'])}</th>" for c in doc["columns"]]
    out.append("<th>target</th></tr>" if targets else "</tr>")
    images = _image_index(doc)
    for prompt_index, seed in _rows(doc):
        prompt = doc["prompts"][prompt_index]
        if edit:
            out.append(f"<tr><td>{esc(prompt['name'])}</td><td>{esc(prompt['template'])}</td><td>{seed}</td>")
            # every input (FLUX.2 takes several references); the grid shows the first, whose aspect the output has
            shown = zip(prompt["inputs"], prompt["input_sources"], strict=True)
            out.append("<td>" + "".join(figure(file, f"input {source}") for file, source in shown) + "</td>")
        else:
            out.append(f"<tr><td>{esc(prompt['template'])}</td><td>{seed}</td>")
        for column in doc["columns"]:
            entry = images.get((column["key"], prompt_index, seed))
            if entry is None:
                out.append("<td>–</td>")
                continue
            with Image.open(folder / entry["file"]) as im:
                uri = _data_uri(im, THUMB_PX)
            scores = "<br>".join(
                f"{esc(metrics[m]['label'])}: {_fmt(v)}" for m, v in entry["scores"].items() if m in metrics
            )
            out.append(
                f'<td><figure><img alt="{esc(entry["prompt"])}" title="{esc(entry["prompt"])}" src="{uri}">'
                f"<figcaption>{scores}</figcaption></figure></td>"
            )
        if targets:
            target = prompt.get("target")
            alt = f"target {prompt['target_source']}"
            out.append(f"<td>{figure(target, alt)}</td>" if target else "<td>–</td>")
        out.append("</tr>")
    out.append("</table>")

    out.append('<h2>Settings</h2><table id="settings">')
    out += [f"<tr><th>{esc(k)}</th><td>{esc(json.dumps(v))}</td></tr>" for k, v in doc["settings"].items()]
    if edit:
        out.append("</table><h3>Edits</h3><ol>")
        out += [
            f'<li>{esc(p["name"])}: {esc(p["template"])} <span class="ci">(inputs '
            f"{esc(', '.join(p['input_sources']))}; target {esc(p.get('target_source') or 'none')})</span></li>"
            for p in doc["prompts"]
        ]
    else:
        out.append("</table><h3>Prompts</h3><ol>")
        out += [f"<li>{esc(p['template'])}</li>" for p in doc["prompts"]]
    out.append("</ol>")

    out.append('<h2>Versions</h2><div id="versions">')
    for version in doc["versions"]:
        lineage = version.get("lineage") or {}
        dataset = lineage.get("dataset") or {}
        out.append(f"<h3>{esc(version['label'])}</h3><table>")
        rows = [
            ("reference", version["ref"]),
            ("kind", version["kind"]),
            ("id", version.get("id")),
            ("base model", version.get("base_model")),
            ("trigger word", version.get("trigger_word")),
            ("backend", lineage.get("backend")),
            ("dataset", dataset.get("path")),
            ("dataset digest", dataset.get("digest")),
        ]
        out += [f"<tr><th>{esc(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows if v not in (None, "")]
        out.append("</table>")
        if lineage:
            out.append(f"<details><summary>lineage</summary><pre>{esc(json.dumps(lineage, indent=2))}</pre></details>")
    out.append("</div></body></html>\n")
    return "\n".join(out)


def write_report(folder: Path, doc: dict) -> dict[str, Path]:
    """Write ``metrics.json``, then ``grid.png`` and ``index.html`` rendered from it; returns their paths."""
    folder = Path(folder)
    paths = {"metrics": folder / "metrics.json", "grid": folder / "grid.png", "html": folder / "index.html"}
    write_atomic(paths["metrics"], (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    grid_png = _png_bytes(render_grid(doc, folder))
    write_atomic(paths["grid"], grid_png)
    write_atomic(paths["html"], render_html(doc, folder, grid_png).encode("utf-8"))
    return paths
