"""
Grading a class: each submission's exercises run against the teacher's own tests.

    python -m course.assignment grade submissions/     # one folder (or .zip) per student

A submission (a folder, or a .zip of one) is copied into a temporary folder; its tests/ and
pytest.ini are replaced by the teacher's (the public exercise tests, tests/adapters.py, the
snapshots, and the hidden tests a student never saw), and a file a student changed there is named in
the report. The exercises' tests run in a process with a time limit; when it runs past it or dies,
each exercise runs again in a process of its own, so a submission that hangs or crashes loses only
that exercise, gets a row that says so, and the next one is graded. The points of an exercise
(course/exercises.py) are shared equally among its tests. The table is written to grades.md and
grades.csv.
"""

import csv
import filecmp
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from course.exercises import EXERCISES, ROOT, project_files, student_files
from plumbing.files import write_text_atomically

TIME_LIMIT = 120  # seconds for one exercise's tests; the reference needs under 10
FIXED = ("tests/", "pytest.ini")  # what the grader puts back before it runs anything
NOT_COPIED = shutil.ignore_patterns(".git", "out", "__pycache__", ".pytest_cache")


@dataclass
class Outcome:
    """One exercise's tests in one folder."""
    results: dict = field(default_factory=dict)  # test name: None if it passed, else its message
    problem: str | None = None  # why no result came back (time limit, import error, ...)

    def passed(self):
        return sum(message is None for message in self.results.values())

    def failures(self):
        return {test: message for test, message in self.results.items() if message is not None}


def first_line(text, limit=240):
    line = next((s.strip() for s in (text or "").splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def read_report(path):
    """{test name: None if it passed, else the first line of its failure} of a JUnit XML report. A
    skipped test did not pass."""
    results = {}
    for case in ET.parse(path).iter("testcase"):
        problem = next((case.find(kind) for kind in ("failure", "error", "skipped")
                        if case.find(kind) is not None), None)
        if problem is None:
            results[case.get("name")] = None
        else:
            said = first_line(problem.get("message") or problem.text)
            results[case.get("name")] = f"skipped: {said}" if problem.tag == "skipped" else said
    return results


def exercise_of(test):
    """test_e6_the_loss_by_hand[...] -> E6: every exercise test is named after its exercise."""
    return test.split("_")[1].upper()


def run_exercises(folder, exercises, time_limit=TIME_LIMIT):
    """{exercise: Outcome}. Every exercise's tests run in one process first (one start-up, not one
    each); when that one runs past the limit or dies, each exercise runs again in a process of its
    own, so that a hang or a crash costs only its own exercise."""
    together = run_tests(folder, exercises, time_limit)
    if together.problem and not together.problem.startswith("the tests could not import"):
        return {e: run_tests(folder, [e], time_limit) for e in exercises}
    outcomes = {}
    for e in exercises:
        mine = {test: message for test, message in together.results.items()
                if exercise_of(test) == e}
        outcomes[e] = Outcome(mine, together.problem or
                              (None if mine else "no test of this exercise was found"))
    return outcomes


def run_tests(folder, exercises, time_limit=TIME_LIMIT):
    """The Outcome of the tests marked with any of `exercises` (public and hidden) in `folder`, run
    in a process group of their own that is killed after time_limit seconds."""
    with tempfile.TemporaryDirectory(prefix="report-") as reports:  # outside the submission
        report = os.path.join(reports, "report.xml")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                   " or ".join(e.lower() for e in exercises), "tests/exercises",
                   f"--junitxml={report}"]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        process = subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=env,
                                   start_new_session=True)
        try:
            output = process.communicate(timeout=time_limit)[0]
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the tests and anything they started
            process.communicate()
            return Outcome(problem=f"time limit of {time_limit} s exceeded (a loop that never "
                           "ends?)")
        if not os.path.exists(report):
            return Outcome(problem=f"the tests did not run: {first_line(output[-2000:])}")
        results = read_report(report)
    broken = [message for test, message in results.items() if not test.startswith("test_")]
    if broken:  # a test file could not be imported: the submission's code fails on import
        return Outcome(problem=f"the tests could not import the code: {broken[0]}")
    if not results:
        return Outcome(problem="no test of this exercise was found")
    return Outcome(results)


def changed_files(submission):
    """The files of tests/ and pytest.ini that a submission changed, added or removed, and the
    conftest.py files it put elsewhere (pytest would load them)."""
    handed_out = [f for f in student_files() if f.startswith(FIXED)]
    changed = []
    for name in handed_out:
        mine = os.path.join(submission, name)
        if not os.path.isfile(mine) or not filecmp.cmp(mine, os.path.join(ROOT, name),
                                                       shallow=False):
            changed.append(name)
    for folder, subfolders, names in os.walk(submission):
        subfolders[:] = [s for s in subfolders if s not in (".git", "__pycache__", ".pytest_cache",
                                                            "out")]
        for n in names:
            name = os.path.relpath(os.path.join(folder, n), submission).replace(os.sep, "/")
            added = name.startswith("tests/") and name not in handed_out
            if added or (n == "conftest.py" and not name.startswith("tests/")):
                changed.append(name)
    return sorted(changed)


def restore_tests(work):
    """Put the teacher's tests/ and pytest.ini into `work`, and remove conftest.py files outside
    tests/."""
    tests = os.path.join(work, "tests")
    if os.path.isdir(tests):
        shutil.rmtree(tests)
    elif os.path.lexists(tests):
        os.remove(tests)
    for name in project_files():
        if name.startswith(FIXED):
            os.makedirs(os.path.dirname(os.path.join(work, name)) or work, exist_ok=True)
            shutil.copyfile(os.path.join(ROOT, name), os.path.join(work, name))
    for folder, _, names in os.walk(work):
        if "conftest.py" in names and os.path.relpath(folder, work).split(os.sep)[0] != "tests":
            os.remove(os.path.join(folder, "conftest.py"))


def unpacked(submission, into):
    """The folder of a submission: `submission` itself, or, for a .zip, where it is unpacked in
    `into` (its one top folder, when it has one)."""
    if not submission.endswith(".zip"):
        return submission
    try:
        with zipfile.ZipFile(submission) as archive:
            archive.extractall(into)  # names with .. or a leading / are kept inside `into`
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"cannot unpack {os.path.basename(submission)}: {e}") from None
    entries = [e for e in os.listdir(into) if e != "__MACOSX"]
    top = os.path.join(into, entries[0]) if len(entries) == 1 else into
    return top if os.path.isdir(top) else into


def notes_of(outcomes):
    """One note per exercise that lost points: its problem, or its first failing test."""
    notes = []
    for e, outcome in outcomes.items():
        failures = list(outcome.failures().items())
        if outcome.problem:
            notes.append(f"{e}: {outcome.problem}")
        elif failures:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            notes.append(f"{e}: {failures[0][0]}{more}: {failures[0][1]}")
    return notes


def grade_submission(submission, exercises, time_limit=TIME_LIMIT):
    """({exercise: Outcome}, [notes]) of one submission (a folder or a .zip), graded in a
    temporary copy."""
    with tempfile.TemporaryDirectory(prefix="grade-") as scratch:
        try:
            source = unpacked(submission, os.path.join(scratch, "unpacked"))
        except ValueError as e:
            return {x: Outcome(problem=str(e)) for x in exercises}, [str(e)]
        changed = changed_files(source)
        work = os.path.join(scratch, "work")
        shutil.copytree(source, work, ignore=NOT_COPIED)
        restore_tests(work)
        outcomes = run_exercises(work, exercises, time_limit)
    notes = [f"changed the tests ({', '.join(changed)}): graded with the teacher's"] if changed \
        else []
    return outcomes, notes + notes_of(outcomes)


def score(outcome, points):
    """The points an exercise earns: its points shared equally among its tests."""
    return round(points * outcome.passed() / len(outcome.results), 1) if outcome.results else 0.0


def cell(outcome, points):
    """A table cell: the points, and why not all of them."""
    got = score(outcome, points)
    if outcome.problem:
        kind = "time limit" if outcome.problem.startswith("time limit") else "error"
        return f"{got:g} ({kind})"
    if outcome.passed() < len(outcome.results):
        return f"{got:g} ({outcome.passed()} of {len(outcome.results)} tests)"
    return f"{got:g}"


def tables(graded, exercises):
    """(Markdown, CSV) of {student: (outcomes, notes)}."""
    header = ["student"] + [f"{e} ({EXERCISES[e].points})" for e in exercises]
    header += [f"total ({sum(EXERCISES[e].points for e in exercises)})", "notes"]
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["student"] + list(exercises) + ["total", "notes"])
    for student, (outcomes, notes) in graded.items():
        points = [score(outcomes[e], EXERCISES[e].points) for e in exercises]
        cells = [cell(outcomes[e], EXERCISES[e].points) for e in exercises]
        noted = "; ".join(notes)
        markdown.append("| " + " | ".join([student] + cells + [f"{sum(points):g}",
                                                               noted.replace("|", "\\|")]) + " |")
        writer.writerow([student] + [f"{p:g}" for p in points] + [f"{sum(points):g}", noted])
    return "\n".join(markdown) + "\n", buffer.getvalue()


def submissions_in(folder):
    """{student: their folder or .zip} of a class folder, by name."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder; give the folder that holds one folder (or "
                         ".zip) per student")
    named = sorted(s for s in os.listdir(folder) if not s.startswith(".") and
                   (os.path.isdir(os.path.join(folder, s)) or s.endswith(".zip")))
    paths = {s.removesuffix(".zip"): os.path.join(folder, s) for s in named}
    if len(paths) != len(named):
        twice = next(s for s in named if s.endswith(".zip") and s[:-4] in named)
        raise ValueError(f"{folder} holds both a folder and a .zip for {twice[:-4]}; keep one")
    if not paths:
        raise ValueError(f"{folder} holds no submission; put each student's copy in a folder (or "
                         "a .zip) of its own inside it")
    return paths


def grade(submissions, exercises=tuple(EXERCISES), out=None, time_limit=TIME_LIMIT,
          workers=1, log=print):
    """Grade every folder or .zip in `submissions` (one per student), `workers` at a time; write
    grades.md and grades.csv to `out` (default: `submissions`). Returns the Markdown table."""
    paths = submissions_in(submissions)
    unknown = [e for e in exercises if e not in EXERCISES]
    if unknown:
        raise ValueError(f"unknown exercise {unknown[0]}; choose from {', '.join(EXERCISES)}")
    if time_limit <= 0 or workers < 1:
        raise ValueError(f"--time-limit must be > 0 and --workers >= 1, got {time_limit} and "
                         f"{workers}")

    def one(student):
        log(f"grading {student} ...")
        return grade_submission(paths[student], exercises, time_limit)

    # each submission's tests run in processes of their own
    with ThreadPoolExecutor(workers) as pool:
        graded = dict(zip(paths, pool.map(one, paths)))
    markdown, table = tables(graded, exercises)
    out = out or submissions
    os.makedirs(out, exist_ok=True)
    write_text_atomically(os.path.join(out, "grades.md"), markdown)
    write_text_atomically(os.path.join(out, "grades.csv"), table)
    log(markdown + f"\nwrote {os.path.join(out, 'grades.md')} and grades.csv")
    return markdown
