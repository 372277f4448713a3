"""
The exercises of course mode, and how a copy of the project is made from the reference.

The reference code marks each exercise between `# >>> exercise E6: <what to write>` and `# <<<
exercise E6`. A student copy has the lines between the markers replaced by `raise
NotImplementedError("E6: ...")` (the markers, the docstrings and the shape comments around them
stay) and leaves out what only the teacher has: the hidden tests and the planted mistakes (which
hold the reference lines).
"""

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Exercise:
    title: str
    where: str  # the file and function the block is in
    checks: str  # what its tests check, for the handout
    minutes: int  # about how long it takes
    points: int  # its weight in the grade


EXERCISES = {  # the one place the points are set; they sum to 100
    "E1": Exercise("The memory h_t: the KV cache", "model.py, KVCache.write",
                   "states read through the cache, a prefill then one token at a time, equal a "
                   "full forward pass", 20, 15),
    "E2": Exercise("The emission: the head reads the state", "model.py, GPT.head",
                   "the logits are W o with the tied embedding matrix; a reward model's scores; "
                   "a snapshot", 5, 5),
    "E3": Exercise("The controlled system: o_t + u_t reaches the head, never the cache",
                   "generate.py, controlled_logits and next_state",
                   "on stand-in models: the greedy tokens of W(o + u) for a fixed edit, the states "
                   "read through the memory (u never enters them), the KL against W o", 20, 20),
    "E6": Exercise("The Bellman targets and loss: TD(lambda) with a stop-gradient",
                   "value.py, lambda_returns and bellman_loss",
                   "lambda-returns by hand for lambda = 0, 0.5, 1 and gamma < 1; the stop-gradient "
                   "setting both ways; training on gambler's ruin recovers its true values; "
                   "snapshots", 40, 30),
    "E7": Exercise("The control: gradient ascent on V",
                   "control.py, Controller.control (two blocks)",
                   "n = 0 is the base model; one step is alpha times V's gradient by central "
                   "differences; the l2 penalty by hand; a snapshot", 25, 20),
    "E8": Exercise("Diversity", "evaluation/metrics.py, diversity",
                   "hand-computed n-gram diversities, responses of different lengths", 10, 10),
}
# the teacher's files: graded against, never handed out
TEACHER_ONLY = ("tests/exercises/test_hidden.py", "course/mutations.py",
                "tests/test_course_mode.py")
BEGIN = re.compile(r"^(\s*)# >>> exercise (E\d+): (.*)$")


def blank(text, exercises):
    """The source `text` with the blocks of the given exercises replaced by raise
    NotImplementedError."""
    out, inside = [], None
    for line in text.split("\n"):
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


def student_files():
    """The files a student copy holds: the project's, less the teacher's."""
    return [f for f in project_files() if f not in TEACHER_ONLY]


def copy_project(dest, blanked=(), files=None):
    """Copy `files` (default: the whole project, the teacher's files included) into `dest`, with
    the blocks of the `blanked` exercises raising NotImplementedError."""
    for name in project_files() if files is None else files:
        target = os.path.join(dest, name)
        os.makedirs(os.path.dirname(target) or dest, exist_ok=True)
        if name.endswith(".py") and blanked:
            with open(os.path.join(ROOT, name)) as f:
                text = f.read()
            with open(target, "w") as f:
                f.write(blank(text, blanked))
        else:
            shutil.copyfile(os.path.join(ROOT, name), target)
