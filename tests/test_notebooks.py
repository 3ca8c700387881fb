"""The notebooks: stored without outputs, public API only, and each executes top to bottom without a cell error.

They run in a real Jupyter kernel (nbclient + ipykernel) started from this venv's python through a kernel spec written
to a temporary JUPYTER_PATH, so a fresh clone needs nothing but ``pip install -e .[dev]``. Settings that differ under
test are injected after the cell tagged ``parameters`` (as papermill does); everything else runs as shipped. The
remote notebook talks to the Replicate stand-in (tests/replicate_stub.py) through the kernel's environment.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = ("quickstart.ipynb", "remote-training.ipynb", "edit-lora.ipynb")
# What a notebook may import from the package: the public API (`finetune`, `finetune.config`); the remote walkthrough
# also shows the remote recipe's mapping (`finetune.recipes.train_remote`).
ALLOWED_IMPORTS = {
    "quickstart.ipynb": {"finetune", "finetune.config"},
    "remote-training.ipynb": {"finetune", "finetune.config", "finetune.recipes.train_remote"},
}
KERNEL = "finetune-test-python"


def _code(nb: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def test_notebooks_are_stored_without_outputs_and_use_the_public_api() -> None:
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert {p.name for p in paths} >= set(EXPECTED), f"missing notebooks in {NOTEBOOKS}"
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for n, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            assert cell.outputs == [], f"{path.name} cell {n} has stored outputs; clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {n} has an execution count; clear outputs"
        tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: exactly one cell must be tagged 'parameters'"
        imported = set()
        for source in _code(nb):
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Import):
                    imported |= {a.name for a in node.names if a.name.split(".")[0] == "finetune"}
                elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "finetune":
                    imported.add(node.module)
        allowed = ALLOWED_IMPORTS.get(path.name, {"finetune", "finetune.config"})
        assert imported <= allowed, f"{path.name} imports {sorted(imported - allowed)}; use the public API"
        assert "finetune" in imported


# ---- execution ------------------------------------------------------------------------------------------------------


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A kernel spec for this interpreter in a temporary JUPYTER_PATH; returns the environment for the kernel."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "finetune tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    env = dict(os.environ)
    env.update(IPYTHONDIR=str(tmp_path / "ipython"), MPLBACKEND="agg", PYTHONUNBUFFERED="1")
    return env


def _run(name: str, cwd: Path, env: dict[str, str], **params: object) -> nbformat.NotebookNode:
    """Execute notebook ``name`` with ``params`` injected after its parameters cell; any cell error fails the test."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    injected = "\n".join(f"{key} = {value!r}" for key, value in params.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    client = NotebookClient(
        nb, timeout=600, startup_timeout=120, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}}
    )
    try:
        client.execute(env=env)
    except CellExecutionError as e:
        pytest.fail(f"{name} failed in a cell:\n{e}")
    return nb


def _outputs(nb: nbformat.NotebookNode) -> tuple[str, set[str]]:
    """All text the executed notebook showed, and the MIME types of its rich outputs."""
    text, mimes = [], set()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"cell error: {out.get('ename')}: {out.get('evalue')}"
            if out.output_type == "stream":
                text.append(out.text)
            for mime, value in out.get("data", {}).items():
                mimes.add(mime)
                if mime.startswith("text/"):
                    text.append(value)
    return "\n".join(text), mimes


@pytest.mark.slow
def test_quickstart_notebook_runs_end_to_end(tmp_path: Path, kernel_env: dict, tiny_scorer_dirs) -> None:
    from finetune.files import sha256_file
    from finetune.registry import Registry

    clip_dir, dino_dir = tiny_scorer_dirs
    work = tmp_path / "work"
    nb = _run("quickstart.ipynb", tmp_path, kernel_env, WORK_DIR=str(work), CLIP_MODEL=str(clip_dir),
              DINO_MODEL=str(dino_dir))  # fmt: skip
    text, mimes = _outputs(nb)
    assert "image/png" in mimes, "the grid (and the input sheet) must be shown inline"

    versions = Registry(work / "home").versions("local/shapes")
    assert len(versions) == 1
    zip_path = work / "data" / "shapes.zip"
    assert versions[0].lineage["dataset"]["digest"] == sha256_file(zip_path)
    assert f"registered {versions[0].ref}" in text
    doc = json.loads((work / "report" / "metrics.json").read_text())
    assert [v["ref"] for v in doc["versions"]] == ["base", versions[0].ref]
    assert {"clip_t", "dino"} <= set(doc["metrics"]), "the injected scorers must have scored the images"
    assert (work / "report" / "grid.png").is_file() and (work / "report" / "index.html").is_file()


@pytest.mark.slow
def test_remote_notebook_runs_against_the_stand_in(tmp_path: Path, kernel_env: dict) -> None:
    from replicate_stub import ReplicateStub

    from finetune.registry import Registry

    work = tmp_path / "work"
    # A training that is over by the time the notebook re-attaches, so following takes no poll interval.
    with ReplicateStub(boot_s=0.0, train_s=0.05) as stub:
        env = dict(kernel_env, REPLICATE_API_TOKEN=stub.token, REPLICATE_BASE_URL=stub.url)
        nb = _run("remote-training.ipynb", tmp_path, env, WORK_DIR=str(work), STEPS=200)
        created = stub.count("POST", r"/v1/models/[^/]+/[^/]+/versions/[^/]+/trainings")
        predictions = stub.count("POST", r"/v1/predictions")
        uploads = stub.count("POST", r"/v1/files")
        training = next(iter(stub.trainings.values()))
    text, mimes = _outputs(nb)

    assert (created, uploads) == (1, 1), "detach + re-attach must submit and upload exactly once"
    assert training["input"]["steps"] == 200 and training["input"]["autocaption"] is False
    assert predictions == 2, "one prediction per prompt and seed for the Replicate version"
    registry = Registry(work / "home")
    remote, local = registry.versions("me/shapes"), registry.versions("me/shapes-local")
    assert len(remote) == 1 and len(local) == 1
    rep_version = remote[0].lineage["replicate"]["version"]
    doc = json.loads((work / "report" / "metrics.json").read_text())
    assert [v["ref"] for v in doc["versions"]] == [f"replicate:{rep_version}", local[0].ref]
    assert "image/png" in mimes
    assert f"registered {remote[0].ref}" in text

    # The token is never shown, and never written anywhere under the work folder.
    assert stub.token not in text
    for path in work.rglob("*"):
        if path.is_file():
            assert stub.token.encode() not in path.read_bytes(), f"token written to {path}"


@pytest.mark.slow
def test_edit_notebook_trains_kontext_and_klein_edit_loras_and_evaluates_them_on_inputs(
    tmp_path: Path, kernel_env: dict, tiny_scorer_dirs
) -> None:
    from finetune.registry import Registry

    clip_dir, dino_dir = tiny_scorer_dirs
    work = tmp_path / "work"
    nb = _run("edit-lora.ipynb", tmp_path, kernel_env, WORK_DIR=str(work), STEPS=2, CLIP_MODEL=str(clip_dir),
              DINO_MODEL=str(dino_dir))  # fmt: skip
    text, mimes = _outputs(nb)
    assert "image/png" in mimes, "the pairs sheet, sample grids and reports must be shown inline"
    registry = Registry(work / "home")
    for name, family in (("local/outline-kontext", "kontext"), ("local/outline-klein", "flux2")):
        (version,) = registry.versions(name)
        assert version.lineage["family"] == family and f"registered {version.ref}" in text
        run = work / "runs" / name.split("/")[1]
        assert "5 images" in (run / "train.log").read_text()  # pair5 held out for the samples
        assert (run / "samples" / "step-000000" / "grid.png").is_file()
        doc = json.loads((work / "reports" / name.split("/")[1] / "metrics.json").read_text())
        assert [v["ref"] for v in doc["versions"]] == ["base", version.ref]
        assert {"dino_target", "dino_input"} <= set(doc["metrics"]), "the injected scorers must score the edits"
