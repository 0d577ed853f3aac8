"""Documents from images, boxes and servers are parsed as untrusted: XML without entities or DTDs
(a billion-laughs OVF is refused with one line, quickly), JSON refused above a size limit before
it is parsed (a box's metadata.json, an OCI layout's manifest)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from conftest import racker
from racker import untrusted
from racker.errors import BadArchive
from racker.sources import oci, ova, vagrant

LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + "".join(f' <!ENTITY lol{n} "{("&lol" + (str(n - 1) if n > 1 else "") + ";") * 10}">\n' for n in range(1, 10))
    + ']>\n<Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References>'
    '<File ovf:id="f1" ovf:href="&lol9;"/></References><DiskSection><Disk ovf:fileRef="f1"/></DiskSection></Envelope>\n'
)
EXTERNAL = (
    '<?xml version="1.0"?>\n<!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/hostname">]>\n'
    '<Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References><File ovf:id="f1" ovf:href="&x;"/></References>'
    '<DiskSection><Disk ovf:fileRef="f1"/></DiskSection></Envelope>\n'
)


@pytest.mark.parametrize("document", [LAUGHS, EXTERNAL], ids=["billion-laughs", "external-entity"])
def test_an_ovf_with_entities_is_refused_at_once(tmp_path: Path, document: str) -> None:
    (tmp_path / "vm.ovf").write_text(document)
    started = time.monotonic()
    with pytest.raises(BadArchive, match=r"^vm\.ova: the OVF descriptor vm\.ovf is refused: (DTDForbidden|EntitiesForbidden)"):
        ova.first_disk(tmp_path / "vm.ovf", "vm.ova")
    assert time.monotonic() - started < 1


def test_a_box_metadata_json_above_the_limit_is_refused_unparsed(tmp_path: Path) -> None:
    (tmp_path / "metadata.json").write_text(json.dumps({"provider": "libvirt", "pad": "x" * vagrant.METADATA_LIMIT}))
    with pytest.raises(BadArchive, match=r"^box: metadata\.json is larger than 1048576 bytes, too large for what it should be: refused$"):
        vagrant.unpack_dir(tmp_path, tmp_path / "rootfs", name="box", provider=None)


def test_an_oci_manifest_above_the_limit_is_refused_unparsed(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    manifest = json.dumps({"config": {"digest": "sha256:" + "0" * 64}, "pad": "x" * untrusted.JSON_LIMIT}).encode()
    digest = hashlib.sha256(manifest).hexdigest()
    (blobs / digest).write_bytes(manifest)
    index = {"manifests": [{"digest": f"sha256:{digest}", "annotations": {"org.opencontainers.image.ref.name": "t"}}]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(BadArchive, match=rf"^the manifest sha256:{digest} is larger than {untrusted.JSON_LIMIT} bytes"):
        oci.read_layout(tmp_path, "t")


def test_deeply_nested_json_is_one_error() -> None:
    with pytest.raises(BadArchive, match="is not JSON"):
        untrusted.load_json(b"[" * 200_000, name="deep.json")


@pytest.mark.slow
@pytest.mark.root
def test_pulling_a_billion_laughs_ova_is_one_line_and_stores_nothing(tmp_path: Path, private_store: dict[str, str]) -> None:
    path = tmp_path / "laughs.ova"
    with tarfile.open(path, "w") as archive:
        for name, data in (("vm.ovf", LAUGHS.encode()), ("disk1.vmdk", os.urandom(4096))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    done = racker("pull", f"file:{path}", env=private_store, timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if not line.startswith("racker: warning:")]  # no .mf: a warning
    assert len(errors) == 1 and "vm.ovf is refused: DTDForbidden" in errors[0], done.stderr
    assert not racker("images", "--json", env=private_store).stdout.strip("[]\n ")
