"""
Files that survive a crash and never replace another job's work: atomic writes (whose temporary
files a rerun finds and removes), one job per output at a time (a lock), the provenance record
(`made_by`: the settings that made a file) checked before a run writes over what is there, and the
CRC-32 of every record of a file torch saved, checked when it is read.
"""

import atexit
import errno
import json
import os
import re
import zipfile

# write_atomically's temporary files: <path>.tmp<pid of the writer>
LEFTOVER = re.compile(r"\.tmp(\d+)$")


def write_atomically(path, write):
    """write(tmp) then rename over `path`: a crash leaves the old file or the new one, never half of
    one. A failed write (disk full, no permission) is an OSError that names the file; the old file
    stays."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno,
                      f"could not write {path}: {e.strerror or e} (errno {e.errno}); the file "
                      "that was there is unchanged") from None
    except RuntimeError as e:  # torch's zip writer reports a full disk or a closed file this way
        raise OSError(errno.EIO,
                      f"could not write {path}: {str(e).splitlines()[0]}; the file that was "
                      "there is unchanged (is the disk full?)") from None
    finally:  # a failed write (disk full, Ctrl-C, SIGTERM) leaves no temporary file behind
        if os.path.exists(tmp):
            os.remove(tmp)


def alive(pid):
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(folder, log=print):
    """Remove the temporary files that killed writers left in `folder` (their process is gone); say
    which."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        match = LEFTOVER.search(name)
        if match and not alive(int(match.group(1))):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    if removed:
        log(f"removed {len(removed)} temporary files left by a process that was killed: "
            f"{', '.join(removed)}")
    return removed


def check_writable(path, what="--out"):
    """Before any work: the folder of `path` exists (or can be made) and can be written to."""
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: the folder {existing} cannot be written to; choose "
                         "another path")


class Lock:
    """One job at a time on an output (a rollout folder, a checkpoint, a generations file): a lock
    file that holds the owner's process id, made with O_EXCL, removed when the job ends however it
    ends. A lock whose process is gone (a killed job) is taken over, and said so; a live one is an
    error that names its owner."""

    def __init__(self, path, log=print):
        self.path, self.log, self.held = path + ".lock", log, False

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                owner = self.owner()
                if owner == os.getpid():
                    raise ValueError(f"{self.path[:-5]} is already in use by this process") \
                        from None
                if owner is not None and alive(owner):
                    raise ValueError(f"{self.path[:-5]} is in use by another job (process "
                                     f"{owner}); wait for it to end, or choose another path") \
                        from None
                self.log(f"{self.path}: the job that held it (process {owner}) is gone; taking it "
                         "over")
                os.remove(self.path)
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        self.held = True
        atexit.register(self.release)
        return self

    def owner(self):
        try:
            with open(self.path) as f:
                return int(f.read().strip() or -1)
        except (OSError, ValueError):
            return None

    def release(self):
        if self.held and self.owner() == os.getpid():
            os.remove(self.path)
        self.held = False

    def __exit__(self, *exc):
        self.release()


def check_zip(path, what):
    """A file torch saved is a zip whose every record carries a CRC-32: a truncated file or a
    flipped bit is a ValueError that names the file, before torch reads it."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{what} {path} is truncated or damaged ({type(e).__name__}: {e})") \
            from None
    if bad is not None:
        raise ValueError(f"{what} {path} is damaged: its record {bad} fails its CRC-32 check (a "
                         "flipped bit)")


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
    """x as JSON would give it back (tuples become lists), so that recorded and current settings
    compare equal."""
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
    """Before a run writes `path`: a file that is there already is replaced only when it was made by
    the same job (read_made_by(path) records the same settings as made_by) or with --overwrite; else
    a ValueError says why. made_by None: only check that the file was made by this tool (before the
    job's settings are known)."""
    if overwrite or not os.path.exists(path):
        return
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; name a file")
    try:
        recorded = read_made_by(path)
    except Exception:
        recorded = None
    if recorded is None:
        raise ValueError(f"{path} exists and does not record what made it (not written by this "
                         "tool, or by an older version); choose another path, or pass --overwrite "
                         "to replace it")
    changed = differences(recorded, made_by) if made_by is not None else []
    if changed:
        raise ValueError(f"{path} was made with other settings ({'; '.join(changed[:4])}"
                         f"{'; ...' if len(changed) > 4 else ''}); choose another path, or pass "
                         "--overwrite to replace it")


def check_not_an_input(out, inputs, flag="--out"):
    """An output path must not be one of the run's inputs ({what: path or [paths]}): it would be
    overwritten."""
    for what, paths in inputs.items():
        for path in [paths] if isinstance(paths, str) else paths or []:
            if os.path.exists(path) and os.path.realpath(path) == os.path.realpath(out):
                raise ValueError(f"{flag} {out} is also the {what}; write the output to another "
                                 "file")


def write_jsonl(path, records, made_by):
    """Records as JSON lines, after a first line {"made_by": ...} that records the settings that
    made them."""
    lines = [json.dumps({"made_by": made_by})] + [json.dumps(record) for record in records]
    write_text_atomically(path, "\n".join(lines) + "\n")
    print(f"wrote {len(records)} responses to {path}")


def read_jsonl_made_by(path):
    with open(path) as f:
        return json.loads(f.readline())["made_by"]
