"""Course mode: student copies with the exercises blanked (assignment.py), run as `python -m
course.assignment`."""
