"""Grading one submitted file: `python -m course grade` and the Gradescope autograder (course/README.md).

Only the submitted file is read: it is copied into a fresh grading tree (the student copy of the
reference, with the hidden tests), so no test, conftest or other file of the submission's folder
ever runs. The tests run in one pytest process (a process per test would pay the import of torch,
several seconds, per test) watched from here through course/grade_plugin.py's events: a test that
runs past its timeout is ended by killing the process, recorded as timed out, and pytest starts
again on the tests not yet graded.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from course import kit
from course.grade_plugin import cap

COLLECT_TIMEOUT = 120.0   # s to collect (import torch, the tests, the submission), or to build a test's fixtures
EVENTS, SKIP, LOG = ".course-grade-events", ".course-grade-skip", ".course-grade-log"
VISIBILITY = {False: "visible", True: "after_published"}   # Gradescope's: hidden tests show once grades are out


@dataclass
class Result:
    name: str        # the test's node id, relative to course/tests/
    max_score: float
    score: float
    output: str      # why it failed (capped), or ""
    hidden: bool


# ----------------------------------------------------------------------------- one file, graded

def grade(assignment, submission: Path, tree: Path | None = None, timeout: float | None = None) -> list[Result]:
    """Grade `submission` (the student's version of assignment.file) in a fresh grading tree: the student
    copy of the reference with the hidden tests, or a copy of `tree` (an autograder's, already one)."""
    timeout = timeout or assignment.timeout
    with tempfile.TemporaryDirectory(prefix="course-grade-") as tmp:
        where = Path(tmp, "tree")
        if tree is None:
            kit.copy_project(kit.ROOT, where, student=True, hidden=True)
        else:
            shutil.copytree(tree, where, ignore=shutil.ignore_patterns("__pycache__", EVENTS, SKIP, LOG))
        own = (where / assignment.file).read_bytes()   # the tree's own (stub) file, to list the tests if need be
        shutil.copyfile(submission, where / assignment.file)
        files = [*assignment.tests, *assignment.hidden]
        tests, done, broken = run_graded(where, files, timeout)
        if tests is None or broken:   # the submission breaks the import of a test file: list them without it
            (where / assignment.file).write_bytes(own)
            tests = collect_tests(where, files)
        results = []
        for test in tests:
            passed, output = done.get(test["id"], (False, _not_run(test["id"], broken)))
            results.append(Result(test["id"].removeprefix("course/tests/"), test["points"],
                                  test["points"] if passed else 0, _relative(output, where),
                                  any(test["id"].startswith(f"{h}::") for h in assignment.hidden)))
        return results


def _not_run(nodeid: str, broken: dict) -> str:
    file = nodeid.split("::")[0]
    if file in broken:
        return f"not run: {file} could not be imported with the submission\n{broken[file]}"
    return "not run: the test process ended before this test (see the tests before it)"


def _relative(text: str, where: Path) -> str:
    """Paths inside the grading tree as the student knows them (a temporary folder tells nothing)."""
    return text.replace(f"{where}/", "").replace(str(where), ".")


# ----------------------------------------------------------------------------- pytest, watched

def run_graded(where: Path, files: list[str], timeout: float):
    """Run the test files in `where`, each test limited to `timeout` s. Returns (the tests collected, each
    {"id", "points"}, or None if collection failed; node id -> (passed, output); file -> its collection error)."""
    tests, done, broken = None, {}, {}
    while True:
        collected, stopped = _pytest_once(where, files, done, broken, timeout)
        tests = collected if tests is None else tests   # the first run collects them all (none skipped yet)
        if not stopped or tests is None or all(t["id"] in done for t in tests):
            return tests, done, broken


def collect_tests(where: Path, files: list[str]) -> list[dict]:
    """The tests of `files` and their points, by the plugin, without running them."""
    collected, _ = _pytest_once(where, files, {}, {}, COLLECT_TIMEOUT, "--collect-only")
    if collected is None:
        raise kit.CourseError(f"the tests of {', '.join(files)} do not even collect in the grading tree "
                              f"(see {where / LOG}): is the reference broken?")
    return collected


def _pytest_once(where, files, done, broken, timeout, *extra):
    """One pytest process over the tests not yet in `done`; fills `done` and `broken`. Returns (the tests it
    collected or None, True if it was stopped or ended inside a test: the rest must run again)."""
    events, skip = where / EVENTS, where / SKIP
    events.write_text("")
    skip.write_text("\n".join(done))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}   # no plugins or options from outside
    env |= {"COURSE_GRADE_EVENTS": str(events), "COURSE_GRADE_SKIP": str(skip), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "course.grade_plugin",
               "--tb=short", "--continue-on-collection-errors", *extra, *files]
    with open(where / LOG, "w") as log:
        process = subprocess.Popen(command, cwd=where, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    collected, current, since, offset, limit = None, None, time.monotonic(), 0, COLLECT_TIMEOUT
    try:
        while True:
            ended = process.poll() is not None
            text = events.read_text()
            lines, offset = text[offset:].split("\n")[:-1], offset + text[offset:].rfind("\n") + 1
            for event in map(json.loads, lines):
                since = time.monotonic()
                if "collected" in event:
                    collected = event["collected"]
                elif "collect_error" in event:
                    broken[event["collect_error"]] = event["output"]
                elif "start" in event:   # its fixtures first: the session's tiny models, built once per process
                    current, limit = event["start"], COLLECT_TIMEOUT
                elif "call" in event:
                    limit = timeout
                elif "done" in event:
                    done[event["done"]], current, limit = (event["passed"], event["output"]), None, COLLECT_TIMEOUT
            if ended:
                break
            if time.monotonic() - since > limit:
                _end(process)
                if collected is None:   # (a loop at import time: the tests are listed without the submission)
                    broken.update(dict.fromkeys(files, f"timed out: collecting the tests (importing the submission) "
                                                       f"took over {COLLECT_TIMEOUT:g} s"))
                if current is not None:
                    done[current] = (False, f"timed out: ended after {limit:g} s (the other tests still count)")
                return collected, True
            time.sleep(0.05)
    finally:
        _end(process)
    if current is not None:   # the process ended inside a test (os._exit, a crash of torch)
        log_tail = cap((where / LOG).read_text(errors="replace"), 1000)
        done[current] = (False, f"the test process ended during this test (exit status {process.returncode})\n"
                                f"{log_tail}")
        return collected, True
    return collected, False


def _end(process):
    """Kill pytest and whatever it started (its own session, so a Ctrl-C here never reaches it first)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


# ----------------------------------------------------------------------------- reports

def score_lines(assignment, results: list[Result]) -> str:
    """One line per test with its points, then the total."""
    width = max((len(r.name) for r in results), default=0)
    lines = [f"{r.score:g}/{r.max_score:g}  {r.name:<{width}}{'  (hidden)' if r.hidden else ''}"
             f"{'  ' + _reason(r.output) if r.score < r.max_score else ''}" for r in results]
    score, total = sum(r.score for r in results), sum(r.max_score for r in results)
    total_line = f"total: {score:g}/{total:g} ({assignment.name}, {assignment.file})"
    return "\n".join([*(line.rstrip() for line in lines), total_line])


def _reason(output: str) -> str:
    """The line of pytest's report that says what went wrong (the last 'E ' line), or the first line."""
    errors = [line[1:].strip() for line in output.splitlines() if line.startswith("E ")]
    line = errors[-1] if errors else (output.strip().splitlines() or ["failed"])[0]
    return line if len(line) <= 100 else line[:97] + "..."


def results_json(assignment, results: list[Result]) -> dict:
    """Gradescope's results.json: https://gradescope-autograders.readthedocs.io/en/latest/specs/"""
    score, total = sum(r.score for r in results), sum(r.max_score for r in results)
    return {"score": score,
            "output": f"{assignment.name} ({assignment.file}): {score:g}/{total:g} points",
            "tests": [{"name": r.name, "score": r.score, "max_score": r.max_score, "output": r.output,
                       "visibility": VISIBILITY[r.hidden]} for r in results]}


# ----------------------------------------------------------------------------- Gradescope's autograder

SETUP = """#!/usr/bin/env bash
# Gradescope runs this once, in /autograder/source, to build the grading image: the project's
# requirements, then the default tokenizer converted once (the tests' tiny models use its vocabulary).
set -euo pipefail
cd "$(dirname "$0")/tree"
python3 -m pip install -r requirements.txt
python3 -c "from plumbing.pretrained import load_tokenizer; load_tokenizer('e5-small')"
"""

RUN = """#!/usr/bin/env bash
# Gradescope runs this as /autograder/run_autograder for each submission. It reads only the one file
# {file} (or {base}) of $AUTOGRADER_ROOT/submission and writes $AUTOGRADER_ROOT/results/results.json
# (AUTOGRADER_ROOT is /autograder unless set, so it runs locally too; $PYTHON, python3 unless set).
root="${{AUTOGRADER_ROOT:-/autograder}}"
submission="$root/submission/{file}"
[ -f "$submission" ] || submission="$root/submission/{base}"
cd "$root/source/tree" || exit 1
"${{PYTHON:-python3}}" -m course grade {name} "$submission" --tree . --json "$root/results/results.json"
"""


def write_autograder(assignment, dest: Path):
    """A Gradescope autograder folder: setup.sh, run_autograder and tree/, the grading tree (the student
    copy with the hidden tests: no solutions travel)."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise kit.CourseError(f"{dest} exists and is not an empty folder: name a new one")
    kit.copy_project(kit.ROOT, dest / "tree", student=True, hidden=True)
    for name, text in [("setup.sh", SETUP), ("run_autograder", RUN.format(
            file=assignment.file, base=Path(assignment.file).name, name=assignment.name))]:
        (dest / name).write_text(text)
        (dest / name).chmod(0o755)
