"""Time evaluate.verification_accuracy (vectorised over thresholds) against the reference loop.

The loop is the protocol as insightface's `calculate_roc` writes it: for each fold, for each of the
400 thresholds, numpy accuracy over the training pairs; argmax; score the held-out fold. (The
reference also fills per-threshold TPR/FPR on the test fold for its ROC plot; that part does not
change the accuracies and is left out, so the loop is timed only on what the accuracy needs.)
Both run on the same random pairs in one process; they must agree exactly.

Usage: python benchmarks/verification_speed.py [--pairs 6000 --dim 512 --seed 0 --repeats 3]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluate import verification_accuracy  # noqa: E402


def calculate_accuracy(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict_issame, actual_issame))
    tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
    return float(tp + tn) / dist.size


def calculate_roc_loop(thresholds, embeddings1, embeddings2, actual_issame, nrof_folds=10):
    """Per-fold held-out accuracy, one threshold at a time (the reference formulation)."""
    actual_issame = np.asarray(actual_issame, dtype=bool)
    dist = np.sum(np.square(np.subtract(embeddings1, embeddings2)), 1)
    indices = np.arange(len(actual_issame))
    accuracy = np.zeros(nrof_folds)
    # = KFold(shuffle=False)
    for fold_idx, test_set in enumerate(np.array_split(indices, nrof_folds)):
        train_set = np.setdiff1d(indices, test_set)
        acc_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            acc_train[threshold_idx] = calculate_accuracy(threshold, dist[train_set],
                                                          actual_issame[train_set])
        best_threshold_index = np.argmax(acc_train)
        best = thresholds[best_threshold_index]
        accuracy[fold_idx] = calculate_accuracy(best, dist[test_set], actual_issame[test_set])
    return accuracy


def random_pairs(n_pairs, dim, seed):
    """L2-normalised embeddings [2N, dim]: positives are very noisy copies (accuracy near 78%)."""
    rng = np.random.default_rng(seed)
    issame = rng.random(n_pairs) < 0.5
    a = rng.standard_normal((n_pairs, dim))
    noise = rng.standard_normal((n_pairs, dim))
    b = np.where(issame[:, None], a + 15 * noise, rng.standard_normal((n_pairs, dim)))
    emb = np.empty((2 * n_pairs, dim))
    emb[0::2], emb[1::2] = a, b
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), issame


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pairs", type=int, default=6000, help="number of pairs (LFW has 6000)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each implementation (best is reported)")
    args = parser.parse_args()
    emb, issame = random_pairs(args.pairs, args.dim, args.seed)
    times = {"vectorised": [], "loop": [], "distances": []}
    for _ in range(args.repeats):  # best of a few runs of each, interleaved, in this one process
        t0 = time.perf_counter()
        fast = verification_accuracy(emb, issame)
        t1 = time.perf_counter()
        slow = calculate_roc_loop(np.arange(0, 4, 0.01), emb[0::2], emb[1::2], issame)
        t2 = time.perf_counter()
        np.sum(np.square(emb[0::2] - emb[1::2]), 1)
        times["distances"].append(time.perf_counter() - t2)
        times["vectorised"].append(t1 - t0)
        times["loop"].append(t2 - t1)
        if not np.array_equal(fast, slow):
            sys.exit(f"error: the two implementations disagree: {fast} vs {slow}")
    fast_t, slow_t, dist_t = (min(times[k]) for k in ("vectorised", "loop", "distances"))
    print(f"{args.pairs} pairs, d = {args.dim}: accuracy {100 * fast.mean():.2f} +- "
          f"{100 * fast.std():.2f} "
          "(both implementations agree exactly)")
    print(f"vectorised {1e3 * fast_t:.1f} ms, loop {1e3 * slow_t:.1f} ms (best of {args.repeats}; "
          "both include "
          f"the pair distances), speed-up {slow_t / fast_t:.1f}x")
    print(f"without the {1e3 * dist_t:.1f} ms of pair distances: vectorised "
          f"{1e3 * (fast_t - dist_t):.1f} ms, "
          f"loop {1e3 * (slow_t - dist_t):.1f} ms, speed-up "
          f"{(slow_t - dist_t) / (fast_t - dist_t):.0f}x")


if __name__ == "__main__":
    main()
