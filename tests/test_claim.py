"""emguard.ownership.claim: the one sequence by which a command takes its output folder
(lock, check, remove what --force replaces, mark, and for a whole-folder kind replace it
atomically). Each test sets up a folder, claims it, and checks the disk byte for byte."""

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from emguard.ownership import (
    EVAL,
    FolderBusyError,
    FolderConflictError,
    FolderKind,
    check_claim,
    claim,
    folder_lock,
    read_marker,
    write_marker,
)

FILES = FolderKind("things", ("result.json", "parts", "part_*.jsonl"))  # a file kind
WHOLE = FolderKind("blob", (), whole=True)  # replaced as a whole


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Lock files in this test's own cache, not the user's."""
    monkeypatch.setenv("EMGUARD_CACHE", str(tmp_path / "cache"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def ours(folder: Path, kind: FolderKind = FILES) -> Path:
    """A folder an earlier command of ``kind`` wrote, with a file of the user's beside."""
    folder.mkdir(parents=True)
    write_marker(folder, kind, tag="old")
    (folder / "result.json").write_text('{"old": 1}')
    (folder / "parts").mkdir()
    (folder / "parts" / "a.bin").write_bytes(b"\x00\x01")
    (folder / "part_1.jsonl").write_text("{}\n")
    (folder / "notes.txt").write_text("mine")
    return folder


def other_work(folder: Path):
    return lambda: FolderConflictError(f"{folder} holds other work; pass --force")


def busy_elsewhere(folder: Path, kind: FolderKind) -> BaseException | None:
    """What claiming ``folder`` from another thread raises (None: it got the claim)."""
    caught: list[BaseException | None] = []

    def attempt():
        try:
            with claim(folder, kind, what="a test"):
                caught.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            caught.append(e)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join(30)
    return caught[0]


# ----------------------------------------------------------------------------- file kinds


def test_a_free_folder_is_created_and_marked(tmp_path):
    folder = tmp_path / "a" / "out"
    with claim(folder, FILES, what="a test", marker={"key": "k1"}) as claimed:
        assert claimed.folder == claimed.path == folder and claimed.state == "free"
        assert claimed.removed == ()
        marker = read_marker(folder, FILES)
        assert marker["kind"] == "things" and marker["key"] == "k1"
        (claimed.path / "result.json").write_text("{}")
    assert sorted(p.name for p in folder.iterdir()) == [".emguard-things.json", "result.json"]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".emguard-write-test")]


def test_a_folder_of_ours_continues_with_its_marker_and_files(tmp_path):
    folder = ours(tmp_path / "out")
    before = snapshot(folder)
    with claim(folder, FILES, what="a test", marker={"tag": "new"}) as claimed:
        assert claimed.state == "ours" and claimed.removed == ()
    assert snapshot(folder) == before  # the marker is not rewritten, nothing removed


def test_a_foreign_folder_is_refused_naming_it_and_is_left_alone(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "result.json").write_text("my result")
    (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)
    for force in (False, True):
        with pytest.raises(FolderConflictError) as e:
            with claim(folder, FILES, what="this test (--out)", force=force,
                       conflict=other_work(folder)):
                pytest.fail("a foreign folder was claimed")
        message = str(e.value)
        assert str(folder) in message and "result.json" in message
        assert ".emguard-things.json" in message and "this test (--out)" in message
        assert "cannot tell that it wrote" in message
    assert snapshot(folder) == before
    with pytest.raises(FolderConflictError, match="cannot tell that it wrote"):
        check_claim(folder, FILES, "this test (--out)")


def test_same_work_without_a_marker_is_adopted_not_refused(tmp_path):
    """A folder written before markers existed whose record shows this very work."""
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "result.json").write_text("{}")
    with claim(folder, FILES, what="a test", same=True, marker={"key": "k"}) as claimed:
        assert claimed.state == "foreign"
    assert read_marker(folder, FILES)["key"] == "k"
    assert (folder / "result.json").read_text() == "{}"


def test_other_work_of_ours_is_refused_and_force_removes_only_its_files(tmp_path):
    folder = ours(tmp_path / "out")
    before = snapshot(folder)
    with pytest.raises(FolderConflictError, match="holds other work; pass --force"):
        with claim(folder, FILES, what="a test", conflict=other_work(folder)):
            pytest.fail("other work was claimed without --force")
    assert snapshot(folder) == before
    with claim(folder, FILES, what="a test", force=True, conflict=other_work(folder),
               marker={"tag": "new"}) as claimed:
        assert claimed.state == "ours"
        assert claimed.removed == ("part_1.jsonl", "parts", "result.json")
        assert sorted(p.name for p in folder.iterdir()) == [".emguard-things.json", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine"
    assert read_marker(folder, FILES)["tag"] == "new"


def test_force_alone_removes_nothing(tmp_path):
    """Without a conflict (the folder holds this very work) force keeps everything."""
    folder = ours(tmp_path / "out")
    before = snapshot(folder)
    with claim(folder, FILES, what="a test", force=True) as claimed:
        assert claimed.removed == ()
    assert snapshot(folder) == before


def test_the_conflict_error_is_made_only_when_the_folder_is_ours(tmp_path):
    def must_not_be_called():
        raise AssertionError("conflict called for a free folder")

    with claim(tmp_path / "free", FILES, what="a test", conflict=must_not_be_called):
        pass
    assert read_marker(tmp_path / "free", FILES) is not None


def test_a_file_as_output_folder_is_refused(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(FolderConflictError, match="is a file, not a folder"):
        with claim(target, FILES, what="a test"):
            pytest.fail("a file was claimed")
    assert target.read_text() == "x"


def test_check_claim_writes_nothing(tmp_path):
    folder = tmp_path / "a" / "b"
    assert check_claim(folder, FILES, "a test") == "free"
    assert check_claim(folder, FILES, "a test", writable=False) == "free"
    assert list(tmp_path.iterdir()) == []
    mine = ours(tmp_path / "mine")
    before = snapshot(mine)
    with pytest.raises(FolderConflictError, match="other work"):
        check_claim(mine, FILES, "a test", conflict=other_work(mine))
    assert check_claim(mine, FILES, "a test", conflict=other_work(mine), force=True) == "ours"
    assert snapshot(mine) == before  # force removes in claim, never in the check


def test_eval_kind_keeps_what_it_does_not_write(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "plot.png").write_bytes(b"png")  # not an eval file: the folder is free
    with claim(folder, EVAL, what="this evaluation (--out)", marker={"gen_key": "g"}):
        pass
    assert read_marker(folder, EVAL)["gen_key"] == "g"
    assert (folder / "plot.png").read_bytes() == b"png"


# ----------------------------------------------------------------------------- whole kinds


def test_a_whole_folder_is_written_in_a_temporary_folder_then_replaced(tmp_path):
    folder = ours(tmp_path / "blob", WHOLE)
    with claim(folder, WHOLE, what="a test", marker={"tag": "new"}) as claimed:
        assert claimed.path != folder and claimed.path.parent == folder.parent
        assert claimed.state == "ours"
        assert read_marker(claimed.path, WHOLE)["tag"] == "new"
        assert read_marker(folder, WHOLE)["tag"] == "old"  # untouched until the block ends
        (claimed.path / "weights.bin").write_bytes(b"new")
    assert sorted(p.name for p in folder.iterdir()) == [".emguard-blob.json", "weights.bin"]
    assert read_marker(folder, WHOLE)["tag"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "cache"]  # no temporaries


def test_an_exception_in_the_block_leaves_the_old_whole_folder(tmp_path):
    folder = ours(tmp_path / "blob", WHOLE)
    before = snapshot(folder)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        with claim(folder, WHOLE, what="a test", marker={"tag": "new"}) as claimed:
            (claimed.path / "weights.bin").write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "cache"]
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        with claim(fresh, WHOLE, what="a test"):
            raise RuntimeError("failed")
    assert not fresh.exists()


def test_a_foreign_folder_is_never_replaced_as_a_whole(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "anything.txt").write_text("mine")
    with pytest.raises(FolderConflictError, match="anything.txt but no .emguard-blob.json"):
        with claim(folder, WHOLE, what="the blob (--out)"):
            pytest.fail("a foreign folder was claimed")
    assert snapshot(folder) == {"anything.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "mine"]


# ----------------------------------------------------------------------------- the lock


def test_the_lock_is_held_for_the_block(tmp_path):
    folder = tmp_path / "out"
    with claim(folder, FILES, what="a test"):
        assert isinstance(busy_elsewhere(folder, FILES), FolderBusyError)
        with claim(folder, FILES, what="a test") as again:  # this thread holds it: re-entered
            assert again.state == "ours"
        assert isinstance(busy_elsewhere(folder, FILES), FolderBusyError)  # still held
    assert busy_elsewhere(folder, FILES) is None  # released with the block


def test_the_lock_is_released_when_the_block_fails(tmp_path):
    folder = tmp_path / "blob"
    with pytest.raises(RuntimeError):
        with claim(folder, WHOLE, what="a test"):
            raise RuntimeError("failed")
    assert busy_elsewhere(folder, WHOLE) is None


def test_a_recipe_holding_the_folder_claims_it_inside(tmp_path):
    """train() and run_eval() lock the folder before their first check and claim later."""
    folder = tmp_path / "run"
    with folder_lock(folder):
        with claim(folder, FILES, what="a test"):
            (folder / "result.json").write_text("{}")
        assert isinstance(busy_elsewhere(folder, FILES), FolderBusyError)  # the outer lock
    assert busy_elsewhere(folder, FILES) is None


HOLDER = textwrap.dedent("""
    import sys, time
    from emguard.ownership import FolderKind, claim
    kind = FolderKind("blob", (), whole=True)
    with claim(sys.argv[1], kind, what="a test", marker={"by": "holder"}):
        print("claimed", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def test_another_process_claiming_the_folder_makes_this_one_busy_or_wait(tmp_path):
    import os

    folder = tmp_path / "blob"
    env = {**os.environ, "EMGUARD_CACHE": str(tmp_path / "cache")}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), "1.5"], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(FolderBusyError, match="another emguard process is writing"):
            with claim(folder, WHOLE, what="a test"):
                pytest.fail("claimed a folder another process holds")
        with claim(folder, WHOLE, what="a test", wait=60, marker={"by": "waiter"}):
            pass  # waited for the holder, which replaced the folder first
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((folder / ".emguard-blob.json").read_text())["by"] == "waiter"
