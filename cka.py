"""Representation alignment between two class spaces: CKA, unbiased CKA, CKNNA, mutual kNN.

ScoreMix (Rahimi & Marcel, Sec. 5) asks whether the generator's learned class-condition vectors
arrange the identities the way the discriminator's class centres do. Rows of X and Y are paired
(one row per class); the metrics follow the platonic-representation code (Huh et al. 2024) and
docs/formulas.md section 6. Rows are L2-normalised first, everything in float64.

The command compares, for every generator snapshot and discriminator given:
  generator condition vectors  vs  each discriminator's class centres   (the paper's ~0.35)
  discriminator                vs  discriminator                         (the paper's ~0.95)
and a permutation null (the rows of one space shuffled: mean +- std over --permutations).

    python cka.py --generator RUN/network-snapshot-*.pt --fr BASE/model.pt --data DATA/train \
        --out cka.json
"""
import argparse
import json
import os
import re

import numpy as np
import torch

from common import (ArgumentParser, DataError, InputError, check_finite, fail, load_checkpoint,
                    non_negative_int, open_datasets, output_file_guard, positive_int, write_atomic)
from train_arcface import class_centres, load_backbone
from train_diffusion import condition_vectors, load_generator


def as_float64(X):
    X = X.detach().cpu().numpy() if hasattr(X, "detach") else np.asarray(X)
    return X.astype(np.float64)


def l2_normalise(X):
    X = as_float64(X)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def hsic_biased(K, L):
    n = K.shape[0]
    H = np.eye(n) - 1.0 / n
    return np.trace(K @ H @ L @ H)


def hsic_unbiased(K, L):
    """Song et al. 2012, eq. 5: an unbiased HSIC estimator from kernels with zeroed diagonals."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    value = (
        np.sum(K * L.T) + K.sum() * L.sum() / ((n - 1) * (n - 2)) - 2 * np.sum(K @ L) / (n - 2))
    return value / (n * (n - 3))


def _cka(X, Y, hsic):
    X, Y = as_float64(X), as_float64(Y)
    K, L = X @ X.T, Y @ Y.T
    return float(hsic(K, L) / (np.sqrt(hsic(K, K) * hsic(L, L)) + 1e-6))


def linear_cka(X, Y):
    return _cka(X, Y, hsic_biased)


def unbiased_cka(X, Y):
    return _cka(X, Y, hsic_unbiased)


def knn_mask(K, k):
    """M[i, j] = 1 where j is among the k rows with the largest inner product with row i (self
    excluded)."""
    K = K.copy()
    np.fill_diagonal(K, -np.inf)
    idx = np.argsort(-K, axis=1, kind="stable")[:, :k]
    M = np.zeros_like(K)
    np.put_along_axis(M, idx, 1.0, axis=1)
    return M


def cknna(X, Y, k):
    """CKNNA (Huh et al. 2024): unbiased HSIC restricted to pairs that are mutual k-nearest
    neighbours in both spaces (row-wise masks, not symmetrised). k = n-1 gives unbiased CKA."""
    X, Y = as_float64(X), as_float64(Y)
    K, L = X @ X.T, Y @ Y.T

    def masked_hsic(K, L):
        M = knn_mask(K, k) * knn_mask(L, k)
        return hsic_unbiased(M * K, M * L)

    return float(masked_hsic(K, L) / (np.sqrt(masked_hsic(K, K) * masked_hsic(L, L)) + 1e-6))


def mutual_knn(X, Y, k):
    """Mean over rows of |kNN_X(i) & kNN_Y(i)| / k."""
    X, Y = as_float64(X), as_float64(Y)
    return float(np.mean((knn_mask(X @ X.T, k) * knn_mask(Y @ Y.T, k)).sum(axis=1) / k))


# ----------------------------------------------------------------------------------------------
# Command line: condition space vs embedding space, discriminator vs discriminator, permutation null

def alignment(X, Y, k):
    X, Y = l2_normalise(X), l2_normalise(Y)
    return {"cka": linear_cka(X, Y), "unbiased_cka": unbiased_cka(X, Y), "cknna": cknna(X, Y, k),
            "mutual_knn": mutual_knn(X, Y, k)}


def permutation_null(X, Y, k, permutations, seed=0):
    """The same metrics with the rows of Y shuffled (class pairing destroyed): mean and std."""
    rng = np.random.default_rng(seed)
    runs = [alignment(X, as_float64(Y)[rng.permutation(len(Y))], k) for _ in range(permutations)]
    return {m: {"mean": float(np.mean([r[m] for r in runs])),
                "std": float(np.std([r[m] for r in runs]))}
            for m in runs[0]}


def snapshot_kimg(path):
    m = re.search(r"(\d+)\.pt$", os.path.basename(path))
    return int(m.group(1)) if m else None


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--generator", nargs="*", default=[], metavar="SNAPSHOT.pt",
                        help="generator snapshots (their learned class-condition vectors)")
    parser.add_argument("--fr", nargs="+", required=True, metavar="MODEL.pt",
                        help="discriminators (model.pt)")
    parser.add_argument("--data", required=True,
                        help="the labelled training images the class centres come from")
    parser.add_argument("--out", required=True, help="JSON output")
    parser.add_argument("--k", type=positive_int, default=10,
                        help="neighbours for CKNNA and mutual kNN")
    parser.add_argument("--permutations", type=positive_int, default=20,
                        help="row shuffles for the null")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="embedding batch size")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the permutation null")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda")
    args = parser.parse_args(argv)
    for path in args.generator + args.fr + [args.data]:
        if not os.path.exists(path):
            parser.error(f"not found: {path}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        with output_file_guard(args.out):
            compare(args)
    except (InputError, DataError, ValueError, OSError, RuntimeError) as e:
        fail(e)


def discriminator_centres(args, dataset):
    """{run name: class centres [C, d]} of every --fr, each model and its centres finite."""
    centres = {}
    for path in args.fr:
        model = load_checkpoint(load_backbone, path, "train_arcface.py model.pt")
        model = model.to(args.device)
        check_finite(f"the discriminator {path}", model.state_dict())
        label = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        centres[label] = class_centres(model, dataset, batch_size=args.batch_size,
                                       device=args.device)
        check_finite(f"the class centres under {path}", centres[label])
    return centres


def generator_vectors(path, names):
    """The generator's condition vectors [C, d] in the order of `names`, finite."""
    net = load_checkpoint(load_generator, path, "train_diffusion.py network snapshot")
    check_finite(f"the generator {path}", net.state_dict())
    index = {c: i for i, c in enumerate(net.class_names)}
    missing = [c for c in names if c not in index]
    if missing:
        raise InputError(f"{path}: the generator has no class named {missing[0]} "
                         f"(of {len(missing)} missing)")
    cond = condition_vectors(net).detach().cpu().numpy()[[index[c] for c in names]]
    check_finite(f"the condition vectors of {path}", cond)
    return cond


def compare(args):
    """Every comparison of the module docstring -> the printed table and --out (finite values
    only)."""
    dataset = open_datasets([args.data])
    names = list(dataset.classes)
    if len(names) < 4:  # the unbiased HSIC divides by n - 3
        raise InputError(
            f"--data {args.data} has {len(names)} classes; the metrics need at least 4")
    if args.k >= len(names):  # a row has only n - 1 neighbours; a larger k would count itself
        print(f"note: --k {args.k} with {len(names)} classes; using k = {len(names) - 1}")
        args.k = len(names) - 1
    centres = discriminator_centres(args, dataset)
    rows, result = [], {"k": args.k, "permutations": args.permutations, "classes": len(names),
                        "pairs": []}

    def add(kind, a, b, X, Y, kimg=None):
        entry = {"kind": kind, "a": a, "b": b, "kimg": kimg, **alignment(X, Y, args.k),
                 "null": permutation_null(X, Y, args.k, args.permutations, args.seed)}
        result["pairs"].append(entry)
        rows.append(entry)

    for path in args.generator:
        cond = generator_vectors(path, names)
        for label, C in centres.items():
            add("condition vs embedding", os.path.basename(path), label, cond, C,
                snapshot_kimg(path))
    labels = list(centres)
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            add("embedding vs embedding", labels[i], labels[j], centres[labels[i]],
                centres[labels[j]])
    for r in rows:
        check_finite(f"the {r['kind']} metrics of {r['a']} and {r['b']}",
                     [r[m] for m in ("cka", "unbiased_cka", "cknna", "mutual_knn")])

    print(f"| comparison | a | b | kimg | CKA | unbiased CKA | CKNNA (k={args.k}) | mutual kNN | "
          "null CKA | null CKNNA |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["null"]
        print(f"| {r['kind']} | {r['a']} | {r['b']} | {'' if r['kimg'] is None else r['kimg']} | "
              f"{r['cka']:.3f} | "
              f"{r['unbiased_cka']:.3f} | {r['cknna']:.3f} | {r['mutual_knn']:.3f} | "
              f"{n['cka']['mean']:.3f} +- {n['cka']['std']:.3f} | {n['cknna']['mean']:.3f} +- "
              f"{n['cknna']['std']:.3f} |")
    write_atomic(args.out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
