"""The pytest plugin of `python -m course grade` (course/grade.py loads it with -p course.grade_plugin).

It reports, one JSON line each, to the file named by $COURSE_GRADE_EVENTS: the collected tests with
their points, each test's start and the start of its call (after its fixtures), and each test's result
with its output. The grader reads that file
while pytest runs, so a test that hangs is seen, ended and named from outside. The tests named in
the file $COURSE_GRADE_SKIP (one node id a line: those already graded before a restart) are
deselected.
"""

import json
import os

import pytest

OUTPUT_CAP = 4000   # characters of output per test: a failing loop that prints stays readable


def _emit(event: dict):
    with open(os.environ["COURSE_GRADE_EVENTS"], "a") as f:
        f.write(json.dumps(event) + "\n")


def cap(text: str, limit: int = OUTPUT_CAP) -> str:
    """The head and the tail of a long text (an assertion's message is at the end of pytest's report)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit // 4]}\n... [{len(text) - limit} characters cut] ...\n{text[-(limit - limit // 4):]}"


def pytest_collection_modifyitems(config, items):
    skip_file = os.environ.get("COURSE_GRADE_SKIP")
    skip = set(open(skip_file).read().split("\n")) if skip_file else set()
    kept = [item for item in items if item.nodeid not in skip]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in skip])
        items[:] = kept
    tests = []
    for item in items:
        marker = item.get_closest_marker("points")
        tests.append({"id": item.nodeid, "points": marker.args[0] if marker else 1})
    _emit({"collected": tests})


def pytest_collectreport(report):
    if report.failed:
        _emit({"collect_error": report.nodeid, "output": cap(report.longreprtext)})


def pytest_runtest_logstart(nodeid, location):
    _emit({"start": nodeid})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    _emit({"call": item.nodeid})   # the test's own time starts here (its fixtures, built first, are the reference's)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    state = item.stash.setdefault(_RESULT, {"call_passed": False, "failed": False, "output": []})
    state["call_passed"] |= report.when == "call" and report.passed   # a skip or an xfail earns nothing
    state["failed"] |= report.failed
    if report.skipped:   # (a submission may call pytest.skip)
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longreprtext
        state["output"].append(f"[{report.when}] skipped: {reason}")
    elif report.failed:
        state["output"].append(f"[{report.when}] {report.longreprtext}")
    if report.when == "teardown":
        printed = "".join(f"--- {name} ---\n{text}" for name, text in report.sections if text)
        _emit({"done": item.nodeid, "passed": state["call_passed"] and not state["failed"],
               "output": cap("\n".join(state["output"]) + ("\n" + printed if printed else ""))})


_RESULT = pytest.StashKey[dict]()
