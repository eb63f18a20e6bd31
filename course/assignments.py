"""The one registry of assignments, in the order of course/README.md.

implement  a step of the paper that the reference code contains between the lines
           `# BEGIN ASSIGNMENT <name>` and `# END ASSIGNMENT <name>` (in `file` only);
           the student copy replaces each such region by a NotImplementedError.
extend     a feature the reference lacks; its solution is course/solutions/<name>.patch,
           which changes `file` only and is left out of the student copy.

Each test earns 1 point, or n with `@pytest.mark.points(n)`. Hidden tests (course/tests/hidden/, left
out of the student copy) run only when `python -m course grade` grades a submission. `timeout` is each
test's limit in grading: the slowest course test takes under 0.5 s on a loaded 2-core CPU (pytest
--durations, 2026-12-08), and its first test also builds the session's tiny models, so 20 s leaves a
slow grading machine room while a loop that never ends costs 20 s.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Assignment:
    name: str
    kind: str                # "implement" or "extend"
    file: str                # the one file a student changes
    tests: tuple[str, ...]   # pytest files, relative to the repository root
    spec: str                # what to do, for the student
    hidden: tuple[str, ...] = ()   # tests run only by grade (course/tests/hidden/), not in the student copy
    timeout: float = 20.0    # s per test when grading (the module docstring says why)

    @property
    def solution(self) -> str:
        return f"course/solutions/{self.name}.patch"


def _assignment(name: str, kind: str, file: str, hidden: bool = False) -> Assignment:
    return Assignment(name, kind, file, (f"course/tests/test_{name}.py",), f"course/{name}.md",
                      (f"{HIDDEN}test_{name}_hidden.py",) if hidden else ())


HIDDEN = "course/tests/hidden/"


ASSIGNMENTS = [
    _assignment("adapter", "implement", "adapters.py"),
    _assignment("prefix", "implement", "adapters.py"),
    _assignment("lora", "implement", "adapters.py"),
    _assignment("episode", "implement", "episodes.py"),
    _assignment("phi_start", "implement", "episodes.py"),
    _assignment("inner_loop", "implement", "maml.py", hidden=True),
    _assignment("meta_gradient", "implement", "maml.py"),
    _assignment("adam", "extend", "maml.py"),
    _assignment("head", "extend", "episodes.py"),
    _assignment("conjugate_gradient", "implement", "implicit.py"),
    _assignment("paired_interval", "implement", "experiments/stats.py"),
    _assignment("bootstrap", "extend", "experiments/stats.py"),
]
KINDS = ("implement", "extend")
BY_NAME = {a.name: a for a in ASSIGNMENTS}
