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
import re
import shutil
import subprocess

from plumbing.cli import new_parser, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXERCISES = {  # id: (title, where, what the tests check, minutes of work)
    "E1": ("The memory h_t: the KV cache", "model.py, KVCache.write",
           "states read through the cache, a prefill then one token at a time, equal a full "
           "forward pass", 20),
    "E2": ("The emission: the head reads the state", "model.py, GPT.head",
           "the logits are W o with the tied embedding matrix; a snapshot", 5),
    "E3": ("The controlled system: o_t + u_t reaches the head, never the cache",
           "generate.py, controlled_logits and next_state",
           "on a stand-in model: the greedy tokens of W(o + u) for a fixed edit, and the recorded "
           "states are the model's own (u never enters them)", 20),
    "E6": ("The Bellman targets and loss: TD(lambda) with a stop-gradient",
           "value.py, lambda_returns and bellman_loss",
           "lambda-returns by hand for lambda = 0, 0.5, 1; the targets carry no gradient; "
           "training on gambler's ruin recovers its true values; snapshots", 40),
    "E7": ("The control: gradient ascent on V", "control.py, Controller.control (two blocks)",
           "n = 0 is the base model; one step is alpha times V's gradient by central differences; "
           "a snapshot", 25),
    "E8": ("Diversity", "evaluation/metrics.py, diversity", "hand-computed n-gram diversities", 10),
}

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

BEGIN = re.compile(r"^(\s*)# >>> exercise (E\d+): (.*)$")


def blank(text, exercises):
    """The source `text` with the blocks of the given exercises replaced by raise
    NotImplementedError."""
    lines, out, inside = text.split("\n"), [], None
    for line in lines:
        begin = BEGIN.match(line)
        if inside is not None:
            if line.strip() == f"# <<< exercise {inside}":
                out.append(line)
                inside = None
            continue
        out.append(line)
        if begin and begin.group(2) in exercises:
            indent, inside, what = begin.groups()
            out.append(f'{indent}raise NotImplementedError("{inside}: {what} (ASSIGNMENT.md)")')
    if inside is not None:
        raise ValueError(f"exercise {inside} has no end marker '# <<< exercise {inside}'")
    return "\n".join(out)


def project_files():
    """The project's files, as git tracks them (or every file outside out/ and .git when this is no
    checkout)."""
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout
        return [f for f in listed.splitlines() if os.path.exists(os.path.join(ROOT, f))]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, subfolders, names in os.walk(ROOT):
            subfolders[:] = [s for s in subfolders if s not in ("out", ".git", "__pycache__",
                                                                ".pytest_cache")]
            files += [os.path.relpath(os.path.join(folder, n), ROOT) for n in names]
        return files


def handout(exercises):
    """ASSIGNMENT.md for a copy with `exercises` blanked (in the order of EXERCISES)."""
    order = [e for e in EXERCISES if e in exercises]
    lines = ["# Assignment: RE-Control from the inside", "",
             "Read docs/method.md (the equations E1-E8) first. Each exercise below is a block of",
             "the project that raises NotImplementedError; its docstring, the comments and the",
             "shapes around it say what it must do. Its tests grade it (through tests/adapters.py,",
             "against snapshots and properties):", "",
             "    python -m pytest -q -m e6 tests/      # one exercise", "",
             "| exercise | where | the tests check | about |", "|---|---|---|---|"]
    lines += [f"| {e}: {EXERCISES[e][0]} | {EXERCISES[e][1]} | {EXERCISES[e][2]} | "
              f"{EXERCISES[e][3]} min |" for e in order]
    lines += ["", f"Do them in this order: {', '.join(order)}. E4 (the objective) and E5 (V as an "
              "MLP) are", "definitions, not code to write: E4 is read in control.py, E5 is "
              "value.ValueFunction.", "",
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
    for name in project_files():
        target = os.path.join(dest, name)
        os.makedirs(os.path.dirname(target) or dest, exist_ok=True)
        if name.endswith(".py"):
            with open(os.path.join(ROOT, name)) as f:
                text = f.read()
            with open(target, "w") as f:
                f.write(blank(text, exercises))
        else:
            shutil.copyfile(os.path.join(ROOT, name), target)
    with open(os.path.join(dest, "ASSIGNMENT.md"), "w") as f:
        f.write(handout([e for e in EXERCISES if e in exercises]))
    log(f"wrote a student copy to {dest} with exercises {', '.join(exercises)} blanked, and "
        f"{dest}/ASSIGNMENT.md")


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("command", choices=["make"], help="make: write a student copy")
    parser.add_argument("dest", help="the folder of the student copy")
    parser.add_argument("--exercises", nargs="+", default=list(EXERCISES),
                        help="the exercises to blank")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a folder that is not empty")
    args = parser.parse_args(argv)
    make(args.dest, args.exercises, args.overwrite)


if __name__ == "__main__":
    run_cli(main)
