"""select_pairs.py: cosine distances, farthest / closest / random pairs and triplets under the
per-class cap (against a plain greedy oracle), determinism, the blockwise path for many classes
(against the full matrix), and CLI runs in embedding and condition space."""
import csv
import itertools
import math
import os
import shutil

import numpy as np
import pytest
import torch

from common import open_datasets
from conftest import one_error_line, run_script
from select_pairs import cosine_distances, main, select_blockwise, select_tuples, tuple_distances
from train_arcface import class_centres, load_backbone
from train_diffusion import condition_vectors, load_generator

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def circle(angles):
    """Unit vectors at these angles: cosine distance 1 - cos(angle difference)."""
    angles = np.asarray(angles, dtype=np.float64)
    return np.stack([np.cos(angles), np.sin(angles)], 1)


def greedy_oracle(dist, strategy, num, k, cap):
    """The pairing rule written plainly: all tuples sorted by score, greedy under the cap, cap + 1
    if short."""
    tuples = list(itertools.combinations(range(len(dist)), k))
    score = {t: sum(dist[a, b] for a, b in itertools.combinations(t, 2)) for t in tuples}
    tuples.sort(key=lambda t: -score[t] if strategy == "dist" else score[t])
    chosen, taken, uses = [], set(), np.zeros(len(dist), dtype=int)
    while True:
        for t in tuples:
            if t not in taken and all(uses[c] < cap for c in t):
                chosen.append(t)
                taken.add(t)
                uses[list(t)] += 1
                if len(chosen) == num:
                    return chosen, cap
        cap += 1


def test_cosine_distances_are_one_minus_cosine():
    # rows of different norms
    X = np.random.default_rng(0).normal(size=(7, 5)) * np.arange(1, 8)[:, None]
    cos = (X @ X.T) / np.outer(np.linalg.norm(X, axis=1), np.linalg.norm(X, axis=1))
    d = cosine_distances(X)
    np.testing.assert_allclose(d, 1 - cos, atol=1e-12)
    assert d.dtype == np.float64 and np.all(np.diag(d) == 0) and np.allclose(d, d.T)
    np.testing.assert_allclose(cosine_distances(torch.from_numpy(X).float()), d, atol=1e-6)
    np.testing.assert_allclose(cosine_distances(circle([0, np.pi / 2, np.pi]))[0], [0, 1, 2],
                               atol=1e-12)


def test_dist_takes_the_farthest_pair_first_and_close_the_closest():
    angles = [0, 0.3, 1.0, 1.7, 2.9, 3.35, 4.4, 5.5]  # all pairwise gaps differ
    d = cosine_distances(circle(angles))
    iu = np.triu_indices(len(d), 1)
    far = (iu[0][d[iu].argmax()], iu[1][d[iu].argmax()])
    near = (iu[0][d[iu].argmin()], iu[1][d[iu].argmin()])
    # 0.3 vs 3.35: the gap nearest pi
    assert tuple(select_tuples(d, "dist", 4)[0][0]) == far == (1, 5)
    assert tuple(select_tuples(d, "close", 4)[0][0]) == near == (0, 1)


@pytest.mark.parametrize("strategy", ["dist", "close"])
@pytest.mark.parametrize("C,k", [(120, 2), (40, 3)])  # > 4096 candidates: several ranked blocks
def test_selection_equals_the_plain_greedy_rule(strategy, C, k):
    d = cosine_distances(np.random.default_rng(C).normal(size=(C, 8)))
    for num, max_uses in [(C, None), (C // 2, 1), (2 * C, 3)]:
        tuples, cap = select_tuples(d, strategy, num, k, max_uses, seed=0)
        expected, expected_cap = greedy_oracle(d, strategy, num, k,
                                               max_uses or math.ceil(num * k / C))
        assert [tuple(t) for t in tuples] == expected and cap == expected_cap


@pytest.mark.parametrize("strategy", ["dist", "close", "random"])
@pytest.mark.parametrize("k", [2, 3])
def test_no_class_is_used_more_than_the_cap(strategy, k):
    C = 30
    d = cosine_distances(np.random.default_rng(1).normal(size=(C, 6)))
    for num, max_uses in [(C, None), (C // k, 1), (3 * C, None)]:
        tuples, cap = select_tuples(d, strategy, num, k, max_uses, seed=3)
        uses = np.bincount(tuples.ravel(), minlength=C)
        assert len(tuples) == num and len({tuple(t) for t in tuples}) == num
        assert np.all(np.diff(tuples, axis=1) > 0)  # k distinct classes, sorted
        assert uses.max() <= cap and cap >= (max_uses or math.ceil(num * k / C))
    tuples, cap = select_tuples(d, strategy, C // k, k, 1, seed=3)
    # a perfect matching when the cap allows it
    assert cap == 1 and np.bincount(tuples.ravel()).max() == 1


def test_a_cap_that_leaves_too_few_tuples_is_raised():
    d = cosine_distances(circle([0, 1, 2, 3]))
    tuples, cap = select_tuples(d, "dist", 3, 2, max_uses=1)  # 4 classes hold only 2 disjoint pairs
    assert cap == 2 and len({tuple(t) for t in tuples}) == 3
    assert np.bincount(tuples.ravel()).max() <= 2
    with pytest.raises(ValueError, match="at most 6"):
        select_tuples(d, "dist", 7, 2)
    with pytest.raises(ValueError, match="at most 4"):
        select_tuples(d, "close", 5, 3)


def test_random_is_deterministic_for_a_seed():
    d = cosine_distances(np.random.default_rng(2).normal(size=(20, 4)))
    for k in (2, 3):
        a, b, c = (select_tuples(d, "random", 20, k, seed=s)[0] for s in (5, 5, 6))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
        # not the distance order: the chosen distances are not sorted either way
        sums = tuple_distances(d, a).sum(1)
        assert np.any(np.diff(sums) > 0) and np.any(np.diff(sums) < 0)


def test_ties_are_broken_by_the_seed():
    # a regular octagon: 4 equal farthest pairs
    d = cosine_distances(circle(np.arange(8) * np.pi / 4))
    firsts = {tuple(select_tuples(d, "dist", 4, seed=s)[0][0]) for s in range(12)}
    assert firsts <= {(0, 4), (1, 5), (2, 6), (3, 7)} and len(firsts) > 1
    np.testing.assert_array_equal(select_tuples(d, "dist", 4, seed=1)[0],
                                  select_tuples(d, "dist", 4, seed=1)[0])


def test_triplets_are_ranked_by_the_distance_sum():
    d = cosine_distances(circle(np.arange(6) * np.pi / 3))  # regular hexagon
    tuples, cap = select_tuples(d, "dist", 2, 3)  # Sum Max: the two equilateral triangles
    assert cap == 1 and sorted(map(tuple, tuples)) == [(0, 2, 4), (1, 3, 5)]
    np.testing.assert_allclose(tuple_distances(d, tuples), 1.5)
    tuples, _ = select_tuples(d, "close", 2, 3)  # Sum Min: three neighbours, 0.5 + 0.5 + 1.5
    np.testing.assert_allclose(tuple_distances(d, tuples).sum(1), 2.5)
    # consecutive (mod 6)
    assert all(sorted((t[1] - t[0], t[2] - t[1])) in ([1, 1], [1, 4]) for t in tuples)
    d = cosine_distances(circle([0, 0.2, 0.5, 1.4, 2.2, 3.0, 4.1, 5.0]))
    tuples, _ = select_tuples(d, "dist", 8, 3)
    every = [sum(d[a, b] for a, b in itertools.combinations(t, 2))
             for t in itertools.combinations(range(8), 3)]
    assert tuple_distances(d, tuples).sum(1)[0] == pytest.approx(max(every))


def test_triplets_of_many_classes_come_from_class_neighbourhoods():
    C = 230  # above the exact-enumeration limit
    d = cosine_distances(np.random.default_rng(4).normal(size=(C, 16)))
    every = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(C), 3)),
                        dtype=np.int64)
    every = tuple_distances(d, every.reshape(-1, 3)).sum(1)
    for strategy, better in [("dist", np.greater_equal), ("close", np.less_equal)]:
        tuples, cap = select_tuples(d, strategy, C, 3, seed=0)
        sums = tuple_distances(d, tuples).sum(1)
        assert len({tuple(t) for t in tuples}) == C and np.bincount(tuples.ravel()).max() <= cap
        assert better(sums[0], every).mean() > 0.999  # the first is better than 99.9% of triplets
    tuples, cap = select_tuples(d, "random", C, 3, seed=0)
    assert len({tuple(t) for t in tuples}) == C and np.bincount(tuples.ravel()).max() <= cap

@pytest.mark.parametrize("strategy", ["dist", "close"])
@pytest.mark.parametrize("partners", [4, 32])  # 4: many classes outrun their first list
def test_blockwise_pairs_equal_the_full_matrix(strategy, partners):
    C = 300
    # float64: no rounding ties between the two paths
    X = np.random.default_rng(5).normal(size=(C, 8))
    d = cosine_distances(X)
    # (C, 1): the cap must be raised
    for num, max_uses in [(C, None), (C // 2, 1), (C, 1), (2 * C, 3)]:
        expected, expected_cap = select_tuples(d, strategy, num, 2, max_uses, seed=0)
        tuples, cap, dists = select_blockwise(X, strategy, num, 2, max_uses, seed=0,
                                              block_bytes=12 * C * 37,
                                              partners=partners)  # blocks of 37 rows
        np.testing.assert_array_equal(tuples, expected)
        assert cap == expected_cap
        np.testing.assert_allclose(dists, tuple_distances(d, tuples), atol=1e-12)


@pytest.mark.parametrize("strategy", ["dist", "close", "random"])
def test_blockwise_triplets_equal_the_full_matrix(strategy):
    # above the exact-enumeration limit: both use class neighbourhoods (or the same random sample)
    C = 230
    X = np.random.default_rng(6).normal(size=(C, 12))
    d = cosine_distances(X)
    expected, expected_cap = select_tuples(d, strategy, C, 3, seed=1)
    tuples, cap, dists = select_blockwise(X, strategy, C, 3, seed=1, block_bytes=12 * C * 50)
    np.testing.assert_array_equal(tuples, expected)
    assert cap == expected_cap
    np.testing.assert_allclose(dists, tuple_distances(d, tuples), atol=1e-12)


def test_blockwise_random_pairs_respect_the_cap_and_the_seed():
    X = np.random.default_rng(7).normal(size=(500, 8))
    a, cap, dists = select_blockwise(X, "random", 500, 2, seed=3)
    assert len({tuple(t) for t in a}) == 500 and np.bincount(a.ravel()).max() <= cap == 2
    np.testing.assert_allclose(dists, tuple_distances(cosine_distances(X), a), atol=1e-12)
    np.testing.assert_array_equal(select_blockwise(X, "random", 500, 2, seed=3)[0], a)
    assert not np.array_equal(select_blockwise(X, "random", 500, 2, seed=4)[0], a)


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def models(tiny_models):
    """A 4-step discriminator and a tiny generator snapshot on the tiny toy set (conftest)."""
    return tiny_models


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_embedding_space_writes_named_pairs(models, tiny_toy, tmp_path):
    fr, _ = models
    r = run_script("select_pairs.py", "--fr", fr, "--data", tiny_toy / "train", "--out",
                   tmp_path / "pairs.csv", env=ENV)
    assert r.returncode == 0, r.stderr
    names = sorted(os.listdir(tiny_toy / "train"))
    rows = read_csv(tmp_path / "pairs.csv")
    assert list(rows[0]) == ["class_a", "class_b", "distance", "rank"]
    assert (len(rows) == len(names)
            and [int(x["rank"]) for x in rows] == list(range(1, len(names) + 1)))
    centres = class_centres(load_backbone(fr), open_datasets([str(tiny_toy / "train")]))
    d = cosine_distances(centres)
    index = {n: i for i, n in enumerate(names)}
    got = [d[index[x["class_a"]], index[x["class_b"]]] for x in rows]
    np.testing.assert_allclose([float(x["distance"]) for x in rows], got, atol=1e-5)
    assert float(rows[0]["distance"]) == pytest.approx(d.max(), abs=1e-5)  # farthest first
    assert "classes used: 6 of 6" in r.stdout and "p90" in r.stdout

    r = run_script("select_pairs.py", "--fr", fr, "--data", tiny_toy / "train", "--out",
                   tmp_path / "tri.csv", "--tuple-size", 3, "--strategy", "close", "--num-pairs", 4,
                   env=ENV)
    assert r.returncode == 0, r.stderr
    rows = read_csv(tmp_path / "tri.csv")
    assert list(rows[0]) == ["class_a", "class_b", "class_c", "distance_ab", "distance_ac",
                             "distance_bc", "distance_sum", "rank"] and len(rows) == 4
    sums = [float(x["distance_sum"]) for x in rows]
    for x in rows:
        assert {x["class_a"], x["class_b"], x["class_c"]} <= set(names)
        parts = float(x["distance_ab"]) + float(x["distance_ac"]) + float(x["distance_bc"])
        assert float(x["distance_sum"]) == pytest.approx(parts, abs=1e-5)
    assert sums[0] == pytest.approx(min(d[a, b] + d[a, c] + d[b, c]
                                        for a, b, c in itertools.combinations(range(6), 3)),
                                    abs=1e-5)


def test_cli_blockwise_path_writes_the_same_pairs(models, tiny_toy, tmp_path):
    fr, _ = models
    common = ["--fr", fr, "--data", tiny_toy / "train", "--strategy", "close", "--num-pairs", 9]
    r = run_script("select_pairs.py", *common, "--out", tmp_path / "full.csv", env=ENV)
    assert r.returncode == 0, r.stderr
    r = run_script("select_pairs.py", *common, "--out", tmp_path / "blocks.csv", "--max-matrix-gb",
                   0, "--workers", 2, env=ENV)
    assert r.returncode == 0, r.stderr
    assert "block by block" in r.stdout and "all 15 pairs" in r.stdout
    full, blocks = read_csv(tmp_path / "full.csv"), read_csv(tmp_path / "blocks.csv")
    assert ([(x["class_a"], x["class_b"]) for x in blocks]
            == [(x["class_a"], x["class_b"]) for x in full])
    np.testing.assert_allclose([float(x["distance"]) for x in blocks],
                               [float(x["distance"]) for x in full], atol=2e-6)


def test_cli_condition_space_uses_the_generator_class_embeddings(models, tiny_toy, tmp_path):
    _, snapshot = models
    r = run_script("select_pairs.py", "--space", "condition", "--generator", snapshot, "--out",
                   tmp_path / "c.csv", "--strategy", "random", "--seed", 1, env=ENV)
    assert r.returncode == 0, r.stderr
    net = load_generator(snapshot)
    d = cosine_distances(condition_vectors(net))
    index = {n: i for i, n in enumerate(net.class_names)}
    rows = read_csv(tmp_path / "c.csv")
    assert len(rows) == 6
    np.testing.assert_allclose([float(x["distance"]) for x in rows],
                               [d[index[x["class_a"]], index[x["class_b"]]] for x in rows],
                               atol=1e-5)
    # with --data the rows follow the real set's classes: same pairs by name
    r = run_script("select_pairs.py", "--space", "condition", "--generator", snapshot, "--data",
                   tiny_toy / "train", "--out", tmp_path / "c2.csv", "--strategy", "random",
                   "--seed", 1, env=ENV)
    assert r.returncode == 0, r.stderr
    assert read_csv(tmp_path / "c2.csv") == rows
    other = tmp_path / "other"  # an identity the generator does not know
    shutil.copytree(tiny_toy / "train", other)
    first = sorted(os.listdir(other))[0]
    os.rename(other / first, other / "somebody_else")
    r = run_script("select_pairs.py", "--space", "condition", "--generator", snapshot, "--data",
                   other, "--out", tmp_path / "c3.csv", env=ENV)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "do not match" in r.stderr
    assert not (tmp_path / "c3.csv").exists()


@pytest.mark.parametrize("args,needle", [
    (["--fr", "missing/model.pt", "--data", "DATA"], "no such file"),
    (["--fr", "BAD", "--data", "DATA"], "is not a train_arcface.py model.pt"),
    (["--space", "condition", "--generator", "BAD"],
     "is not a train_diffusion.py network snapshot"),
    (["--space", "condition", "--generator", "FR"], "is not a train_diffusion.py network snapshot"),
    (["--data", "DATA"], "needs --fr"),
    (["--space", "condition"], "needs --generator"),
    (["--fr", "FR", "--data", "DATA", "--num-pairs", 16], "at most 15"),
    (["--fr", "FR", "--data", "DATA", "--num-pairs", 21, "--tuple-size", 3], "at most 20"),
    (["--fr", "FR", "--data", "missing_folder"], "not found"),
])
def test_bad_input_gives_one_error_line(models, tiny_toy, tmp_path, capsys, args, needle):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    subst = {"FR": models[0], "DATA": tiny_toy / "train", "BAD": bad}
    argv = [str(subst.get(a, a)) for a in args] + ["--out", str(tmp_path / "p.csv")]
    with pytest.raises(SystemExit) as e:  # nothing else escapes
        main(argv)
    message = (e.value.code if isinstance(e.value.code, str)
               else capsys.readouterr().err.strip().splitlines()[-1])
    assert e.value.code != 0 and needle in message and "\n" not in message and "error:" in message
    assert not (tmp_path / "p.csv").exists()


def test_bad_input_from_the_command_line_has_no_traceback(models, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    r = run_script("select_pairs.py", "--space", "condition", "--generator", bad, "--out",
                   tmp_path / "p.csv", env=ENV)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    expected = f"error: {bad} is not a train_diffusion.py network snapshot (UnpicklingError)"
    assert r.stderr.strip().splitlines() == [expected]


# ----------------------------------------------------------------------------- nothing bad is kept


def test_a_discriminator_with_a_nan_weight_writes_no_pairs(models, tiny_toy, tmp_path, capsys):
    from conftest import poisoned_copy
    bad, key = poisoned_copy(models[0], tmp_path / "model.pt")
    (tmp_path / "pairs.csv").write_text("earlier\n")
    line = one_error_line(
        main, ["--fr", bad, "--data", tiny_toy / "train", "--out", tmp_path / "pairs.csv"], capsys)
    assert f"the discriminator {bad}: 1 non-finite value(s) in {key}" in line
    # the earlier result is kept as it was
    assert (tmp_path / "pairs.csv").read_text() == "earlier\n"
    # no lock or temporary file left
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "pairs.csv"]


def test_a_generator_with_a_nan_condition_vector_writes_no_pairs(models, tmp_path, capsys):
    from conftest import poisoned_copy
    bad, _ = poisoned_copy(models[1], tmp_path / "snap.pt", "unet.emb_label.weight")
    line = one_error_line(main, ["--space", "condition", "--generator", bad, "--out",
                                 tmp_path / "p.csv"], capsys)
    assert f"the generator {bad}: 1 non-finite value(s) in unet.emb_label.weight" in line
    assert sorted(os.listdir(tmp_path)) == ["snap.pt"]


def test_non_finite_distances_write_no_pairs(models, tmp_path, capsys, monkeypatch):
    import select_pairs
    monkeypatch.setattr(select_pairs, "cosine_distances",
                        lambda X: np.full((len(X), len(X)), np.nan))
    line = one_error_line(main, ["--space", "condition", "--generator", models[1], "--out",
                                 tmp_path / "p.csv"], capsys)
    assert f"the distances from {models[1]}" in line and "non-finite" in line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv,needle", [
    (["--batch-size", 0], "argument --batch-size: must be a positive integer, got 0"),
    (["--num-pairs", -1], "argument --num-pairs: must be a positive integer"),
    (["--max-uses", 0], "argument --max-uses: must be a positive integer"),
    (["--workers", -1], "argument --workers: must be an integer >= 0"),
    (["--seed", -2], "argument --seed: must be an integer >= 0"),
    (["--max-matrix-gb", "-1"], "argument --max-matrix-gb: must be a number >= 0"),
    (["--max-matrix-gb", "nan"], "argument --max-matrix-gb: not a finite number"),
    (["--tuple-size", 4], "argument --tuple-size: invalid choice"),
])
def test_numeric_flags_are_checked_at_the_door(models, tiny_toy, tmp_path, capsys, argv, needle):
    line = one_error_line(
        main, ["--fr", models[0], "--data", tiny_toy / "train", "--out", tmp_path / "p.csv", *argv],
        capsys)
    assert needle in line
    assert os.listdir(tmp_path) == []


def test_an_out_that_is_a_folder_or_locked_is_refused_before_any_work(models, tiny_toy, tmp_path,
                                                                      capsys):
    from common import output_lock
    argv = ["--fr", models[0], "--data", tiny_toy / "train"]
    (tmp_path / "dir.csv").mkdir()
    assert "is a folder, not a file" in one_error_line(main, [*argv, "--out", tmp_path / "dir.csv"],
                                                       capsys)
    with output_lock(str(tmp_path / "p.csv"), is_dir=False):
        line = one_error_line(main, [*argv, "--out", tmp_path / "p.csv"], capsys)
        assert (f"--out {tmp_path / 'p.csv'} is in use by another process (pid {os.getpid()})"
                in line)
    assert os.listdir(tmp_path) == ["dir.csv"]


def test_stale_temporary_files_are_removed_and_the_lock_released(models, tmp_path):
    (tmp_path / "p.csv.4242.tmp").write_text("half")
    (tmp_path / "other.csv.4242.tmp").write_text("not ours")
    r = run_script("select_pairs.py", "--space", "condition", "--generator", models[1], "--out",
                   tmp_path / "p.csv", env=ENV)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["other.csv.4242.tmp", "p.csv"]
