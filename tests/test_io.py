import os
import stat

import pytest

from emguard.io import atomic_dir, read_json, write_json_atomic


def test_json_written_atomically_with_normal_mode(tmp_path):
    p = write_json_atomic(tmp_path / "a" / "m.json", {"x": float("nan"), "y": [1.5]})
    assert read_json(p) == {"x": None, "y": [1.5]}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask
    assert [f.name for f in p.parent.iterdir()] == ["m.json"]  # no temp file left


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "w").write_text("two")
            raise RuntimeError("crash mid-write")
    assert (target / "w").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("three")
    assert (target / "w").read_text() == "three"
