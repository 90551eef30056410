"""The toy-face benchmark: determinism, the 2N-identities prefix property, the .bin format."""
import hashlib
import json
import os
import pickle

import numpy as np
from PIL import Image

from conftest import run_script
import toy_faces


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def test_layout_and_bin_format(tiny_toy):
    ids = sorted(os.listdir(tiny_toy / "train"))
    assert ids == [f"id{i:05d}" for i in range(6)]
    assert all(len(os.listdir(tiny_toy / "train" / i)) == 6 for i in ids)
    assert sorted(os.listdir(tiny_toy / "heldout")) == ids
    img = np.asarray(Image.open(tiny_toy / "train" / ids[0] / "0000.png"))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    for name in toy_faces.BENCHMARKS:
        with open(tiny_toy / "bench" / f"{name}.bin", "rb") as f:
            bins, issame = pickle.load(f, encoding="bytes")
        assert len(bins) == 2 * len(issame) == 80 and sum(issame) == 20
        # each of the 10 contiguous folds holds as many positives as negatives
        assert all(sum(issame[k * 4:(k + 1) * 4]) == 2 for k in range(10))
        assert isinstance(bins[0], bytes) and bins[0][:4] == b"\x89PNG"
    meta = json.loads((tiny_toy / "meta.json").read_text())
    assert meta["train_images"] == 36


def test_doubling_identities_keeps_first_ones_and_benchmarks(tiny_toy, tmp_path):
    r = run_script("toy_faces.py", "--out", tmp_path, "--identities", 12, "--per-identity", 6,
                   "--test-identities", 12, "--pairs", 40, "--heldout", 2, "--seed", 0)
    assert r.returncode == 0, r.stderr
    for i in range(6):
        for k in (0, 5):
            rel = os.path.join("train", f"id{i:05d}", f"{k:04d}.png")
            assert digest(tiny_toy / rel) == digest(tmp_path / rel)
    for name in toy_faces.BENCHMARKS:
        rel = os.path.join("bench", f"{name}.bin")
        assert digest(tiny_toy / rel) == digest(tmp_path / rel)
    assert len(os.listdir(tmp_path / "train")) == 12


def test_render_is_deterministic_and_identity_changes_the_face():
    rng = np.random.default_rng(0)
    people = [toy_faces.random_identity(rng) for _ in range(8)]
    a = toy_faces.draw(people[0], np.random.default_rng(5), 32)
    assert np.array_equal(a, toy_faces.draw(people[0], np.random.default_rng(5), 32))
    # same nuisances (same seed), other identities: the centre of the image (the face) changes
    for p in people[1:]:
        b = toy_faces.draw(p, np.random.default_rng(5), 32)
        assert np.abs(a[8:24, 8:24].astype(int) - b[8:24, 8:24]).mean() > 5


def test_lookalike_is_close_but_not_identical():
    rng = np.random.default_rng(1)
    p = toy_faces.random_identity(rng)
    q = toy_faces.lookalike(p, rng, jitter=0.25, keep=1.0)
    assert q != p
    for k, (lo, hi) in toy_faces.CONTINUOUS.items():
        assert abs(q[k] - p[k]) <= 0.25 * (hi - lo) + 1e-12
    assert all(q[k] == p[k] for k in toy_faces.DISCRETE)


def test_bad_arguments_give_one_clear_error(tmp_path):
    r = run_script("toy_faces.py", "--out", tmp_path, "--resolution", 4)
    assert r.returncode != 0 and "--resolution" in r.stderr and "Traceback" not in r.stderr


def test_validation_and_all_pairs_sets_change_nothing_else_and_a_set_made_without_them_is_complete(
    tiny_toy, tmp_path):
    common = ["--identities", 6, "--per-identity", 6, "--test-identities", 12, "--pairs", 40,
              "--heldout", 2, "--seed", 0]
    r = run_script("toy_faces.py", "--out", tmp_path, *common, "--val-identities", 12,
                   "--allpairs-identities", 3, "--allpairs-per-identity", 2)
    assert r.returncode == 0, r.stderr
    for rel in [os.path.join("train", "id00005", "0005.png"),
                os.path.join("heldout", "id00000", "0001.png")] + \
            [os.path.join("bench", f"{name}.bin") for name in toy_faces.BENCHMARKS]:
        assert digest(tiny_toy / rel) == digest(tmp_path / rel)
    vals = sorted(os.listdir(tmp_path / "val"))
    assert vals == sorted(f"val_{n[4:]}.bin" for n in toy_faces.BENCHMARKS)
    with open(tmp_path / "val" / "val_lfw.bin", "rb") as f:
        val_bins, val_issame = pickle.load(f, encoding="bytes")
    with open(tmp_path / "bench" / "toy_lfw.bin", "rb") as f:
        test_bins, test_issame = pickle.load(f, encoding="bytes")
    # same protocol, other faces
    assert val_issame == test_issame and not set(val_bins) & set(test_bins)
    assert sorted(os.listdir(tmp_path / "allpairs")) == ["id00000", "id00001", "id00002"]
    assert all(len(os.listdir(tmp_path / "allpairs" / i)) == 2
               for i in os.listdir(tmp_path / "allpairs"))
    # the tiny set was made without the new flags: re-running it with their defaults does nothing
    r = run_script("toy_faces.py", "--out", tiny_toy, *common)
    assert r.returncode == 0 and "already complete" in r.stdout, r.stderr
    # the same set under another path: nothing to do either
    os.symlink(tiny_toy, tmp_path / "moved")
    r = run_script("toy_faces.py", "--out", tmp_path / "moved", *common)
    assert r.returncode == 0 and "already complete" in r.stdout, r.stderr
