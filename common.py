"""Plumbing the stage scripts share: flag types, output checks, one writer per output, atomic
writes.

Every stage refuses bad input at the door with one `error:` line and never keeps a bad result:
- numeric flags are checked by argparse (`positive_int`, `non_negative_float`, `probability`, ...);
- the output is checked before any work (`check_output_dir` / `check_output_file`: not a file
  where a folder is meant, writable, enough free disk space);
- `output_lock` holds one lock per output for the whole run, so a second process writing the same
  `--out` stops at once; the lock file records the holder's pid, and a lock left by a dead process
  is taken over (the kernel drops a dead process's `flock`, and its pid shows it is gone);
- `remove_stale_tmp` deletes the temporary files a killed run left (only under the lock);
- `write_atomic` writes a temporary file beside the target and renames it (a kill never leaves half
  a file, and a failed write removes its temporary file);
- `load_checkpoint` turns any failure to load a checkpoint into one line naming the file;
- `check_finite` names the first tensor holding NaN or infinity;
- `read_csv` reads a CSV by column name, with `utf-8-sig` so a spreadsheet's byte-order mark does
  not rename the first column.
"""
import argparse
import csv
import errno
import glob
import io
import json
import math
import os
import pickle
import platform
import shutil
import struct
import sys
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: the pid check alone
    fcntl = None

PROGRESS = sys.stderr.isatty()  # progress bars on a terminal only: logs and error lines stay clean
MIN_FREE_BYTES = 16 << 20  # refuse an output disk with less than this free, whatever the estimate

# ----------------------------------------------------------------------------- argparse types


def _number(kind, text):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not {'an integer' if kind is int else 'a number'}: {text!r}")
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
jpeg_quality = _bounded(int, lambda v: 1 <= v <= 100, "an integer in [1, 100]")

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

    `tensors`: a tensor / numpy array, a list of them, or a dict (a state_dict: the key is
    named)."""
    items = tensors.items() if isinstance(tensors, dict) else enumerate(
        tensors if isinstance(tensors, (list, tuple)) else [tensors])
    for key, value in items:
        if value is None or isinstance(value, (str, bytes)):
            continue
        # torch: counted where it lives (no copy to the CPU)
        if hasattr(value, "is_floating_point"):
            floating = value.is_floating_point() or value.is_complex()
            bad = int((~value.isfinite()).sum()) if floating else 0
        else:
            array = np.asarray(value)
            bad = int((~np.isfinite(array)).sum()) if array.dtype.kind in "fc" else 0
        if bad:
            where = key if isinstance(key, str) else "it"
            raise InputError(f"{name}: {bad} non-finite value(s) in {where}")


def check_same_recipe(saved, args, keys, path):
    """Resuming: InputError unless each flag in `keys` equals the one `path` was trained with
    (`saved`: its flags; a flag it does not record is not compared). The run's length is the one
    allowed change."""
    for k in keys:
        if k in saved and saved[k] != getattr(args, k):
            raise InputError(f"{path} was trained with --{k.replace('_', '-')} {saved[k]}, not "
                             f"{getattr(args, k)}; resume with the same flags (a longer run is "
                             "allowed) or use another --out")


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
    """Before any work: `path` can be written as a file (not a folder, its folder writable, room
    left)."""
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a folder, not a file")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path} is not writable")
    base = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    _check_writable(base, f"{flag} {path}")
    _check_space(base, need_bytes)

# ---------------------------------------------------------------------------- one writer per output


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
    """Hold the one-writer lock of `out` for the body; InputError at once if a live process holds
    it.

    A lock file left by a killed process is taken over (its flock died with it)."""
    path = lock_path(out, is_dir)
    created = _make_folders(os.path.dirname(path))
    fd = _try_lock(path)
    if fd is None:
        raise InputError(f"{flag} {out} is in use by another process (pid "
                         f"{_read_pid(path) or '?'}); "
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
def run_folder_guard(path):
    """A training run folder, checked before any work; rank 0 (torchrun's RANK) holds its lock for
    the run and removes the temporary files a killed run left (the other ranks only check: they
    write nothing there)."""
    check_output_dir(path)
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    with output_lock(path):
        remove_stale_tmp(path)
        yield


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

# ----------------------------------------------------------------------------- image sources


class DataError(Exception):
    """Bad input data; the CLI prints the message as one line."""


def load_weights(path, **kwargs):
    """torch.load(path, weights_only=True): tensors and plain containers only, so an untrusted file
    that would run code is refused. torch's note on pickle protocols other than 2 (insightface's
    files, any pickle) is dropped: it would print before our own result or error line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, weights_only=True, **kwargs)


IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def decode_image(data, name):
    """Encoded bytes (or a path) -> uint8 tensor [3,H,W] RGB; DataError naming the file if
    corrupt."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... for broken files
        raise DataError(f"corrupt image {name}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class ImageFolderDataset(torch.utils.data.Dataset):
    """root/<identity>/<image>.{png,jpg,jpeg}; classes are the sorted folder names. Hidden folders
    (a sampler's unfinished `.<name>.partial`) are not identities."""

    def __init__(self, root):
        if not os.path.isdir(root):
            raise DataError(f"data source not found: {root}")
        self.classes = sorted(d.name for d in os.scandir(root)
                              if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise DataError(f"no identity folders in {root}")
        self.files, self.targets = [], []
        for label, name in enumerate(self.classes):
            files = sorted(f for f in os.listdir(os.path.join(root, name))
                           if f.lower().endswith(IMAGE_EXTS))
            if not files:
                raise DataError(f"identity folder {os.path.join(root, name)} has no images")
            self.files += [os.path.join(root, name, f) for f in files]
            self.targets += [label] * len(files)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return decode_image(self.files[i], self.files[i]), self.targets[i]

    def encoded(self, i):
        """(the image file's bytes, label) without decoding."""
        with open(self.files[i], "rb") as f:
            return f.read(), self.targets[i]

    def describe(self, i):
        return self.files[i]


RECORD_MAGIC = 0xCED7230A


class RecordIODataset(torch.utils.data.Dataset):
    """MXNet RecordIO train.rec + train.idx read without mxnet (docs/formulas.md 5).

    The file is opened lazily once per process, so DataLoader workers (fork) each get their own."""

    def __init__(self, rec_path):
        self.rec_path, idx_path = rec_path, os.path.splitext(rec_path)[0] + ".idx"
        for p in (rec_path, idx_path):
            if not os.path.isfile(p):
                raise DataError(f"data source not found: {p}")
        self._file, self._pid = None, None
        try:
            with open(idx_path) as f:
                self.offsets = {int(k): int(v)
                                for k, v in (ln.split("\t") for ln in f if ln.strip())}
        except ValueError:
            raise DataError(f"corrupt index {idx_path}: expected lines 'key<TAB>offset'") from None
        size = os.path.getsize(rec_path)
        if any(o + 8 > size for o in self.offsets.values()):
            raise DataError(
                f"truncated or corrupt {rec_path}: the index points past its end ({size} bytes)")
        self.keys, labels = sorted(self.offsets), {}
        flag, head, image = self.read_header(0) if 0 in self.offsets else (0, None, None)
        # insightface: record 0 holds (first identity record, end), no image
        if flag > 0 and not image:
            first, end = int(head[0]), int(head[1])
            self.keys = [k for k in self.keys if 0 < k < first]
            for k in range(first, end):  # identity records hold their image-key range (a, b)
                a, b = (int(v) for v in self.read_header(k)[1][:2]) if k in self.offsets else (0, 0)
                if a in self.offsets:
                    labels.update(dict.fromkeys(range(a, b), int(self.read_header(a)[1][0])))
        # no ranges (or flag-0 layout): read every header
        if any(k not in labels for k in self.keys):
            labels = {k: int(self.read_header(k)[1][0]) for k in self.keys}
        names = sorted(set(labels[k] for k in self.keys))
        self.classes = [str(n) for n in names]
        index = {n: i for i, n in enumerate(names)}
        self.targets = [index[labels[k]] for k in self.keys]

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}

    def read_record(self, key):
        """The payload of record `key`, joining split chunks (cflag 1/2/3) around the magic word."""
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.rec_path, "rb"), os.getpid()
        f, parts = self._file, []
        f.seek(self.offsets[key])
        while True:
            head = f.read(8)
            magic, lrec = struct.unpack("<II", head) if len(head) == 8 else (None, 0)
            length = lrec & ((1 << 29) - 1)
            data = f.read(length)
            if magic != RECORD_MAGIC or len(data) != length:
                raise DataError(f"truncated or corrupt {self.rec_path} (record {key})")
            parts.append(data)
            f.seek((-length) % 4, 1)
            if lrec >> 29 in (0, 3):
                return struct.pack("<I", RECORD_MAGIC).join(parts)

    def read_header(self, key, payload=None):
        """(flag, labels as a float list, image bytes) of record `key`."""
        payload = self.read_record(key) if payload is None else payload
        if len(payload) < 24:
            raise DataError(f"truncated or corrupt {self.rec_path} (record {key} header)")
        flag, label, _, _ = struct.unpack("<IfQQ", payload[:24])
        if flag > 0:
            return (flag, list(struct.unpack(f"<{flag}f", payload[24:24 + 4 * flag])),
                    payload[24 + 4 * flag:])
        return flag, [label], payload[24:]

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        key = self.keys[i]
        return decode_image(self.read_header(key)[2],
                            f"{self.rec_path} record {key}"), self.targets[i]

    def encoded(self, i):
        """(the record's encoded image, label) without decoding."""
        return self.read_header(self.keys[i])[2], self.targets[i]

    def describe(self, i):
        return f"{self.rec_path} record {self.keys[i]}"


def record_header(label, key=0, labels=None):
    """A record payload's header (docs/formulas.md 5): struct '<IfQQ' (flag, label, id, id2), then
    `flag` float32 labels when a list is given (flag = its length, the label field 0)."""
    if labels is None:
        return struct.pack("<IfQQ", 0, label, key, 0)
    return struct.pack("<IfQQ", len(labels), 0.0, key, 0) + struct.pack(f"<{len(labels)}f", *labels)


def record_chunks(payload):
    """RecordIO framing of one record: chunks [uint32 magic, uint32 lrec, data], the last padded
    with zeros to a multiple of 4 bytes; lrec = cflag << 29 | length. A payload holding the magic
    word at a 4-aligned offset is cut there, the word dropped (the reader puts it back): cflag 1 on
    the first chunk, 2 on middle ones, 3 on the last; 0 for an uncut record."""
    magic = struct.pack("<I", RECORD_MAGIC)
    cuts, i = [], payload.find(magic)
    while i != -1:
        if i % 4 == 0:
            cuts.append(i)
        i = payload.find(magic, i + 1)
    starts, ends = [0] + [c + 4 for c in cuts], cuts + [len(payload)]
    out = []
    for j, (a, b) in enumerate(zip(starts, ends)):
        cflag = 0 if not cuts else 1 if j == 0 else 3 if j == len(cuts) else 2
        out += [magic, struct.pack("<I", cflag << 29 | (b - a)), payload[a:b]]
    # middle chunks end on aligned offsets: only the last pads
    out.append(b"\0" * (-len(payload) % 4))
    return b"".join(out)


class RecordWriter:
    """train.rec + train.idx written record by record (the `.idx` line `key<TAB>offset` per record);
    both go to temporary names and are renamed on close, so a killed job leaves no half dataset."""

    def __init__(self, rec_path):
        self.paths = [rec_path, os.path.splitext(rec_path)[0] + ".idx"]
        self.tmp = [tmp_name(p) for p in self.paths]
        self.rec, self.idx = open(self.tmp[0], "wb"), open(self.tmp[1], "w")

    def write(self, key, payload):
        self.idx.write(f"{key}\t{self.rec.tell()}\n")
        self.rec.write(record_chunks(payload))

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        self.rec.close()
        self.idx.close()
        for tmp, path in zip(self.tmp, self.paths):
            if kind is None:
                os.replace(tmp, path)
            else:
                os.remove(tmp)


def encode_image(image, fmt="jpeg", quality=95):
    """uint8 [3,H,W] RGB -> JPEG (PIL, 4:2:0 as cv2 writes it) or PNG bytes."""
    buf = io.BytesIO()
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    pil.save(buf, format="PNG") if fmt == "png" else pil.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def stored_image(data, fmt, quality, size):
    """The bytes a .rec stores for one encoded image: passed through when already in `fmt` and size,
    else decoded, resized and re-encoded."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            kind, shape = im.format, im.size
    except Exception as e:
        raise DataError(f"corrupt image: {e}") from None
    if kind == {"jpeg": "JPEG", "png": "PNG"}[fmt] and (size is None or shape == (size, size)):
        return data
    image = decode_image(data, "image")
    return encode_image(resize_uint8(image, size) if size else image, fmt, quality)


def pack_rec(dataset, out_dir, fmt="jpeg", quality=95, size=None, progress=True):
    """A dataset from open_datasets (its classes as merged) -> out_dir/train.rec, train.idx,
    property in insightface's layout: record 0 = header (flag 2, labels (first identity record,
    end)); image records 1..N grouped by class, label = class index; identity records N+1..N+C,
    labels (a, b) = the key range of the class's images. Returns (images, classes)."""
    order = sorted(range(len(dataset)), key=lambda i: (dataset.targets[i], i))
    n, c = len(order), len(dataset.classes)
    ranges, shape = [[0, 0] for _ in range(c)], None
    os.makedirs(out_dir, exist_ok=True)
    with RecordWriter(os.path.join(out_dir, "train.rec")) as w:
        w.write(0, record_header(0, labels=(n + 1, n + 1 + c)))
        for key, i in enumerate(tqdm(order, desc="packing", disable=not progress, leave=False),
                                start=1):
            data, label = dataset.encoded(i)
            try:
                data = stored_image(data, fmt, quality, size)
            except DataError as e:
                raise DataError(f"{dataset.describe(i)}: {e}") from None
            if shape is None:
                with Image.open(io.BytesIO(data)) as im:
                    shape = im.size[::-1]
            w.write(key, record_header(float(label), key) + data)
            ranges[label] = [ranges[label][0] or key, key + 1]
        for label, (a, b) in enumerate(ranges):
            w.write(n + 1 + label, record_header(0, n + 1 + label, labels=(a, b)))
    write_atomic(os.path.join(out_dir, "property"), f"{c},{shape[0]},{shape[1]}\n")
    return n, c


def write_bin(path, images, issame):
    """A verification benchmark in insightface's .bin layout: the pickle of (bins, issame_list) with
    2N encoded images (pair i = images 2i, 2i+1) and N booleans; protocol 2, as Python 2 wrote them.
    images: encoded bytes, or uint8 [H,W,3] arrays (stored as PNG)."""
    issame = [bool(v) for v in issame]
    if len(images) != 2 * len(issame) or not issame:
        raise DataError(f"{len(images)} images for {len(issame)} pairs: need 2 per pair")
    bins = []
    for im in images:
        if not isinstance(im, (bytes, bytearray)):
            buf = io.BytesIO()
            Image.fromarray(np.asarray(im, dtype=np.uint8)).save(buf, format="PNG")
            im = buf.getvalue()
        bins.append(bytes(im))
    write_atomic(path, pickle.dumps((bins, issame), protocol=2))


def read_pairs(path):
    """A pairs list -> (image paths, issame): lines `image1 image2 same` (same: 1/0, true/false;
    separated by spaces, tabs or commas; `#` comments); relative paths from the list's folder."""
    root, paths, issame = os.path.dirname(os.path.abspath(path)), [], []
    with open(path) as f:
        for num, line in enumerate(f, 1):
            fields = line.split("#")[0].replace(",", " ").split()
            if not fields:
                continue
            if len(fields) != 3 or fields[2].lower() not in ("1", "0", "true", "false"):
                raise DataError(
                    f"{path} line {num}: expected 'image1 image2 same(1/0)', got {line.strip()!r}")
            paths += [os.path.join(root, p) for p in fields[:2]]
            issame.append(fields[2].lower() in ("1", "true"))
    return paths, issame


def pack_bin(pairs_path, out_path):
    """A pairs list (read_pairs) -> an insightface .bin holding the images' own encoded bytes."""
    paths, issame = read_pairs(pairs_path)
    images, sizes = [], set()
    for p in paths:
        if not os.path.isfile(p):
            raise DataError(f"image not found: {p} (listed in {pairs_path})")
        with open(p, "rb") as f:
            images.append(f.read())
        sizes.add(tuple(decode_image(images[-1], p).shape))
    if len(sizes) > 1:
        raise DataError(
            f"the images of {pairs_path} differ in size {sorted(sizes)}: a .bin holds one size")
    write_bin(out_path, images, issame)
    return len(issame)


def resize_uint8(image, size):
    """uint8 [...,3,H,W] -> uint8 [...,3,size,size] (antialiased bilinear), unchanged if already
    there."""
    if image.shape[-2:] == (size, size):
        return image
    x = F.interpolate(image.reshape(-1, *image.shape[-3:]).float(), size=(size, size),
                      mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).reshape(*image.shape[:-2], size, size)


class MergedDataset(torch.utils.data.Dataset):
    """Several sources as one: later sources' identities become new classes (or join by name).

    Without merge_by_name, a name already taken gets the source's index as suffix (`bob.1`)."""

    def __init__(self, datasets, merge_by_name=False, size=None):
        self.datasets, self.size = datasets, size
        self.classes, self.targets, self.remaps = [], [], []
        where = {}
        for s, ds in enumerate(datasets):
            remap = []
            for name in ds.classes:
                if not (merge_by_name and name in where):
                    if name in where:  # same name, different identity: keep names unique
                        name = f"{name}.{s}"
                    where[name] = len(self.classes)
                    self.classes.append(name)
                remap.append(where[name])
            self.targets += [remap[t] for t in ds.targets]
            self.remaps.append(remap)
        self.starts = np.cumsum([0] + [len(ds) for ds in datasets])

    def __len__(self):
        return int(self.starts[-1])

    def source(self, i):
        """(source index, index inside that source) of item i."""
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return s, i - int(self.starts[s])

    def __getitem__(self, i):
        s, j = self.source(i)
        image, label = self.datasets[s][j]
        return image if self.size is None else resize_uint8(image, self.size), self.remaps[s][label]

    def encoded(self, i):
        s, j = self.source(i)
        data, label = self.datasets[s].encoded(j)
        return data, self.remaps[s][label]

    def describe(self, i):
        s, j = self.source(i)
        return self.datasets[s].describe(j)


def open_dataset(source):
    if source.endswith(".rec"):
        return RecordIODataset(source)
    # insightface's folders: train.rec, train.idx, *.bin
    if os.path.isfile(os.path.join(source, "train.rec")):
        return RecordIODataset(os.path.join(source, "train.rec"))
    if os.path.isdir(source):
        return ImageFolderDataset(source)
    raise DataError(f"data source not found: {source} (expected an image folder or a train.rec)")


def open_datasets(sources, merge_by_name=False, size=None):
    """Image folders and/or .rec files -> one dataset with .classes and .targets (images resized to
    `size`)."""
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    return MergedDataset([open_dataset(str(s)) for s in sources], merge_by_name, size)


def load_images(dataset, size=None, progress=True):
    """Decode a whole dataset once -> (uint8 [N,3,H,W], int64 labels [N]), resized to `size` if
    given."""
    n = len(dataset)
    images, labels = None, torch.empty(n, dtype=torch.int64)
    for i in tqdm(range(n), desc="decoding images", disable=not progress, leave=False):
        image, labels[i] = dataset[i]
        if size is not None:
            image = resize_uint8(image, size)
        if images is None:
            images = torch.empty((n, *image.shape), dtype=torch.uint8)
        if image.shape != images.shape[1:]:
            raise DataError(f"images differ in size ({tuple(image.shape)} at item {i} vs "
                            f"{tuple(images.shape[1:])}); give a size to resize them")
        images[i] = image
    if images is None:
        raise DataError("the dataset is empty")
    return images, labels


# -------------------------------------------------------------------- seeding, processes, precision


def seed_for(*values):
    """A 63-bit seed from a tuple such as (seed, rank, epoch); resuming re-derives the same ones."""
    return int(np.random.SeedSequence(list(values)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def epoch_order(n, batch_size, seed, epoch):
    """The global item order of one epoch (same on every rank), cut to whole batches."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(seed, epoch)))
    return perm[:max(1, n // batch_size) * batch_size]


def setup_distributed(device=None, timeout=None):
    """-> (rank, local_rank, world_size, device). DDP when RANK is set (torchrun), else one process.
    timeout: how long collectives wait (a datetime.timedelta; None: torch's default)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=timeout)
        return rank, local_rank, world, torch.device("cuda", local_rank)
    dist.init_process_group("gloo", timeout=timeout)
    return rank, local_rank, world, torch.device(device)


def save_atomic(obj, path):
    """torch.save through write_atomic (a kill never leaves half a file)."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_json(obj, path):
    """JSON through write_atomic, its folder made if missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, json.dumps(obj, indent=2))


def machine(device=None):
    """What a seeded run's bits depend on besides its flags (benchmarks/determinism.py): the CPU
    model, the vector kernels PyTorch picked for it, the thread count, the library versions and the
    GPU."""
    cpu = None
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), None)
    info = {"cpu": cpu or platform.processor(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "numpy": np.__version__}
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def amp_dtype(device, dtype="auto"):
    """The autocast dtype --amp uses on `device`, or None for fp32: bf16 where the hardware has it
    natively (emulated bf16 is slower than fp32), else fp16 on CUDA (with loss scaling) and fp32 on
    CPU. dtype "bf16" / "fp16" forces one."""
    if dtype != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if torch.device(device).type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False)
                else torch.float16)
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def autocast_context(device, amp, dtype="auto"):
    """-> (ctx, scaler): autocast in amp_dtype(device, dtype) and a GradScaler enabled for fp16
    only; no-ops without amp (or on a CPU without native bf16)."""
    device = torch.device(device)
    dtype = amp_dtype(device, dtype) if amp else None
    if dtype is None:
        return nullcontext(), torch.amp.GradScaler(device.type, enabled=False)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return torch.autocast(device.type, dtype=dtype), scaler


def cuda_settings(tf32=True):
    """TF32 matmuls and convolutions (Ampere and later; the reference recipe trains so) and cuDNN's
    kernel autotuning (fixed input shapes)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True


def check_compile(device):
    """torch.compile fails at the first call, deep in training: try a tiny function first, so a
    missing C++ compiler (or Triton on CUDA) ends in one error line."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(4, device=device))
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        raise DataError(f"--compile does not work on this machine ({lines[0]}); "
                        f"install a C++ compiler or leave --compile out") from None
