"""
Course mode: a student copy of the project with the exercises blanked out, and the handout that goes
with it.

The reference code marks each exercise between `# >>> exercise E6: <what to write>` and `# <<<
exercise E6`. `make` copies the project, replaces the lines between the markers by `raise
NotImplementedError("E6: ...")` (the markers, the docstrings and the shape comments around them
stay), and writes ASSIGNMENT.md. The exercise tests (tests/exercises/, `pytest -m e6 tests/`) grade
a copy through tests/adapters.py against snapshots of the reference outputs and against properties,
never against the reference code itself.

    python -m course.assignment make student/                    # every exercise
    python -m course.assignment make student/ --exercises E6 E7  # some of them
    cd student && python -m pytest -q -m e6 tests/           # one exercise's tests, in seconds
"""

import os

from course.exercises import EXERCISES, copy_project, student_files
from course.grading import TIME_LIMIT, grade
from plumbing.cli import new_parser, run_cli

QUESTIONS = [  # (question, the exercises its command needs, its run time on 2 CPU cores)
    ("TD(0), TD(lambda) and Monte Carlo: run `python benchmarks/bellman_methods.py --model toy`. "
     "Which V steers, and why does the held-out error against the realised return tell more than "
     "each method's own loss?", "all", "about 10 min"),
    ("Why does alpha * n have a cliff? Read the two sweeps `python recontrol.py` prints: what does "
     "the radius change?", "all", "about 5 min (7 the first time: it pretrains the base model)"),
    ("Why must u never enter the KV cache? What would the model read at the next step if it did?",
     "E1-E3", "no command: read generate.next_state"),
    ("What does the static steering vector of `python compare.py` miss that RE-Control's gradient "
     "has?", "all", "about 2 min once recontrol.py has run"),
    ("What does each baseline cost? Compare the reward calls and FLOPs per response in "
     "`python compare.py --world verdict`'s table.", "all", "about 40 min the first time"),
]
WALKTHROUGH_NEEDS = {1: "E1, E2", 2: "E1, E2, E3, E6, E7", 3: "E1, E2, E3, E6, E7",
                     4: "every exercise"}  # docs/walkthrough.md's steps: the exercises they run

def handout(exercises):
    """ASSIGNMENT.md for a copy with `exercises` blanked (in the order of EXERCISES)."""
    order = [e for e in EXERCISES if e in exercises]
    lines = ["# Assignment: RE-Control from the inside", "",
             "Read docs/method.md (the equations E1-E8) first. Each exercise below is a block of",
             "the project that raises NotImplementedError; its docstring, the comments and the",
             "shapes around it say what it must do. Its tests grade it (through tests/adapters.py,",
             "against snapshots and properties):", "",
             "    python -m pytest -q -m e6 tests/      # one exercise", "",
             "| exercise | where | the tests check | about | points |", "|---|---|---|---|---|"]
    lines += [f"| {e}: {EXERCISES[e].title} | {EXERCISES[e].where} | {EXERCISES[e].checks} | "
              f"{EXERCISES[e].minutes} min | {EXERCISES[e].points} |" for e in order]
    lines += ["", "Grading puts back the tests/ folder and pytest.ini as handed out",
              "(tests/adapters.py included: keep the names and arguments the docstrings give) and",
              "adds hidden tests: the same properties on other inputs. Code that passes the tests",
              "here only because it was fitted to their inputs loses the points of the hidden",
              "ones."]
    todo = f"Do them in this order: {', '.join(order)}." if order else \
        "Nothing is blanked in this copy: it is the reference."
    lines += ["", f"{todo} E4 (the objective) and E5 (V as an MLP) are", "definitions, not code "
              "to write: E4 is read in control.py, E5 is value.ValueFunction.", "",
              "docs/walkthrough.md runs the method step by step; each step needs the exercises "
              "it runs:"]
    lines += [f"- step {step}: {needs}" for step, needs in WALKTHROUGH_NEEDS.items()]
    lines += ["", "## Questions (the project's own tools answer them once the exercises they need "
              "pass)", ""]
    lines += [f"{i}. {q} (needs: {needs}; {time})"
              for i, (q, needs, time) in enumerate(QUESTIONS, 1)]
    return "\n".join(lines) + "\n"


def make(dest, exercises, overwrite=False, log=print):
    """Write a student copy of the project into `dest` with `exercises` blanked, and its
    ASSIGNMENT.md."""
    unknown = [e for e in exercises if e not in EXERCISES]
    if unknown:
        raise ValueError(f"unknown exercise {unknown[0]}; choose from {', '.join(EXERCISES)}")
    if os.path.exists(dest) and os.listdir(dest) and not overwrite:
        raise ValueError(f"{dest} exists and is not empty; choose another folder, or pass "
                         "--overwrite")
    copy_project(dest, exercises, student_files())
    with open(os.path.join(dest, "ASSIGNMENT.md"), "w") as f:
        f.write(handout([e for e in EXERCISES if e in exercises]))
    blanked = ", ".join(exercises) or "(none)"
    log(f"wrote a student copy to {dest} with exercises {blanked} blanked, and "
        f"{dest}/ASSIGNMENT.md")


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("command", choices=["make", "grade"],
                        help="make: write a student copy; grade: grade a folder of submissions")
    parser.add_argument("folder", help="make: the folder of the student copy; grade: the folder "
                        "that holds one folder (or .zip) per student")
    parser.add_argument("--exercises", nargs="*", default=list(EXERCISES),
                        help="the exercises to blank (make) or to grade (grade); make with none "
                        "named writes the reference itself, a complete submission to try grade on")
    parser.add_argument("--overwrite", action="store_true",
                        help="make: write into a folder that is not empty")
    parser.add_argument("--time-limit", type=int, default=TIME_LIMIT,
                        help="grade: seconds one exercise's tests may run in one submission")
    parser.add_argument("--workers", type=int, default=1,
                        help="grade: submissions graded at once (at most one per CPU core)")
    parser.add_argument("--out", default=None,
                        help="grade: the folder for grades.md and grades.csv (default: the "
                        "submissions folder)")
    args = parser.parse_args(argv)
    if args.command == "make":
        make(args.folder, args.exercises, args.overwrite)
    else:
        grade(args.folder, args.exercises, args.out, args.time_limit, args.workers)


if __name__ == "__main__":
    run_cli(main)
