"""Platforms of multi-arch indexes (pull --platform) and plain-HTTP registries (pull --insecure).

The index is real: the seeded image and an arm64 twin (the same layers, a
config saying arm64), pushed with `skopeo copy --all` to the loopback registry.
An arm64 image cannot boot here; pulling and recording it is what is tested.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import racker, racker_here, running_registry
from racker import images, store
from racker.errors import BadReference
from racker.sources import insecure_pull, oci, recipe_for
from racker.store import platforms, refs
from racker.store.platforms import Platform

INDEX = "application/vnd.oci.image.index.v1+json"

# -- platform strings (unit) -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("linux/arm64", Platform("linux", "arm64")),
        ("linux/arm/v7", Platform("linux", "arm", "v7")),
        ("Linux/AMD64", Platform("linux", "amd64")),
        ("linux/x86_64", Platform("linux", "amd64")),
        ("linux/aarch64", Platform("linux", "arm64")),
        ("linux/arm64/v8", Platform("linux", "arm64")),  # v8 is what arm64 is anyway
        ("windows/amd64", Platform("windows", "amd64")),
    ],
)
def test_platforms_parse_as_docker_writes_them(text: str, expected: Platform) -> None:
    assert platforms.parse(text) == expected
    assert platforms.from_tag(expected.tag) == expected
    assert platforms.parse(str(expected)) == expected


@pytest.mark.parametrize(
    "text", ["", "linux", "arm64", "linux/", "/arm64", "linux/arm/v7/x", "linux/amd46", "lunix/amd64", "linux/arm/v 7"]
)
def test_a_bad_platform_is_one_error(text: str) -> None:
    with pytest.raises(BadReference, match=r"^bad platform .*(expected OS/ARCH|unknown|bad variant)") as raised:
        platforms.parse(text)
    assert "\n" not in str(raised.value)


def test_skopeo_is_told_the_platform() -> None:
    argv = oci.copy_argv("docker://h/x:1", Path("/l"), "t", platform=platforms.parse("linux/arm/v7"))
    assert argv[: argv.index("copy")] == ["skopeo", "--override-os", "linux", "--override-arch", "arm", "--override-variant", "v7"]
    assert oci.copy_argv("docker://h/x:1", Path("/l"), "t")[1] == "copy"


def test_a_platform_is_part_of_a_docker_name_unless_it_is_the_hosts() -> None:
    arm = refs.parse("docker://127.0.0.1:5000/multi:latest@linux-arm-v7")
    assert (arm.target, arm.platform) == ("127.0.0.1:5000/multi:latest", Platform("linux", "arm", "v7"))
    assert str(arm) == "docker://127.0.0.1:5000/multi:latest@linux-arm-v7"
    assert refs.parse(str(arm) + "+vm").platform == arm.platform
    pinned = refs.parse("docker://h:5/x@sha256:" + "a" * 64 + "@linux-arm64")
    assert pinned.target.endswith("@sha256:" + "a" * 64) and pinned.platform == Platform("linux", "arm64")
    host = platforms.host()
    assert refs.parse(f"docker://h:5/x@{host.tag}") == refs.parse("docker://h:5/x"), "the host's platform is the default name"
    with pytest.raises(BadReference, match="bad platform"):
        refs.parse("docker://h:5/x@linux-amd46")
    with pytest.raises(BadReference, match="only be chosen for docker://"):
        refs.parse("file:/x.qcow2").for_platform(Platform("linux", "arm64"))
    bootstrap = refs.parse("bootstrap:debian/bookworm@linux-arm64")
    assert (bootstrap.target, bootstrap.platform, str(bootstrap)) == (
        "debian/bookworm",
        Platform("linux", "arm64"),
        "bootstrap:debian/bookworm@linux-arm64",
    )
    catalogued = refs.parse("debian-bookworm@linux-arm64")
    assert (catalogued.scheme, catalogued.target, str(catalogued)) == ("catalog", "debian-bookworm", "debian-bookworm@linux-arm64")


def test_resolve_names_each_platform_apart() -> None:
    arm, ppc = Platform("linux", "arm64"), Platform("linux", "ppc64le")
    assert images.resolve("docker://h:5/x:1", arm).name == "docker://h:5/x:1@linux-arm64"
    assert images.resolve("docker://h:5/x:1@linux-arm64", arm).name == "docker://h:5/x:1@linux-arm64"
    assert images.resolve("docker://h:5/x:1", platforms.host()).name == "docker://h:5/x:1"
    assert recipe_for(images.resolve("docker://h:5/x:1", arm).source) != recipe_for(images.resolve("docker://h:5/x:1").source)
    with pytest.raises(BadReference, match="names the platform linux/arm64, not linux/ppc64le"):
        images.resolve("docker://h:5/x:1@linux-arm64", ppc)
    # A catalogue image is bootstrapped for the platform (mmdebstrap --arch), under a name of its own.
    catalogued = images.resolve("debian-bookworm", arm)
    assert (catalogued.name, str(catalogued.source)) == ("debian-bookworm@linux-arm64", "bootstrap:debian/bookworm@linux-arm64")
    assert images.resolve("debian-bookworm@linux-arm64").name == "debian-bookworm@linux-arm64"
    assert images.resolve("debian-bookworm", platforms.host()).name == "debian-bookworm"
    assert recipe_for(catalogued.source, catalogued.entry) != recipe_for(images.resolve("debian-bookworm").source, catalogued.entry)
    with pytest.raises(BadReference, match="names the platform linux/arm64, not linux/ppc64le"):
        images.resolve("debian-bookworm@linux-arm64", ppc)


def test_insecure_holds_for_one_pull_only() -> None:
    assert oci.tls_verify("registry.example:5000")
    with insecure_pull(True):
        assert not oci.tls_verify("registry.example:5000")
        assert not oci.sources(refs.parse("docker://registry.example:5000/x:1"))[0][1]
    assert oci.tls_verify("registry.example:5000")
    with contextlib.suppress(RuntimeError), insecure_pull(True):
        raise RuntimeError
    assert oci.tls_verify("registry.example:5000"), "--insecure outlived a pull that failed"
    assert oci.tls_verify("registry.example:5000") and not oci.tls_verify("127.0.0.1:5000")


def test_a_bad_platform_on_the_command_line_is_one_line() -> None:
    result = racker_here("pull", "docker://127.0.0.1:1/x:1", "--platform", "linux/amd46")  # the slow tests run the real command
    assert result.returncode == 125
    assert result.stderr.strip().splitlines() == ["racker: error: bad platform 'linux/amd46': unknown architecture 'amd46' "
                                                  "(expected OS/ARCH[/VARIANT], e.g. linux/arm64 or linux/arm/v7)"]  # fmt: skip


# -- a real multi-arch index ---------------------------------------------------


def _blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _read(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


@pytest.fixture(scope="module")
def multi_arch(seeded_registry: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """HOST/multi:latest, an index of the seeded image (amd64) and its arm64 twin:
    {"reference", "amd64", "arm64"} (the manifests' digests)."""
    host = seeded_registry["host"]
    layout = tmp_path_factory.mktemp("multi") / "layout"
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{host}/library/debian:bookworm", f"oci:{layout}:amd64"],
        check=True,
        timeout=600,
    )
    (descriptor,) = json.loads((layout / "index.json").read_text())["manifests"]
    manifest = json.loads(_read(layout, descriptor["digest"]))
    config = json.loads(_read(layout, manifest["config"]["digest"]))
    assert config["architecture"] == "amd64"
    arm_config = _blob(layout, json.dumps(dict(config, architecture="arm64")).encode())
    arm_manifest = dict(manifest, config=dict(manifest["config"], **arm_config))
    arm = dict(_blob(layout, json.dumps(arm_manifest).encode()), mediaType=descriptor["mediaType"])
    amd = {k: descriptor[k] for k in ("mediaType", "digest", "size")}
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [
            dict(amd, platform={"os": "linux", "architecture": "amd64"}),
            dict(arm, platform={"os": "linux", "architecture": "arm64"}),
        ],
    }
    listed = dict(_blob(layout, json.dumps(index).encode()), mediaType=INDEX, annotations={"org.opencontainers.image.ref.name": "multi"})
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [listed]}))
    reference = f"{host}/multi:latest"
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false", f"oci:{layout}:multi", f"docker://{reference}"],
        check=True,
        timeout=600,
    )
    return {"reference": f"docker://{reference}", "amd64": amd["digest"], "arm64": arm["digest"]}


def _store_holds_nothing() -> bool:
    tmp, refs_dir, images_dir = (store.home() / d for d in ("tmp", "refs", "images"))
    leftovers = [p for p in tmp.iterdir() if p.name != ".new"] if tmp.is_dir() else []
    return not leftovers and not (refs_dir.is_dir() and any(refs_dir.iterdir())) and not (images_dir.is_dir() and any(images_dir.iterdir()))


@pytest.mark.slow
def test_each_platform_of_an_index_is_its_own_stored_image(multi_arch: dict, private_store: dict) -> None:
    assert platforms.host() == Platform("linux", "amd64"), "the index's default entry is amd64"
    reference = multi_arch["reference"]
    default = racker("pull", reference, env=private_store)
    assert default.returncode == 0, default.stderr
    arm = racker("pull", reference, "--platform", "linux/arm64", env=private_store)
    assert arm.returncode == 0, arm.stderr
    assert arm.stdout.split()[0] == f"{reference}@linux-arm64"

    host_image, arm_image = store.lookup(reference), store.lookup(f"{reference}@linux-arm64")
    assert host_image is not None and arm_image is not None, "both platforms are stored, side by side"
    assert (host_image.manifest["oci"]["manifest_digest"], host_image.manifest["oci"]["platform"]) == (multi_arch["amd64"], "linux/amd64")
    assert (arm_image.manifest["oci"]["manifest_digest"], arm_image.manifest["oci"]["platform"]) == (multi_arch["arm64"], "linux/arm64")
    assert arm_image.manifest["oci"]["architecture"] == "arm64"
    assert host_image.recipe != arm_image.recipe

    # Each name is served from the store for its own platform only: no network needed, and the
    # digest that comes back is that platform's.
    for argv, digest in [((reference,), multi_arch["amd64"]), ((reference, "--platform", "linux/arm64"), multi_arch["arm64"])]:
        offline = subprocess.run(
            ["unshare", "--net", sys.executable, "-m", "racker", "--debug", "pull", *argv],
            env={**os.environ, **private_store},
            capture_output=True,
            text=True,
        )
        assert offline.returncode == 0 and "run: " not in offline.stderr, offline.stderr
        assert store.lookup(offline.stdout.split()[0]).manifest["oci"]["manifest_digest"] == digest  # type: ignore[union-attr]

    listed = racker("images", env=private_store).stdout.splitlines()
    assert listed[0].split()[-1] == "PLATFORM", listed
    rows = {line.split()[0]: line.split() for line in listed[1:]}
    assert rows[f"{reference}@linux-arm64"][-1] == "linux/arm64"
    assert rows[reference][-1] == reference, "the host's platform is not shown"


@pytest.mark.slow
def test_a_platform_the_index_lacks_is_one_line_and_stores_nothing(multi_arch: dict, private_store: dict) -> None:
    result = racker("pull", multi_arch["reference"], "--platform", "linux/s390x", env=private_store)
    assert result.returncode == 125
    (line,) = result.stderr.strip().splitlines()
    assert "no linux/s390x image in its index, which has linux/amd64, linux/arm64" in line, line
    assert _store_holds_nothing()


@pytest.mark.slow
def test_a_single_image_of_another_platform_is_refused(seeded_registry: dict, private_store: dict) -> None:
    reference = f"docker://{seeded_registry['host']}/library/debian:bookworm"
    result = racker("pull", reference, "--platform", "linux/arm64", env=private_store)
    assert result.returncode == 125
    (line,) = result.stderr.strip().splitlines()
    assert "is a linux/amd64 image, not linux/arm64" in line, line
    assert _store_holds_nothing()


# -- a plain-HTTP registry that is not on loopback -----------------------------


def _host_address() -> str | None:
    """This host's address on its default route's interface (not loopback)."""
    route = subprocess.run(["ip", "-4", "route", "get", "1.1.1.1"], capture_output=True, text=True).stdout
    found = re.search(r"\bsrc (\S+)", route)
    return found.group(1) if found else None


@pytest.mark.slow
def test_a_plain_http_registry_needs_insecure(seeded_registry: dict, private_store: dict, tmp_path: Path) -> None:
    address = _host_address()
    if address is None or oci.is_loopback(address):
        pytest.skip("no non-loopback address on this host")
    with running_registry(address, tmp_path) as remote:
        subprocess.run(
            ["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false",
             f"docker://{seeded_registry['host']}/library/debian:bookworm", f"docker://{remote}/library/debian:bookworm"],
            check=True, timeout=600,
        )  # fmt: skip
        reference = f"docker://{remote}/library/debian:bookworm"
        refused = racker("pull", reference, env=private_store)
        assert refused.returncode == 125
        (line,) = refused.stderr.strip().splitlines()
        assert f"{remote} answers plain HTTP, not HTTPS" in line and "--insecure" in line, line
        assert _store_holds_nothing()

        pulled = racker("pull", reference, "--insecure", env=private_store)
        assert pulled.returncode == 0, pulled.stderr
        assert pulled.stdout.split() == [reference, seeded_registry["digest"]]


# -- platform as an axis of the pytest matrix --------------------------------


def _collect(*args: str) -> subprocess.CompletedProcess[str]:
    sample = Path(__file__).parent / "sample_project"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--co",
        "-q",
        "--racker-images=debian-bookworm",
        *args,
        "test_sample.py",
    ]
    return subprocess.run(
        argv, cwd=sample, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}, capture_output=True, text=True
    )


@pytest.mark.slow  # runs pytest three times
def test_platforms_are_an_axis_of_the_matrix_and_part_of_the_ids() -> None:
    pytest.importorskip("testinfra")  # the plugin's fixtures import it (tox -e unit has none)
    one = _collect()
    assert "test_is_debian[debian-bookworm]" in one.stdout and "@linux-" not in one.stdout
    both = _collect(f"--racker-platforms={platforms.host()},linux/arm64")
    ids = set(re.findall(r"test_is_debian\[(.*)\]", both.stdout))
    assert ids == {"debian-bookworm", "debian-bookworm@linux-arm64"}, both.stdout
    bad = _collect("--racker-platforms=linux/arm46")
    assert "--racker-platforms: bad platform 'linux/arm46'" in bad.stdout + bad.stderr
