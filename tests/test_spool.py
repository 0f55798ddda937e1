from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from dicom_io.spool import InvalidUIDError, Quarantine, Spool, SpoolFullError
from dicom_io.uids import is_valid_uid


@pytest.mark.parametrize(
    "uid",
    ["1.2.840.10008.1.2", "2.25.329800735698586629295641978511506172918", "1.0.3"],
)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "1",
        "1.02.3",
        "1.2.",
        ".1.2",
        "1.2.3/../../etc",
        "../1.2",
        "1.2.3 ",
        "1.2.a",
        "1." * 40 + "1",
        None,
    ],
)
def test_invalid_uids_never_become_paths(uid: object, tmp_path: Path) -> None:
    assert not is_valid_uid(uid)
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidUIDError):
        spool.adopt(written(tmp_path / "rx.dcm", b"data"), "1.2.3", "1.2.4", uid)  # type: ignore[arg-type]
    assert [p for p in (tmp_path / "spool").rglob("*") if p.is_file()] == []


def test_store_is_atomic_and_keeps_one_copy(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.adopt(written(spool.incoming / "a", b"one"), "1.2.3", "1.2.3.4", "1.2.3.4.5")
    again = spool.adopt(written(spool.incoming / "b", b"two"), "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert (first.replaced, again.replaced) == (False, True)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files == [tmp_path / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"]
    assert files[0].read_bytes() == b"two"


def test_quarantine_keeps_bytes_and_reason(tmp_path: Path) -> None:
    q = Quarantine(tmp_path)
    rel = q.adopt(written(tmp_path / "rx.dcm", b"\x00garbage"), "undecodable", calling_ae="X")
    assert (tmp_path / rel).read_bytes() == b"\x00garbage"
    side = json.loads((tmp_path / rel).with_suffix(".json").read_text())
    assert side["reason"] == "undecodable" and side["calling_ae"] == "X"


@pytest.fixture
def tiny_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real 1 MiB filesystem (tmpfs) so ENOSPC comes from the kernel."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_leaves_nothing_half_written(tiny_fs: Path) -> None:
    # the received files live on another filesystem: adopting them copies (EXDEV)
    src = tiny_fs.parent
    spool = Spool(tiny_fs / "spool")
    spool.adopt(written(src / "x.dcm", b"x" * 600_000), "1.2.3", "1.2.3.4", "1.2.3.4.1")
    with pytest.raises(SpoolFullError):
        spool.adopt(written(src / "y.dcm", b"y" * 600_000), "1.2.3", "1.2.3.4", "1.2.3.4.2")
    names = sorted(p.name for p in tiny_fs.rglob("*") if p.is_file())
    assert names == ["1.2.3.4.1.dcm"]
