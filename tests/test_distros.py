"""Distribution detection and the package-manager recipes: which row an image gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from racker import prepare
from racker.store import distros

# os-release and the package manager's program, as each distribution's container image has them.
IMAGES = {
    "debian": ("ID=debian\nVERSION_ID=12\n", "usr/bin/apt-get", "apt"),
    "ubuntu": ("ID=ubuntu\nID_LIKE=debian\nVERSION_ID=24.04\n", "usr/bin/apt-get", "apt"),
    "fedora": ("ID=fedora\nVERSION_ID=41\n", "usr/bin/dnf", "dnf"),
    "ubi-minimal": ('ID="rhel"\nID_LIKE="fedora"\nVERSION_ID="9.4"\n', "usr/bin/microdnf", "microdnf"),
    "centos7": ('ID="centos"\nID_LIKE="rhel fedora"\nVERSION_ID="7"\n', "usr/bin/yum", "yum"),
    "rocky": ('ID="rocky"\nID_LIKE="rhel centos fedora"\n', "usr/bin/dnf", "dnf"),
    "tumbleweed": ('ID="opensuse-tumbleweed"\nID_LIKE="opensuse suse"\n', "usr/bin/zypper", "zypper"),
    "alpine": ("ID=alpine\nVERSION_ID=3.20.0\n", "sbin/apk", "apk"),
    "arch": ("ID=arch\n", "usr/bin/pacman", "pacman"),
}


def _image(root: Path, os_release: str, binary: str) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text(os_release)
    (root / binary).parent.mkdir(parents=True, exist_ok=True)
    (root / binary).write_text("")
    return root


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_detect_picks_the_manager_the_image_has(tmp_path: Path, name: str) -> None:
    os_release, binary, manager = IMAGES[name]
    distro = distros.detect(_image(tmp_path, os_release, binary))
    assert distro.recipe is not None and distro.recipe.manager == manager


def test_unknown_distribution_has_no_recipe(tmp_path: Path) -> None:
    assert distros.detect(_image(tmp_path, "ID=plan9\n", "bin/rc")).recipe is None


def test_every_recipe_can_prepare_an_image_to_boot() -> None:
    assert set(prepare.BOOT_PACKAGES) == set(distros.RECIPES)
    for family in distros.FAMILIES.values():
        assert all(manager in distros.RECIPES for manager in family)


def test_only_recipes_run_in_ci_are_marked_verified() -> None:
    """apt is proved by every CI run; the others wait for a reachable mirror and say what to watch for."""
    verified = {name for name, recipe in distros.RECIPES.items() if recipe.verified}
    assert verified == {"apt"}
    for recipe in distros.RECIPES.values():
        assert recipe.binary and recipe.quirks, f"{recipe.manager}: every row names its program and its quirks"
        assert recipe.query and recipe.base_package


def test_preparing_with_an_unverified_recipe_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    warnings: list[str] = []
    ran: list[tuple[str, ...]] = []
    monkeypatch.setattr(prepare.progress, "warn", warnings.append)
    monkeypatch.setattr(prepare, "in_container", lambda rootfs, argv, **kw: ran.append(tuple(argv)))
    rootfs = _image(tmp_path, *IMAGES["fedora"][:2])
    distro = distros.detect(rootfs)
    installed = prepare._install(rootfs, distro, prepare.BOOT_PACKAGES["dnf"])
    assert any("unverified" in w for w in warnings)
    assert ran[0] == distro.recipe.update and ran[1] == (*distro.recipe.install, *installed)
