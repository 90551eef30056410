"""Select the identity pairs (or triplets) that ScoreMix mixes (Rahimi & Marcel, arXiv 2506.10226).

Each class is a vector: its class centre under the discriminator (`--space embedding`, the mean of
the L2-normalised embeddings of its training images, re-normalised) or the generator's learned class
embedding (`--space condition`). Classes are compared by the cosine distance d(A, B) = 1 - cos(A, B).
The paper's best rule mixes the most distant classes ("dist"); "close" takes the nearest ones and
"random" any. Triplets (--tuple-size 3) are ranked by d(A,B) + d(A,C) + d(B,C): the paper's
"Sum Max" (dist) and "Sum Min" (close).

Pairing rule (deterministic for a seed): the candidate tuples are ranked by the strategy's score
(farthest first, closest first, or a seeded shuffle), ties in a seeded random order; a greedy pass
takes them in that order and accepts one only if none of its classes has been used --max-uses times
yet (default: the smallest cap that can give --num-pairs tuples, ceil(P * tuple size / C)), so the
new identities spread over many parents. If the cap leaves too few tuples, it is raised by one and
the pass goes on over the tuples not yet taken (the summary says so). Candidates: every pair; every
triplet for up to 200 classes; above that, for dist/close the triplets {a, b, c} with b and c among
the 16 farthest/nearest classes of a (every class anchors 120 of them), for random a seeded uniform
sample of max(20 P, 100000) distinct triplets.

    python select_pairs.py --fr runs/baseline/model.pt --data toy/train --out runs/pairs.csv
    python select_pairs.py --space condition --generator runs/gen/network-snapshot-000150.pt --out pairs.csv

pairs.csv: class_a, class_b[, class_c] (identity folder names), distance (pairs) or distance_ab,
distance_ac, distance_bc, distance_sum (triplets), rank (1 = chosen first).
"""
import argparse
import csv
import io
import itertools
import math
import os
import pickle
import sys

import numpy as np
import torch

from evaluate import class_centres
from train_arcface import DataError, load_backbone, open_datasets, write_text_atomic
from train_diffusion import condition_vectors, load_generator

STRATEGIES = ("dist", "close", "random")
EXACT_TRIPLETS = 200  # up to this many classes every triplet is a candidate (C(200, 3) = 1.3M)
TRIPLET_PARTNERS = 16  # above it: triplets inside each class's 16 best partners

# ----------------------------------------------------------------------------- distances and selection


def cosine_distances(X):
    """Rows [C, d] (numpy or torch) -> [C, C] cosine distances 1 - cos between the L2-normalised rows."""
    X = np.asarray(X)
    X = X.astype(np.result_type(X.dtype, np.float32))
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    dist = np.clip(1 - X @ X.T, 0, 2)
    np.fill_diagonal(dist, 0)
    return dist


def tuple_distances(dist, tuples):
    """[P, k] class indices -> [P, k(k-1)/2] pairwise distances, in the order ab (k=2) or ab, ac, bc (k=3)."""
    tuples = np.asarray(tuples)
    pairs = itertools.combinations(range(tuples.shape[1]), 2)
    return np.stack([dist[tuples[:, i], tuples[:, j]] for i, j in pairs], 1)


def candidate_tuples(dist, strategy, tuple_size, num, seed):
    """The candidate tuples [N, k] (sorted class indices, distinct rows) and their distance sums [N]."""
    C, rng = len(dist), np.random.default_rng([seed, 1])
    if tuple_size == 2:
        cand = np.stack([i.astype(np.int32) for i in np.triu_indices(C, 1)], 1)
    elif C <= EXACT_TRIPLETS:
        flat = itertools.chain.from_iterable(itertools.combinations(range(C), 3))
        cand = np.fromiter(flat, dtype=np.int64, count=3 * math.comb(C, 3)).reshape(-1, 3)
    elif strategy == "random":  # a uniform sample of distinct triplets
        n = max(20 * num, 100000)
        cand = np.sort(rng.integers(0, C, size=(int(1.2 * n) + 100, 3)), 1)
        cand = np.unique(cand[(cand[:, 0] < cand[:, 1]) & (cand[:, 1] < cand[:, 2])], axis=0)
        cand = cand[rng.permutation(len(cand))[:n]]
    else:  # triplets inside each class's neighbourhood: its m farthest (dist) or nearest (close) classes
        m = TRIPLET_PARTNERS
        partners = np.empty((C, m), dtype=np.int64)
        for s in range(0, C, 1024):  # row blocks bound the memory of argpartition
            key = -dist[s:s + 1024] if strategy == "dist" else dist[s:s + 1024].copy()
            key[np.arange(len(key)), np.arange(s, s + len(key))] = np.inf  # never its own partner
            partners[s:s + len(key)] = np.argpartition(key, m - 1, axis=1)[:, :m]
        b, c = np.triu_indices(m, 1)
        cand = np.stack([np.repeat(np.arange(C), len(b)), partners[:, b].ravel(), partners[:, c].ravel()], 1)
        cand = np.unique(np.sort(cand, 1), axis=0)
    return cand, tuple_distances(dist, cand).sum(1)


def ranked_blocks(key, tie, alive, block=4096):
    """Candidate indices by ascending `key`, equal keys by ascending `tie`, in blocks of growing size.

    Before each block, the candidates that `alive(indices) -> bool mask` rejects are dropped (a class
    at its cap stays there) and a partition finds the block among the rest (with every candidate tied
    with its last one): the greedy pass never sorts all of millions of candidates."""
    rest = np.arange(len(key))
    while len(rest):
        rest = rest[alive(rest)]
        if len(rest) > block:
            k = key[rest]
            head_mask = k <= np.partition(k, block - 1)[block - 1]
            head, rest = rest[head_mask], rest[~head_mask]
        else:
            head, rest = rest, rest[:0]
        yield head[np.lexsort((tie[head], key[head]))]
        block *= 4


def select_tuples(dist, strategy="dist", num=None, tuple_size=2, max_uses=None, seed=0):
    """Greedy capped selection (module docstring) -> (tuples int [num, k] in the order chosen, final cap).

    `dist` is a [C, C] distance matrix; `num` defaults to C; `max_uses` to ceil(num * k / C)."""
    dist = np.asarray(dist)
    C = len(dist)
    num = C if num is None else int(num)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if tuple_size not in (2, 3):
        raise ValueError(f"tuple size must be 2 or 3, got {tuple_size}")
    if num < 1 or num > math.comb(C, tuple_size):
        raise ValueError(f"cannot choose {num} distinct {'pairs' if tuple_size == 2 else 'triplets'} "
                         f"from {C} classes (at most {math.comb(C, tuple_size)})")
    cand, total = candidate_tuples(dist, strategy, tuple_size, num, seed)
    tie = np.random.default_rng([seed, 2]).random(len(cand))  # a seeded order among equal scores
    key = {"dist": -total, "close": total, "random": tie}[strategy]
    cap = max_uses or math.ceil(num * tuple_size / C)
    uses, taken, chosen = np.zeros(C, dtype=np.int64), np.zeros(len(cand), dtype=bool), []
    columns = [np.ascontiguousarray(cand[:, j]) for j in range(tuple_size)]

    def alive(idx):  # not taken yet, and no class at the cap
        ok, full = ~taken[idx], uses >= cap
        for col in columns:
            ok &= ~full[col[idx]]
        return ok

    while True:
        for block in ranked_blocks(key, tie, alive):
            for s in range(0, len(block), 4096):
                idx = block[s:s + 4096]
                idx = idx[alive(idx)]
                for i in idx:
                    t = cand[i]
                    if (uses[t] < cap).all():
                        uses[t] += 1
                        taken[i] = True
                        chosen.append(i)
                        if len(chosen) == num:
                            return cand[chosen], cap
        if cap >= num:
            raise ValueError(f"only {len(chosen)} candidate tuples exist; asked for {num}")
        cap += 1

# ----------------------------------------------------------------------------- class vectors


def reorder_rows(vectors, names, target):
    """Rows of `vectors` named `names` -> reordered to `target`; ValueError if the name sets differ."""
    missing, extra = sorted(set(target) - set(names)), sorted(set(names) - set(target))
    if missing or extra or len(names) != len(target):
        raise ValueError(f"the generator's class names do not match --data's ({len(missing)} missing from the "
                         f"generator, e.g. {missing[:3]}; {len(extra)} not in --data, e.g. {extra[:3]})")
    index = {n: i for i, n in enumerate(names)}
    return vectors[[index[n] for n in target]]


def load_checkpoint(loader, path, what):
    """loader(path), with a one-line ValueError for a file that is not such a checkpoint."""
    try:
        return loader(path)
    except (pickle.UnpicklingError, RuntimeError, KeyError, TypeError, EOFError) as e:
        raise ValueError(f"{path} is not a {what} ({type(e).__name__})") from None


def class_vectors(args):
    """(vectors [C, d] numpy, class names) for --space embedding or condition."""
    if args.space == "embedding":
        dataset = open_datasets(args.data)
        model = load_checkpoint(lambda p: load_backbone(p, args.device), args.fr, "train_arcface.py model.pt")
        print(f"class centres of {len(dataset.classes)} classes ({len(dataset)} images) under {args.fr}")
        return class_centres(model, dataset, batch_size=args.batch_size, device=args.device), list(dataset.classes)
    net = load_checkpoint(load_generator, args.generator, "train_diffusion.py network snapshot")
    vectors, names = condition_vectors(net).cpu().numpy(), list(net.class_names)
    if args.data:  # rows in the order of the real set's classes
        target = list(open_datasets(args.data).classes)
        vectors, names = reorder_rows(vectors, names, target), target
    print(f"condition vectors of {len(names)} classes from {args.generator}")
    return vectors, names

# ----------------------------------------------------------------------------- main


def write_pairs(path, names, tuples, dist):
    """pairs.csv (module docstring), written atomically."""
    k, d = tuples.shape[1], tuple_distances(dist, tuples)
    cols = ["distance"] if k == 2 else ["distance_ab", "distance_ac", "distance_bc", "distance_sum"]
    if k == 3:
        d = np.concatenate([d, d.sum(1, keepdims=True)], 1)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class_a", "class_b", "class_c"][:k] + cols + ["rank"])
    for r, (t, row) in enumerate(zip(tuples, d), 1):
        w.writerow([names[c] for c in t] + [f"{v:.6f}" for v in row] + [r])
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text_atomic(buf.getvalue(), path)


def summary(dist, tuples, cap, initial_cap):
    """Printed lines: chosen vs all-pairs distances, class coverage and uses."""
    C, k = len(dist), tuples.shape[1]
    allp = dist[np.triu_indices(C, 1)]
    mine = tuple_distances(dist, tuples).mean(1)  # a triplet's mean pairwise distance, comparable with pairs
    uses = np.bincount(tuples.ravel(), minlength=C)
    what = "distance" if k == 2 else "mean pairwise distance"
    lines = [f"chosen {len(tuples)} {'pairs' if k == 2 else 'triplets'}: {what} mean {mine.mean():.4f} "
             f"min {mine.min():.4f} max {mine.max():.4f}",
             f"all {len(allp)} pairs: distance mean {allp.mean():.4f} min {allp.min():.4f} max {allp.max():.4f} "
             f"p10 {np.percentile(allp, 10):.4f} p90 {np.percentile(allp, 90):.4f}",
             f"classes used: {int((uses > 0).sum())} of {C}; max uses per class {uses.max()} (cap {cap})"]
    if cap > initial_cap:
        lines.insert(0, f"note: a cap of {initial_cap} uses per class left too few tuples; raised to {cap}")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[2],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--fr", metavar="RUN/model.pt", help="discriminator checkpoint (needed for --space embedding)")
    a("--data", nargs="+", metavar="SRC", help="the real training set (image folders / train.rec) naming the "
                                               "classes; needed for --space embedding, optional for condition")
    a("--out", required=True, metavar="pairs.csv", help="output CSV")
    a("--space", choices=["embedding", "condition"], default="embedding",
      help="embedding: discriminator class centres; condition: the generator's class embeddings")
    a("--generator", metavar="SNAPSHOT.pt", help="generator snapshot (needed for --space condition)")
    a("--strategy", choices=STRATEGIES, default="dist",
      help="dist: farthest first (triplets: Sum Max); close: closest first (Sum Min); random: seeded shuffle")
    a("--num-pairs", type=int, help="tuples to select (None: the number of classes)")
    a("--tuple-size", type=int, choices=[2, 3], default=2, help="2: pairs; 3: triplets")
    a("--max-uses", type=int, help="start cap on tuples per class, raised if it leaves too few "
                                   "(None: ceil(num-pairs * tuple-size / classes))")
    a("--seed", type=int, default=0, help="seed of the tie order and of --strategy random")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device for the embeddings")
    a("--batch-size", type=int, default=256, help="images per forward pass")
    args = p.parse_args(argv)
    if args.space == "embedding" and not (args.fr and args.data):
        p.error("--space embedding needs --fr RUN/model.pt and --data SRC")
    if args.space == "condition" and not args.generator:
        p.error("--space condition needs --generator SNAPSHOT.pt")
    for f in [args.fr if args.space == "embedding" else None, args.generator]:
        if f and not os.path.isfile(f):
            p.error(f"no such file: {f}")
    if args.num_pairs is not None and args.num_pairs < 1 or args.max_uses is not None and args.max_uses < 1:
        p.error("--num-pairs and --max-uses must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:  # a single-process stage
        return
    try:
        vectors, names = class_vectors(args)
        dist = cosine_distances(vectors)
        num = len(names) if args.num_pairs is None else args.num_pairs
        initial_cap = args.max_uses or math.ceil(num * args.tuple_size / len(names))
        tuples, cap = select_tuples(dist, args.strategy, num, args.tuple_size, args.max_uses, args.seed)
    except (DataError, ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {str(e).strip().splitlines()[0]}")
    write_pairs(args.out, names, tuples, dist)
    print("\n".join(summary(dist, tuples, cap, initial_cap)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
