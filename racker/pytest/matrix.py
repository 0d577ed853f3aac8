"""Run the built-in checks (racker.checks) over images × engines: one pytest, in this process.

`racker check` and `racker nightly` both run it; the results file is what
they read back (and what `racker report` merges).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from racker import engines as known_engines
from racker import progress

# pytest's own exit statuses that mean the run did what it was asked: all passed, some failed, none collected.
RAN = (0, 1, 5)


def engine_names(choice: str) -> list[str]:
    """`--engine` as a list: one engine's name, or `all`."""
    return list(known_engines.ENGINES) if choice == "all" else [choice]


def run(
    images: list[str],
    engines: list[str],
    results: Path,
    *,
    workers: str | None = None,
    junit: str | None = None,
    verbose: bool = False,
    quiet: bool = False,
    shard: str | None = None,
    reuse: Path | None = None,
) -> int:
    """pytest's exit status for the checks of `images` on `engines` (this shard's slice), results into `results`.

    reuse: a JSON list of [image, engine, check] cells not to run (plugin.py's --racker-reuse).

    Output: pytest's dots and failures (every test's name with `verbose`);
    with `quiet`, nothing unless a person watches on a terminal: in CI or a
    pipe the results file and the caller's summary say it all.
    """
    import pytest

    if verbose:
        output = ["-v"]
    elif quiet and not progress.interactive():
        output = ["-p", "no:terminal"]
    else:
        output = ["-q"]
    with tempfile.TemporaryDirectory(prefix="racker-check-") as tmp:
        argv = [
            "--pyargs", "racker.checks",
            f"--racker-images={','.join(images)}",
            f"--racker-engines={','.join(engines)}",
            f"--racker-results={results}",
            "-c", os.devnull, "--rootdir", tmp, "-p", "no:cacheprovider",
            # One boot per image and engine for every check module: module scope would boot
            # each VM once for test_container and again for test_vm (a minute each under TCG).
            "-o", "racker_machine_scope=session",
            # Only racker's checks: a conftest.py above the installed package (a source
            # checkout's own test conftest, say) must not reconfigure the run.
            "--noconftest",
            # racker itself is imported already, so pytest cannot rewrite its asserts: expected.
            "-W", "ignore::pytest.PytestAssertRewriteWarning",
            *output,
        ]  # fmt: skip
        if workers and workers != "0":
            argv += ["-n", workers]
        if junit:
            argv.append(f"--junitxml={junit}")
        if shard:
            argv.append(f"--racker-shard={shard}")
        if reuse:
            argv.append(f"--racker-reuse={reuse}")
        # The caller's PYTEST_ADDOPTS are for their own pytest runs: this one's argv is racker's,
        # and an added `-v` is not even an option with the terminal plugin off.
        addopts = os.environ.pop("PYTEST_ADDOPTS", None)
        try:
            return int(pytest.main(argv))
        finally:
            if addopts is not None:
                os.environ["PYTEST_ADDOPTS"] = addopts
