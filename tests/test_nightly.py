"""racker nightly and sharding: --racker-shard K/N, racker nightly --shard K/N, and merging shards.

The fast tests split names and collect (nothing boots); the slow one runs
`racker nightly` for real on two images under nspawn, whole and as two shards,
and merges the shards with `racker report`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import ROOT, racker
from racker import cli, nightly
from racker.cli import reports as cli_reports
from racker.report import shards

# --- the split ------------------------------------------------------------------

names = st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True), max_size=20, unique=True)


@given(names, st.integers(1, 8), st.randoms())
def test_every_image_is_in_exactly_one_shard_whatever_the_order(images: list[str], total: int, random) -> None:
    slices = [shards.Shard(k, total).select(images) for k in range(1, total + 1)]
    flat = [name for part in slices for name in part]
    assert sorted(flat) == sorted(images)  # every image once: none lost, none twice
    assert max(map(len, slices)) - min(map(len, slices)) <= 1  # balanced: no shard left idle while another takes two more
    shuffled = list(images)
    random.shuffle(shuffled)
    assert [shards.Shard(k, total).select(shuffled) for k in range(1, total + 1)] == slices


SPLIT = (
    "from racker.report import shards\n"
    "print([shards.Shard(k, 3).select(['debian-sid', 'debian-bookworm', 'alma-9', 'debian-trixie', 'x']) for k in (1, 2, 3)])"
)


def test_the_split_is_the_same_in_every_process() -> None:
    """Runners of one pipeline compute their slices apart: no hash seed, no process state may change them."""
    seen = set()
    for seed in ("1", "2"):  # and this process's own (random) seed, below
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        seen.add(subprocess.run([sys.executable, "-c", SPLIT], env=env, capture_output=True, text=True).stdout)
    here = io.StringIO()
    with contextlib.redirect_stdout(here):
        exec(SPLIT, {})
    seen.add(here.getvalue())
    assert seen == {"[['alma-9', 'debian-trixie'], ['debian-bookworm', 'x'], ['debian-sid']]\n"}


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "2", "a/b", "", "1/2/3", "-1/2"])
def test_a_bad_shard_is_refused(text: str) -> None:
    with pytest.raises(shards.BadShard, match="expected K/N"):
        shards.parse(text)


def test_a_shard_parses_and_prints_as_given() -> None:
    assert str(shards.parse("2/4")) == "2/4"
    assert nightly.results_name("qemu", shards.parse("2/4")) == "results-qemu-2of4.jsonl"
    assert nightly.results_name("nspawn", None) == "results-nspawn.jsonl"


# --- the plugin's option: collection only, nothing boots -----------------------------


def collect(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str], list[dict]]:
    """pytest --collect-only with racker's plugin on a test taking `host`: (run, test ids, run records)."""
    pytest.importorskip("testinfra")  # the plugin's fixtures import it (tox -e unit has none)
    (tmp_path / "test_x.py").write_text("def test_x(host):\n    pass\n")
    results = tmp_path / "results.jsonl"
    results.unlink(missing_ok=True)
    without_addopts = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "racker.pytest.plugin", "-p", "no:cacheprovider", "--collect-only", "-q",
         "-W", "ignore::pytest.PytestUnknownMarkWarning", f"--racker-results={results}", *args, "test_x.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        # Only racker's plugin, named once (-p), not again by its entry point; no xdist, no testinfra plugin.
        # No PYTEST_ADDOPTS of the caller's: a -v there would change the -q listing read below.
        env={**without_addopts, "PYTHONPATH": str(ROOT), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )  # fmt: skip
    ids = [line.split("[", 1)[1].rstrip("]") for line in done.stdout.splitlines() if line.startswith("test_x.py::")]
    runs = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    return done, ids, [r for r in runs if r.get("kind") == "run"]


IMAGES = ["debian-bookworm", "debian-bullseye", "debian-sid", "debian-trixie", "fedora-40"]


@pytest.mark.slow  # runs pytest three times
def test_racker_shard_slices_the_images_and_every_shard_plans_the_whole_matrix(tmp_path: Path) -> None:
    everything = [f"{image}-{engine}" for image in IMAGES for engine in ("nspawn", "qemu")]
    seen: list[str] = []
    for k in (1, 2, 3):
        done, ids, runs = collect(tmp_path, f"--racker-images={','.join(reversed(IMAGES))}", "--racker-engines=qemu,nspawn",
                                  f"--racker-shard={k}/3")  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        # An image's tests stay together: both its engines in this shard, or neither.
        assert {i.rsplit("-", 1)[0] for i in ids} == set(shards.Shard(k, 3).select(IMAGES))
        assert len(ids) == 2 * len(shards.Shard(k, 3).select(IMAGES))
        (run,) = runs
        assert run["planned"] == [[image, engine] for image in IMAGES for engine in ("nspawn", "qemu")]
        assert (run["shard"], run["images"]) == (f"{k}/3", shards.Shard(k, 3).select(IMAGES))
        seen += ids
    assert sorted(seen) == sorted(everything)


def test_without_a_shard_everything_is_collected(tmp_path: Path) -> None:
    done, ids, runs = collect(tmp_path, "--racker-images=debian-sid,debian-bookworm", "--racker-engines=nspawn")
    assert done.returncode == 0, done.stdout + done.stderr
    assert ids == ["debian-bookworm", "debian-sid"]
    assert runs[0]["planned"] == [["debian-bookworm", "nspawn"], ["debian-sid", "nspawn"]] and "shard" not in runs[0]


def test_a_bad_racker_shard_is_a_usage_error(tmp_path: Path) -> None:
    done, ids, runs = collect(tmp_path, "--racker-images=debian-sid", "--racker-shard=3/2")
    assert done.returncode == 4 and "--racker-shard: bad shard '3/2'" in done.stderr, done.stdout + done.stderr
    assert not ids and not runs


# --- the command's bad input: one line, nothing made ------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["debian-sid", "--shard", "0/2"], "racker: error: bad shard '0/2': expected K/N"),
        (["debian-sid", "no-such-image"], "racker: error: unknown image 'no-such-image'"),
        (["debian-sid", "--previous", "/nonexistent/last-night"], "racker: error: no previous report at /nonexistent/last-night"),
    ],
)
def test_bad_input_is_one_error_line_and_makes_nothing(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "night"
    assert cli.main(["nightly", *argv, "--engine", "nspawn", "-o", str(out)]) == cli.EXIT_RACKER_FAILED
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert not out.exists()


def test_a_night_goes_red_on_new_failures_or_missing_images_and_on_any_failure_without_a_previous_report() -> None:
    cell = {"image": "debian-sid", "engine": "nspawn", "check": "test_x", "outcome": "pass"}
    green = {"cells": [cell], "missing": [], "comparison": None}
    assert not nightly.failed(green)
    assert nightly.failed(green | {"cells": [cell | {"outcome": "fail"}]})
    assert nightly.failed(green | {"cells": [cell | {"outcome": "error"}]})
    assert nightly.failed(green | {"missing": [["debian-bookworm", "nspawn"]]})
    still_failing = {"cells": [cell | {"outcome": "fail"}], "missing": [], "comparison": {"regressed": False}}
    assert not nightly.failed(still_failing)  # known since last night: not a regression
    assert nightly.failed(still_failing | {"comparison": {"regressed": True}})


# --- history: each night carries the last ones forward ------------------------------


def test_each_night_carries_the_history_of_the_last_ones_forward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three nights into one directory, each given the last as --previous (a CI cache's way): the
    pulls and pytest runs are stand-ins writing synthetic results; the report is the real one."""
    outcomes = iter([{"test_a": "pass", "test_b": "pass"}, {"test_a": "fail", "test_b": "fail"}, {"test_a": "pass", "test_b": "fail"}])

    def checks(names: list[str], engines: list[str], path: Path, **_options: object) -> int:
        tonight = next(outcomes)
        records = [{"kind": "run", "host": {}, "planned": [[names[0], engines[0]]]}]
        records += [{"kind": "test", "image": names[0], "engine": engines[0], "check": check, "nodeid": f"t.py::{check}[{names[0]}]",
                     "outcome": outcome, "message": ""} for check, outcome in tonight.items()]  # fmt: skip
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return 1 if "fail" in tonight.values() else 0

    monkeypatch.setattr(nightly.images, "resolve", lambda name: SimpleNamespace(name=name))
    monkeypatch.setattr(nightly.images, "pull", lambda name: SimpleNamespace(digest="sha256:0", created="", manifest={"packages": []}))
    monkeypatch.setattr(nightly.matrix, "run", checks)
    out = tmp_path / "night"
    for number in (1, 2, 3):
        monkeypatch.setattr(nightly.report.store, "now", lambda number=number: f"2026-02-0{number}T03:00:00+00:00")
        previous = ["--previous", str(out)] if number > 1 else []
        # --full: each night runs its stand-in checks (unchanged inputs would keep the last results).
        cli.main(["nightly", "debian-sid", "--engine", "nspawn", "--offline", "--full", "-o", str(out), *previous, "--history", "10"])
    made = report_of(out)
    assert made["history"]["nights"] == [f"2026-02-0{n}T03:00:00+00:00" for n in (1, 2, 3)]
    cells = {c["check"]: c for c in made["cells"]}
    assert (cells["test_a"]["strip"], cells["test_a"]["label"]) == (["pass", "fail", "pass"], "FLAKY")
    assert (cells["test_b"]["label"], cells["test_b"]["last_good"], cells["test_b"]["first_bad"]) == (
        "FAILING",
        "2026-02-01T03:00:00+00:00",
        "2026-02-02T03:00:00+00:00",
    )


# --- for real --------------------------------------------------------------------------

TWO = ["debian-bookworm", "debian-sid"]


def report_of(directory: Path) -> dict:
    return json.loads((directory / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.root
def test_nightly_whole_and_in_shards_merged_by_racker_report(tmp_path: Path) -> None:
    # --offline: sharding is what this tests, not the refresh (tests/test_refresh.py), and sid moves daily.
    whole = racker("nightly", *TWO, "--engine", "nspawn", "--offline", "-o", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert f"report: {tmp_path / 'whole' / 'report.html'}" in whole.stdout
    made = report_of(tmp_path / "whole")
    assert sorted(made["images"]) == TWO and made["missing"] == [] and made["counts"]["pass"] > 0
    assert {"report.html", "report.md", "results-nspawn.jsonl"} <= {p.name for p in (tmp_path / "whole").iterdir()}

    files = []
    for k in (1, 2):
        shard = racker("nightly", *TWO, "--engine", "nspawn", "--offline", "--shard", f"{k}/2", "-o", str(tmp_path / f"shard-{k}"))
        assert shard.returncode == 0, shard.stdout + shard.stderr
        # Results and what the refresh found, no report: the merge job makes it.
        (path, upstream) = sorted((tmp_path / f"shard-{k}").iterdir())
        assert path.name == f"results-nspawn-{k}of2.jsonl" and upstream.name == f"upstream-{k}of2.json"
        assert list(json.loads(upstream.read_text())) == [TWO[k - 1]]
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert {r["image"] for r in records if r.get("kind") == "test"} == {TWO[k - 1]}
        assert records[0]["planned"] == [[image, "nspawn"] for image in TWO]
        files.append(str(path))

    merged = racker("report", *files, "-o", str(tmp_path / "merged"), "--previous", str(tmp_path / "whole"))
    assert merged.returncode == 0, merged.stdout + merged.stderr
    made = report_of(tmp_path / "merged")
    assert sorted(made["images"]) == TWO and made["missing"] == []
    assert not made["comparison"]["new_failures"] and not made["comparison"]["dropped_images"]
    assert made["counts"] == report_of(tmp_path / "whole")["counts"]

    # A lost shard: its image is named as having no results, and the merge fails. A repeated one counts once.
    lost = racker("report", files[0], files[0], "-o", str(tmp_path / "lost"))
    assert lost.returncode == 1, lost.stdout + lost.stderr
    assert "no results for: debian-sid (nspawn)" in lost.stdout
    made = report_of(tmp_path / "lost")
    assert made["missing"] == [["debian-sid", "nspawn"]] and sorted(made["images"]) == ["debian-bookworm"]
    assert made["repeated"] and made["counts"]["pass"] == sum(c["outcome"] == "pass" for c in made["cells"])
    assert "No results" in (tmp_path / "lost" / "report.md").read_text()


def test_the_readmes_main_command_is_the_nightly_on_the_default_image_set() -> None:
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.endswith("# main"))
    words = line.split("#")[0].split()
    assert words[:3] == ["./install.sh", "&&", ".venv/bin/racker"], line
    args = cli.parse(words[3:])
    assert (args.func, args.images, args.engine, args.previous, args.shard) == (cli_reports.cmd_nightly, [], "all", None, None)
    assert sorted(nightly.default_images()) == [
        "debian-bookworm",
        "debian-bookworm-openrc",
        "debian-bookworm-sysvinit",
        "debian-bullseye",
        "debian-sid",
        "debian-trixie",
    ]


# --- a night costs only what changed (racker.report.reuse) -------------------------------------


def _tonight(directory: Path) -> tuple[list[dict], list[dict]]:
    """(test records, image records) of a night's nspawn results."""
    records = [json.loads(line) for line in (directory / "results-nspawn.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("kind") == "test"], [r for r in records if r.get("kind") == "image"]


@pytest.mark.slow
@pytest.mark.root
def test_a_second_night_with_nothing_changed_reuses_every_cell_and_boots_nothing(tmp_path: Path) -> None:
    night = ["nightly", "debian-bookworm", "--engine", "nspawn", "--offline", "-n", "0"]
    # A user's PYTEST_ADDOPTS are for their own pytest: racker's check run has argv of its own (an
    # inherited -v stopped every night: "unrecognized arguments", the terminal plugin being off).
    first = racker(*night, "-o", str(tmp_path / "1"), env={"PYTEST_ADDOPTS": "-v --durations=0"})
    assert first.returncode == 0, first.stdout + first.stderr
    tests, booted = _tonight(tmp_path / "1")
    assert tests and not any(t.get("reused") for t in tests) and all(t["key"] and t["ran"] for t in tests)
    assert booted and "boot_seconds" in booted[0]  # night 1 booted the machine

    second = racker(*night, "-o", str(tmp_path / "2"), "--previous", str(tmp_path / "1"))
    assert second.returncode == 0, second.stdout + second.stderr
    tests2, booted2 = _tonight(tmp_path / "2")
    ran = {t["nodeid"]: t["ran"] for t in tests}
    assert sorted(t["nodeid"] for t in tests2) == sorted(ran)
    assert all(t["reused"] == ran[t["nodeid"]] for t in tests2)  # each says the night it ran
    # No machine booted: the image's only facts are night 1's, carried over.
    assert [b.get("reused") for b in booted2] == [ran[tests[0]["nodeid"]]]
    made = report_of(tmp_path / "2")
    assert all(c["reused"] for c in made["cells"]) and made["counts"] == report_of(tmp_path / "1")["counts"]
    assert "reused: ran" in (tmp_path / "2" / "report.html").read_text()
    assert f"{len(made['cells'])} of {len(made['cells'])} cells reused" in second.stdout

    # --full, or a result older than --max-age: every cell runs again (and the machine boots).
    for option in (["--full"], ["--max-age", "0"]):
        again = racker(*night, "-o", str(tmp_path / "again"), "--previous", str(tmp_path / "2"), *option)
        assert again.returncode == 0, again.stdout + again.stderr
        tests3, booted3 = _tonight(tmp_path / "again")
        assert tests3 and not any(t.get("reused") for t in tests3), option
        assert booted3 and "boot_seconds" in booted3[0] and "reused" not in booted3[0], option


@pytest.mark.parametrize("text", ["-1", "x", "nan", "h"])
def test_a_bad_max_age_is_a_usage_error(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.parse(["nightly", "-o", "x", "--max-age", text])
    assert "--max-age" in capsys.readouterr().err


def test_max_age_takes_days_or_hours() -> None:
    import datetime as dt

    assert cli.parse(["nightly", "-o", "x"]).max_age == dt.timedelta(days=7)
    assert cli.parse(["nightly", "-o", "x", "--max-age", "12h"]).max_age == dt.timedelta(hours=12)
    assert cli.parse(["nightly", "-o", "x", "--max-age", "0"]).max_age == dt.timedelta(0)
