import hashlib
import os
import stat

import pytest

from finetune.files import atomic_dir, atomic_file, sha256_file, write_atomic


def test_write_atomic_replaces_and_uses_default_permissions(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_interrupted_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.zip"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.zip"]


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "runs" / "step-000010"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"half")
        raise RuntimeError("killed")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"whole")
        assert not target.exists()  # nothing visible until the block ends
    assert (target / "a.bin").read_bytes() == b"whole"
    assert [p.name for p in target.parent.iterdir()] == ["step-000010"]


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
