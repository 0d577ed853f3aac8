"""The store's own logic, on small trees made here (the real builds are in test_pull.py)."""

import json
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from racker import promote, store
from racker.errors import StoreError
from racker.upkeep import gc


def make_tree(root: Path, text: str = "hello") -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "os-release").write_text('ID=debian\nVERSION_ID="12"\n')
    (root / "file").write_text(text)
    os.symlink("file", root / "link")
    return root


def commit_name(text: str, recipe: str, name: str = "name") -> store.StoredImage:
    """Build a small tree and commit it under `name`, as a pull or prepare would."""
    with store.workdir("test") as work:
        return store.commit(name, make_tree(work / "rootfs", text), source="test:", recipe=recipe, manifest={})


@contextmanager
def live_machine(kind: str, name: str, image: str, digest: str = "", disk: Path | None = None) -> Iterator[None]:
    """A registry record of a running machine (this test process stands in for it)."""
    from racker import machines

    state = machines.new_state(kind, name, image, digest, extra={"disk": str(disk)} if disk else {})
    state.pid, state.pid_start = state.owner, state.owner_start
    machines.claim(state)
    try:
        yield
    finally:
        machines.release(state)


def test_digest_is_stable_and_content_sensitive(tmp_path: Path) -> None:
    a = make_tree(tmp_path / "a")
    b = make_tree(tmp_path / "b")
    assert store.tree_digest(a) == store.tree_digest(b)
    (b / "file").write_text("changed")
    assert store.tree_digest(a) != store.tree_digest(b)
    os.chmod(a / "file", 0o600)
    assert store.tree_digest(a) != store.tree_digest(make_tree(tmp_path / "c"))


def test_commit_lookup_remove(private_store: dict, tmp_path: Path) -> None:
    with store.workdir("test") as work:
        image = store.commit("one", make_tree(work / "rootfs"), source="test:", recipe="r1", manifest={})
    assert image.rootfs.joinpath("file").read_text() == "hello"
    assert store.lookup("one") == image
    assert [i.name for i in store.images()] == ["one"]
    # A second name for the same content shares the image directory.
    with store.workdir("test") as work:
        same = store.commit("two", make_tree(work / "rootfs"), source="test:", recipe="r1", manifest={})
    assert same.digest == image.digest
    store.remove("one")
    assert image.path.exists(), "still referenced by 'two'"
    store.remove("two")
    assert not image.path.exists()
    with pytest.raises(StoreError, match="no image named"):
        store.remove("two")


def test_workdir_is_removed_even_on_error(private_store: dict) -> None:
    with pytest.raises(RuntimeError), store.workdir("test") as work:
        (work / "x").write_text("x")
        raise RuntimeError
    assert not work.exists()
    assert [p.name for p in (store.home() / "tmp").rglob("*")] == [".new"]


def test_gc_removes_abandoned_workdirs_only(private_store: dict) -> None:
    abandoned = store.home() / "tmp" / "pull.dead"
    abandoned.mkdir(parents=True)
    with store.workdir("live") as live:
        removed = gc.collect()
        assert live.exists()
    assert not abandoned.exists()
    assert any("pull.dead" in line for line in removed)


def test_gc_removes_images_and_disks_no_name_links_to(private_store: dict) -> None:
    old = commit_name("old", "r1")
    new = commit_name("new", "r2")
    disks = store.home() / "disks"
    disks.mkdir()
    old_disk = disks / promote.cached_disk_name(old.digest, "bios")
    new_disk = disks / promote.cached_disk_name(new.digest, "bios")
    partial = disks / f".{promote.cached_disk_name(new.digest, 'uefi')}.x.partial"  # a promote writing now
    for disk in (old_disk, new_disk, partial):
        disk.write_bytes(b"disk")
    with store.locked(promote.disk_lock(promote.cached_disk_name(new.digest, "uefi"))):
        removed = gc.collect()
    assert not old.path.exists() and not old_disk.exists()
    assert new.path.exists() and new_disk.exists() and partial.exists()
    assert store.lookup("name") == new
    assert any(old.path.name[:19] in line for line in removed)
    assert not any(new.path.name[:19] in line for line in removed)


def _blocked_on(lock: Path, timeout: float = 30) -> None:
    """Return once some process or thread waits for a flock on `lock` (a `->` line in /proc/locks)."""
    inode = os.stat(lock).st_ino
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            words = line.split()
            if "->" in words and words[words.index("->") + 1] == "FLOCK" and words[-3].rsplit(":", 1)[-1] == str(inode):
                return
        time.sleep(0.01)
    raise AssertionError(f"nothing waited for {lock}")


def _in_thread(func) -> tuple[threading.Thread, threading.Event]:  # type: ignore[no-untyped-def]
    done = threading.Event()
    thread = threading.Thread(target=lambda: (func(), done.set()))
    thread.start()
    return thread, done


def test_gc_waits_for_a_copy_reading_an_image_no_name_links_to_any_more(private_store: dict) -> None:
    old = commit_name("old", "r1")
    with store.reading(old) as rootfs:
        # The name is rebuilt while the old image is being copied out, and gc runs.
        commit_name("new", "r2")
        sweeper, collected = _in_thread(gc.collect)
        _blocked_on(store._lock_path(store.SWEEP_LOCK))
        assert not collected.is_set() and old.path.exists(), "gc must wait for the copy"
        assert (rootfs / "file").read_text() == "old"
    sweeper.join(10)
    assert collected.is_set() and not old.path.exists()
    with pytest.raises(StoreError, match="gone from the store"), store.reading(old):
        pass


def test_rmi_waits_for_a_copy_reading_the_image(private_store: dict) -> None:
    image = commit_name("only", "r1")
    with store.reading(image) as rootfs:
        remover, removed = _in_thread(lambda: store.remove("name"))
        _blocked_on(store._lock_path(store.SWEEP_LOCK))
        assert not removed.is_set() and (rootfs / "file").read_text() == "only"
    remover.join(10)
    assert removed.is_set() and not image.path.exists() and store.lookup("name") is None


def _commit_at_once(home: str, name: str, barrier, results) -> None:  # type: ignore[no-untyped-def]
    os.environ["RACKER_HOME"] = home
    with store.workdir("test") as work:
        tree = make_tree(work / "rootfs", "same")
        barrier.wait()
        try:
            results.put(store.commit(name, tree, source="test:", recipe="r", manifest={}).digest)
        except Exception as error:
            results.put(f"error: {error!r}")


def test_names_committing_the_same_content_at_once_all_succeed(private_store: dict) -> None:
    context = multiprocessing.get_context("fork")
    for round_ in range(5):
        barrier, results = context.Barrier(6), context.Queue()
        names = [f"n{round_}-{i}" for i in range(6)]
        workers = [context.Process(target=_commit_at_once, args=(private_store["RACKER_HOME"], n, barrier, results)) for n in names]
        for worker in workers:
            worker.start()
        outcomes = {results.get(timeout=60) for _ in workers}
        for worker in workers:
            worker.join(30)
        assert len(outcomes) == 1 and next(iter(outcomes)).startswith("sha256:"), outcomes
        assert all(store.lookup(n) is not None for n in names)
        for name in names:
            store.remove(name)


def test_gc_never_removes_a_live_workdir(private_store: dict) -> None:
    """gc sweeping all the while workdirs are made: none may vanish under its owner."""
    stop = threading.Event()

    def sweep() -> None:
        while not stop.is_set():
            gc._stale_workdirs()

    sweeper = threading.Thread(target=sweep)
    sweeper.start()
    try:
        for _ in range(300):
            with store.workdir("live") as work:
                (work / "x").write_text("x")
                assert (work / "x").read_text() == "x"
    finally:
        stop.set()
        sweeper.join(10)


def test_gc_removes_disks_of_an_older_promote_and_dead_partials_only(private_store: dict) -> None:
    image = commit_name("hello", "r1")
    disks = store.home() / "disks"
    disks.mkdir()
    current = disks / promote.cached_disk_name(image.digest, "bios")
    older = disks / f"{image.path.name}-bios-v0.raw"
    booted = disks / f"{image.path.name}-uefi-v0.raw"  # an older disk a VM still runs on
    dead = disks / f".{promote.cached_disk_name(image.digest, 'uefi')}.abc123.partial"  # a killed promote's
    live = disks / f".{current.name}.def456.partial"  # a promote writing now, under the disk's lock
    for disk in (current, older, booted, dead, live):
        disk.write_bytes(b"disk")
    with live_machine("qemu", "vm", booted.name, disk=booted), store.locked(promote.disk_lock(current.name)):
        removed = gc.collect()
    assert current.exists() and booted.exists() and live.exists()
    assert not older.exists() and not dead.exists()
    assert any(older.name in line for line in removed) and any(dead.name in line for line in removed)


def test_gc_keeps_an_unlinked_image_a_machine_still_uses(private_store: dict) -> None:
    old = commit_name("old", "r1")
    with live_machine("nspawn", "user", "name", digest=old.digest):
        commit_name("new", "r2")
        gc.collect()
        assert old.path.exists(), "a live machine's image must stay"
    gc.collect()
    assert not old.path.exists()


def test_gc_keeps_an_unlinked_image_whose_disk_a_vm_boots(private_store: dict) -> None:
    old = commit_name("old", "r1")
    disk = store.home() / "disks" / promote.cached_disk_name(old.digest, "bios")
    disk.parent.mkdir()
    disk.write_bytes(b"disk")
    # `racker vm start PATH` records the disk, not an image digest.
    with live_machine("qemu", "vm", disk.name, disk=disk):
        commit_name("new", "r2")
        gc.collect()
        assert disk.exists() and old.path.exists(), "a running VM's disk and its image must stay"
    gc.collect()
    assert not disk.exists() and not old.path.exists()


def test_write_json_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    store.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_each_name_keeps_its_own_manifest_when_content_is_shared(private_store: dict) -> None:
    """Two images with the same files but different configs (a base and an app built from it)."""
    with store.workdir("test") as work:
        base = store.commit("base", make_tree(work / "rootfs", "same"), source="test:base", recipe="r", manifest={})
    with store.workdir("test") as work:
        app = store.commit("app", make_tree(work / "rootfs", "same"), source="test:app", recipe="r", manifest={"config": {"Cmd": ["x"]}})
    assert app.digest == base.digest and app.path == base.path
    assert store.lookup("app").manifest["config"] == {"Cmd": ["x"]}  # type: ignore[union-attr]
    assert "config" not in store.lookup("base").manifest  # type: ignore[union-attr]


def test_linking_from_another_store_waits_for_its_gc(private_store: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other"
    monkeypatch.setenv("RACKER_HOME", str(other))
    source = commit_name("shared", "r1")
    monkeypatch.setenv("RACKER_HOME", private_store["RACKER_HOME"])
    with store.locked(store.SWEEP_LOCK, store_home=other):  # the other store's gc, sweeping
        linker, linked = _in_thread(lambda: store.link_from(other, "name"))
        _blocked_on(store._lock_path(store.SWEEP_LOCK, other))
        assert not linked.is_set()
    linker.join(10)
    assert linked.is_set()
    image = store.lookup("name")
    assert image is not None and image.digest == source.digest and store.tree_digest(image.rootfs) == image.digest
    assert os.stat(image.rootfs / "file").st_ino == os.stat(source.rootfs / "file").st_ino, "hard links, not copies"


def test_linking_waits_for_this_stores_gc_too(private_store: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Until the name links it, a freshly linked image is unreferenced: this store's gc must not be sweeping."""
    other = tmp_path / "other"
    monkeypatch.setenv("RACKER_HOME", str(other))
    commit_name("shared", "r1")
    monkeypatch.setenv("RACKER_HOME", private_store["RACKER_HOME"])
    with store.locked(store.SWEEP_LOCK):  # this store's gc, sweeping
        linker, linked = _in_thread(lambda: store.link_from(other, "name"))
        _blocked_on(store._lock_path(store.SWEEP_LOCK))
        assert not linked.is_set() and store.lookup("name") is None
    linker.join(10)
    assert linked.is_set() and store.lookup("name") is not None
