"""imagetree: paths inside an image tree never lead out of it, whatever links the image holds."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tree_checksum
from racker.store import imagetree

RESOLVERS = ["openat2", "walk"] if imagetree.has_openat2() else ["walk"]


@pytest.fixture(params=RESOLVERS)
def resolver(request: pytest.FixtureRequest) -> bool:
    return request.param == "openat2"


def sentinel(base: Path) -> Path:
    """A host directory an image must never reach: secrets, keys, a subdirectory."""
    host = base / "host"
    (host / ".ssh").mkdir(parents=True)
    (host / ".ssh/id_ed25519").write_text("SECRET-PRIVATE-KEY\n")
    (host / ".ssh/authorized_keys").write_text("SECRET-AUTHORIZED\n")
    (host / "passwd").write_text("SECRET-PASSWD\n")
    (host / ".ssh/SECRET-host-only").write_text("SECRET-NAME\n")  # a name no operation makes inside
    for path in (host, host / ".ssh"):
        path.chmod(0o755)
    return host


def make_tree(base: Path) -> Path:
    root = base / "image"
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/os-release").write_text("ID=debian\n")
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("image key\n")
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/os-release").write_text("ID=inside\n")
    return root


def test_absolute_link_resolves_inside(tmp_path: Path, resolver: bool) -> None:
    host = sentinel(tmp_path)
    root = make_tree(tmp_path)
    (root / "var/lib/apt").mkdir(parents=True)
    (root / "var/lib/apt/lists").symlink_to(host / ".ssh")
    tree = imagetree.Tree(root, use_openat2=resolver)
    before = tree_checksum(host)
    assert tree.glob("var/lib/apt/lists/*") == []
    assert not tree.exists("var/lib/apt/lists/id_ed25519")
    tree.rmtree("var/lib/apt/lists/anything")
    with pytest.raises(FileNotFoundError):
        tree.unlink("var/lib/apt/lists/id_ed25519")
    with pytest.raises(FileExistsError):  # a dangling link inside, as `mkdir -p` in a chroot says
        tree.write_text("var/lib/apt/lists/new", "inside\n")
    (root / str(host / ".ssh").lstrip("/")).mkdir(parents=True)
    tree.write_text("var/lib/apt/lists/new", "inside\n")  # made inside: <root>/<host>/.ssh/new
    assert (root / str(host / ".ssh/new").lstrip("/")).read_text() == "inside\n"
    assert tree_checksum(host) == before


def test_relative_dotdot_chain_stops_at_the_root(tmp_path: Path, resolver: bool) -> None:
    host = sentinel(tmp_path)
    root = make_tree(tmp_path)
    (root / "etc/passwd").symlink_to("../../../../../../../../" + str(host / "passwd").lstrip("/"))
    (root / "escape").symlink_to("../../../..")
    tree = imagetree.Tree(root, use_openat2=resolver)
    with pytest.raises(FileNotFoundError):
        tree.read_text("etc/passwd")
    assert tree.read_text("escape/etc/os-release") == "ID=debian\n"  # `..` above the root is the root
    assert tree.read_text("../../etc/os-release") == "ID=debian\n"
    assert tree.listdir("escape") == sorted(os.listdir(root))


def test_links_inside_are_followed_for_reading(tmp_path: Path, resolver: bool) -> None:
    root = make_tree(tmp_path)
    (root / "etc/os-release").unlink()
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / "lib").symlink_to("/usr/lib")
    tree = imagetree.Tree(root, use_openat2=resolver)
    assert tree.read_text("etc/os-release") == "ID=inside\n"
    assert tree.read_text("/lib/os-release") == "ID=inside\n"
    assert tree.is_file("lib/os-release") and tree.is_dir("lib") and tree.is_symlink("lib")
    assert tree.readlink("etc/os-release") == "../usr/lib/os-release"


def test_writes_replace_the_link_never_through_it(tmp_path: Path, resolver: bool) -> None:
    host = sentinel(tmp_path)
    root = make_tree(tmp_path)
    (root / "etc/machine-id").symlink_to(host / "passwd")
    (root / "etc/hostname").symlink_to("../../host/passwd")
    tree = imagetree.Tree(root, use_openat2=resolver)
    before = tree_checksum(host)
    tree.write_text("etc/machine-id", "", mode=0o444)
    tree.unlink("etc/hostname")
    assert (root / "etc/machine-id").read_text() == "" and stat.S_IMODE((root / "etc/machine-id").stat().st_mode) == 0o444
    assert not (root / "etc/hostname").is_symlink()
    assert tree_checksum(host) == before


def test_rmtree_never_follows_links(tmp_path: Path, resolver: bool) -> None:
    host = sentinel(tmp_path)
    root = make_tree(tmp_path)
    (root / "var/lib/cloud/instance").mkdir(parents=True)
    (root / "var/lib/cloud/instance/keys").symlink_to(host / ".ssh")
    (root / "var/lib/cloud/up").symlink_to("../../../..")
    (root / "var/lib/cloud/host").symlink_to(host)
    tree = imagetree.Tree(root, use_openat2=resolver)
    before = tree_checksum(host)
    tree.rmtree("var/lib/cloud")
    tree.rmtree("var/lib/missing/deeper")
    assert not (root / "var/lib/cloud").exists()
    assert (root / "etc/os-release").exists() and tree_checksum(host) == before


def test_chmod_chown_refuse_a_link(tmp_path: Path, resolver: bool) -> None:
    host = sentinel(tmp_path)
    root = make_tree(tmp_path)
    (root / "etc/shadow").symlink_to(host / "passwd")
    tree = imagetree.Tree(root, use_openat2=resolver)
    before = tree_checksum(host)
    with pytest.raises(OSError):
        tree.chmod("etc/shadow", 0o777)
    tree.chown("etc/shadow", os.getuid(), os.getgid())  # the link's own owner, as lchown
    tree.chmod("etc/os-release", 0o600)
    assert stat.S_IMODE((root / "etc/os-release").stat().st_mode) == 0o600
    assert tree_checksum(host) == before


def test_mkdir_and_symlink_and_glob(tmp_path: Path, resolver: bool) -> None:
    host = sentinel(tmp_path)
    root = make_tree(tmp_path)
    (root / "home").symlink_to(host)
    tree = imagetree.Tree(root, use_openat2=resolver)
    before = tree_checksum(host)
    with pytest.raises(FileExistsError):  # a dangling link
        tree.mkdir("home/vagrant/.ssh", 0o700)
    (root / str(host).lstrip("/")).mkdir(parents=True)
    tree.mkdir("home/vagrant/.ssh", 0o700)
    assert (root / str(host).lstrip("/") / "vagrant/.ssh").is_dir()
    tree.mkdir("etc/systemd/system-generators")
    tree.symlink("/dev/null", "etc/systemd/system-generators/x")
    assert os.readlink(root / "etc/systemd/system-generators/x") == "/dev/null"
    assert tree.glob("etc/ssh/ssh_host_*") == ["etc/ssh/ssh_host_ed25519_key"]
    assert tree.glob("*/os-release") == ["etc/os-release"]
    assert tree.glob("usr/*/os-release") == ["usr/lib/os-release"]
    assert tree_checksum(host) == before


def test_read_refuses_devices_and_fifos(tmp_path: Path, resolver: bool) -> None:
    root = make_tree(tmp_path)
    os.mkfifo(root / "etc/fifo")
    tree = imagetree.Tree(root, use_openat2=resolver)
    with pytest.raises(OSError):
        tree.read_bytes("etc/fifo")  # would block forever if opened for reading without O_NONBLOCK


def test_link_loops_end(tmp_path: Path, resolver: bool) -> None:
    root = make_tree(tmp_path)
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("/a")
    tree = imagetree.Tree(root, use_openat2=resolver)
    assert not tree.exists("a")
    with pytest.raises(OSError):
        tree.read_text("a/x")


def test_path_for_tool_is_the_file_inside(tmp_path: Path, resolver: bool) -> None:
    host = sentinel(tmp_path)
    root = make_tree(tmp_path)
    (root / "boot").mkdir()
    (root / "boot/vmlinuz").symlink_to("/etc/os-release")
    (root / "boot/initrd").symlink_to(host / "passwd")
    tree = imagetree.Tree(root, use_openat2=resolver)
    with tree.path_for_tool("boot/vmlinuz") as path:
        assert path.read_text() == "ID=debian\n"
    with pytest.raises(FileNotFoundError), tree.path_for_tool("boot/initrd"):
        pass


# -- hypothesis: links of every kind at random components ---------------------

COMPONENTS = ["etc", "ssh", "var", "lib", "lists", "x"]
# What a hostile image puts at a component: a link out (absolute, relative, `..` chains) or to itself.
LINK_KINDS = st.sampled_from(["abs-host", "abs-host-dir", "rel-dotdot", "rel-dotdot-host", "root", "self-loop", "dir", "file"])
REL_PATHS = st.lists(st.sampled_from([*COMPONENTS, "..", ".", "id_ed25519", "authorized_keys"]), min_size=1, max_size=6).map("/".join)
OPERATIONS = st.sampled_from(
    ["read", "exists", "listdir", "glob", "unlink", "rmtree", "write", "mkdir", "chmod", "chown", "symlink", "lstat", "tool"]
)


def _plant(root: Path, host: Path, layout: list[tuple[str, str]]) -> None:
    depth = len(root.parts) - 1
    targets = {
        "abs-host": str(host / ".ssh/id_ed25519"),
        "abs-host-dir": str(host / ".ssh"),
        "rel-dotdot": "../" * (depth + 4),
        "rel-dotdot-host": "../" * (depth + 4) + str(host / ".ssh").lstrip("/"),
        "root": "/",
    }
    for rel, kind in layout:
        path = root / rel
        if path.exists() or path.is_symlink() or not path.parent.is_dir() or path.parent.is_symlink():
            continue
        if kind == "dir":
            path.mkdir()
        elif kind == "file":
            path.write_text("inside\n")
        elif kind == "self-loop":
            path.symlink_to(path.name)
        else:
            path.symlink_to(targets[kind])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    layout=st.lists(st.tuples(st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4).map("/".join), LINK_KINDS), max_size=10),
    data=st.data(),
    use_openat2=st.sampled_from([r == "openat2" for r in RESOLVERS]),
)
def test_nothing_outside_is_read_written_or_deleted(
    tmp_path_factory: pytest.TempPathFactory, layout: list[tuple[str, str]], data: st.DataObject, use_openat2: bool
) -> None:
    # Paths through the planted links, most of them: a link's path with more components after it.
    through = st.sampled_from([rel for rel, _kind in layout] or ["etc"])
    paths = st.one_of(st.tuples(through, REL_PATHS).map("/".join), through, REL_PATHS)
    steps = data.draw(st.lists(st.tuples(OPERATIONS, paths), min_size=1, max_size=8))
    base = tmp_path_factory.mktemp("hostile")
    host = sentinel(base)
    root = base / "image"
    root.mkdir()
    _plant(root, host, layout)
    before = tree_checksum(host)
    tree = imagetree.Tree(root, use_openat2=use_openat2)
    for operation, rel in steps:
        try:
            seen = _run(tree, operation, rel)
        except OSError:
            continue
        assert b"SECRET" not in seen, (operation, rel)
    assert tree_checksum(host) == before
    assert sorted(os.listdir(base)) == ["host", "image"]  # nothing made beside the tree either


def _run(tree: imagetree.Tree, operation: str, rel: str) -> bytes:
    """The operation on `rel`, and whatever it showed of the files it reached."""
    if operation == "read":
        return tree.read_bytes(rel)
    if operation == "tool":
        with tree.path_for_tool(rel) as path:
            return path.read_bytes() if path.is_file() else b""
    if operation == "listdir":
        return "\n".join(tree.listdir(rel)).encode()
    if operation == "glob":
        return "\n".join(tree.glob(rel + "/*")).encode()
    actions = {
        "exists": lambda: tree.exists(rel),
        "unlink": lambda: tree.unlink(rel),
        "rmtree": lambda: tree.rmtree(rel),
        "write": lambda: tree.write_text(rel, "written\n"),
        "mkdir": lambda: tree.mkdir(rel),
        "chmod": lambda: tree.chmod(rel, 0o777),
        "chown": lambda: tree.chown(rel, 4242, 4242) if os.getuid() == 0 else None,
        "symlink": lambda: tree.symlink("/etc/shadow", rel),
        "lstat": lambda: tree.lstat(rel),
    }
    actions[operation]()
    return b""


def test_both_resolvers_agree(tmp_path: Path) -> None:
    """The walk resolves as openat2 does: the same file, or the same kind of error."""
    if len(RESOLVERS) < 2:
        pytest.skip("this kernel has no openat2")
    host = sentinel(tmp_path)
    root = make_tree(tmp_path)
    (root / "a").symlink_to("etc/../usr/./lib")
    (root / "b").symlink_to("/a/../../../etc")
    (root / "c").symlink_to(host)
    (root / "d").symlink_to("../../../../../")
    paths = ["a/os-release", "b/os-release", "c/passwd", "d/etc", "d/../b/ssh", "a", "/", "..", "b/ssh/ssh_host_ed25519_key/x"]
    for rel in paths:
        results = []
        for use in (True, False):
            try:
                info = imagetree.Tree(root, use_openat2=use).stat(rel)
                results.append((info.st_dev, info.st_ino))
            except OSError as err:
                results.append(err.errno)
        assert results[0] == results[1], rel


def test_refused_is_one_line_naming_the_path(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    (root / "etc/cloud").symlink_to("/nowhere")
    with pytest.raises(ValueError) as raised, imagetree.refused(ValueError, "cannot configure the image"):
        imagetree.Tree(root).write_text("etc/cloud/cloud.cfg.d/x.cfg", "x")
    assert str(raised.value) == "cannot configure the image: the image's /etc/cloud cannot be used: File exists"
