"""Select the identity pairs (or triplets) that ScoreMix mixes (Rahimi & Marcel, arXiv 2506.10226).

Each class is a vector: its class centre under the discriminator (`--space embedding`, the mean of
the L2-normalised embeddings of its training images, re-normalised) or the generator's learned class
embedding (`--space condition`). Classes are compared by the cosine distance d(A, B) = 1 - cos(A,
B). The paper's best rule mixes the most distant classes ("dist"); "close" takes the nearest ones
and "random" any. Triplets (--tuple-size 3) are ranked by d(A,B) + d(A,C) + d(B,C): the paper's "Sum
Max" (dist) and "Sum Min" (close).

Pairing rule (deterministic for a seed): the candidate tuples are ranked by the strategy's score
(farthest first, closest first, or a seeded shuffle), ties in a seeded random order; a greedy pass
takes them in that order and accepts one only if none of its classes has been used --max-uses times
yet (default: the smallest cap that can give --num-pairs tuples, ceil(P * tuple size / C)), so the
new identities spread over many parents. If the cap leaves too few tuples, it is raised by one and
the pass goes on over the tuples not yet taken (the summary says so). Candidates: every pair; every
triplet for up to 200 classes; above that, for dist/close the triplets {a, b, c} with b and c among
the 16 farthest/nearest classes of a (every class anchors 120 of them), for random a seeded uniform
sample of max(20 P, 100000) distinct triplets.

Many classes (10^5-10^6): class centres come from one streaming pass over the images. When the full
C x C path would pass --max-matrix-gb, distances are computed block by block (on the GPU when there
is one) and never stored whole. Pairs (dist/close) start from each class's 32 best partners; a class
whose list runs out while the greedy pass could still give it a pair gets a 4x longer list and the
pass is re-run, so the result is the full matrix's (up to float rounding of the distances and the
seeded order among exactly equal ones). Triplets use the neighbourhoods above, as with the full
matrix; random pairs come from a seeded sample of max(20 P, 100000) pairs, as random triplets do.

    python select_pairs.py --fr runs/baseline/model.pt --data toy/train --out runs/pairs.csv
    python select_pairs.py --space condition --generator runs/gen/network-snapshot-000150.pt \
        --out pairs.csv

pairs.csv: class_a, class_b[, class_c] (identity folder names), distance (pairs) or distance_ab,
distance_ac, distance_bc, distance_sum (triplets), rank (1 = chosen first). It is written
atomically, only when every class vector and distance is finite, by one process at a time (a lock
file .<name>.lock beside it for the run).
"""
import argparse
import csv
import io
import itertools
import math
import os

import numpy as np
import torch

from common import (ArgumentParser, DataError, InputError, check_finite, fail, load_checkpoint,
                    non_negative_float, non_negative_int, open_datasets, output_file_guard,
                    positive_int, write_atomic)
from train_arcface import class_centres, load_backbone
from train_diffusion import condition_vectors, load_generator

STRATEGIES = ("dist", "close", "random")
EXACT_TRIPLETS = 200  # up to this many classes every triplet is a candidate (C(200, 3) = 1.3M)
TRIPLET_PARTNERS = 16  # above it: triplets inside each class's 16 best partners
PAIR_PARTNERS = 32  # blockwise pairs: each class's first partner list
# peak bytes per C^2 of the full path (matrix, every pair a candidate): 31-34 measured
FULL_PATH_BYTES = 34

# -------------------------------------------------------------------------- distances and selection


def cosine_distances(X):
    """Rows [C, d] (numpy or torch) -> [C, C] cosine distances 1 - cos between the L2-normalised
    rows."""
    X = np.asarray(X)
    X = X.astype(np.result_type(X.dtype, np.float32))
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    dist = np.clip(1 - X @ X.T, 0, 2)
    np.fill_diagonal(dist, 0)
    return dist


def tuple_distances(dist, tuples):
    """[P, k] class indices -> [P, k(k-1)/2] pairwise distances, in the order ab (k=2) or ab, ac, bc
    (k=3)."""
    tuples = np.asarray(tuples)
    pairs = itertools.combinations(range(tuples.shape[1]), 2)
    return np.stack([dist[tuples[:, i], tuples[:, j]] for i, j in pairs], 1)


def random_tuples(C, k, n, rng):
    """A seeded uniform sample of up to n distinct k-tuples of C classes (sorted rows)."""
    cand = np.sort(rng.integers(0, C, size=(int(1.2 * n) + 100, k)), 1)
    cand = np.unique(cand[(np.diff(cand, axis=1) > 0).all(1)], axis=0)
    return cand[rng.permutation(len(cand))[:n]]


def neighbourhood_triplets(partners):
    """partners [C, m] -> the distinct triplets {a, b, c} with b and c among a's partners (sorted
    rows)."""
    C, m = partners.shape
    b, c = np.triu_indices(m, 1)
    cand = np.stack(
        [np.repeat(np.arange(C), len(b)), partners[:, b].ravel(), partners[:, c].ravel()], 1)
    return np.unique(np.sort(cand, 1), axis=0)


def candidate_tuples(dist, strategy, tuple_size, num, seed):
    """The candidate tuples [N, k] (sorted class indices, distinct rows) and their distance sums
    [N]."""
    C, rng = len(dist), np.random.default_rng([seed, 1])
    if tuple_size == 2:
        cand = np.stack([i.astype(np.int32) for i in np.triu_indices(C, 1)], 1)
    elif C <= EXACT_TRIPLETS:
        flat = itertools.chain.from_iterable(itertools.combinations(range(C), 3))
        cand = np.fromiter(flat, dtype=np.int64, count=3 * math.comb(C, 3)).reshape(-1, 3)
    elif strategy == "random":
        cand = random_tuples(C, 3, max(20 * num, 100000), rng)
    # triplets inside each class's neighbourhood: its m farthest (dist) or nearest (close) classes
    else:
        m = TRIPLET_PARTNERS
        partners = np.empty((C, m), dtype=np.int64)
        for s in range(0, C, 1024):  # row blocks bound the memory of argpartition
            key = -dist[s:s + 1024] if strategy == "dist" else dist[s:s + 1024].copy()
            key[np.arange(len(key)), np.arange(s, s + len(key))] = np.inf  # never its own partner
            partners[s:s + len(key)] = np.argpartition(key, m - 1, axis=1)[:, :m]
        cand = neighbourhood_triplets(partners)
    return cand, tuple_distances(dist, cand).sum(1)


def ranked_blocks(key, tie, alive, block=4096):
    """Candidate indices by ascending `key`, equal keys by ascending `tie`, in blocks of growing
    size.

    Before each block, the candidates that `alive(indices) -> bool mask` rejects are dropped (a
    class at its cap stays there) and a partition finds the block among the rest (with every
    candidate tied with its last one): the greedy pass never sorts all of millions of candidates."""
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


def check_request(C, strategy, num, tuple_size):
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if tuple_size not in (2, 3):
        raise ValueError(f"tuple size must be 2 or 3, got {tuple_size}")
    if num < 1 or num > math.comb(C, tuple_size):
        raise ValueError(f"cannot choose {num} distinct "
                         f"{'pairs' if tuple_size == 2 else 'triplets'} "
                         f"from {C} classes (at most {math.comb(C, tuple_size)})")


def greedy(cand, key, tie, C, num, cap, last_cap=None):
    """The capped greedy pass (module docstring) over candidates ranked by (key, tie), the cap
    raised by one for each pass that falls short, up to last_cap (None: until num tuples, else
    ValueError).
    -> (chosen candidate indices in order, final cap, index in `chosen` where each pass began)."""
    uses, taken, chosen, starts = (np.zeros(C, dtype=np.int64), np.zeros(len(cand), dtype=bool), [],
                                   [0])
    columns = [np.ascontiguousarray(cand[:, j]) for j in range(cand.shape[1])]

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
                            return np.asarray(chosen, dtype=np.int64), cap, starts
        if last_cap is not None and cap >= last_cap:
            return np.asarray(chosen, dtype=np.int64), cap, starts
        if cap >= num:
            raise ValueError(f"only {len(chosen)} candidate tuples exist; asked for {num}")
        cap += 1
        starts.append(len(chosen))


def select_tuples(dist, strategy="dist", num=None, tuple_size=2, max_uses=None, seed=0):
    """Greedy capped selection (module docstring) -> (tuples int [num, k] in the order chosen, final
    cap).

    `dist` is a [C, C] distance matrix; `num` defaults to C; `max_uses` to ceil(num * k / C)."""
    dist = np.asarray(dist)
    C = len(dist)
    num = C if num is None else int(num)
    check_request(C, strategy, num, tuple_size)
    cand, total = candidate_tuples(dist, strategy, tuple_size, num, seed)
    tie = np.random.default_rng([seed, 2]).random(len(cand))  # a seeded order among equal scores
    key = {"dist": -total, "close": total, "random": tie}[strategy]
    chosen, cap, _ = greedy(cand, key, tie, C, num, max_uses or math.ceil(num * tuple_size / C))
    return cand[chosen], cap

# --------------------------------------------------------------------- many classes: block by block


def full_path_bytes(C):
    return FULL_PATH_BYTES * C * C


def unit_rows(vectors, device="cpu"):
    """[C, d] -> L2-normalised rows as a torch tensor on `device` (cosine_distances' precision)."""
    X = torch.as_tensor(np.asarray(vectors))
    X = X.to(torch.promote_types(X.dtype, torch.float32))
    return (X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(device)


def pair_distances(X, a, b, chunk=1 << 16):
    """Cosine distances between rows a[i] and b[i] of unit rows X -> numpy [N]."""
    a, b = torch.as_tensor(a, device=X.device), torch.as_tensor(b, device=X.device)
    out = [(1 - (X[a[s:s + chunk]] * X[b[s:s + chunk]]).sum(1)).clamp(0, 2)
           for s in range(0, len(a), chunk)]
    return torch.cat(out).cpu().numpy() if out else np.zeros(0, dtype=np.float32)


def best_partners(X, rows, m, strategy, block_bytes):
    """Each class in `rows`: its m farthest (dist) or nearest (close) other classes, best first,
    from row blocks of X X^T of about block_bytes -> (indices [R, m], cosine similarities [R, m]) as
    numpy."""
    C, rows = len(X), torch.as_tensor(np.asarray(rows), dtype=torch.int64, device=X.device)
    # similarities, topk's copy and indices
    step, index, value = max(1, int(block_bytes) // (12 * C)), [], []
    for s in range(0, len(rows), step):
        r = rows[s:s + step]
        sim = X[r] @ X.T
        sim[torch.arange(len(r), device=X.device),
            r] = math.inf if strategy == "dist" else -math.inf  # not itself
        top = sim.topk(m, dim=1, largest=strategy == "close")
        index.append(top.indices.cpu())
        value.append(top.values.cpu())
    return torch.cat(index).numpy(), torch.cat(value).numpy()


def open_past_list(tuples, keys, starts, cap, complete, thr):
    """Classes whose partner list ran out (pairs past it rank after thr[c]) while a pass could still
    give them a pair: not at the cap yet and the pass not over. Only these can make the greedy pass
    over every pair differ from the pass over the listed ones; others are exact."""
    C = len(thr)
    uses, flagged, bounds = (np.zeros(C, dtype=np.int64), np.zeros(C, dtype=bool),
                             list(starts) + [len(tuples)])
    for p in range(len(starts)):
        cls = tuples[bounds[p]:bounds[p + 1]].ravel()
        at = np.repeat(keys[bounds[p]:bounds[p + 1]], tuples.shape[1])
        closed = np.full(C, np.inf)  # the key at which a class reached this pass's cap
        order = np.argsort(cls, kind="stable")
        c = cls[order]
        nth = np.arange(len(c)) - np.searchsorted(c, c) + 1  # the n-th use of class c in this pass
        hit = nth == cap - len(starts) + 1 + p - uses[c]
        closed[c[hit]] = at[order][hit]
        uses += np.bincount(cls, minlength=C)
        if p == len(starts) - 1 and complete:
            closed = np.minimum(closed, keys[-1])
        flagged |= np.isfinite(thr) & (thr <= closed)
    return flagged


def select_blockwise(vectors, strategy="dist", num=None, tuple_size=2, max_uses=None, seed=0,
                     block_bytes=2 ** 30, device="cpu", partners=PAIR_PARTNERS):
    """select_tuples without the C x C matrix (module docstring): distances from row blocks of about
    block_bytes on `device`. -> (tuples [num, k], final cap, their pairwise distances [num,
    k(k-1)/2])."""
    X = unit_rows(vectors, device)
    C, k = len(X), tuple_size
    num = C if num is None else int(num)
    check_request(C, strategy, num, k)
    cap0, rng = max_uses or math.ceil(num * k / C), np.random.default_rng([seed, 1])

    def distances(cand):
        return np.stack([pair_distances(X, cand[:, i], cand[:, j])
                         for i, j in itertools.combinations(range(k), 2)], 1)

    # the same candidates as the full matrix's (k = 3), or a sample
    if k == 3 or strategy == "random":
        if strategy == "random":
            cand = random_tuples(C, k, max(20 * num, 100000), rng)
        else:
            cand = neighbourhood_triplets(
                best_partners(X, np.arange(C), TRIPLET_PARTNERS, strategy, block_bytes)[0])
        d = distances(cand)
        tie = np.random.default_rng([seed, 2]).random(len(cand))
        key = {"dist": -d.sum(1), "close": d.sum(1), "random": tie}[strategy]
        chosen, cap, _ = greedy(cand, key, tie, C, num, cap0)
        return cand[chosen], cap, d[chosen]

    sign = -1 if strategy == "dist" else 1  # key: ascending = chosen first
    # rounding bound of a d-term dot product of unit vectors
    eps = X.shape[1] * torch.finfo(X.dtype).eps
    m0 = min(partners, C - 1)
    first = best_partners(X, np.arange(C), m0, strategy, block_bytes)
    # class -> (indices, similarities): the lists grown for the classes that outran theirs
    longer = {}
    last_cap = cap0
    while True:
        a = np.concatenate(
            [np.repeat(np.arange(C), m0)] + [np.full(len(i), c) for c, (i, _) in longer.items()])
        b = np.concatenate([first[0].ravel()] + [i for i, _ in longer.values()])
        sim = np.concatenate([first[1].ravel()] + [v for _, v in longer.values()])
        code = np.minimum(a, b) * C + np.maximum(a, b)
        order = np.argsort(code, kind="stable")
        code, sim = code[order], sim[order]
        # each pair once (it may be in both classes' lists)
        once = np.r_[True, code[1:] != code[:-1]]
        cand, key = (np.stack([code[once] // C, code[once] % C], 1),
                     sign * np.clip(1 - sim[once], 0, 2))
        ends, length = first[1][:, -1].copy(), np.full(C, m0)
        for c, (i, v) in longer.items():
            ends[c], length[c] = v[-1], len(i)
        # every unlisted pair of class c ranks after thr[c]
        thr = sign * np.clip(1 - ends, 0, 2) - eps
        thr[length == C - 1] = np.inf
        tie = np.random.default_rng([seed, 2]).random(len(cand))
        chosen, cap, starts = greedy(cand, key, tie, C, num, cap0, last_cap)
        flagged = open_past_list(cand[chosen], key[chosen], starts, cap, len(chosen) == num, thr)
        if flagged.any():  # 4x longer lists for these classes, then the pass again
            grown = np.minimum(4 * length[flagged], C - 1)
            for m in np.unique(grown):
                rows = np.flatnonzero(flagged)[grown == m]
                index, value = best_partners(X, rows, int(m), strategy, block_bytes)
                longer.update((c, (i, v)) for c, i, v in zip(rows.tolist(), index, value))
        elif len(chosen) == num:
            return cand[chosen], cap, sign * key[chosen][:, None]
        elif cap >= num:
            raise ValueError(f"only {len(chosen)} candidate tuples exist; asked for {num}")
        else:  # the full matrix's pass falls short too: raise the cap, as select_tuples does
            last_cap = cap + 1

# ----------------------------------------------------------------------------- class vectors


def reorder_rows(vectors, names, target):
    """Rows of `vectors` named `names` -> reordered to `target`; ValueError if the name sets
    differ."""
    missing, extra = sorted(set(target) - set(names)), sorted(set(names) - set(target))
    if missing or extra or len(names) != len(target):
        raise ValueError(f"the generator's class names do not match --data's ({len(missing)} "
                         "missing from the "
                         f"generator, e.g. {missing[:3]}; {len(extra)} not in --data, e.g. "
                         f"{extra[:3]})")
    index = {n: i for i, n in enumerate(names)}
    return vectors[[index[n] for n in target]]


def class_vectors(args):
    """(vectors [C, d] numpy, class names) for --space embedding or condition."""
    if args.space == "embedding":
        dataset = open_datasets(args.data)
        model = load_checkpoint(load_backbone, args.fr, "train_arcface.py model.pt").to(args.device)
        check_finite(f"the discriminator {args.fr}", model.state_dict())
        print(f"class centres of {len(dataset.classes)} classes ({len(dataset)} images) under "
              f"{args.fr}")
        centres = class_centres(model, dataset, batch_size=args.batch_size, device=args.device,
                                workers=args.workers)
        check_finite(f"the class centres under {args.fr}", centres)
        return centres, list(dataset.classes)
    net = load_checkpoint(load_generator, args.generator, "train_diffusion.py network snapshot")
    check_finite(f"the generator {args.generator}", net.state_dict())
    vectors, names = condition_vectors(net).cpu().numpy(), list(net.class_names)
    check_finite(f"the condition vectors of {args.generator}", vectors)
    if args.data:  # rows in the order of the real set's classes
        target = list(open_datasets(args.data).classes)
        vectors, names = reorder_rows(vectors, names, target), target
    print(f"condition vectors of {len(names)} classes from {args.generator}")
    return vectors, names

# ----------------------------------------------------------------------------- main


def write_pairs(path, names, tuples, d):
    """pairs.csv (module docstring), written atomically; d: the tuples' pairwise distances [P,
    k(k-1)/2]."""
    k = tuples.shape[1]
    cols = ["distance"] if k == 2 else ["distance_ab", "distance_ac", "distance_bc", "distance_sum"]
    if k == 3:
        d = np.concatenate([d, d.sum(1, keepdims=True)], 1)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class_a", "class_b", "class_c"][:k] + cols + ["rank"])
    for r, (t, row) in enumerate(zip(tuples, d), 1):
        w.writerow([names[c] for c in t] + [f"{v:.6f}" for v in row] + [r])
    write_atomic(path, buf.getvalue())


def summary(d, tuples, C, allp, cap, initial_cap, sampled=False):
    """Printed lines: chosen (pairwise distances d) vs all-pairs distances `allp` (or a sample),
    class coverage and uses."""
    k = tuples.shape[1]
    mine = d.mean(1)  # a triplet's mean pairwise distance, comparable with pairs
    uses = np.bincount(tuples.ravel(), minlength=C)
    what = "distance" if k == 2 else "mean pairwise distance"
    which = (f"a sample of {len(allp)} of the {math.comb(C, 2)} pairs" if sampled
             else f"all {len(allp)} pairs")
    lines = [f"chosen {len(tuples)} {'pairs' if k == 2 else 'triplets'}: {what} mean "
             f"{mine.mean():.4f} "
             f"min {mine.min():.4f} max {mine.max():.4f}",
             f"{which}: distance mean {allp.mean():.4f} min {allp.min():.4f} max {allp.max():.4f} "
             f"p10 {np.percentile(allp, 10):.4f} p90 {np.percentile(allp, 90):.4f}",
             f"classes used: {int((uses > 0).sum())} of {C}; max uses per class {uses.max()} (cap "
             f"{cap})"]
    if cap > initial_cap:
        lines.insert(
            0, f"note: a cap of {initial_cap} uses per class left too few tuples; raised to {cap}")
    return lines


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[2],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--fr", metavar="RUN/model.pt",
      help="discriminator checkpoint (needed for --space embedding)")
    a("--data", nargs="+", metavar="SRC",
      help="the real training set (image folders / train.rec) naming the classes; needed for "
           "--space embedding, optional for condition")
    a("--out", required=True, metavar="pairs.csv", help="output CSV")
    a("--space", choices=["embedding", "condition"], default="embedding",
      help="embedding: discriminator class centres; condition: the generator's class embeddings")
    a("--generator", metavar="SNAPSHOT.pt",
      help="generator snapshot (needed for --space condition)")
    a("--strategy", choices=STRATEGIES, default="dist",
      help="dist: farthest first (triplets: Sum Max); close: closest first (Sum Min); random: "
           "seeded shuffle")
    a("--num-pairs", type=positive_int, help="tuples to select (None: the number of classes)")
    a("--tuple-size", type=int, choices=[2, 3], default=2, help="2: pairs; 3: triplets")
    a("--max-uses", type=positive_int,
      help="start cap on tuples per class, raised if it leaves too few (None: ceil(num-pairs * "
           "tuple-size / classes))")
    a("--seed", type=non_negative_int, default=0,
      help="seed of the tie order and of --strategy random")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu",
      help="torch device for the embeddings")
    a("--batch-size", type=positive_int, default=256, help="images per forward pass")
    a("--workers", type=non_negative_int, default=0,
      help="DataLoader workers decoding images for the class centres")
    a("--max-matrix-gb", type=non_negative_float, default=4.0,
      help=f"memory budget: the full C x C path (about {FULL_PATH_BYTES} bytes per C^2) when it "
           "fits, else "
           "distances block by block in blocks of this size")
    args = p.parse_args(argv)
    if args.space == "embedding" and not (args.fr and args.data):
        p.error("--space embedding needs --fr RUN/model.pt and --data SRC")
    if args.space == "condition" and not args.generator:
        p.error("--space condition needs --generator SNAPSHOT.pt")
    for f in [args.fr if args.space == "embedding" else None, args.generator]:
        if f and not os.path.isfile(f):
            p.error(
                f"{f} is a folder, not a checkpoint" if os.path.isdir(f) else f"no such file: {f}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:  # a single-process stage
        return
    try:
        with output_file_guard(args.out):
            select(args)
    except (InputError, DataError, ValueError, OSError, RuntimeError) as e:
        fail(e)


def select(args):
    """Class vectors -> pairs.csv (finite distances only) and the printed summary."""
    vectors, names = class_vectors(args)
    C, budget = len(names), args.max_matrix_gb * 2 ** 30
    num = C if args.num_pairs is None else args.num_pairs
    initial_cap = args.max_uses or math.ceil(num * args.tuple_size / C)
    # (exact triplets)
    if full_path_bytes(C) <= budget or args.tuple_size == 3 and C <= EXACT_TRIPLETS:
        dist = cosine_distances(vectors)
        tuples, cap = select_tuples(dist, args.strategy, num, args.tuple_size, args.max_uses,
                                    args.seed)
        d, allp = tuple_distances(dist, tuples), dist[np.triu_indices(C, 1)]
    else:
        print(f"{C} classes: the full matrix path would need ~{full_path_bytes(C) / 2 ** 30:.0f} "
              f"GiB (--max-matrix-gb {args.max_matrix_gb:g}); distances block by block on "
              f"{args.device}")
        tuples, cap, d = select_blockwise(vectors, args.strategy, num, args.tuple_size,
                                          args.max_uses, args.seed, budget, args.device)
        sample = random_tuples(C, 2, 10 ** 6, np.random.default_rng([args.seed, 3]))
        allp = pair_distances(unit_rows(vectors, args.device), sample[:, 0], sample[:, 1])
    source = args.fr if args.space == "embedding" else args.generator
    check_finite(f"the distances from {source}", [d, allp])
    write_pairs(args.out, names, tuples, d)
    print("\n".join(summary(d, tuples, C, allp, cap, initial_cap,
                            sampled=len(allp) < math.comb(C, 2))))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
