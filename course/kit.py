"""What the commands do: the student copy, running an assignment's tests, and the course check."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from course.assignments import ASSIGNMENTS, HIDDEN

ROOT = Path(__file__).resolve().parents[1]   # the reference: the repository this kit belongs to
MARKER = re.compile(r"^(?P<indent>\s*)# (?P<edge>BEGIN|END) ASSIGNMENT (?P<name>\w+)\s*$")
INSTRUCTOR_ONLY = ("course/solutions/", "course/mutants/")   # never in a student copy: they show the solutions
STAGES = ("meta_pretrain.py", "finetune_peft.py", "evaluate_ner.py")   # must answer --help in a student copy


class CourseError(Exception):
    """A usage or setup error: printed on one line, exit status 2."""


def stub(name: str) -> str:
    return f'raise NotImplementedError("assignment {name}: see course/{name}.md")'


# ----------------------------------------------------------------------------- the student copy

def regions(text: str, where: str = "") -> list[tuple[str, int, int]]:
    """(name, begin line, end line) of every solution region of a file, 0-based marker lines."""
    found, open_ = [], None
    for i, line in enumerate(text.splitlines()):
        m = MARKER.match(line)
        if not m:
            continue
        if m["edge"] == "BEGIN" and open_ is None:
            open_ = (m["name"], i)
        elif m["edge"] == "END" and open_ is not None and open_[0] == m["name"]:
            found.append((m["name"], open_[1], i))
            open_ = None
        else:
            raise CourseError(f"{where}:{i + 1}: unexpected {line.strip()!r}")
    if open_ is not None:
        raise CourseError(f"{where}:{open_[1] + 1}: BEGIN ASSIGNMENT {open_[0]} is never ended")
    return found


def strip_regions(text: str, where: str = "", keep: str | None = None) -> str:
    """The text with each region (markers included) replaced by a stub at the region's indentation;
    the regions of assignment `keep`, if any, keep their solution (markers removed)."""
    lines = text.splitlines(keepends=True)
    for name, begin, end in reversed(regions(text, where)):
        if name == keep:
            lines[begin:end + 1] = lines[begin + 1:end]
            continue
        indent = MARKER.match(lines[begin])["indent"]
        lines[begin:end + 1] = [f"{indent}{stub(name)}\n"]
    return "".join(lines)


def project_files(root: Path) -> list[str]:
    """The repository's files: git-tracked and untracked-but-not-ignored (what a clone would hold)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise CourseError(f"{root} is not a git checkout (the reference must be one)") from None
    return sorted(f for f in set(out.decode().split("\0")) if f and (root / f).is_file())


def copy_project(root: Path, dest: Path, student: bool = False, keep: str | None = None,
                 hidden: bool = False) -> list[str]:
    """Copy the repository to dest; student=True strips the solution regions of .py files (but those of
    assignment `keep`) and leaves course/solutions/ out, and the hidden tests unless `hidden` (a grading
    tree). Returns the files written."""
    if dest.is_symlink() and not dest.exists():
        raise CourseError(f"{dest} is a symbolic link to nothing ({os.readlink(dest)}): remove it or name a folder")
    if dest.exists() and not dest.is_dir():
        raise CourseError(f"{dest} is a file, not a folder: name a new or empty folder")
    if dest.exists() and any(dest.iterdir()):
        raise CourseError(f"{dest} exists and is not empty")
    if dest.resolve().is_relative_to(root):
        raise CourseError(f"{dest} is inside the repository: write the copy elsewhere")
    written = []
    for f in project_files(root):
        if student and (f.startswith(INSTRUCTOR_ONLY) or (f.startswith(HIDDEN) and not hidden)):
            continue
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, target)
        if student and f.endswith(".py"):
            text = (root / f).read_text()
            target.write_text(strip_regions(text, f, keep))
        written.append(f)
    return written


# ----------------------------------------------------------------------------- tests

def run_tests(assignment, where: Path, stop_first: bool = False, capture: bool = False, hidden: bool = False):
    """pytest on the assignment's test files (and its hidden ones if `hidden`), run in `where` (so it imports
    that copy's code)."""
    tests = [*assignment.tests, *(assignment.hidden if hidden else ())]
    missing = [t for t in tests if not (where / t).is_file()]
    if missing:
        raise CourseError(f"{where} has no {missing[0]}")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-x"] if stop_first else []),
               *tests]
    return subprocess.run(command, cwd=where, capture_output=capture, text=True)


# ----------------------------------------------------------------------------- the check

def check(root: Path = ROOT) -> bool:
    """Every assignment: implement fails in a fresh student copy (at its stub), passes in the reference
    and in a student copy with its own solution alone; extend fails in the reference and passes with its
    patch, which touches its one file. The regions live in their assignments' files, the student copy
    differs from the reference in those files only, and its stage scripts answer --help. Prints one line
    per check; True iff all hold."""
    if not (root / "course" / "solutions").is_dir():
        raise CourseError("course/solutions/ is missing: course check runs on the reference, not a student copy")
    start, failures = time.time(), []

    def report(ok: bool, line: str):
        print(f"{'ok  ' if ok else 'FAIL'} {line}", flush=True)
        failures.extend([] if ok else [line])

    files = project_files(root)
    implement = {a.name: a.file for a in ASSIGNMENTS if a.kind == "implement"}
    where = {}
    for f in files:
        if f.endswith(".py"):
            for name, _, _ in regions((root / f).read_text(), f):
                where.setdefault(name, set()).add(f)
    for name in sorted(where.keys() | implement.keys()):
        ok = where.get(name) == {implement.get(name)}
        report(ok, f"regions of {name}: in {', '.join(sorted(where.get(name, []))) or 'no file'}"
                   f" (registry: {implement.get(name, 'not an implement assignment')})")

    with tempfile.TemporaryDirectory(prefix="course-check-") as tmp:
        student = Path(tmp, "student")
        copy_project(root, student, student=True)
        changed = sorted(f for f in files if not f.startswith((*INSTRUCTOR_ONLY, HIDDEN))
                         and (student / f).read_bytes() != (root / f).read_bytes())
        left_out = sorted(set(files) - {str(p.relative_to(student)) for p in student.rglob("*") if p.is_file()})
        report(changed == sorted(set(implement.values())) and all(f.startswith((*INSTRUCTOR_ONLY, HIDDEN))
                                                                  for f in left_out),
               f"student copy: differs in {', '.join(changed)}; leaves out {_folders(left_out) or 'nothing'}")
        jobs = [partial(_help, student, script) for script in STAGES]
        jobs += [partial(_check_assignment, a, root, student, Path(tmp)) for a in ASSIGNMENTS]
        jobs += [partial(_check_mutant, a, patch, root, Path(tmp)) for a in ASSIGNMENTS for patch in mutants(a, root)]
        counts = {a.name: len(mutants(a, root)) for a in ASSIGNMENTS if a.kind == "implement"}
        report(min(counts.values()) >= 3,
               "mutants: " + ", ".join(f"{n} {c}" for n, c in counts.items()) + " (at least 3 each)")
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:   # each job a subprocess
            for ok, line in pool.map(lambda job: job(), jobs):
                report(ok, line)
    print(f"course check: {'passed' if not failures else f'{len(failures)} failed'}"
          f" ({len(ASSIGNMENTS)} assignments, {time.time() - start:.0f} s)")
    return not failures


def _folders(files: list[str]) -> str:
    """'course/mutants/ (30 files), ...': what a student copy leaves out, by folder."""
    count = {}
    for f in files:
        count[f.rsplit("/", 1)[0] + "/"] = count.get(f.rsplit("/", 1)[0] + "/", 0) + 1
    return ", ".join(f"{folder} ({n} files)" for folder, n in sorted(count.items()))


def _help(student: Path, script: str) -> tuple[bool, str]:
    run = subprocess.run([sys.executable, script, "--help"], cwd=student, capture_output=True)
    return run.returncode == 0, f"student copy: python {script} --help exits {run.returncode}"


def _check_assignment(a, root: Path, student: Path, tmp: Path) -> tuple[bool, str]:
    if a.kind == "implement":
        cut = run_tests(a, student, stop_first=True, capture=True)
        stubbed = f"assignment {a.name}: see" in cut.stdout
        ref = run_tests(a, root, stop_first=True, capture=True, hidden=True)
        alone = tmp / a.name   # a student copy with this assignment done and no other: graded on its own
        copy_project(root, alone, student=True, keep=a.name, hidden=True)
        own = run_tests(a, alone, stop_first=True, capture=True, hidden=True)
        return (cut.returncode == 1 and stubbed and ref.returncode == 0 and own.returncode == 0,
                f"{a.name} ({a.file}): student copy {_verdict(cut)}{' at its stub' if stubbed else ''},"
                f" reference {_verdict(ref)}, student copy with this solution alone {_verdict(own)}")
    ref = run_tests(a, root, stop_first=True, capture=True)
    scratch = tmp / a.name
    copy_project(root, scratch)
    touched = _patched_files(root / a.solution, scratch)
    solved = run_tests(a, scratch, stop_first=True, capture=True)
    return (ref.returncode == 1 and solved.returncode == 0 and touched == [a.file],
            f"{a.name} ({a.file}): reference {_verdict(ref)}, with {a.solution} (touches {', '.join(touched)})"
            f" {_verdict(solved)}")


def _verdict(run) -> str:
    return {0: "passes", 1: "fails"}.get(run.returncode, f"errors (pytest exit {run.returncode})")


def _patched_files(patch: Path, scratch: Path) -> list[str]:
    """Apply a solution patch to a scratch copy; the files it touches."""
    if not patch.is_file():
        raise CourseError(f"no solution {patch}")
    stat = subprocess.run(["git", "apply", "--numstat", str(patch)], cwd=scratch, capture_output=True, text=True)
    applied = subprocess.run(["git", "apply", str(patch)], cwd=scratch, capture_output=True, text=True)
    if applied.returncode != 0:
        raise CourseError(f"{patch.name} does not apply: {applied.stderr.strip().splitlines()[0]}")
    return sorted(line.split("\t")[2] for line in stat.stdout.splitlines())


# ----------------------------------------------------------------------------- the mutants

def mutants(a, root: Path = ROOT) -> list[Path]:
    """course/mutants/NAME/*.patch: plausible wrong solutions of the assignment, each named by its file."""
    return sorted((root / "course" / "mutants" / a.name).glob("*.patch"))


def _check_mutant(a, patch: Path, root: Path, tmp: Path) -> tuple[bool, str]:
    """A mutant applied to a copy of the reference must fail the assignment's tests (hidden ones included).
    Applied with one line of context, so that small unrelated edits of the reference do not stop it."""
    scratch = tmp / f"mutant-{a.name}-{patch.stem}"
    copy_project(root, scratch)
    name = f"mutant {a.name}/{patch.name}"
    applied = subprocess.run(["git", "apply", "-C1", "--recount", "--include", a.file, str(patch)], cwd=scratch,
                             capture_output=True, text=True)
    if applied.returncode != 0 or (scratch / a.file).read_bytes() == (root / a.file).read_bytes():
        why = (applied.stderr.strip().splitlines() or [f"it changes nothing in {a.file}"])[0]
        return False, f"{name}: does not apply to {a.file} ({why}): rewrite it against the reference"
    run = run_tests(a, scratch, stop_first=True, capture=True, hidden=True)
    verdict = {0: "pass: a hole in the tests", 1: "fail"}.get(run.returncode, f"error (pytest exit {run.returncode})")
    return run.returncode == 1, f"{name}: the tests {verdict}"
