"""Plumbing the stage scripts share: flag types, output checks, one writer per output, atomic writes.

Every stage refuses bad input at the door with one `error:` line and never keeps a bad result:
- numeric flags are checked by argparse (`positive_int`, `non_negative_float`, `probability`, ...);
- the output is checked before any work (`check_output_dir` / `check_output_file`: not a file where a
  folder is meant, writable, enough free disk space);
- `output_lock` holds one lock per output for the whole run, so a second process writing the same
  `--out` stops at once; the lock file records the holder's pid, and a lock left by a dead process is
  taken over (the kernel drops a dead process's `flock`, and its pid shows it is gone);
- `remove_stale_tmp` deletes the temporary files a killed run left (only under the lock);
- `write_atomic` writes a temporary file beside the target and renames it (a kill never leaves half a
  file, and a failed write removes its temporary file);
- `load_checkpoint` turns any failure to load a checkpoint into one line naming the file;
- `check_finite` names the first tensor holding NaN or infinity;
- `read_csv` reads a CSV by column name, with `utf-8-sig` so a spreadsheet's byte-order mark does not
  rename the first column.
"""
import argparse
import csv
import errno
import glob
import math
import os
import shutil
import sys
import warnings
from contextlib import contextmanager

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: the pid check alone
    fcntl = None

MIN_FREE_BYTES = 16 << 20  # refuse an output disk with less than this free, whatever the estimate

# ----------------------------------------------------------------------------- argparse types


def _number(kind, text):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}")
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _bounded(kind, test, what):
    def parse(text):
        value = _number(kind, text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = f"{what} {kind.__name__}"  # argparse names the type in its messages
    return parse


positive_int = _bounded(int, lambda v: v > 0, "a positive integer")
non_negative_int = _bounded(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _bounded(float, lambda v: v > 0, "a positive number")
non_negative_float = _bounded(float, lambda v: v >= 0, "a number >= 0")
probability = _bounded(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
finite_float = _bounded(float, lambda v: True, "a finite number")

# ----------------------------------------------------------------------------- errors


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one `error: ...` line on stderr (exit status 2), no usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


class InputError(ValueError):
    """Bad input or output: the CLI prints the message as one `error:` line."""


def error_line(e):
    """An exception -> one line: its first non-empty line, or its type's name."""
    lines = [s for s in str(e).strip().splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__


def fail(message):
    """Exit with one `error:` line (stderr, exit status 1)."""
    sys.exit(f"error: {error_line(message)}")

# ----------------------------------------------------------------------------- checks


def load_checkpoint(loader, path, what):
    """loader(path), or one InputError naming the file and what it should have been.

    A foreign, truncated or code-running file makes torch and pickle raise many kinds of exception
    (and warn on the way); the one line says it all."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return loader(path)
    except MemoryError:
        raise
    except Exception as e:
        raise InputError(f"{path} is not a {what} ({type(e).__name__})") from None


def check_finite(name, tensors):
    """InputError naming `name` and the first entry with NaN or infinity.

    `tensors`: a tensor / numpy array, a list of them, or a dict (a state_dict: the key is named)."""
    items = tensors.items() if isinstance(tensors, dict) else enumerate(
        tensors if isinstance(tensors, (list, tuple)) else [tensors])
    for key, value in items:
        if value is None or isinstance(value, (str, bytes)):
            continue
        if hasattr(value, "is_floating_point"):  # torch: counted where it lives (no copy to the CPU)
            floating = value.is_floating_point() or value.is_complex()
            bad = int((~value.isfinite()).sum()) if floating else 0
        else:
            array = np.asarray(value)
            bad = int((~np.isfinite(array)).sum()) if array.dtype.kind in "fc" else 0
        if bad:
            where = key if isinstance(key, str) else "it"
            raise InputError(f"{name}: {bad} non-finite value(s) in {where}")


def _nearest_existing(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_space(folder, need_bytes):
    free = shutil.disk_usage(folder).free
    need = max(int(need_bytes), MIN_FREE_BYTES)
    if free < need:
        raise InputError(f"not enough free disk space for {folder}: {free / 2 ** 20:.1f} MiB free, "
                         f"about {need / 2 ** 20:.1f} MiB needed")


def _check_writable(folder, what):
    if not os.path.isdir(folder):
        raise InputError(f"{what}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{what}: {folder} is not writable")


def check_output_dir(path, need_bytes=0, flag="--out"):
    """Before any work: `path` is (or can become) a writable folder with room for `need_bytes`."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path} is a file, not a folder")
    base = _nearest_existing(path)
    _check_writable(base, f"{flag} {path}")
    _check_space(base, need_bytes)


def check_output_file(path, need_bytes=0, flag="--out"):
    """Before any work: `path` can be written as a file (not a folder, its folder writable, room left)."""
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a folder, not a file")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path} is not writable")
    base = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    _check_writable(base, f"{flag} {path}")
    _check_space(base, need_bytes)

# ----------------------------------------------------------------------------- one writer per output


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _try_lock(path):
    """-> an open fd holding the lock at `path`, or None if a live process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    return None
                raise
        else:
            holder = _read_pid(path)
            if holder and holder != os.getpid() and _pid_alive(holder):
                os.close(fd)
                return None
        # the holder may have released and unlinked the file between our open and our flock
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            os.close(fd)
            return _try_lock(path)
    except FileNotFoundError:
        os.close(fd)
        return _try_lock(path)
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def lock_path(out, is_dir=True):
    """The lock of an output folder is a hidden file inside it; of an output file, one beside it."""
    if is_dir:
        return os.path.join(out, ".lock")
    folder, name = os.path.split(os.path.abspath(out))
    return os.path.join(folder, f".{name}.lock")


@contextmanager
def output_lock(out, is_dir=True, flag="--out"):
    """Hold the one-writer lock of `out` for the body; InputError at once if a live process holds it.

    A lock file left by a killed process is taken over (its flock died with it)."""
    path = lock_path(out, is_dir)
    created = _make_folders(os.path.dirname(path))
    fd = _try_lock(path)
    if fd is None:
        raise InputError(f"{flag} {out} is in use by another process (pid {_read_pid(path) or '?'}); "
                         "wait for it to finish or use another output")
    try:
        yield path
    finally:
        try:
            os.remove(path)  # before releasing: a process that opened it then sees a stale inode
        except OSError:
            pass
        os.close(fd)
        for folder in reversed(created):  # a run that wrote nothing leaves no empty folder
            try:
                os.rmdir(folder)
            except OSError:
                break


def _make_folders(folder):
    """os.makedirs that returns the folders it created, outermost first."""
    created, folder = [], os.path.abspath(folder)
    while not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(created[0] if created else folder, exist_ok=True)
    return created[::-1]

# ----------------------------------------------------------------------------- temporary files


def tmp_name(path):
    return f"{path}.{os.getpid()}.tmp"


def remove_stale_tmp(folder, pattern="*.tmp"):
    """Delete the temporary files a killed run left in `folder` (call it while holding the lock)."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), pattern)) + \
            glob.glob(os.path.join(glob.escape(folder), "." + pattern)):
        if os.path.isfile(path):
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed


@contextmanager
def output_file_guard(path):
    """A stage writing one file: the path checked, its lock held for the run, and the temporary
    files a killed run left beside it removed, before any work."""
    check_output_file(path)
    with output_lock(path, is_dir=False):
        folder, name = os.path.split(os.path.abspath(path))
        remove_stale_tmp(folder, f"{name}.*.tmp")
        yield


def write_atomic(path, data):
    """Write `path` via a temporary file beside it and a rename; the temporary file never survives a
    failure. `data`: bytes, str (UTF-8), or a callable writing the file whose path it is given."""
    tmp = tmp_name(path)
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise

# ----------------------------------------------------------------------------- CSV


def read_csv(path, required, what="CSV file"):
    """-> (header, [(line number, row dict), ...]) of a CSV with at least the `required` columns.

    Names and fields are stripped; blank lines are skipped; a row with another number of fields than
    the header is refused. `utf-8-sig` drops the byte-order mark spreadsheets write, which would
    otherwise rename the first column."""
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path}")
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise InputError(f"{path}: no column {missing[0]!r} (the header is {header[:6]})")
            for values in reader:
                if not any(v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    raise InputError(f"{path} line {reader.line_num}: {len(values)} fields, "
                                     f"the header has {len(header)}")
                row = dict(zip(header, (v.strip() for v in values)))
                empty = [c for c in required if row[c] == ""]
                if empty:
                    raise InputError(f"{path} line {reader.line_num}: empty {empty[0]}")
                rows.append((reader.line_num, row))
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path} is not a UTF-8 CSV file ({type(e).__name__})") from None
    return header, rows
