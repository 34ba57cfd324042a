"""Temporaries written beside a target (restore, export): a killed writer's leftover is removed by the next
writer to that name, a living writer's never is (pending.py)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagechain import pending
from imagechain.stores import temporary_of


def test_sweep_removes_unlocked_temporaries_of_that_name_only(tmp_path: Path) -> None:
    final = tmp_path / "disk.img"
    orphan = tmp_path / "disk.img.tmp-0123abcd"
    orphan.write_bytes(b"x" * 5000)
    others = [tmp_path / "disk.img.tmp-0123abc", tmp_path / "other.img.tmp-0123abcd", tmp_path / "disk.img",
              tmp_path / "disk.img.restored-0123abcd", tmp_path / "disk.img.tmp-0123ABCD"]  # fmt: skip
    for p in others:
        p.write_bytes(b"keep")
    (tmp_path / "disk.img.tmp-99999999").mkdir()  # not a file: not ours
    (tmp_path / "disk.img.tmp-88888888").symlink_to(tmp_path / "other.img.tmp-0123abcd")
    fd, live = pending.create(str(final))
    try:
        assert temporary_of(os.path.basename(live)) == "disk.img"
        assert pending.sweep(str(final)) == [(str(orphan), 5000)]
        assert not orphan.exists() and os.path.exists(live)
        assert all(p.read_bytes() == b"keep" for p in others)
        assert (tmp_path / "disk.img.tmp-99999999").is_dir()
        assert (tmp_path / "disk.img.tmp-88888888").is_symlink()
        assert pending.sweep(str(final)) == []  # the live one is locked
    finally:
        os.close(fd)  # its writer is gone: now it is a leftover
    assert pending.sweep(str(final)) == [(live, 0)]
    assert not os.path.exists(live)
    assert pending.sweep(str(tmp_path / "no-folder" / "x")) == []


def test_folders_are_swept_with_all_they_hold_and_only_in_folder_sweeps(tmp_path: Path) -> None:
    final = tmp_path / ".staging"
    orphan = tmp_path / ".staging.tmp-0123abcd"
    (orphan / "deep").mkdir(parents=True)
    (orphan / "deep" / "f").write_bytes(b"x" * 300)
    (orphan / "g").write_bytes(b"y" * 200)
    (orphan / "deep").chmod(0o500)  # as a copy of a read-only folder leaves it
    file_twin = tmp_path / ".staging.tmp-89abcdef"
    file_twin.write_bytes(b"a file, not a staging folder")
    fd, live = pending.create(str(final), folder=True)
    try:
        assert os.path.isdir(live) and temporary_of(os.path.basename(live)) == ".staging"
        assert pending.sweep(str(final)) == [(str(file_twin), 28)]  # a file sweep takes no folder
        assert orphan.is_dir()
        file_twin.write_bytes(b"kept")
        assert pending.sweep(str(final), folders=True) == [(str(orphan), 500)]  # nor a folder sweep a file
        assert not orphan.exists() and os.path.isdir(live) and file_twin.exists()
    finally:
        os.close(fd)
    assert pending.sweep(str(final), folders=True) == [(live, 0)]
    assert not os.path.exists(live)


def test_a_locked_temporary_survives_a_sweep_from_another_process(tmp_path: Path) -> None:
    final = tmp_path / "out.img"
    fd, live = pending.create(str(final))
    try:
        code = f"from imagechain import pending; print(pending.sweep({str(final)!r}))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "[]" and os.path.exists(live)
    finally:
        os.close(fd)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert live in out and not os.path.exists(live)


def test_create_takes_another_name_when_a_sweep_removed_its_first(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The race: a sweep locks and removes a temporary between its creation and its creator's lock."""
    final = tmp_path / "vol.img"
    real_flock = pending.fcntl.flock
    raced: list[str] = []

    def flock(fd: int, op: int) -> None:
        if not raced:  # the first creation: a sweep runs before the creator's lock lands
            name = next(p for p in tmp_path.iterdir() if p.name.startswith("vol.img.tmp-"))
            raced.append(str(name))
            assert pending.sweep(str(final)) == [(str(name), 0)]
        real_flock(fd, op)

    monkeypatch.setattr(pending.fcntl, "flock", flock)
    fd, tmp = pending.create(str(final))
    try:
        assert raced and tmp != raced[0] and os.path.exists(tmp) and not os.path.exists(raced[0])
    finally:
        os.close(fd)
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(tmp)]


@pytest.mark.parametrize("links", [True, False])
@pytest.mark.parametrize("noreplace", [True, False])
def test_publish_never_replaces_a_file_that_took_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         links: bool, noreplace: bool) -> None:  # fmt: skip
    """By hard link, by a rename that refuses to replace, or (FUSE FAT: neither) by a rename after a check."""
    if not links:
        def no_link(src: str, dst: str, **_how: object) -> None:
            raise OSError(errno.EPERM, "no hard links here")

        monkeypatch.setattr(pending.os, "link", no_link)
    if not noreplace:
        monkeypatch.setattr(pending.libc, "rename_noreplace", lambda src, dst: False)
    final = tmp_path / "vol.img"
    fd, tmp = pending.create(str(final))
    os.write(fd, b"restored")
    os.close(fd)
    final.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        pending.publish(tmp, str(final))
    assert final.read_bytes() == b"someone else's" and Path(tmp).read_bytes() == b"restored"
    final.unlink()
    pending.publish(tmp, str(final))
    assert final.read_bytes() == b"restored" and not os.path.exists(tmp)


def test_a_symlink_is_published_as_a_symlink(tmp_path: Path) -> None:
    """restore-files moves the symlinks of its copy into place too: never as the file they point to."""
    (tmp_path / "target.txt").write_text("x")
    os.symlink("target.txt", tmp_path / "staged")
    pending.publish(str(tmp_path / "staged"), str(tmp_path / "link"))
    assert os.readlink(tmp_path / "link") == "target.txt" and not os.path.lexists(tmp_path / "staged")


def test_under_dev_a_missing_name_is_a_device_not_attached() -> None:
    assert pending.in_dev("/dev/sdz") and pending.in_dev("/dev/disk/by-id/usb-x") and pending.in_dev("/dev/x/../y")
    assert not pending.in_dev("/dev/shm/vol.img") and not pending.in_dev("/devices/vol.img")
    assert not pending.in_dev("/tmp/vol.img") and not pending.in_dev("vol.img")
