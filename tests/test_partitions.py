"""partitions.py, the one MBR/GPT reader, against tables sfdisk wrote: what it reads is what sfdisk says."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from racker.errors import BadDisk
from racker.sources import partitions

MiB = 1 << 20
SIZE = 64 * MiB


def _disk(path: Path, script: str) -> list[dict]:
    with open(path, "wb") as handle:
        handle.truncate(SIZE)
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)], input=script, text=True, check=True)
    listed = subprocess.run(["sfdisk", "--json", str(path)], capture_output=True, text=True, check=True).stdout
    return json.loads(listed)["partitiontable"]["partitions"]


def _read(path: Path, *, cached: bool = False) -> tuple[str, list[partitions.Volume]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        read = partitions.fd_reader(fd)
        return partitions.table(partitions.cached(read) if cached else read, SIZE)
    finally:
        os.close(fd)


@pytest.mark.parametrize("cached", [False, True], ids=["fd", "cached"])
def test_mbr_with_logical_partitions(tmp_path: Path, cached: bool) -> None:
    said = _disk(tmp_path / "d", "label: dos\n,8M,83\n,8M,ef\n,,5\n,8M,83\n,8M,82\n")
    label, volumes = _read(tmp_path / "d", cached=cached)
    assert label == "dos"
    expected = [(int(p["node"].rpartition("d")[2]), p["start"] * 512, p["size"] * 512, p["type"]) for p in said if p["type"] != "5"]
    assert [(v.number, v.offset, v.size, v.type) for v in volumes] == expected
    assert [v.number for v in volumes] == [1, 2, 5, 6]


@pytest.mark.parametrize("cached", [False, True], ids=["fd", "cached"])
def test_gpt_and_its_backup(tmp_path: Path, cached: bool) -> None:
    said = _disk(tmp_path / "d", f"label: gpt\nsize=8M, type={partitions.GPT_ESP}\ntype={partitions.GPT_ROOT_X86_64}, name=root\n")
    label, volumes = _read(tmp_path / "d", cached=cached)
    assert label == "gpt"
    assert [(v.offset, v.size, v.type.upper(), v.partuuid.upper()) for v in volumes] == [
        (p["start"] * 512, p["size"] * 512, p["type"], p["uuid"]) for p in said
    ]
    assert volumes[1].partlabel == "root"
    # A damaged primary header: the backup at the disk's end is read instead.
    with open(tmp_path / "d", "r+b") as handle:
        handle.seek(512 + 16)
        handle.write(b"\xff\xff\xff\xff")
    assert _read(tmp_path / "d", cached=cached) == (label, volumes)
    # Both damaged: one clear error.
    with open(tmp_path / "d", "r+b") as handle:
        handle.seek(SIZE - 512 + 16)
        handle.write(b"\xff\xff\xff\xff")
    with pytest.raises(BadDisk, match="the disk's GPT is corrupt"):
        _read(tmp_path / "d", cached=cached)


def test_a_disk_without_a_table_is_one_volume(tmp_path: Path) -> None:
    (tmp_path / "d").write_bytes(bytes(SIZE))
    assert _read(tmp_path / "d") == ("", [partitions.Volume("the whole disk", 0, SIZE)])
