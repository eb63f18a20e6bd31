"""The course kit: the paper's steps as assignments (course/README.md).

    python -m course list                  # NAME KIND FILE, one line per assignment
    python -m course student DIR           # a student copy: every solution region replaced by a stub
    python -m course test NAME [--in DIR]  # exit 0 iff that assignment's tests pass in DIR
    python -m course grade NAME FILE       # grade one submitted file (points, timeouts, --json results.json)
    python -m course autograder NAME DIR   # a Gradescope autograder folder
    python -m course check                 # every assignment fails for the student and passes with its solution;
                                           # every mutant fails
"""
