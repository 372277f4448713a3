"""Course mode itself: a student copy's exercise tests fail exactly where exercises are blanked, each with its own
NotImplementedError, pass everywhere else, and all pass once the reference blocks are put back."""

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from course import assignment, exercises


def run_exercise_tests(folder):
    """{test name: None if it passed, else its failure message} of the copy's exercise tests."""
    report = folder / "report.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/exercises",
                    f"--junitxml={report}"], cwd=folder, capture_output=True, timeout=300)
    results = {}
    for case in ET.parse(report).iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        results[case.get("name")] = None if problem is None else problem.get("message")
    return results


def exercise_of(test_name):  # test_e6_... -> E6
    return test_name.split("_")[1].upper()


@pytest.mark.slow
def test_exactly_the_blanked_exercises_fail_and_the_solution_passes(tmp_path):
    everything = tmp_path / "all"
    assignment.make(str(everything), list(assignment.EXERCISES), log=lambda *a: None)
    results = run_exercise_tests(everything)
    assert {exercise_of(t) for t in results} == set(assignment.EXERCISES)
    for test, message in results.items():  # later exercises stop at an earlier one's block: E3 samples through E1's
        assert message and message.startswith("NotImplementedError: E"), (test, message)
    handout = (everything / "ASSIGNMENT.md").read_text()
    assert all(f"| {e}: " in handout for e in assignment.EXERCISES) and "## Questions" in handout

    for exercise in assignment.EXERCISES:  # one exercise blanked: its tests fail on it, every other test passes
        alone = tmp_path / exercise
        assignment.make(str(alone), [exercise], log=lambda *a: None)
        for test, message in run_exercise_tests(alone).items():
            if exercise_of(test) == exercise:
                assert message and message.startswith(f"NotImplementedError: {exercise}: "), (test, message)
            else:
                assert message is None, (exercise, test, message)

    for name in ("model.py", "generate.py", "value.py", "control.py", "evaluation/metrics.py"):  # the reference back
        shutil.copyfile(os.path.join(exercises.ROOT, name), everything / name)
    assert all(message is None for message in run_exercise_tests(everything).values())


def test_blanking_keeps_the_markers_and_refuses_an_unclosed_block():
    text = "def f(x):\n    # >>> exercise E9: double x\n    return 2 * x\n    # <<< exercise E9\n"
    assert exercises.blank(text, ["E9"]) == ("def f(x):\n    # >>> exercise E9: double x\n"
                                              '    raise NotImplementedError("E9: double x (ASSIGNMENT.md)")\n'
                                              "    # <<< exercise E9\n")
    assert exercises.blank(text, ["E6"]) == text
    with pytest.raises(ValueError, match="exercise E9 has no end marker"):
        exercises.blank(text.replace("    # <<< exercise E9\n", ""), ["E9"])
