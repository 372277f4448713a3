"""Course mode: student copies with the exercises blanked and their handout (assignment.py), the
exercises and their points (exercises.py), grading a class (grading.py) and the planted mistakes
that test the grader (mutations.py). Run as `python -m course.assignment make|grade`."""
