"""LVM2 volume groups read in user space: no device-mapper, no lvm2 tools.

    PV label (one of sectors 0-3: "LABELONE") ──▶ pv_header: the PV's UUID, its metadata areas
    metadata area header (" LVM2 x[5A%r0N*>") ──▶ where the newest metadata text sits in its circular buffer
    metadata text (LVM2's config format) ──▶ the VG's PVs, extent size, LVs and their segments

A linear LV (segments of type "striped" with one stripe) is a list of byte ranges
of the PVs; anything else (thin, raid, mirror, several stripes, snapshots) needs
device-mapper and is refused with its name.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

from racker.errors import BadDisk
from racker.sources.partitions import SECTOR, Volume, read_at

LABEL = b"LABELONE"
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_HEADER = 512
METADATA_LIMIT = 16 << 20


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    name: str
    volume: Volume | None  # None: not readable without device-mapper
    why_not: str = ""


def logical_volumes(fd: int, pvs: list[Volume]) -> list[LogicalVolume]:
    """The LVs of every VG whose PVs are among `pvs` (volumes holding an LVM2 label)."""
    by_uuid: dict[str, Volume] = {}
    texts: dict[str, str] = {}
    for pv in pvs:
        pv_uuid, text = _read_pv(fd, pv)
        by_uuid[pv_uuid] = pv
        if text:
            texts[pv_uuid] = text
    found: list[LogicalVolume] = []
    seen_vgs: set[str] = set()
    for text in texts.values():
        name, vg = _volume_group(parse(text))
        if name in seen_vgs:
            continue
        seen_vgs.add(name)
        found += _lvs(name, vg, by_uuid)
    return found


def _read_pv(fd: int, pv: Volume) -> tuple[str, str]:
    """(the PV's UUID, the newest metadata text in its first metadata area, or "")."""
    for sector in range(4):
        label = read_at(fd, pv.offset + sector * SECTOR, SECTOR)
        if label[:8] == LABEL:
            break
    else:
        raise BadDisk(f"{pv.name} has no LVM2 label")
    crc = struct.unpack_from("<I", label, 16)[0]
    if _lvm_crc(label[20:]) != crc:
        raise BadDisk(f"{pv.name}: the LVM2 label's checksum does not match: corrupt")
    header = struct.unpack_from("<I", label, 20)[0]
    pv_uuid = label[header : header + 32].decode("ascii", "replace")
    position = header + 40
    areas: list[list[tuple[int, int]]] = [[], []]  # data areas, then metadata areas, each ended by (0, 0)
    for kind in range(2):
        while position + 16 <= SECTOR:
            offset, size = struct.unpack_from("<QQ", label, position)
            position += 16
            if offset == 0:
                break
            areas[kind].append((offset, size))
    for mda_offset, _size in areas[1]:
        text = _metadata(fd, pv, mda_offset)
        if text:
            return pv_uuid, text
    return pv_uuid, ""


def _metadata(fd: int, pv: Volume, mda_offset: int) -> str:
    start = pv.offset + mda_offset
    head = read_at(fd, start, MDA_HEADER)
    if head[4:20] != MDA_MAGIC:
        raise BadDisk(f"{pv.name}: the LVM2 metadata area header is missing")
    if _lvm_crc(head[4:]) != struct.unpack_from("<I", head, 0)[0]:
        raise BadDisk(f"{pv.name}: the LVM2 metadata area header's checksum does not match: corrupt")
    area_size = struct.unpack_from("<Q", head, 32)[0]
    offset, size, checksum, _flags = struct.unpack_from("<QQII", head, 40)
    if not size:
        return ""
    if size > METADATA_LIMIT or offset >= area_size or area_size <= MDA_HEADER:
        raise BadDisk(f"{pv.name}: the LVM2 metadata location is out of its area: corrupt")
    first = min(size, area_size - offset)
    text = read_at(fd, start + offset, first)
    if first < size:  # the circular buffer wraps to just after the header
        text += read_at(fd, start + MDA_HEADER, size - first)
    if _lvm_crc(text) != checksum:
        raise BadDisk(f"{pv.name}: the LVM2 metadata's checksum does not match: corrupt")
    return text.rstrip(b"\0").decode("utf-8", "replace")


def _lvm_crc(data: bytes) -> int:
    """LVM2's calc_crc: CRC-32 seeded with 0xf597a6cf and no final inversion."""
    return zlib.crc32(data, 0xF597A6CF ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def _volume_group(config: dict) -> tuple[str, dict]:
    for name, value in config.items():
        if isinstance(value, dict) and "physical_volumes" in value:
            return name, value
    raise BadDisk("the LVM2 metadata names no volume group")


def _lvs(vg_name: str, vg: dict, pvs: dict[str, Volume]) -> list[LogicalVolume]:
    extent = int(vg.get("extent_size", 0)) * SECTOR
    pv_ranges: dict[str, tuple[Volume | None, int]] = {}
    for key, pv in vg.get("physical_volumes", {}).items():
        volume = pvs.get(str(pv.get("id", "")).replace("-", ""))
        pv_ranges[key] = (volume, int(pv.get("pe_start", 0)) * SECTOR)
    found = []
    for lv_name, lv in vg.get("logical_volumes", {}).items():
        if "VISIBLE" not in lv.get("status", []):
            continue
        try:
            ranges = _ranges(vg_name, lv_name, lv, extent, pv_ranges)
        except _Unreadable as why:
            found.append(LogicalVolume(vg_name, lv_name, None, str(why)))
            continue
        size = sum(length for _offset, length in ranges)
        volume = Volume(f"LV {vg_name}/{lv_name}", ranges[0][0], size, ranges=tuple(ranges) if len(ranges) > 1 else ())
        found.append(LogicalVolume(vg_name, lv_name, volume))
    return found


class _Unreadable(Exception):
    pass


def _ranges(vg: str, name: str, lv: dict, extent: int, pvs: dict[str, tuple[Volume | None, int]]) -> list[tuple[int, int]]:
    segments = sorted((v for k, v in lv.items() if k.startswith("segment") and isinstance(v, dict)), key=lambda s: int(s["start_extent"]))
    if not segments or extent <= 0:
        raise _Unreadable(f"LV {vg}/{name} has no segments")
    ranges: list[tuple[int, int]] = []
    for segment in segments:
        kind = segment.get("type")
        stripes = segment.get("stripes", [])
        if kind != "striped" or int(segment.get("stripe_count", 0)) != 1 or len(stripes) != 2:
            what = "striped over several PVs" if kind == "striped" else kind
            raise _Unreadable(f"LV {vg}/{name} is {what}: only linear volumes can be read without device-mapper")
        volume, pe_start = pvs.get(stripes[0], (None, 0))
        if volume is None:
            raise _Unreadable(f"LV {vg}/{name} lies on a PV that is not on this disk")
        offset = volume.offset + pe_start + int(stripes[1]) * extent
        length = int(segment["extent_count"]) * extent
        if offset + length > volume.offset + volume.size:
            raise _Unreadable(f"LV {vg}/{name} reaches past the end of its PV: the image is truncated or corrupt")
        if ranges and ranges[-1][0] + ranges[-1][1] == offset:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)  # contiguous: one range
        else:
            ranges.append((offset, length))
    return ranges


# -- LVM2's text format -------------------------------------------------------------------

_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|[{}\[\]=,]|[^\s{}\[\]=,"#]+')


def parse(text: str) -> dict:
    """`key = value`, `section { … }`, values a number, a "string" or a [list]: nested dicts."""
    tokens = [t for t in _TOKEN.findall(text) if t.strip() and not t.startswith("#")]
    position = 0

    def value() -> object:
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "[":
            items = []
            while tokens[position] != "]":
                if tokens[position] == ",":
                    position += 1
                    continue
                items.append(value())
            position += 1
            return items
        if token.startswith('"'):
            return re.sub(r"\\(.)", r"\1", token[1:-1])
        return int(token) if re.fullmatch(r"-?\d+", token) else token

    def section(end: str | None) -> dict:
        nonlocal position
        result: dict = {}
        while position < len(tokens) and tokens[position] != end:
            key = tokens[position]
            position += 1
            if tokens[position] == "{":
                position += 1
                result[key] = section("}")
                position += 1
            elif tokens[position] == "=":
                position += 1
                result[key] = value()
            else:
                raise BadDisk(f"the LVM2 metadata text cannot be read near {key!r}")
        return result

    try:
        return section(None)
    except IndexError:
        raise BadDisk("the LVM2 metadata text ends too early: corrupt") from None
