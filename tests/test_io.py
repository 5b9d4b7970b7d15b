import pytest

from safegene.errors import OutputExistsError
from safegene.io import atomic_dir, atomic_file, check_output_path


def test_atomic_dir_commits_only_on_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp left behind either
    with atomic_dir(out) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (out / "done.txt").read_text() == "ok"


def test_atomic_dir_overwrite_replaces_whole_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


def test_atomic_file_keeps_old_content_on_failure(tmp_path):
    f = tmp_path / "r.json"
    f.write_text("original")
    with pytest.raises(ValueError):
        with atomic_file(f) as h:
            h.write("partial")
            raise ValueError
    assert f.read_text() == "original"


def test_output_may_not_overlap_an_input(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    with pytest.raises(OutputExistsError, match="overlaps the input"):
        check_output_path(src, inputs=[src], overwrite=True)
    with pytest.raises(OutputExistsError, match="overlaps the input"):
        check_output_path(src / "sub", inputs=[src], overwrite=True)
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        check_output_path(existing, inputs=[src])
    assert check_output_path(existing, inputs=[src], overwrite=True) == existing.resolve()


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    """Review finding: outputs came out 0700/0600 (tempfile's private modes), unreadable to the user's group."""
    import os
    import stat

    from safegene.io import atomic_dir, write_json

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            write_json(tmp / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "a.json").stat().st_mode) == 0o644
