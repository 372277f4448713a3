"""
Files that survive a crash and never replace another job's work: atomic writes, and the provenance record
(`made_by`: the settings that made a file) checked before a run writes over what is there.
"""

import json
import os


def write_atomically(path, write):
    """write(tmp) then rename over `path`: a crash leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:  # a failed write (disk full, Ctrl-C) leaves no temporary file behind
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomically(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomically(path, write)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def as_json(x):
    """x as JSON would give it back (tuples become lists), so that recorded and current settings compare equal."""
    return json.loads(json.dumps(x))


def differences(recorded, current, prefix=""):
    """What differs between two (nested) settings dicts, as 'key: recorded -> current' phrases."""
    recorded, current = as_json(recorded), as_json(current)
    found = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, "(not recorded)"), current.get(key, "(not recorded)")
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key}: {str(old)[:60]} -> {str(new)[:60]}")
    return found


def check_overwrite(path, made_by, read_made_by, overwrite):
    """Before a run writes `path`: a file that is there already is replaced only when it was made by the same
    job (read_made_by(path) records the same settings as made_by) or with --overwrite; else a ValueError says
    why. made_by None: only check that the file was made by this tool (before the job's settings are known)."""
    if overwrite or not os.path.exists(path):
        return
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; name a file")
    try:
        recorded = read_made_by(path)
    except Exception:
        recorded = None
    if recorded is None:
        raise ValueError(f"{path} exists and does not record what made it (not written by this tool, or by an "
                         "older version); choose another path, or pass --overwrite to replace it")
    changed = differences(recorded, made_by) if made_by is not None else []
    if changed:
        raise ValueError(f"{path} was made with other settings ({'; '.join(changed[:4])}"
                         f"{'; ...' if len(changed) > 4 else ''}); choose another path, or pass --overwrite to "
                         "replace it")


def check_not_an_input(out, inputs, flag="--out"):
    """An output path must not be one of the run's inputs ({what: path or [paths]}): it would be overwritten."""
    for what, paths in inputs.items():
        for path in [paths] if isinstance(paths, str) else paths or []:
            if os.path.exists(path) and os.path.realpath(path) == os.path.realpath(out):
                raise ValueError(f"{flag} {out} is also the {what}; write the output to another file")


def write_jsonl(path, records, made_by):
    """Records as JSON lines, after a first line {"made_by": ...} that records the settings that made them."""
    lines = [json.dumps({"made_by": made_by})] + [json.dumps(record) for record in records]
    write_text_atomically(path, "\n".join(lines) + "\n")
    print(f"wrote {len(records)} responses to {path}")


def read_jsonl_made_by(path):
    with open(path) as f:
        return json.loads(f.readline())["made_by"]
