"""Course mode itself: a student copy's exercise tests fail exactly where exercises are blanked, each with its own
NotImplementedError, pass everywhere else, and all pass once the reference blocks are put back; the teacher's files
stay out of it; every planted mistake is caught and every correct alternative passes (the mutation suite); and
`grade` turns a folder of submissions, one complete, one wrong, one that hangs, crashes and edits the tests, into
the right table."""

import csv
import os
import shutil

import pytest

from course import assignment, exercises, grading, mutations


def run_exercise_tests(folder):
    """{test name: None if it passed, else its failure message} of the copy's exercise tests."""
    outcome = grading.run_tests(str(folder), list(exercises.EXERCISES), time_limit=300)
    assert outcome.problem is None, outcome.problem
    return outcome.results


@pytest.mark.slow
def test_exactly_the_blanked_exercises_fail_and_the_solution_passes(tmp_path):
    everything = tmp_path / "all"
    assignment.make(str(everything), list(assignment.EXERCISES), log=lambda *a: None)
    results = run_exercise_tests(everything)
    assert {grading.exercise_of(t) for t in results} == set(assignment.EXERCISES)
    for test, message in results.items():  # later exercises stop at an earlier one's block: E3 samples through E1's
        assert message and message.startswith("NotImplementedError: E"), (test, message)
    handout = (everything / "ASSIGNMENT.md").read_text()
    assert all(f"| {e}: " in handout for e in assignment.EXERCISES) and "## Questions" in handout

    for exercise in assignment.EXERCISES:  # one exercise blanked: its tests fail on it, every other test passes
        alone = tmp_path / exercise
        assignment.make(str(alone), [exercise], log=lambda *a: None)
        for test, message in run_exercise_tests(alone).items():
            if grading.exercise_of(test) == exercise:
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


def test_a_student_copy_holds_none_of_the_teachers_files(tmp_path):
    assignment.make(str(tmp_path / "s"), ["E6"], log=lambda *a: None)
    for name in exercises.TEACHER_ONLY:
        assert os.path.exists(os.path.join(exercises.ROOT, name)) and not (tmp_path / "s" / name).exists(), name
    assert "raise NotImplementedError(\"E6: " in (tmp_path / "s" / "value.py").read_text()


def test_every_plant_stands_in_its_exercise_block_once(tmp_path):
    for plant in mutations.MISTAKES + mutations.ALTERNATIVES:
        os.makedirs(os.path.dirname(tmp_path / plant.file), exist_ok=True)
        shutil.copyfile(os.path.join(exercises.ROOT, plant.file), tmp_path / plant.file)
        reference = mutations.plant(str(tmp_path), plant)
        assert (tmp_path / plant.file).read_text() != reference, plant.what
    moved = mutations.Plant("E7", "a line of E6's block", "value.py", mutations.SG, "    bootstrap = values")
    with pytest.raises(ValueError, match="not inside the exercise's block of value.py"):
        mutations.plant(str(tmp_path), moved)


def test_grading_names_changed_tests_and_puts_back_the_teachers(tmp_path):
    submission, work = tmp_path / "sub", tmp_path / "work"
    exercises.copy_project(str(submission), files=exercises.student_files())
    assert grading.changed_files(str(submission)) == []
    with open(submission / "tests" / "exercises" / "test_exercises.py", "a") as f:
        f.write("\n# all pass\n")
    (submission / "tests" / "conftest_extra.py").write_text("")
    (submission / "conftest.py").write_text("")
    assert grading.changed_files(str(submission)) == ["conftest.py", "tests/conftest_extra.py",
                                                      "tests/exercises/test_exercises.py"]
    shutil.copytree(submission, work)
    grading.restore_tests(str(work))
    assert not (work / "conftest.py").exists() and not (work / "tests" / "conftest_extra.py").exists()
    assert (work / "tests" / "exercises" / "test_hidden.py").exists()
    assert (work / "tests" / "exercises" / "test_exercises.py").read_text() == \
        open(os.path.join(exercises.ROOT, "tests", "exercises", "test_exercises.py")).read()


def test_a_test_that_hangs_is_stopped_at_the_time_limit_and_a_skipped_one_earns_nothing(tmp_path):
    (tmp_path / "tests" / "exercises").mkdir(parents=True)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    e7: skips\n    e8: hangs\n")
    (tmp_path / "tests" / "exercises" / "test_loop.py").write_text(
        "import pytest\n\n@pytest.mark.e8\ndef test_e8_forever():\n    while True:\n        pass\n\n\n"
        "@pytest.mark.e7\ndef test_e7_skipped():\n    pytest.skip('not today')\n\n\n"
        "@pytest.mark.e7\ndef test_e7_passes():\n    pass\n")
    outcomes = grading.run_exercises(str(tmp_path), ["E7", "E8"], time_limit=5)  # together past the limit: one by one
    assert outcomes["E8"].problem.startswith("time limit of 5 s exceeded") and grading.score(outcomes["E8"], 10) == 0
    assert outcomes["E7"].failures() == {"test_e7_skipped": "skipped: not today"}
    assert grading.score(outcomes["E7"], 10) == 5
    assert not list(tmp_path.glob("**/*.xml")), "the report is written outside the submission"


def test_the_table_gives_points_and_says_why_not_all():
    ok = grading.Outcome({"test_e8_a": None, "test_e8_b": None})
    half = grading.Outcome({"test_e8_a": None, "test_e8_b": "AssertionError: wrong"})
    hung = grading.Outcome(problem="time limit of 5 s exceeded")
    graded = {"ann": ({"E8": ok}, []), "ben": ({"E8": half}, ["E8: test_e8_b: AssertionError: wrong | x"]),
              "cy": ({"E8": hung}, ["E8: time limit of 5 s exceeded"])}
    markdown, table = grading.tables(graded, ["E8"])
    assert "| ann | 10 | 10 |  |" in markdown and "| ben | 5 (1 of 2 tests) | 5 |" in markdown
    assert "| cy | 0 (time limit) | 0 |" in markdown and "wrong \\| x" in markdown
    rows = list(csv.reader(table.splitlines()))
    assert rows[0] == ["student", "E8", "total", "notes"] and rows[2][:3] == ["ben", "5", "5"]


@pytest.mark.slow
def test_every_planted_mistake_is_caught_and_every_alternative_passes():
    table, problems = mutations.report(mutations.MISTAKES, mutations.ALTERNATIVES)
    assert not problems, "\n".join(problems)
    assert table.count("| caught |") == len(mutations.MISTAKES)


@pytest.mark.slow
def test_grade_a_class_of_three(tmp_path):
    for student in ("ada", "ben", "cy"):
        exercises.copy_project(str(tmp_path / "class" / student), files=exercises.student_files())
    gamma_once = next(p for p in mutations.MISTAKES if p.what == "gamma never applied")
    mutations.plant(str(tmp_path / "class" / "ben"), gamma_once)
    cy = tmp_path / "class" / "cy"
    for name, old, new in (("value.py", "    last = last_index(mask)", "    while True:\n        pass"),
                           ("evaluation/metrics.py", "    scores = []\n", "    scores = 1 / 0\n")):
        text = (cy / name).read_text()
        (cy / name).write_text(text.replace(old, new, 1))
    with open(cy / "tests" / "exercises" / "test_exercises.py", "a") as f:
        f.write("\n")
    grading.grade(str(tmp_path / "class"), out=str(tmp_path / "grades"), time_limit=30, workers=2,
                  log=lambda *a: None)
    rows = {r["student"]: r for r in csv.DictReader(open(tmp_path / "grades" / "grades.csv"))}
    assert rows["ada"]["total"] == "100" and rows["ada"]["notes"] == ""
    assert float(rows["ben"]["E6"]) < 30 and rows["ben"]["E7"] == "20"
    assert "test_e6_discount_by_hand" in rows["ben"]["notes"] and "gamma^(T-t) R" in rows["ben"]["notes"]
    assert rows["cy"]["E6"] == "0" and rows["cy"]["E8"] == "0" and rows["cy"]["E1"] == "15"
    assert "E6: time limit of 30 s exceeded" in rows["cy"]["notes"] and "ZeroDivisionError" in rows["cy"]["notes"]
    assert "changed the tests (tests/exercises/test_exercises.py)" in rows["cy"]["notes"]
    assert "| cy |" in (tmp_path / "grades" / "grades.md").read_text()


def test_the_docs_count_the_plants_there_are():
    guide = open(os.path.join(exercises.ROOT, "docs", "course.md")).read()
    readme = open(os.path.join(exercises.ROOT, "README.md")).read()
    assert f"lists {len(mutations.MISTAKES)} mistakes" in guide and f"{len(mutations.ALTERNATIVES)} other correct" in guide
    assert f"a suite of {len(mutations.MISTAKES)} planted mistakes" in readme


def test_a_class_is_folders_and_zips_and_a_broken_zip_gets_a_row(tmp_path):
    import zipfile
    (tmp_path / "ada").mkdir()
    with zipfile.ZipFile(tmp_path / "ben.zip", "w") as archive:
        archive.writestr("ben-main/value.py", "x = 1\n")
    (tmp_path / "cy.zip").write_bytes(b"not a zip")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / ".hidden").mkdir()
    assert list(grading.submissions_in(str(tmp_path))) == ["ada", "ben", "cy"]
    assert grading.unpacked(str(tmp_path / "ben.zip"), str(tmp_path / "u")) == str(tmp_path / "u" / "ben-main")
    outcomes, notes = grading.grade_submission(str(tmp_path / "cy.zip"), ["E6", "E8"])
    assert notes == ["cannot unpack cy.zip: File is not a zip file"]
    assert all(grading.score(o, 10) == 0 and o.problem == notes[0] for o in outcomes.values())
    (tmp_path / "ada.zip").write_bytes(b"")
    with pytest.raises(ValueError, match="both a folder and a .zip for ada; keep one"):
        grading.submissions_in(str(tmp_path))
    with pytest.raises(ValueError, match="holds no submission"):
        grading.submissions_in(str(tmp_path / ".hidden"))


def test_every_exercise_test_is_named_after_its_marker():
    import ast
    folder = os.path.join(exercises.ROOT, "tests", "exercises")
    for name in ("test_exercises.py", "test_hidden.py"):
        for node in ast.parse(open(os.path.join(folder, name)).read()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                marks = [d.attr for d in ast.walk(node) if isinstance(d, ast.Attribute) and d.attr[:1] == "e"
                         and d.attr[1:].isdigit()]
                assert marks == [grading.exercise_of(node.name).lower()], (name, node.name, marks)
