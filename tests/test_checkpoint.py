"""Checkpoint folders: the newest complete one is found, old ones are pruned without ever leaving a partial one."""

from pathlib import Path

from finetune import checkpoint


def make(run: Path, *steps: int, complete: bool = True) -> None:
    for step in steps:
        folder = checkpoint.checkpoint_dir(run, step)
        folder.mkdir(parents=True)
        (folder / "lora.safetensors").write_bytes(b"x")
        if complete:
            (folder / checkpoint.STATE_FILE).write_bytes(b"x")


def names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    make(tmp_path, 100, 200, 300, 1000)
    make(tmp_path, 1100, complete=False)  # being written (no state file yet): not counted, not touched
    removed = checkpoint.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step-000100", "step-000200"]
    assert names(tmp_path) == ["step-000300", "step-001000", "step-001100"]
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-001000"


def test_prune_zero_keeps_all_and_fewer_than_keep_is_a_no_op(tmp_path):
    make(tmp_path, 1, 2, 3)
    assert checkpoint.prune_checkpoints(tmp_path, keep=0) == []
    assert checkpoint.prune_checkpoints(tmp_path, keep=5) == []
    assert names(tmp_path) == ["step-000001", "step-000002", "step-000003"]
    assert checkpoint.prune_checkpoints(tmp_path / "no-such-run", keep=1) == []


def test_an_interrupted_deletion_is_finished_and_never_resumed_from(tmp_path):
    make(tmp_path, 5, 6)
    leftover = tmp_path / "checkpoints" / ".del-step-000004"  # a run killed while deleting step 4
    leftover.mkdir()
    (leftover / checkpoint.STATE_FILE).write_bytes(b"x")
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-000006"
    checkpoint.prune_checkpoints(tmp_path, keep=1)
    assert names(tmp_path) == ["step-000006"]
