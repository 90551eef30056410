"""Evaluate face-recognition backbones: 1:1 verification, IJB-B/C TAR@FAR, rank-1 identification.

Verification (.bin, docs/formulas.md section 4): each LFW-style file is a pickle of (2N encoded
images, N booleans), pair i = images (2i, 2i+1). An image's embedding is f(x) + f(flip x),
L2-normalised; a pair's distance is the squared L2 distance (in [0, 4]). 10-fold accuracy:
thresholds np.arange(0, 4, 0.01), 10 contiguous unshuffled folds; each fold is scored at the
threshold that is best on the other nine (predict "same" when dist < thr, first maximum wins); we
report mean +- population std over the folds, and the pooled TAR at FAR 1e-3 / 1e-4
("pooled_tar_at_far_*": one ROC over all pairs' cosine scores; insightface's VAL@FAR sets a
threshold per fold instead).

IJB-B / IJB-C 1:1 (--ijb DIR): DIR/meta/<name>_face_tid_mid.txt (image template media),
DIR/meta/<name>_template_pair_label.txt (t1 t2 label), DIR/meta/<name>_name_5pts_score.txt (image x1
y1 ... x5 y5 score), images in DIR/loose_crop/. Faces are aligned by a 5-point similarity transform
(Umeyama) to the 112x112 ArcFace template; an image's feature is (f(x) + f(flip x)) * score; a
template's is the mean over each media's images, summed over media, L2-normalised; cosine scores;
TAR at the ROC point whose FAR is closest to 1e-6 ... 1e-1 (ties to the larger TAR; the ROC keeps
every distinct score as a threshold).

All-pairs 1:1 (--allpairs DIR, IJB-style at image level): every pair of the images in
DIR/<identity>/ is scored (cosine of f(x) + f(flip x)); same identity = genuine, otherwise impostor.
TAR@FAR 1e-3, 1e-4, 1e-5 at the threshold t = the (k+1)-th largest impostor score, k = floor(FAR *
impostor pairs), computed exactly in bounded memory (only the largest impostor scores are kept).

Rank-1 identification (--identification DIR, TinyFace-style):
    DIR/gallery/<identity>/*.png   labelled gallery images
    DIR/probe/<identity>/*.png     probes; identity names match the gallery's folder names
    DIR/distractor/*.png           optional: unlabelled images that join the gallery
A probe is a hit when its most similar gallery image (cosine) has the probe's identity.

Generator checks (--consistency): class centres (mean of L2-normalised embeddings, re-normalised) of
the real identity folders REAL_DIR/<identity>/; identity consistency = share of the images under
SAMPLES_DIR/<identity>/ (identities also in REAL_DIR) whose nearest centre is their own class;
cleanliness = mean absolute difference between neighbouring pixels (grey levels), samples over real;
identity spread = mean cosine of each image to its own folder's centre (intra) and mean cosine
between distinct folders' centres (inter), for real and generated identities alike (mixed identities
that are loose or alike teach the discriminator little); nearest real distance = mean RMS pixel
distance of each image to its nearest REAL_DIR image (fresh real renders give the figure of a
generator that does not copy its training set; a smaller one means copies).

Under torchrun only rank 0 works (evaluation is single-process).

    python evaluate.py --model RUN/model.pt [RUN2/model.pt ...] --bin FILE.bin ... --out r.json
    python evaluate.py --model RUN/model.pt --ijb IJB_C --identification tinyface --out r.json
    python evaluate.py --model RUN/model.pt --allpairs data/toy/allpairs --bin data/toy/bench/*.bin
    python evaluate.py --consistency SAMPLES_DIR [...] --data REAL_DIR --model RUN/model.pt \
        --out c.json
"""
import argparse
import csv
import glob
import io
import os
import pickle
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

from common import (PROGRESS, ArgumentParser, DataError, InputError, check_finite, decode_image,
                    fail, load_images, open_datasets, output_file_guard, pack_bin, positive_int,
                    resize_uint8, write_json)
from train_arcface import centres_of, embed, load_backbone

THRESHOLDS = np.arange(0, 4, 0.01)  # the reference's float values, e.g. 0.35000000000000003
BIN_FARS = (1e-3, 1e-4)
IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
ALLPAIRS_FARS = (1e-3, 1e-4, 1e-5)
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]])

# -----------------------------------------------------------------------------
# Metrics


def fold_slices(n, n_folds):
    """Contiguous unshuffled folds as sklearn's KFold(shuffle=False): the first n % k get one
    more."""
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    ends = np.cumsum(sizes)
    return [slice(e - s, e) for s, e in zip(sizes, ends)]


def verification_accuracy(embeddings, issame, n_folds=10):
    """Per-fold held-out accuracies of the 10-fold protocol on L2-normalised pair embeddings [2N,
    d].

    Vectorised over thresholds: per fold, the count of pairs with dist < thr comes from a
    searchsorted on the fold's sorted distances, so it equals the reference's threshold loop
    exactly.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if emb.ndim != 2 or emb.shape[0] != 2 * issame.size:
        raise ValueError(f"need embeddings [2N, d] for N = {issame.size} pairs, got {emb.shape}")
    if issame.size < n_folds:
        raise ValueError(f"{issame.size} pairs cannot make {n_folds} folds")
    norms = np.sqrt(np.einsum("ij,ij->i", emb, emb))
    # NaN rows (a diverged model) count as wrong
    if not np.allclose(norms[np.isfinite(norms)], 1.0, atol=1e-3):
        raise ValueError("embeddings must be L2-normalised rows")
    dist = np.sum(np.square(emb[0::2] - emb[1::2]), 1)
    folds = fold_slices(issame.size, n_folds)
    # correct[f, t]: pairs of fold f classified correctly at threshold t (same & dist<t, or diff &
    # not)
    correct = np.empty((n_folds, THRESHOLDS.size), dtype=np.int64)
    for f, sl in enumerate(folds):
        d, s = dist[sl], issame[sl]
        tp = np.searchsorted(np.sort(d[s]), THRESHOLDS, side="left")  # count of d < thr
        fp = np.searchsorted(np.sort(d[~s]), THRESHOLDS, side="left")
        correct[f] = tp + (np.count_nonzero(~s) - fp)
    total = correct.sum(0)
    acc = np.empty(n_folds)
    for f, sl in enumerate(folds):
        best = np.argmax(total - correct[f])  # best on the other folds, first maximum
        acc[f] = correct[f, best] / (sl.stop - sl.start)
    return acc


def roc_curve(scores, labels):
    """(fpr, tpr) at every distinct score threshold, descending, starting at (0, 0) (all points
    kept)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    positives, negatives = max(y.sum(), 1), max((~y).sum(), 1)
    return np.r_[0, fps] / negatives, np.r_[0, tps] / positives


def tar_at_far(scores, labels, fars):
    """TAR at the ROC point whose FAR is closest to each target FAR (ties to the larger TAR)."""
    fpr, tpr = roc_curve(scores, labels)
    out = []
    for far in fars:
        gap = np.abs(fpr - far)
        out.append(tpr[gap == gap.min()].max())
    return np.array(out)


def all_pairs_tar(emb, labels, fars, block=1024):
    """IJB-style 1:1 over every pair of images i < j: genuine when both show one identity, impostor
    otherwise; score = cosine. TAR@FAR = share of genuine scores above t, where t is the (k+1)-th
    largest impostor score and k = floor(FAR * impostors), so at most a FAR share of impostors score
    above t. Exact, in memory O(block * N + k): only the largest impostor scores are kept.
    -> (TAR per FAR (NaN where FAR < 1 / impostors), genuine pairs, impostor pairs)"""
    emb = torch.as_tensor(np.asarray(emb), dtype=torch.float32)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    n = len(emb)
    sizes = torch.bincount(labels)
    genuine_pairs = int((sizes * (sizes - 1) // 2).sum())
    impostor_pairs = n * (n - 1) // 2 - genuine_pairs
    if genuine_pairs == 0 or impostor_pairs == 0:
        raise ValueError("all-pairs evaluation needs identities with 2+ images and 2+ identities")
    # floor, robust to 1e-3 * 1000 = 0.999...
    ks = [int(far * impostor_pairs + 1e-9) for far in fars]
    keep = min(max(ks) + 1, impostor_pairs)
    top, genuine = torch.empty(0), []
    columns = torch.arange(n)
    for i in range(0, n, block):
        rows = columns[i:i + block]
        scores = emb[rows] @ emb.T
        upper = columns[None] > rows[:, None]
        same = labels[rows][:, None] == labels[None]
        genuine.append(scores[upper & same])
        top = torch.cat([top, scores[upper & ~same]])
        top = torch.topk(top, min(keep, len(top))).values  # sorted, largest first
    genuine = torch.cat(genuine)
    tars = [float((genuine > top[k]).double().mean()) if far * impostor_pairs >= 1 else float("nan")
            for far, k in zip(fars, ks)]
    return np.array(tars), genuine_pairs, impostor_pairs


# -----------------------------------------------------------------------------
# Data: .bin files (safe unpickling), image folders, IJB alignment


class RefusedGlobal(pickle.UnpicklingError):
    """A .bin asked for a global outside the allow-list (it could run code)."""


class _BinUnpickler(pickle.Unpickler):
    """Admits only numpy array/scalar reconstruction and py2 bytes; a .bin holds nothing else."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}

    def __init__(self, file, path):
        super().__init__(file, encoding="bytes")  # py2 str -> bytes
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise RefusedGlobal(f"{self.path}: refused to load global '{module}.{name}' "
                                "(a .bin may only hold encoded images and booleans)")
        if module.startswith("numpy.core."):  # numpy 2 renamed numpy.core to numpy._core
            try:
                return super().find_class("numpy._core." + module[len("numpy.core."):], name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def load_bin(path):
    """LFW-style .bin -> (images uint8 [2N,H,W,3] RGB, issame bool [N]); raises ValueError if
    invalid."""
    with open(path, "rb") as f:  # a missing file raises FileNotFoundError as usual
        data = f.read()
    try:
        obj = _BinUnpickler(io.BytesIO(data), path).load()
    except RefusedGlobal:
        raise
    except Exception as e:  # truncated or foreign files fail in many ways; report them as one
        raise ValueError(f"{path}: not a readable .bin pickle ({type(e).__name__}: {e})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(
            f"{path}: expected a pickled (bins, issame_list), got {type(obj).__name__}")
    bins, issame = obj
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if len(bins) != 2 * issame.size or issame.size == 0:
        raise ValueError(f"{path}: {len(bins)} images for {issame.size} pairs (need 2 per pair)")
    images = []
    for i, b in enumerate(tqdm(bins, desc=os.path.basename(path), leave=False, disable=None)):
        # some .bin files hold arrays of the bytes
        b = b.tobytes() if isinstance(b, np.ndarray) else b
        if not isinstance(b, (bytes, bytearray)):
            raise ValueError(f"{path}: image {i} is a {type(b).__name__}, not encoded bytes")
        images.append(decode_image(bytes(b), f"{path} image {i}").permute(1, 2, 0).numpy())
    if len({im.shape for im in images}) != 1:
        raise ValueError(f"{path}: images differ in size")
    return np.stack(images), issame


def read_image_files(paths, size=None):
    """Image files -> uint8 [N,3,H,W] RGB (resized to size x size if given, antialiased
    bilinear)."""
    images = [decode_image(p, p) for p in paths]
    return torch.stack([resize_uint8(im, size) if size else im for im in images])


def umeyama(src, dst):
    """Least-squares similarity transform (Umeyama 1991) mapping points src [n,2] to dst: 2x3
    matrix."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    U, S, Vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.ones(2)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:  # reflection: flip the smallest singular direction
        sign[-1] = -1
    R = U @ np.diag(sign) @ Vt
    scale = (S * sign).sum() / s.var(0).sum()
    return np.hstack([scale * R, (mu_d - scale * R @ mu_s)[:, None]])


def warp_affine(image, M, size):
    """Bilinear warp of uint8 [H,W,3] by the 2x3 matrix M (source pixel -> output pixel, pixel-index
    coordinates as in cv2.warpAffine), output size x size, zeros outside."""
    A = np.vstack([M, [0, 0, 1]])
    inv = np.linalg.inv(A)
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    x = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
    y = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    h, w = image.shape[:2]
    padded = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)))  # zero border
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    xi = np.clip(x0.astype(np.int64) + 1, 0, w + 1)
    yi = np.clip(y0.astype(np.int64) + 1, 0, h + 1)
    xj, yj = np.clip(xi + 1, 0, w + 1), np.clip(yi + 1, 0, h + 1)
    out = (padded[yi, xi] * (1 - fx) * (1 - fy) + padded[yi, xj] * fx * (1 - fy)
           + padded[yj, xi] * (1 - fx) * fy + padded[yj, xj] * fx * fy)
    outside = (x < -1) | (x > w) | (y < -1) | (y > h)
    out[outside] = 0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def align_face(image, landmarks, size=112):
    """Align an RGB uint8 face to the ArcFace 112x112 template from its 5 landmarks [5, 2]."""
    template = ARCFACE_TEMPLATE * (size / 112.0)
    return warp_affine(image, umeyama(np.asarray(landmarks, np.float64).reshape(5, 2), template),
                       size)


def template_features(feats, templates, medias):
    """Per-template features: mean over each media's images, summed over media, L2-normalised.
    Returns (sorted unique template ids, features [T, d])."""
    media_keys, media_of = np.unique(np.stack([templates, medias], 1), axis=0, return_inverse=True)
    media_of = media_of.reshape(-1)
    media_sum = np.zeros((len(media_keys), feats.shape[1]))
    np.add.at(media_sum, media_of, feats)
    media_mean = media_sum / np.bincount(media_of)[:, None]
    tids, template_of = np.unique(media_keys[:, 0], return_inverse=True)
    out = np.zeros((len(tids), feats.shape[1]))
    np.add.at(out, template_of.reshape(-1), media_mean)
    return tids, out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def read_ijb_meta(root, name=None):
    """IJB metadata -> (name, images, template ids, media ids, landmarks [n,10], face scores, pairs
    [m,3])."""
    meta = os.path.join(root, "meta")
    if name is None:
        found = sorted(glob.glob(os.path.join(meta, "*_face_tid_mid.txt")))
        if len(found) != 1:
            raise ValueError(
                f"{meta}: found {len(found)} *_face_tid_mid.txt files; pass --ijb-name")
        name = os.path.basename(found[0])[: -len("_face_tid_mid.txt")]
    files = []
    for kind in ("face_tid_mid", "template_pair_label", "name_5pts_score"):
        path = os.path.join(meta, f"{name}_{kind}.txt")
        path = path if os.path.isfile(path) else os.path.join(meta, f"{name.lower()}_{kind}.txt")
        if not os.path.isfile(path):
            raise ValueError(f"IJB metadata file missing: {path}")
        files.append(path)
    tid_mid = np.loadtxt(files[0], dtype=str, ndmin=2)
    pairs = np.loadtxt(files[1], dtype=np.int64, ndmin=2)
    lmk = np.loadtxt(files[2], dtype=str, ndmin=2)
    if not np.array_equal(tid_mid[:, 0], lmk[:, 0]):
        raise ValueError(f"{files[0]} and {files[2]} list different images")
    if not np.isin(pairs[:, :2], tid_mid[:, 1].astype(np.int64)).all():
        raise ValueError(f"{files[1]} names templates that {files[0]} does not have")
    return (name.upper(), lmk[:, 0], tid_mid[:, 1].astype(np.int64), tid_mid[:, 2].astype(np.int64),
            lmk[:, 1:11].astype(np.float64), lmk[:, 11].astype(np.float64), pairs)


def ijb_tar(models, root, name=None, batch_size=256, device=None, amp=False):
    """IJB-B/C 1:1 verification -> (benchmark name, one {"tar_at_far_1e-6": fraction, ...} per
    model). Each image is read and aligned once, then embedded by every model."""
    name, images, templates, medias, landmarks, scores, pairs = read_ijb_meta(root, name)
    feats = [[] for _ in models]
    for i in tqdm(range(0, len(images), batch_size), desc=f"{name} images", disable=None):
        crops = []
        for j in range(i, min(i + batch_size, len(images))):
            path = os.path.join(root, "loose_crop", images[j])
            crops.append(
                align_face(decode_image(path, path).permute(1, 2, 0).numpy(), landmarks[j]))
        crops = np.stack(crops)
        # (f(x) + f(flip x)) unnormalised, weighted by the face score
        for k, model in enumerate(models):
            raw = embed(model, crops, batch_size, device, amp=amp, normalize=False)
            feats[k].append(raw * scores[i:i + len(crops), None])
    results = []
    for f in feats:
        tids, tf = template_features(np.concatenate(f).astype(np.float64), templates, medias)
        a, b = np.searchsorted(tids, pairs[:, 0]), np.searchsorted(tids, pairs[:, 1])
        sims = np.concatenate([np.einsum("ij,ij->i", tf[a[s:s + 65536]], tf[b[s:s + 65536]])
                               for s in range(0, len(pairs), 65536)])
        tars = tar_at_far(sims, pairs[:, 2] == 1, IJB_FARS)
        results.append(
            {f"tar_at_far_{far:.0e}".replace("e-0", "e-"): t for far, t in zip(IJB_FARS, tars)})
    return name, results


def rank1_identification(model, root, batch_size=256, device=None, amp=False):
    """Share of probes whose most similar gallery image (gallery + distractors) has their
    identity."""
    size = getattr(model, "input_size", None)
    gallery, probe = (open_datasets([os.path.join(root, "gallery")]),
                      open_datasets([os.path.join(root, "probe")]))
    g_images, g_labels = load_images(gallery, size, PROGRESS)
    p_images, p_labels = load_images(probe, size, PROGRESS)
    g_names = np.array(gallery.classes)[np.asarray(g_labels)]
    distractors = sorted(glob.glob(os.path.join(root, "distractor", "*")))
    distractors = [p for p in distractors if p.lower().endswith((".png", ".jpg", ".jpeg"))]
    g = embed(model, g_images, batch_size, device, amp=amp)
    if distractors:
        g = np.concatenate(
            [g, embed(model, read_image_files(distractors, size), batch_size, device, amp=amp)])
        g_names = np.concatenate([g_names, np.full(len(distractors), None)])
    p = embed(model, p_images, batch_size, device, amp=amp)
    top1 = np.concatenate([np.argmax(p[s:s + 4096] @ g.T, 1) for s in range(0, len(p), 4096)])
    return float(np.mean(g_names[top1] == np.array(probe.classes)[np.asarray(p_labels)]))


def neighbour_difference(images):
    """Mean absolute difference (grey levels, ITU-R 601 luma) over all horizontally and vertically
    neighbouring pixel pairs of uint8 images [N,3,H,W] or [N,H,W,3]."""
    x = torch.as_tensor(images).float()
    if x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    grey = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    h, v = (grey[:, :, 1:] - grey[:, :, :-1]).abs(), (grey[:, 1:] - grey[:, :-1]).abs()
    return float((h.sum() + v.sum()) / (h.numel() + v.numel()))


def nearest_distance(images, reference, chunk=512):
    """Mean over images of the RMS pixel distance (grey levels, RGB) to the nearest reference image:
    samples nearer their training set than fresh real renders are copies (memorisation)."""
    # noqa: E731 (float64: exact zeros)
    flat = lambda x: torch.as_tensor(x).reshape(len(x), -1).double()
    ref = flat(reference)
    nearest = [torch.cdist(flat(images[i:i + chunk]), ref).min(1).values
               for i in range(0, len(images), chunk)]
    return float(torch.cat(nearest).mean() / ref.shape[1] ** 0.5)


def _named_images(folder, class_names):
    """All images under folder/<identity>/ -> (uint8 images, index of the identity in class_names or
    -1, index of its folder, folder names)."""
    ds = open_datasets([folder])
    images, labels = load_images(ds, progress=PROGRESS)
    index = {c: i for i, c in enumerate(class_names)}
    return (images, np.array([index.get(c, -1) for c in ds.classes])[np.asarray(labels)],
            np.asarray(labels), ds.classes)


def parent_cosines(folder, folder_classes, emb, folder_labels, real_classes, real_centres):
    """Mixed identities, read from folder/manifest.csv (`identity`, `sources`: real classes joined
    by ";") -> {mean cosine between the parents' class centres, mean cosine of each mix's centre to
    each of its parents' centres, mixes}; None without a manifest or without mixes. Shows what
    "close" and "distant" pairs are in the discriminator's embedding."""
    path = os.path.join(folder, "manifest.csv")
    if not os.path.isfile(path):
        return None
    with open(path, newline="", encoding="utf-8-sig") as f:
        sources = {r["identity"]: r["sources"].split(";") for r in csv.DictReader(f)
                   if r.get("sources")}
    real_index = {c: i for i, c in enumerate(real_classes)}
    centres = centres_of(emb, folder_labels, len(folder_classes)).numpy()
    between, to_parents = [], []
    for i, name in enumerate(folder_classes):
        parents = [real_index[p] for p in sources.get(name, ()) if p in real_index]
        if len(parents) < 2:
            continue
        gram = real_centres[parents] @ real_centres[parents].T
        between.append(gram[np.triu_indices(len(parents), 1)].mean())
        to_parents.append((real_centres[parents] @ centres[i]).mean())
    if not between:
        return None
    return {"parent_cosine": float(np.mean(between)),
            "mix_parent_cosine": float(np.mean(to_parents)), "mixes": len(between)}


def _own_centre_share(emb, labels, centres):
    """Share of the embeddings with a class (label >= 0) whose nearest centre is that class; NaN if
    none."""
    keep = labels >= 0
    if not keep.any():
        return float("nan")
    return float(np.mean(np.argmax(emb[keep] @ centres.T, 1) == labels[keep]))


def identity_spread(emb, labels):
    """L2-normalised embeddings [N, d] grouped by labels [N] -> (mean cosine of each to its own
    group's centre, mean cosine between distinct groups' centres)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    emb = torch.as_tensor(emb, dtype=torch.float64)
    centres = centres_of(emb, labels)
    gram = centres @ centres.T
    inter = (gram.sum() - gram.diagonal().sum()) / (len(gram) * (len(gram) - 1))
    return float((emb * centres[labels]).sum(1).mean()), float(inter)


# -----------------------------------------------------------------------------
# Command line


def model_names(paths, names):
    """--names, or each model's run folder name, made unique with -2, -3 ..."""
    names = names or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    out = []
    for n in names:
        unique, k = n, 2
        while unique in out:
            unique, k = f"{n}-{k}", k + 1
        out.append(unique)
    return out


def run_consistency(args, model):
    """Identity consistency and neighbour-difference ratio of each --consistency folder."""
    real = open_datasets([args.data])
    real_images, real_labels = load_images(real, progress=PROGRESS)
    # once: centres and spread
    real_emb = embed(model, real_images, args.batch_size, args.device, amp=args.amp)
    centres = centres_of(real_emb, real_labels, len(real.classes)).numpy()
    real_nd = neighbour_difference(real_images)
    real_intra, real_inter = identity_spread(real_emb, real_labels)
    rows = {}
    for d in args.consistency:
        images, labels, folders, folder_classes = _named_images(d, real.classes)
        emb = embed(model, images, args.batch_size, args.device, amp=args.amp)
        c = _own_centre_share(emb, labels, centres)
        intra, inter = identity_spread(emb, folders)
        nd = neighbour_difference(images)
        rows[d] = {"consistency": None if np.isnan(c) else 100 * c, "images": len(images),
                   "neighbour_difference": nd, "neighbour_ratio": nd / real_nd,
                   "intra_cosine": intra, "inter_cosine": inter,
                   "nearest_real_distance": nearest_distance(images, real_images)}
        parents = parent_cosines(d, folder_classes, emb, folders, real.classes, centres)
        if parents:
            rows[d].update(parents)
            print(f"{d}: {parents['mixes']} mixes; parent-pair cosine "
                  f"{parents['parent_cosine']:.3f}, "
                  f"mix to parent {parents['mix_parent_cosine']:.3f}")
    print(f"\nreal {args.data}: neighbour difference {real_nd:.2f} grey levels; identity spread: "
          f"intra {real_intra:.3f}, inter {real_inter:.3f}\n")
    print("| Samples | Consistency (%) | Neighbour diff | Ratio to real | Intra cosine "
          "| Inter cosine | Nearest real (RMS) |\n|---|---|---|---|---|---|---|")
    for d, r in rows.items():
        c = "n/a" if r["consistency"] is None else f"{r['consistency']:.1f}"
        print(f"| {d} | {c} | {r['neighbour_difference']:.2f} | {r['neighbour_ratio']:.2f} | "
              f"{r['intra_cosine']:.3f} | {r['inter_cosine']:.3f} | "
              f"{r['nearest_real_distance']:.1f} |")
    return {"model": args.model[0], "data": args.data, "real_neighbour_difference": real_nd,
            "real_intra_cosine": real_intra, "real_inter_cosine": real_inter, "samples": rows}


def print_table(results, names):
    """Markdown: one row per model; .bin columns as mean +- std, Avg, then IJB TARs and rank-1."""
    cols = []
    for bench, r in results[names[0]].items():
        if "std" in r or "accuracy" in r:
            cols.append(("Avg" if bench == "avg" else bench, bench, "accuracy"))
        else:
            cols += [(f"{bench} {k.replace('tar_at_far_', 'TAR@')}", bench, k) for k in r]
    print("\n| Model | " + " | ".join(c[0] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name in names:
        cells = []
        for _, bench, key in cols:
            r = results[name][bench]
            cells.append(f"{r[key]:.2f} +- {r['std']:.2f}" if "std" in r else f"{r[key]:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def run_benchmarks(args, models, names):
    """Every benchmark for every model -> {"models": {name: {bench: {metric: percent}}}}."""
    results = {n: {} for n in names}
    stems = [os.path.splitext(os.path.basename(p))[0] for p in args.bin]
    for path, bench in zip(args.bin, stems):
        images, issame = load_bin(path)  # decoded once, shared by all models
        for name, model in zip(names, models):
            emb = embed(model, images, args.batch_size, args.device, amp=args.amp)
            acc = verification_accuracy(emb, issame)
            # TAR at the ROC point of all pairs pooled (no folds): not insightface's VAL@FAR, which
            # picks a threshold per fold. Named for what it is; the old tar_at_far_* keys stay for
            # readers.
            tars = tar_at_far(np.sum(emb[0::2] * emb[1::2], 1), issame, BIN_FARS)
            results[name][bench] = {"accuracy": 100 * acc.mean(), "std": 100 * acc.std(),
                                    "pooled_tar_at_far_1e-3": 100 * tars[0],
                                    "pooled_tar_at_far_1e-4": 100 * tars[1],
                                    "tar_at_far_1e-3": 100 * tars[0],
                                    "tar_at_far_1e-4": 100 * tars[1]}
        del images
    if args.bin:
        for name in names:
            results[name]["avg"] = {
                "accuracy": float(np.mean([results[name][b]["accuracy"] for b in stems]))}
    if args.ijb:
        bench, tars = ijb_tar(models, args.ijb, args.ijb_name, args.batch_size, args.device,
                              args.amp)
        for name, t in zip(names, tars):
            results[name][bench] = {k: 100 * v for k, v in t.items()}
    if args.allpairs:
        bench = os.path.basename(os.path.normpath(args.allpairs))
        ds = open_datasets([args.allpairs])
        images, labels = load_images(ds, progress=PROGRESS)
        for name, model in zip(names, models):
            emb = embed(model, images, args.batch_size, args.device, amp=args.amp)
            tars, genuine_pairs, impostor_pairs = all_pairs_tar(emb, labels, ALLPAIRS_FARS)
            results[name][bench] = {f"tar_at_far_{far:.0e}".replace("e-0", "e-"): 100 * t
                                    for far, t in zip(ALLPAIRS_FARS, tars)}
        counts = {"bench": bench, "identities": len(ds.classes), "images": len(images),
                  "genuine_pairs": genuine_pairs, "impostor_pairs": impostor_pairs}
        print(f"{bench}: {counts['identities']} identities, {len(images)} images, "
              f"{genuine_pairs:,} genuine "
              f"and {impostor_pairs:,} impostor pairs")
        del images
    if args.identification:
        bench = os.path.basename(os.path.normpath(args.identification))
        for name, model in zip(names, models):
            rank1 = rank1_identification(model, args.identification, args.batch_size, args.device,
                                         args.amp)
            results[name][bench] = {"rank1": 100 * rank1}
    print_table(results, names)
    out = {"models": {n: {b: {k: None if np.isnan(v) else float(v) for k, v in r.items()}
                          for b, r in res.items()}
                      for n, res in results.items()}}
    if args.allpairs:
        out["allpairs"] = counts
    return out


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = parser.add_argument
    a("--model", nargs="+", metavar="MODEL.pt",
      help="backbone checkpoints: RUN/model.pt, or insightface backbone files (IResNet state "
           "dicts)")
    a("--network", choices=["r18", "r34", "r50", "r100", "r200"],
      help="insightface backbone files: the depth, overriding what the keys say")
    a("--input-size", type=positive_int,
      help="insightface backbone files: the input size, overriding what the fc layer's shape says "
           "(reference 112)")
    a("--names", nargs="+", metavar="NAME",
      help="row names, one per model; None: the run folder names")
    a("--bin", nargs="*", default=[], metavar="FILE.bin", help="LFW-style verification .bin files")
    a("--ijb", metavar="DIR", help="IJB-B/C root folder holding meta/ and loose_crop/")
    a("--ijb-name", metavar="NAME",
      help="IJB metadata prefix (ijbb, ijbc); None: the one found in DIR/meta")
    a("--allpairs", metavar="DIR",
      help="IJB-style 1:1 over every pair of the images in DIR/<identity>/ (TAR@FAR 1e-3, 1e-4, "
           "1e-5; 8 images x 1000 identities: 32M pairs)")
    a("--identification", metavar="DIR",
      help="rank-1 identification folder: gallery/<id>/, probe/<id>/, optional distractor/")
    a("--consistency", nargs="+", metavar="SAMPLES_DIR",
      help="sample folders <identity>/*.png to check against the class centres of --data")
    a("--data", metavar="REAL_DIR",
      help="real identity folders (the training images) for --consistency")
    a("--out", metavar="FILE.json", help="write the results as JSON here")
    a("--batch-size", type=positive_int, default=256, help="images per forward pass")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    a("--amp", action="store_true",
      help="autocast: bf16 where native (GPU or CPU), else fp16 on CUDA")
    a("--pack-bin", metavar="PAIRS.txt",
      help="instead of evaluating: write the pairs list (lines 'image1 image2 same', paths "
           "relative to the list) as an insightface .bin to --out")
    args = parser.parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if args.pack_bin:
        if not args.out:
            parser.error("--pack-bin needs --out FILE.bin")
        try:
            with output_file_guard(args.out):
                print(f"{pack_bin(args.pack_bin, args.out)} pairs -> {args.out}")
        except (InputError, DataError, OSError) as e:
            fail(e)
        return
    if not args.model:
        parser.error("give --model MODEL.pt (or --pack-bin PAIRS.txt)")
    if args.names and len(args.names) != len(args.model):
        parser.error(f"--names has {len(args.names)} entries for {len(args.model)} models")
    for p in args.model + args.bin:
        if not os.path.isfile(p):
            parser.error(f"no such file: {p}")
    for d in [args.ijb, args.allpairs, args.identification, args.data] + (args.consistency or []):
        if d and not os.path.isdir(d):
            parser.error(f"no such folder: {d}")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in args.bin]
    if len(set(stems)) != len(stems):
        parser.error("two --bin files share a name")
    if args.consistency:
        if not args.data or len(args.model) != 1:
            parser.error("--consistency needs --data REAL_DIR and exactly one --model")
    elif not (args.bin or args.ijb or args.allpairs or args.identification):
        parser.error(
            "nothing to evaluate: give --bin, --ijb, --allpairs, --identification or --consistency")
    try:
        with output_file_guard(args.out) if args.out else nullcontext():
            depth = int(args.network[1:]) if args.network else None
            models = [load_backbone(p, args.device, depth, args.input_size) for p in args.model]
            for path, model in zip(args.model, models):
                check_finite(f"the discriminator {path}", model.state_dict())
            if args.consistency:
                out = run_consistency(args, models[0])
            else:
                out = run_benchmarks(args, models, model_names(args.model, args.names))
            if args.out:
                write_json(out, args.out)
                print(f"\nwrote {args.out}")
    except (InputError, DataError, ValueError, OSError, pickle.UnpicklingError, KeyError,
            RuntimeError) as e:
        fail(e)


if __name__ == "__main__":
    main()
