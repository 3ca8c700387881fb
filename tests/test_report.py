"""The report renders metrics.json into a labelled grid and a self-contained HTML page, atomically."""

import json
from html.parser import HTMLParser

import numpy as np
from PIL import Image

from finetune import report


class _Page(HTMLParser):
    """Collects what the tests check: image sources, links, marked cells, notes and table cells."""

    def __init__(self):
        super().__init__()
        self.img_src: list[str] = []
        self.links: list[str] = []
        self.best: list[tuple[str, str]] = []
        self.classes: list[str] = []
        self.text: list[str] = []
        self._best_metric = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.img_src.append(a["src"])
        if tag in ("a", "link", "script") and (a.get("href") or a.get("src")):
            self.links.append(a.get("href") or a.get("src"))
        if a.get("class"):
            self.classes.append(a["class"])
        if tag == "td" and a.get("class") == "best":
            self._best_metric = a["data-metric"]

    def handle_data(self, data):
        self.text.append(data)
        if self._best_metric is not None and data.strip():
            self.best.append((self._best_metric, data.strip()))
            self._best_metric = None


def _doc(folder):
    (folder / "images").mkdir()
    columns = [
        {"key": "c0", "label": "base", "version": 0, "lora_scale": None},
        {"key": "c1", "label": "me/tok:abc scale 1", "version": 1, "lora_scale": 1.0},
    ]
    prompts = [{"template": "a photo of [trigger]", "has_trigger": True}, {"template": "a cat", "has_trigger": False}]
    images = []
    rng = np.random.default_rng(0)
    for column in columns:
        for p in range(2):
            for seed in (1, 2):
                file = f"images/{column['key']}-{p}-{seed}.png"
                Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / file)
                scores = {"clip_t": float(rng.random()), "dino": float(rng.random())}
                images.append(
                    {"column": column["key"], "prompt_index": p, "seed": seed, "prompt": "a <b>photo</b> of TOK",
                     "file": file, "cached": False, "scores": scores}
                )  # fmt: skip
    return {
        "schema": report.SCHEMA,
        "created_at": "2025-01-01T00:00:00Z",
        "settings": {
            "base_model": "preset:tiny",
            "steps": 8,
            "width": 64,
            "height": 48,
            "guidance": 3.5,
            "seeds": [1, 2],
            "lora_scales": [1.0],
        },  # fmt: skip
        "versions": [
            {
                "ref": "base",
                "label": "base",
                "kind": "base",
                "id": None,
                "trigger_word": "TOK",
                "base_model": "preset:tiny",
                "lineage": {},
            },
            {
                "ref": "me/tok",
                "label": "me/tok:abc",
                "kind": "registry",
                "id": "abc" * 10,
                "trigger_word": "TOK",
                "base_model": "preset:tiny",
                "lineage": {
                    "backend": "local",
                    "dataset": {"path": "data/tok.zip", "digest": "d1g"},
                    "config": {"lora": {"rank": 4}},
                },
            },
        ],  # fmt: skip
        "columns": columns,
        "prompts": prompts,
        "images": images,
        "metrics": {
            "clip_t": {"label": "CLIP-T", "higher_is_better": True, "description": "prompt alignment"},
            "dino": {"label": "DINO", "higher_is_better": True, "description": "subject fidelity"},
            "bleed": {"label": "bleed", "higher_is_better": False, "description": "lower is better"},
        },
        "aggregate": {
            "c0": {
                "clip_t": {"mean": 0.25, "ci95": [0.2, 0.3], "n": 4, "win_rate": None},
                "dino": {"mean": 0.7, "ci95": [0.6, 0.8], "n": 4, "win_rate": None},
                "bleed": {"mean": 0.4, "ci95": [0.3, 0.5], "n": 2, "win_rate": None},
            },
            "c1": {
                "clip_t": {"mean": 0.31, "ci95": [0.28, 0.33], "n": 4, "win_rate": 0.75},
                "dino": {"mean": 0.6, "ci95": [0.5, 0.7], "n": 4, "win_rate": 0.25},
                "bleed": {"mean": 0.5, "ci95": [0.4, 0.6], "n": 2, "win_rate": 0.0},
            },
        },  # fmt: skip
        "reference_column": "c0",
        "notes": ["DINO and diversity skipped: could not load dino model 'x'."],
        "warnings": ["mixed base models"],
        "timings": {},
        "counters": {},
    }


def test_report_files_are_self_contained_and_mark_the_best(tmp_path):
    doc = _doc(tmp_path)
    paths = report.write_report(tmp_path, doc)

    assert json.loads(paths["metrics"].read_text(encoding="utf-8")) == doc
    page = _Page()
    page.feed(paths["html"].read_text(encoding="utf-8"))
    # 1 grid + 2 columns x 2 prompts x 2 seeds thumbnails, all embedded
    assert len(page.img_src) == 9 and all(src.startswith("data:image/png;base64,") for src in page.img_src)
    assert page.links == []
    assert sorted(page.best) == [("bleed", "0.4000"), ("clip_t", "0.3100"), ("dino", "0.7000")]
    text = " ".join(page.text)
    assert "could not load dino model" in text and "mixed base models" in text
    assert "data/tok.zip" in text and "d1g" in text and '"rank": 4' in text
    assert "a <b>photo</b> of TOK" not in paths["html"].read_text()  # prompts are escaped
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left behind


def test_grid_has_a_row_per_prompt_and_seed_and_a_column_per_version(tmp_path):
    doc = _doc(tmp_path)
    report.write_report(tmp_path, doc)
    grid = Image.open(tmp_path / "grid.png")
    cell_w, cell_h = 64, 48  # below GRID_CELL_PX, so images keep their size
    assert grid.size == (220 + 2 * (cell_w + 4), 36 + 4 * (cell_h + 4))
    # the cell for (c1, prompt 1, seed 2) holds that image
    pixels = np.asarray(grid.convert("RGB")).astype(int)
    x, y = 220 + (cell_w + 4), 36 + 3 * (cell_h + 4)
    expected = np.asarray(Image.open(tmp_path / "images/c1-1-2.png").convert("RGB")).astype(int)
    assert np.abs(pixels[y : y + cell_h, x : x + cell_w] - expected).mean() < 1.0
    assert pixels[:36, 220:].min() < 128  # header labels drawn


def test_column_labels_wrap_only_after_a_slash_or_a_colon():
    ref = "black-forest-labs/flux-dev-lora-shapes:3416d0503283aa91"
    for width in (8, 12, 20, 30, 45):
        lines = report.wrap_label(ref, width)
        assert "".join(lines) == ref, width  # nothing lost, nothing added
        assert all(line.endswith(("/", ":")) for line in lines[:-1]), (width, lines)
        # a line is over the width only when it is one piece that cannot be broken
        assert all(len(line) <= width or line.count("/") + line.count(":") <= 1 for line in lines), (width, lines)
    assert report.wrap_label(ref, 20) == ["black-forest-labs/", "flux-dev-lora-shapes:", "3416d0503283aa91"]
    assert report.wrap_label(ref, 100) == [ref]
    # spaces break too (a column "ref scale 0.5"), and the measure can be pixels
    assert report.wrap_label("me/tok:3416d0503283 scale 0.5", 14) == ["me/tok:", "3416d0503283", "scale 0.5"]
    assert report.wrap_label("me/tok:abc", 45, measure=lambda s: 6 * len(s)) == ["me/tok:", "abc"]
    assert report.wrap_label("", 10) == []


def test_grid_widens_columns_for_a_version_id_and_never_breaks_it(tmp_path):
    doc = _doc(tmp_path)
    doc["columns"][1]["label"] = "demo/shapes-tiny:3416d0503283"
    grid = report.render_grid(doc, tmp_path)
    assert grid.size[0] > 220 + 2 * (64 + 4)  # the 12-character id is wider than a 64 px cell: the columns grow
    assert grid.size[1] == 36 + 4 * (48 + 4)  # three header lines fit the usual header


def _edit_doc(folder):
    """``_doc`` as an edit report: two edits (the second without a target), input and target files under inputs/."""
    doc = _doc(folder)
    (folder / "inputs").mkdir()
    rng = np.random.default_rng(1)
    for name in ("in0", "in1", "t0"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"inputs/{name}.png")
    for p, row in enumerate(doc["prompts"]):
        row |= {"name": f"edit{p}", "inputs": [f"inputs/in{p}.png"], "input_sources": [f"src/e{p}_start.png"],
                "input_sha256": ["0" * 64], "instruction_source": f"src/e{p}.txt",
                "target": "inputs/t0.png" if p == 0 else None, "target_source": "src/e0_end.png" if p == 0 else None,
                "width": 64, "height": 48}  # fmt: skip
    doc["edit"] = {"inputs": "src", "layout": "pair-folder", "instructions": "files", "targets": 1,
                   "direction_source_caption": "a photo", "output_size": "as its input"}  # fmt: skip
    doc["metrics"] = {
        "dino_target": {"label": "DINO to target", "higher_is_better": True, "description": "d"},
        "clip_direction": {"label": "CLIP direction", "higher_is_better": True, "description": "c"},
    }
    doc["aggregate"] = {
        c: {m: {"mean": v, "ci95": [v - 0.1, v + 0.1], "n": 4, "win_rate": None if c == "c0" else 0.5}
            for m, v in (("dino_target", 0.5 + i / 10), ("clip_direction", 0.1 - i / 10))}
        for i, c in enumerate(("c0", "c1"))
    }  # fmt: skip
    return doc


def test_edit_report_shows_input_outputs_and_target(tmp_path):
    doc = _edit_doc(tmp_path)
    paths = report.write_report(tmp_path, doc)
    page = _Page()
    page.feed(paths["html"].read_text(encoding="utf-8"))
    # 1 grid + per row (2 edits x 2 seeds): input, 2 outputs, and the target where there is one (edit 0's rows)
    assert len(page.img_src) == 1 + 4 * 3 + 2
    text = " ".join(page.text)
    assert "DINO to target" in text and "CLIP direction" in text and "edit0" in text and "src/e0_end.png" in text
    assert sorted(page.best) == [("clip_direction", "0.1000"), ("dino_target", "0.6000")]

    grid = Image.open(paths["grid"])
    cell_w, cell_h = 64, 48
    assert grid.size == (220 + 4 * (cell_w + 4), 36 + 4 * (cell_h + 4))  # input | c0 | c1 | target
    pixels = np.asarray(grid.convert("RGB")).astype(int)

    def cell(column, row):
        x, y = 220 + column * (cell_w + 4), 36 + row * (cell_h + 4)
        return pixels[y : y + cell_h, x : x + cell_w]

    def image(name):
        return np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(int)

    assert np.abs(cell(0, 2) - image("inputs/in1.png")).mean() < 1.0  # edit 1, seed 1: its input
    assert np.abs(cell(2, 3) - image("images/c1-1-2.png")).mean() < 1.0  # edit 1, seed 2, column c1
    assert np.abs(cell(3, 0) - image("inputs/t0.png")).mean() < 1.0  # edit 0's target
    assert (cell(3, 2) == 255).all()  # edit 1 has no target: the cell stays blank


def test_a_text_to_image_report_has_no_edit_columns(tmp_path):
    doc = _doc(tmp_path)
    report.write_report(tmp_path, doc)
    html_text = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "<th>input</th>" not in html_text and "<th>target</th>" not in html_text and 'id="edit"' not in html_text
