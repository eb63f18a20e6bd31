"""python -m course {list, student DIR, test NAME [--in DIR], check}: see course/README.md."""

import argparse
import sys
from pathlib import Path

from course import kit
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
    commands.add_parser("check", help="check every assignment against the student copy and the solutions")
    args = parser.parse_args(argv)

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
        if args.name not in BY_NAME:
            raise kit.CourseError(f"no assignment {args.name!r} (python -m course list)")
        if not args.where.is_dir():
            raise kit.CourseError(f"no folder {args.where}")
        return 0 if kit.run_tests(BY_NAME[args.name], args.where.resolve()).returncode == 0 else 1
    return 0 if kit.check() else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except kit.CourseError as error:
        print(f"python -m course: error: {error}", file=sys.stderr)
        sys.exit(2)
