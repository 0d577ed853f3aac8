"""Documents from images, boxes and servers, parsed as what they are: a stranger's bytes.

Each is read up to a size limit before a parser sees it (a metadata file of gigabytes is no
metadata file), and XML goes through defusedxml, which refuses entity expansion (billion
laughs), external entities and DTDs. Errors are one line: BadArchive, naming the document.
"""

from __future__ import annotations

import json
import tomllib
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import IO, Any

import defusedxml.ElementTree
from defusedxml import DefusedXmlException

from racker.errors import BadArchive

JSON_LIMIT = 4 << 20  # box metadata, OCI indexes, manifests and configs are KiB
TOML_LIMIT = 1 << 20
XML_LIMIT = 4 << 20  # an OVF descriptor is KiB


def read(source: bytes | str | Path | IO[bytes], *, limit: int, name: str) -> bytes:
    """At most `limit` bytes of a document; BadArchive if it has more."""
    if isinstance(source, str):
        source = source.encode()
    if isinstance(source, bytes):
        data = source[: limit + 1]
    elif isinstance(source, Path):
        try:
            with open(source, "rb") as handle:
                data = handle.read(limit + 1)
        except OSError as error:
            raise BadArchive(f"{name}: cannot be read ({error.strerror})") from None
    else:
        data = source.read(limit + 1)
    if len(data) > limit:
        raise BadArchive(f"{name} is larger than {limit} bytes, too large for what it should be: refused")
    return data


def load_json(source: bytes | str | Path | IO[bytes], *, name: str, limit: int = JSON_LIMIT) -> Any:
    data = read(source, limit=limit, name=name)
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise BadArchive(f"{name} is not JSON") from None


def load_toml(source: bytes | str | Path | IO[bytes], *, name: str, limit: int = TOML_LIMIT) -> dict:
    data = read(source, limit=limit, name=name)
    try:
        return tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise BadArchive(f"{name} is not valid TOML ({error})") from None


def load_xml(source: bytes | str | Path | IO[bytes], *, name: str, limit: int = XML_LIMIT) -> ElementTree.Element:
    """The root element; no entity is expanded, no DTD or external resource is read."""
    data = read(source, limit=limit, name=name)
    try:
        return defusedxml.ElementTree.fromstring(data, forbid_dtd=True)
    except DefusedXmlException as error:
        raise BadArchive(f"{name} is refused: {type(error).__name__} (entities and DTDs are not read from images)") from None
    except ElementTree.ParseError as error:
        raise BadArchive(f"{name} is not readable XML: {error}") from None
