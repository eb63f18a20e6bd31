"""python -m course {list, student DIR, test NAME [--in DIR], grade NAME FILE, autograder NAME DIR, check}:
see course/README.md."""

import argparse
import json
import sys
from pathlib import Path

from course import grade, kit
from course.assignments import ASSIGNMENTS, BY_NAME


class Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, exit 2 (argparse would print the usage first)
        raise kit.CourseError(message)


def main(argv=None) -> int:
    parser = Parser(prog="python -m course", description="The course kit (course/README.md).")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="one line per assignment: NAME KIND FILE")
    student = commands.add_parser("student", help="write a student copy of the repository to DIR")
    student.add_argument("dir", type=Path)
    test = commands.add_parser("test", help="run one assignment's tests; exit 0 iff they pass")
    test.add_argument("name")
    test.add_argument("--in", dest="where", type=Path, default=kit.ROOT, help="the copy to test (default: this one)")
    marks = commands.add_parser("grade", help="grade one submitted file; exit 0 iff full marks")
    marks.add_argument("name")
    marks.add_argument("file", type=Path, help="the student's version of the assignment's one file")
    marks.add_argument("--json", type=Path, help="write Gradescope's results.json here")
    marks.add_argument("--timeout", type=float, help="seconds per test (default: the registry's)")
    marks.add_argument("--tree", type=Path, help="grade in a copy of this grading tree (an autograder's) "
                                                 "instead of a fresh student copy of this reference")
    bundle = commands.add_parser("autograder", help="write a Gradescope autograder folder for one assignment")
    bundle.add_argument("name")
    bundle.add_argument("dir", type=Path)
    commands.add_parser("check", help="check every assignment against the student copy, the solutions "
                                      "and the mutants")
    args = parser.parse_args(argv)
    if getattr(args, "name", None) is not None and args.name not in BY_NAME:
        raise kit.CourseError(f"no assignment {args.name!r} (python -m course list)")

    if args.command == "list":
        for a in ASSIGNMENTS:
            print(a.name, a.kind, a.file)
        return 0
    if args.command == "student":
        written = kit.copy_project(kit.ROOT, args.dir, student=True)
        print(f"student copy: {len(written)} files in {args.dir}; hand it out, grade with "
              f"python -m course test NAME --in {args.dir}")
        return 0
    if args.command == "test":
        if not args.where.is_dir():
            raise kit.CourseError(f"no folder {args.where}")
        if args.where.resolve() != kit.ROOT and (args.where / "course" / "solutions").is_dir():
            print(f"python -m course: warning: {args.where} holds course/solutions/: it is a copy of the reference, "
                  f"not a student copy", file=sys.stderr)
        return 0 if kit.run_tests(BY_NAME[args.name], args.where.resolve()).returncode == 0 else 1
    if args.command == "grade":
        return _grade(BY_NAME[args.name], args)
    if args.command == "autograder":
        grade.write_autograder(BY_NAME[args.name], args.dir)
        print(f"autograder for {args.name} in {args.dir}: zip its contents (cd {args.dir} && zip -r ../"
              f"{args.name}.zip .) and upload it to Gradescope")
        return 0
    return 0 if kit.check() else 1


def _grade(assignment, args) -> int:
    if args.timeout is not None and not args.timeout > 0:
        raise kit.CourseError(f"--timeout must be a positive number of seconds, not {args.timeout:g}")
    if args.tree is not None and not (args.tree / assignment.tests[0]).is_file():
        raise kit.CourseError(f"{args.tree} is not a grading tree: it has no {assignment.tests[0]}")
    if not args.file.is_file():
        message = f"no submission: {args.file} is not a file (submit your {assignment.file})"
        if args.json is None:
            raise kit.CourseError(message)
        _write_json(args.json, {"score": 0, "output": message, "tests": []})   # Gradescope still gets a result
        print(message, file=sys.stderr)
        return 1
    results = grade.grade(assignment, args.file, args.tree, args.timeout)
    print(grade.score_lines(assignment, results))
    if args.json is not None:
        _write_json(args.json, grade.results_json(assignment, results))
    return 0 if all(r.score == r.max_score for r in results) else 1


def _write_json(path: Path, results: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except kit.CourseError as error:
        print(f"python -m course: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:   # (the tests' processes are ended on the way out)
        print("python -m course: interrupted (Ctrl-C): nothing graded", file=sys.stderr)
        sys.exit(130)
