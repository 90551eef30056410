"""common.py: flag types, output checks, the one-writer lock, atomic writes, finiteness, CSV by
name."""
import argparse
import os
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest
import torch

import common
from common import (InputError, check_finite, check_output_dir, check_output_file, output_lock,
                    positive_int, probability, read_csv, remove_stale_tmp, write_atomic)


@pytest.mark.parametrize("parse,good,bad", [
    (common.positive_int, ["1", "64"], ["0", "-1", "1.5", "x", ""]),
    (common.non_negative_int, ["0", "3"], ["-1", "0.5", "nan"]),
    (common.positive_float, ["1e-3", "2"], ["0", "-0.1", "nan", "inf"]),
    (common.non_negative_float, ["0", "7.5"], ["-1e-9", "nan", "-inf"]),
    (common.probability, ["0", "0.5", "1"], ["1.0001", "-0.1", "nan"]),
    (common.finite_float, ["-2", "1.3"], ["nan", "inf", "-inf"]),
])
def test_flag_types_accept_their_range_only(parse, good, bad):
    for text in good:
        parse(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_parser_errors_are_one_line(capsys):
    p = common.ArgumentParser()
    p.add_argument("--n", type=positive_int)
    p.add_argument("--p", type=probability)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: argument --n: must be a positive integer, got 0\n"


def test_write_atomic_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "out.json"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_text() == "second"

    def fails(path):
        open(path, "w").write("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        write_atomic(target, fails)
    assert target.read_text() == "second" and os.listdir(tmp_path) == ["out.json"]


def test_check_finite_names_the_entry():
    check_finite("m", {"w": torch.ones(3), "n": torch.tensor([1, 2]), "s": "text"})
    with pytest.raises(InputError, match=r"model.pt: 2 non-finite value\(s\) in layer.weight"):
        check_finite("model.pt", {"ok": torch.zeros(2),
                                  "layer.weight": torch.tensor([1.0, float("nan"), float("inf")])})
    with pytest.raises(InputError, match="centres"):
        check_finite("centres", np.array([[0.0, np.inf]]))
    with pytest.raises(InputError):
        check_finite("d", [np.zeros(2), np.array([np.nan])])


def test_output_checks(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file" / "below")
    with pytest.raises(InputError, match="is a folder, not a file"):
        check_output_file(tmp_path)
    check_output_dir(tmp_path / "new" / "deeper")
    check_output_file(tmp_path / "new" / "pairs.csv")
    assert sorted(os.listdir(tmp_path)) == ["file"]  # checking creates nothing
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(common.shutil, "disk_usage",
                        lambda path: usage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(InputError, match="not enough free disk space"):
        check_output_dir(tmp_path / "new")


def test_the_lock_admits_one_writer_and_takes_over_a_dead_ones(tmp_path):
    out = tmp_path / "run" / "deeper"
    with output_lock(str(out)) as path:
        assert open(path).read().strip() == str(os.getpid())
        with pytest.raises(InputError, match=f"in use by another process \\(pid {os.getpid()}\\)"):
            with output_lock(str(out)):
                pass
        code = "import common, sys; common.output_lock(sys.argv[1]).__enter__()"  # another process
        r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert r.returncode != 0 and "in use by another process" in r.stderr
    assert not (tmp_path / "run").exists()  # released, and the folders it made for nothing removed
    out.mkdir(parents=True)
    (out / ".lock").write_text("999999999\n")  # a process that no longer exists
    with output_lock(str(out)):
        assert open(out / ".lock").read().strip() == str(os.getpid())
    assert os.listdir(out) == []
    with output_lock(str(tmp_path / "pairs.csv"), is_dir=False) as path:
        assert path == str(tmp_path / ".pairs.csv.lock")


def test_a_killed_holder_releases_the_lock(tmp_path):
    code = ("import common, sys, time; lock = common.output_lock(sys.argv[1]); lock.__enter__(); "
            "print('held', flush=True); time.sleep(60)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                         text=True, cwd=root)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(InputError, match=f"pid {p.pid}"):
        with output_lock(str(tmp_path)):
            pass
    p.kill()
    p.wait()
    with output_lock(str(tmp_path)):  # its lock file is still there: the pid shows it is stale
        pass


def test_stale_temporary_files_are_removed(tmp_path):
    for name in ("a.json.12.tmp", ".b.tmp", "keep.json", "c.png"):
        (tmp_path / name).write_text("x")
    removed = remove_stale_tmp(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == [".b.tmp", "a.json.12.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["c.png", "keep.json"]


def test_read_csv_by_column_name_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes("\ufeffclass_a, class_b ,rank\r\nA,B,1\r\n\r\nC , D,2\r\n".encode())
    header, rows = read_csv(str(path), ["class_a", "class_b"])
    assert header == ["class_a", "class_b", "rank"]
    assert rows == [(2, {"class_a": "A", "class_b": "B", "rank": "1"}),
                    (4, {"class_a": "C", "class_b": "D", "rank": "2"})]
    path.write_text("class_b,class_a\nB,A\n")
    assert read_csv(str(path), ["class_a"])[1] == [(2, {"class_b": "B", "class_a": "A"})]
    with pytest.raises(InputError, match="no column 'class_c'"):
        read_csv(str(path), ["class_c"])
    with pytest.raises(InputError, match="not found"):
        read_csv(str(tmp_path / "none.csv"), ["class_a"])
