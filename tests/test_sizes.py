"""sizes.py: the one size parser and the one size formatter."""

from __future__ import annotations

import pytest

from racker import sizes

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4G", 4 * GiB),
        ("512M", 512 * MiB),
        ("2.5G", int(2.5 * GiB)),
        ("1024", 1024),
        ("3GiB", 3 * GiB),
        ("16m", 16 * MiB),
        ("64 GB", 64 * GiB),
    ],
)
def test_parse_reads_binary_units(text: str, size: int) -> None:
    assert sizes.parse(text) == size


@pytest.mark.parametrize("text", ["", "big", "4X", "-1G", "1.2.3M"])
def test_parse_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        sizes.parse(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 bytes"),
        (1023, "1023 bytes"),
        (KiB, "1 KiB"),
        (16 * MiB, "16 MiB"),
        (int(2.5 * GiB), "2.5 GiB"),
        (64 * GiB, "64 GiB"),
        (5 << 40, "5 TiB"),
    ],
)
def test_human_is_binary_units_with_at_most_one_decimal(size: int, text: str) -> None:
    assert sizes.human(size) == text
    assert sizes.parse(text.replace(" bytes", "")) == size
