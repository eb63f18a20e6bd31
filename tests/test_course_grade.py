"""The course's grader (course/grade.py): points, per-test timeouts, capped output, crashes, Gradescope's
results.json, the autograder folder, and that only the submitted file is ever read."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from course import grade, kit
from course.assignments import BY_NAME

ROOT = Path(__file__).resolve().parents[1]

SYNTHETIC = '''
import os, time
import pytest

def test_passes():
    pass

@pytest.mark.points(3)
def test_worth_three():
    pass

def test_fails():
    assert 1 == 2, "one is not two"

def test_hangs():
    time.sleep(1000)

def test_prints_a_lot_then_fails():
    print("x" * 1_000_000)
    assert False

def test_ends_the_process():
    os._exit(3)

def test_skips_itself():
    pytest.skip("a submission may skip")

def test_passes_after_all_that():
    pass
'''


@pytest.fixture
def tree(tmp_path):
    """A grading tree with no torch in it: the plugin, and one test file of every kind of outcome."""
    (tmp_path / "course").mkdir()
    for f in ("__init__.py", "grade_plugin.py"):
        shutil.copy(ROOT / "course" / f, tmp_path / "course" / f)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    points(n): points\n")
    (tmp_path / "test_synthetic.py").write_text(SYNTHETIC)
    return tmp_path


def test_each_test_is_graded_on_its_own_and_a_hang_or_a_crash_costs_only_that_test(tree):
    tests, done, broken = grade.run_graded(tree, ["test_synthetic.py"], timeout=3.0)
    ids = [t["id"].split("::")[1] for t in tests]
    assert ids == ["test_passes", "test_worth_three", "test_fails", "test_hangs", "test_prints_a_lot_then_fails",
                   "test_ends_the_process", "test_skips_itself", "test_passes_after_all_that"]
    assert [t["points"] for t in tests] == [1, 3, 1, 1, 1, 1, 1, 1] and not broken
    outcome = {i.split("::")[1]: r for i, r in done.items()}
    assert [n for n, (passed, _) in outcome.items() if passed] == ["test_passes", "test_worth_three",
                                                                  "test_passes_after_all_that"]
    assert "one is not two" in outcome["test_fails"][1]
    assert outcome["test_hangs"][1] == "timed out: ended after 3 s (the other tests still count)"
    assert len(outcome["test_prints_a_lot_then_fails"][1]) < 5000 and "characters cut" in outcome[
        "test_prints_a_lot_then_fails"][1]
    assert "exit status 3" in outcome["test_ends_the_process"][1]
    assert "skipped: Skipped: a submission may skip" in outcome["test_skips_itself"][1]


def test_a_file_that_does_not_import_is_reported_and_its_tests_listed(tree):
    (tree / "test_broken.py").write_text("import no_such_module\n\ndef test_never():\n    pass\n")
    tests, done, broken = grade.run_graded(tree, ["test_broken.py"], timeout=3.0)
    assert tests == [] and not done and "No module named 'no_such_module'" in broken["test_broken.py"]
    assert grade._not_run("test_broken.py::test_never", broken).startswith("not run: test_broken.py could not be")


def test_the_report_and_results_json():
    inner = BY_NAME["inner_loop"]
    results = [grade.Result("test_a.py::test_one", 2, 2, "", False),
               grade.Result("hidden/test_b.py::test_two", 1, 0, "[call] x\nE   AssertionError: wrong\n", True)]
    lines = grade.score_lines(inner, results).splitlines()
    assert lines[0] == "2/2  test_a.py::test_one"
    assert lines[1] == "0/1  hidden/test_b.py::test_two  (hidden)  AssertionError: wrong"
    assert lines[2] == "total: 2/3 (inner_loop, maml.py)"
    assert grade.results_json(inner, results) == {
        "score": 2, "output": "inner_loop (maml.py): 2/3 points",
        "tests": [{"name": "test_a.py::test_one", "score": 2, "max_score": 2, "output": "", "visibility": "visible"},
                  {"name": "hidden/test_b.py::test_two", "score": 0, "max_score": 1,
                   "output": "[call] x\nE   AssertionError: wrong\n", "visibility": "after_published"}]}


def course(*argv, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "course", *argv], cwd=cwd, capture_output=True, text=True,
                          env=env)


@pytest.mark.parametrize("make", ["file", "dangling link"])
def test_student_into_a_file_or_a_dangling_link_is_one_line(tmp_path, make):
    target = tmp_path / "copy"
    target.write_text("x") if make == "file" else target.symlink_to(tmp_path / "nowhere")
    run = course("student", str(target))
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1 and "Traceback" not in run.stderr
    assert ("is a file, not a folder" if make == "file" else "symbolic link to nothing") in run.stderr


def test_grade_refuses_a_missing_submission_in_one_line_and_still_writes_results_json(tmp_path):
    run = course("grade", "inner_loop", str(tmp_path / "maml.py"))
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"python -m course: error: no submission: {tmp_path / 'maml.py'} is not a file (submit your maml.py)"]
    run = course("grade", "inner_loop", str(tmp_path / "maml.py"), "--json", str(tmp_path / "r.json"))
    assert run.returncode == 1 and json.loads((tmp_path / "r.json").read_text())["score"] == 0


def test_test_in_a_copy_of_the_reference_warns(tmp_path):
    (tmp_path / "course" / "solutions").mkdir(parents=True)
    run = course("test", "paired_interval", "--in", str(tmp_path))
    assert "holds course/solutions/: it is a copy of the reference" in run.stderr


# ----------------------------------------------------------------------------- the real assignment, end to end

def stub_maml() -> str:
    return kit.strip_regions((ROOT / "maml.py").read_text(), "maml.py")


@pytest.mark.slow
def test_the_reference_gets_full_marks_and_a_loop_costs_only_its_tests(tmp_path):
    run = course("grade", "inner_loop", "maml.py", "--json", str(tmp_path / "ref.json"))
    ref = json.loads((tmp_path / "ref.json").read_text())
    assert run.returncode == 0 and ref["score"] == sum(t["max_score"] for t in ref["tests"]) > 0
    assert any(t["visibility"] == "after_published" for t in ref["tests"])            # the hidden tests ran
    looping = (ROOT / "maml.py").read_text().replace("for _ in range(steps):", "while steps == 3:", 1)
    (tmp_path / "maml.py").write_text(looping)
    run = course("grade", "inner_loop", str(tmp_path / "maml.py"), "--timeout", "5", "--json",
                 str(tmp_path / "loop.json"))
    tests = {t["name"]: t for t in json.loads((tmp_path / "loop.json").read_text())["tests"]}
    assert run.returncode == 1
    timed_out = [n for n, t in tests.items() if t["output"].startswith("timed out: ended after 5 s")]
    hung = "test_inner_loop.py::test_the_steps_are_sgd_on_the_support_loss[3]"   # steps=3 loops forever
    assert hung in timed_out and all(tests[n]["score"] == 0 for n in timed_out)
    assert tests["test_inner_loop.py::test_the_steps_are_sgd_on_the_support_loss[0]"]["score"] == 1  # the rest count
    assert f"0/1  {hung}" in run.stdout and "timed out: ended after 5 s" in run.stdout


@pytest.mark.slow
def test_the_autograder_writes_what_grade_writes_and_only_the_file_is_read(tmp_path):
    """A submission folder whose tests were edited to pass and whose conftest.py writes a file: neither runs."""
    root = tmp_path / "autograder"
    assert course("autograder", "inner_loop", str(root / "source")).returncode == 0
    assert not (root / "source" / "tree" / "course" / "solutions").exists()
    assert (root / "source" / "tree" / BY_NAME["inner_loop"].hidden[0]).is_file()
    submission = root / "submission"
    (submission / "course" / "tests").mkdir(parents=True)
    (submission / "maml.py").write_text(stub_maml())
    (submission / "course" / "tests" / "test_inner_loop.py").write_text("def test_all():\n    pass\n")
    (submission / "conftest.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    run = subprocess.run([str(root / "source" / "run_autograder")], capture_output=True, text=True,
                         env=os.environ | {"AUTOGRADER_ROOT": str(root), "PYTHON": sys.executable})
    assert run.returncode == 1, run.stderr
    graded = json.loads((root / "results" / "results.json").read_text())
    again = course("grade", "inner_loop", str(submission / "maml.py"), "--json", str(tmp_path / "g.json"))
    assert again.returncode == 1
    assert graded == json.loads((tmp_path / "g.json").read_text())
    assert graded["score"] == 0 and len(graded["tests"]) > 10 and not (tmp_path / "ran").exists()
    assert all("NotImplementedError: assignment inner_loop" in t["output"] for t in graded["tests"])
    assert all(str(tmp_path) not in t["output"] for t in graded["tests"])
