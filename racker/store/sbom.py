"""An image's software bill of materials, from the package manifest stored with it (packages.py):

    racker sbom IMAGE --format spdx-json        SPDX 2.3, JSON
    racker sbom IMAGE --format cyclonedx-json   CycloneDX 1.6, JSON

The image is the described package (SPDX) or the metadata's component (CycloneDX), of type
container; each package it holds carries a package URL (purl: pkg:deb/debian/bash@5.2.15-2%2Bb2?arch=amd64),
its architecture and its source package. Everything in it comes from the image (names,
versions, its digest and build time), so the same image always gives the same SBOM.
"""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse
import uuid

from racker import __version__, store
from racker.store import packages

FORMATS = ("spdx-json", "cyclonedx-json")
# purl types of each package manager (github.com/package-url/purl-spec), and the namespace when os-release names none.
PURL_TYPES = {"dpkg": ("deb", "debian"), "rpm": ("rpm", "fedora"), "apk": ("apk", "alpine"), "pacman": ("alpm", "arch")}
_NAMESPACE = uuid.UUID("5f1d6a3e-8c2b-4f57-9a51-2b7f3c0e9d11")  # racker's: document ids derived from the image digest


def of(image: store.StoredImage) -> list[packages.Package]:
    """The image's packages: its manifest's, or read now for an image stored before racker kept them."""
    listed = image.manifest.get("packages")
    return listed if isinstance(listed, list) else packages.read(image.rootfs)


def purl(package: packages.Package, distro: str) -> str:
    kind, default = PURL_TYPES.get(package["manager"], ("generic", ""))
    namespace = distro or default
    quote = lambda text: urllib.parse.quote(text, safe=".-_~")  # noqa: E731
    qualifiers = [f"arch={quote(package['arch'])}"] if package.get("arch") else []
    if distro:
        qualifiers.append(f"distro={quote(distro)}")
    at = f"@{quote(package['version'])}" if package.get("version") else ""
    return f"pkg:{kind}/{quote(namespace)}/{quote(package['name'])}{at}" + (f"?{'&'.join(qualifiers)}" if qualifiers else "")


def _distro(image: store.StoredImage) -> str:
    return str((image.manifest.get("distro") or {}).get("id") or "")


def _timestamp(image: store.StoredImage) -> str:
    """The image's build time as both formats want it: UTC, whole seconds, Z."""
    try:
        when = dt.datetime.fromisoformat(image.created).astimezone(dt.UTC)
    except ValueError:
        when = dt.datetime.fromtimestamp(0, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def write(image: store.StoredImage, form: str) -> dict:
    if form == "spdx-json":
        return spdx(image)
    if form == "cyclonedx-json":
        return cyclonedx(image)
    raise ValueError(form)


def spdx(image: store.StoredImage) -> dict:
    distro = _distro(image)
    image_id = "SPDXRef-Image"
    listed = []
    relationships = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": image_id}]
    for number, package in enumerate(of(image)):
        spdx_id = f"SPDXRef-Package-{number}-{re.sub(r'[^A-Za-z0-9.-]+', '-', package['name'])}"
        reference = {"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl", "referenceLocator": purl(package, distro)}
        origin = f"built from the {package['manager']} source package {package['source']}"
        listed.append(
            {
                "SPDXID": spdx_id,
                "name": package["name"],
                "versionInfo": package["version"],
                "downloadLocation": "NOASSERTION",
                "filesAnalyzed": False,
                "licenseConcluded": "NOASSERTION",
                "licenseDeclared": "NOASSERTION",
                "copyrightText": "NOASSERTION",
                "sourceInfo": origin,
                "externalRefs": [reference],
            }
        )
        relationships.append({"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": spdx_id})
    container = {
        "SPDXID": image_id,
        "name": image.name,
        "versionInfo": image.digest,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "primaryPackagePurpose": "CONTAINER",
        "checksums": [{"algorithm": "SHA256", "checksumValue": image.digest.removeprefix("sha256:")}],
    }
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": image.name,
        "documentNamespace": f"https://spdx.org/spdxdocs/racker-{uuid.uuid5(_NAMESPACE, image.name + image.digest)}",
        "creationInfo": {"created": _timestamp(image), "creators": [f"Tool: racker-{__version__}"]},
        "documentDescribes": [image_id],
        "packages": [container, *listed],
        "relationships": relationships,
    }


def cyclonedx(image: store.StoredImage) -> dict:
    distro = _distro(image)
    components, refs = [], []
    for number, package in enumerate(of(image)):
        locator = purl(package, distro)
        ref = locator if locator not in refs else f"{locator}#{number}"
        refs.append(ref)
        components.append(
            {
                "type": "library",
                "bom-ref": ref,
                "name": package["name"],
                "version": package["version"],
                "purl": locator,
                "properties": [
                    {"name": "racker:package:manager", "value": package["manager"]},
                    {"name": "racker:package:arch", "value": package["arch"]},
                    {"name": "racker:package:source", "value": package["source"]},
                ],
            }
        )
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": f"urn:uuid:{uuid.uuid5(_NAMESPACE, image.name + image.digest)}",
        "version": 1,
        "metadata": {
            "timestamp": _timestamp(image),
            "tools": {"components": [{"type": "application", "name": "racker", "version": __version__}]},
            "component": {"type": "container", "bom-ref": "image", "name": image.name, "version": image.digest},
        },
        "components": components,
        "dependencies": [{"ref": "image", "dependsOn": refs}, *({"ref": ref} for ref in refs)],
    }
