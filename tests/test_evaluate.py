"""evaluate.py: the verification protocol, safe .bin loading, TAR@FAR, IJB alignment,
identification."""
import importlib.util
import io
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import evaluate
from train_arcface import class_centres, embed
from conftest import ROOT, run_script

_spec = importlib.util.spec_from_file_location(
    "verification_speed", os.path.join(ROOT, "benchmarks", "verification_speed.py"))
verification_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(verification_speed)


class StandIn(nn.Module):
    """A fixed random linear map of the pixels: distinct patterns get near-orthogonal embeddings."""

    def __init__(self, input_size=16, dim=64, seed=0):
        super().__init__()
        self.input_size = input_size
        self.proj = nn.Linear(3 * input_size * input_size, dim, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=g))

    def forward(self, x):
        return self.proj(x.flatten(1))


def pattern(seed, size=32):
    """A smooth random RGB uint8 image [size, size, 3] (an 'identity')."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 4, 4, generator=g) * 255
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear",
                                        align_corners=False)
    return x[0].permute(1, 2, 0).round().to(torch.uint8).numpy()


def noisy(image, seed, amount=6):
    rng = np.random.default_rng(seed)
    return np.clip(image.astype(int) + rng.integers(-amount, amount + 1, image.shape), 0,
                   255).astype(np.uint8)


def save_png(image, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path)


def png_bytes(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- 10-fold verification

def golden_embeddings():
    """docs/formulas.md section 7."""
    i, k = np.arange(200)[:, None], np.arange(8)[None]
    issame = (np.arange(200) // 10) % 2 == 0
    e1 = np.sin(8 * i + k)
    e2 = np.where(issame[:, None], e1 + 0.9 * np.cos(5 * i + 2 * k), np.cos(3 * i + k) + 0.6 * e1)
    emb = np.empty((400, 8))
    emb[0::2], emb[1::2] = e1, e2
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), issame


def test_verification_reproduces_golden_folds():
    emb, issame = golden_embeddings()
    acc = evaluate.verification_accuracy(emb, issame)
    assert acc.tolist() == [0.8, 0.65, 0.8, 0.75, 0.8, 0.8, 0.8, 0.8, 0.75, 0.8]
    assert acc.mean() == pytest.approx(0.775, abs=1e-12)
    assert acc.std() == pytest.approx(0.046098, abs=1e-6)
    # a torch tensor works too
    assert np.array_equal(
        evaluate.verification_accuracy(torch.from_numpy(emb), torch.from_numpy(issame)), acc)


def test_folds_are_contiguous_like_kfold():
    sizes = [s.stop - s.start for s in evaluate.fold_slices(23, 10)]
    assert sizes == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert (evaluate.fold_slices(23, 10)[0].start == 0
            and evaluate.fold_slices(23, 10)[-1].stop == 23)


@pytest.mark.parametrize("n_pairs,dim,seed", [(1003, 16, 0), (400, 128, 1), (57, 4, 2)])
def test_verification_equals_reference_threshold_loop(n_pairs, dim, seed):
    emb, issame = verification_speed.random_pairs(n_pairs, dim, seed)
    # pairs whose distance is exactly 0, 2 (a threshold: strict '<' matters) and 4, repeated (ties)
    e, kind = np.eye(dim), np.arange(20)[:, None] % 3
    emb[0:40:2], emb[1:40:2] = e[0], np.where(kind == 0, e[0], np.where(kind == 1, e[1], -e[0]))
    issame[:20] = np.arange(20) % 2 == 0
    fast = evaluate.verification_accuracy(emb, issame)
    slow = verification_speed.calculate_roc_loop(np.arange(0, 4, 0.01), emb[0::2], emb[1::2],
                                                 issame)
    assert np.array_equal(fast, slow)


def test_verification_rejects_bad_shapes():
    with pytest.raises(ValueError):
        # 10 rows for 4 pairs
        evaluate.verification_accuracy(np.ones((10, 4)) / 2, np.ones(4, bool))
    with pytest.raises(ValueError):
        evaluate.verification_accuracy(np.ones((40, 4)), np.ones(20, bool))  # not normalised


# ----------------------------------------------------------------------------- TAR at FAR

def test_tar_at_far_reads_the_roc_closest_point_ties_to_larger_tar():
    # sorted scores: P .9, N .85, P .8, P .7, N .5, P .4, N .3, N .2, N .1 (4 positives, 5
    # negatives) ROC (fpr, tpr): (0,0) (0,.25) (.2,.25) (.2,.75) (.4,.75) (.4,1) (.6,1) (.8,1) (1,1)
    scores = np.array([0.9, 0.85, 0.8, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1])
    labels = np.array([1, 0, 1, 1, 0, 1, 0, 0, 0], bool)
    tar = evaluate.tar_at_far(scores, labels, [0.0, 1e-3, 0.1, 0.25, 0.35, 0.5, 1.0])
    # 0.1 is equally far from fpr 0 and 0.2: the larger TAR (0.75) wins
    assert tar.tolist() == [0.25, 0.25, 0.75, 0.75, 1.0, 1.0, 1.0]
    # equal scores form one ROC point: a positive and a negative tied at the top move both rates at
    # once
    tar = evaluate.tar_at_far(np.array([1.0, 1.0, 0.5, 0.2]), np.array([1, 0, 1, 0], bool),
                              [0.0, 0.5])
    assert tar.tolist() == [0.0, 1.0]


# ----------------------------------------------------------------------------- .bin files

class Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class EvilWrite:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("block", [1, 7, 1000])
def test_all_pairs_tar_equals_an_enumeration_of_every_pair(block):
    # entries in {-1, 0, 1} / 2: every cosine is exact in float32 and many tie (the rule is strict
    # ">")
    rng = np.random.default_rng(block)
    labels = np.repeat(np.arange(40), 3)[rng.permutation(120)]
    emb = rng.integers(-1, 2, (120, 4)).astype(np.float32) / 2
    emb[labels % 2 == 0, 0] += 1  # some structure: half the identities lean one way
    genuine, impostor = [], []
    for i in range(120):
        for j in range(i + 1, 120):
            (genuine if labels[i] == labels[j] else impostor).append(float(emb[i] @ emb[j]))
    impostor = np.sort(impostor)[::-1]
    fars = (0.1, 0.01, 1e-3, 1e-4)
    tars, n_genuine, n_impostor = evaluate.all_pairs_tar(emb, labels, fars, block=block)
    assert (n_genuine, n_impostor) == (len(genuine), len(impostor)) == (120, 7020)
    for far, tar in zip(fars, tars):
        k = int(np.floor(far * len(impostor) + 1e-9))
        if far * len(impostor) < 1:
            assert np.isnan(tar)  # no impostor pair can measure this FAR
        else:
            assert tar == np.mean(np.array(genuine) > impostor[k])
            assert np.sum(impostor > impostor[k]) <= far * len(impostor)
    with pytest.raises(ValueError, match="2\\+ images"):
        evaluate.all_pairs_tar(emb[:3], [0, 1, 2], fars)


def test_malicious_bin_is_refused(tmp_path):
    marker = tmp_path / "marker"
    good = png_bytes(pattern(0))
    cases = {"system": ([good, good], Evil(f"touch {marker}")),       # code in the issame list
             "exec": [[good, EvilWrite(str(marker))], [True]]}        # code among the images
    for name, payload in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(pickle.dumps(payload, protocol=2))
        with pytest.raises(pickle.UnpicklingError, match=f"{path}.*refused.*{name}"):
            evaluate.load_bin(str(path))
        assert not marker.exists()


def test_load_bin_round_trip_png(tmp_path):
    images = np.stack([noisy(pattern(i % 3), i) for i in range(6)])
    issame = [True, False, True]
    path = tmp_path / "toy.bin"
    path.write_bytes(pickle.dumps(([png_bytes(im) for im in images], issame)))
    loaded, same = evaluate.load_bin(str(path))
    assert loaded.dtype == np.uint8 and loaded.shape == (6, 32, 32, 3)
    assert np.array_equal(loaded, images)
    assert same.dtype == bool and same.tolist() == issame


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_load_bin_with_numpy_encoded_images(tmp_path, protocol):
    images = np.stack([pattern(i) for i in range(4)])
    bins = [np.frombuffer(png_bytes(im), dtype=np.uint8) for im in images]
    path = tmp_path / "arrays.bin"
    path.write_bytes(pickle.dumps((bins, [np.bool_(True), np.bool_(False)]), protocol=protocol))
    loaded, same = evaluate.load_bin(str(path))
    assert np.array_equal(loaded, images) and same.tolist() == [True, False]


def py2_pickle(bins, issame, array_first=False):
    """What Python 2's cPickle writes at protocol 2: str as BINSTRING; numpy arrays via
    numpy.core.multiarray._reconstruct and a dtype built from py2 strings."""
    def binstring(b):
        return b"T" + struct.pack("<i", len(b)) + b
    out = [b"\x80\x02", b"]q\x00(" if bins else b"]q\x00"]
    for j, b in enumerate(bins):
        # ndarray of the encoded bytes, as numpy 1.x under py2 pickles it
        if array_first and j == 0:
            out.append(b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00"
                       b"\x85U\x01b\x87R(K\x01" + b"J" + struct.pack("<i", len(b))
                       + b"\x85cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff"
                       b"\xffJ\xff\xff\xff\xffK\x00tb\x89" + binstring(b) + b"tb")
        else:
            out.append(binstring(b))
    out.append(b"e]q\x03(" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e\x86q\x04.")
    return b"".join(out)


def test_load_bin_reads_python2_protocol2_pickles(tmp_path):
    images = np.stack([pattern(i) for i in range(4)])
    raw = py2_pickle([png_bytes(im) for im in images], [False, True], array_first=True)
    path = tmp_path / "py2.bin"
    path.write_bytes(raw)
    loaded, same = evaluate.load_bin(str(path))
    assert np.array_equal(loaded, images) and same.tolist() == [False, True]


def test_corrupt_bin_raises_value_error_naming_the_file(tmp_path):
    good = pickle.dumps(([png_bytes(pattern(0))] * 2, [True]))
    for name, data in {"truncated": good[: len(good) // 2], "garbage": b"not a pickle",
                       "count": pickle.dumps(([png_bytes(pattern(0))] * 3, [True])),
                       "image": pickle.dumps(([b"\x89PNG broken", png_bytes(pattern(0))],
                                              [True]))}.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(data)
        with pytest.raises(Exception, match=str(path)) as e:
            evaluate.load_bin(str(path))
        assert e.type is not pickle.UnpicklingError or "refused" not in str(e.value)


# ------------------------------------------------------------------ embedding, centres, cleanliness

def test_embed_sums_flips_resizes_and_normalises():
    model = StandIn(input_size=16)
    images = np.stack([pattern(i, size=32) for i in range(5)])  # NHWC at 32 px
    emb = embed(model, images, batch_size=2)
    x = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(),
                                        size=(16, 16), mode="bilinear", align_corners=False,
                                        antialias=True)
    x = (x / 255 - 0.5) / 0.5
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model(x) + model(x.flip(3)), dim=1).numpy()
    assert emb.dtype == np.float32 and emb.shape == (5, 64)
    assert np.allclose(emb, ref, atol=1e-5)
    # NCHW
    assert np.allclose(embed(model, torch.from_numpy(images).permute(0, 3, 1, 2)), emb, atol=1e-6)
    raw = embed(model, images, normalize=False)
    assert np.allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), emb, atol=1e-5)


def test_class_centres_are_normalised_means_of_normalised_embeddings():
    model = StandIn()
    images = np.stack([noisy(pattern(i % 3), i) for i in range(9)])
    labels = np.arange(9) % 3
    centres = class_centres(model, images, labels, num_classes=4)
    emb = embed(model, images)
    for c in range(3):
        m = emb[labels == c].mean(0)
        assert np.allclose(centres[c], m / np.linalg.norm(m), atol=1e-5)
    assert np.all(centres[3] == 0)  # a class without images


def test_neighbour_difference_counts_grey_levels():
    assert evaluate.neighbour_difference(np.full((2, 8, 8, 3), 77, np.uint8)) == 0
    checker = ((np.indices((8, 8)).sum(0) % 2) * 255).astype(np.uint8)
    img = np.repeat(checker[None, :, :, None], 3, axis=3)
    assert evaluate.neighbour_difference(img) == pytest.approx(255, rel=1e-5)
    assert evaluate.neighbour_difference(img.transpose(0, 3, 1, 2)) == pytest.approx(255, rel=1e-5)


def test_nearest_distance_is_the_rms_to_the_closest_reference():
    reference = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (0, 100, 200)])
    images = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (90, 200, 255)])
    assert (evaluate.nearest_distance(images, reference, chunk=2)
            == pytest.approx((10 + 0 + 55) / 3, rel=1e-6))


def test_consistency_counts_own_class_nearest_centres(tmp_path, monkeypatch):
    for c in range(3):
        for n in range(3):
            save_png(noisy(pattern(c), 10 * c + n), str(tmp_path / "real" / f"id{c}" / f"{n}.png"))
    for n in range(2):  # id0 looks like id0; id1 has one sample that looks like id2
        save_png(noisy(pattern(0), 100 + n), str(tmp_path / "samples" / "id0" / f"{n}.png"))
    save_png(noisy(pattern(1), 200), str(tmp_path / "samples" / "id1" / "0.png"))
    save_png(noisy(pattern(2), 201), str(tmp_path / "samples" / "id1" / "1.png"))
    # not a real identity: ignored
    save_png(noisy(pattern(5), 300), str(tmp_path / "samples" / "mix-0-1" / "0.png"))
    real = evaluate.open_datasets([str(tmp_path / "real")])
    centres = class_centres(StandIn(), real)
    images, labels, _, _ = evaluate._named_images(str(tmp_path / "samples"), real.classes)
    assert evaluate._own_centre_share(embed(StandIn(), images), labels,
                                      centres) == pytest.approx(3 / 4)


def test_parent_cosines_match_hand_computed_centres(tmp_path):
    # cos(a, b) 0, cos(a, c) 0.6, cos(b, c) 0.8
    real_centres = np.array([[1, 0, 0], [0, 1, 0], [0.6, 0.8, 0]])
    s = 1 / np.sqrt(2)
    # mix_ab: 2 images; lone; mix_ac
    emb = np.array([[s, s, 0], [s, s, 0], [0, 0, 1], [0.6, 0.8, 0]])
    (tmp_path / "manifest.csv").write_text(
        "\ufeffidentity,sources\nmix_ab,a;b\nlone,zz\nmix_ac,a;c\n")
    got = evaluate.parent_cosines(str(tmp_path), ["lone", "mix_ab", "mix_ac"], emb, [1, 1, 0, 2],
                                  ["a", "b", "c"], real_centres)
    assert got["mixes"] == 2
    assert got["parent_cosine"] == pytest.approx((0 + 0.6) / 2)
    # mix_ab's centre (s, s, 0) is at cos s from a and from b; mix_ac's (0.6, 0.8, 0) at 0.6 from a,
    # 1 from c
    assert got["mix_parent_cosine"] == pytest.approx((s + s) / 4 + (0.6 + 1) / 4)
    assert evaluate.parent_cosines(str(tmp_path / "none"), ["a"], emb[:1], [0], ["a"],
                                   real_centres) is None


def test_identity_spread_matches_hand_computed_cosines():
    s = 1 / np.sqrt(2)
    emb = np.array([[1, 0, 0], [s, s, 0], [0, 0, 1], [0, s, s]])  # two identities of two images
    intra, inter = evaluate.identity_spread(emb, [0, 0, 1, 1])
    c0 = np.array([1 + s, s, 0]) / np.linalg.norm([1 + s, s, 0])
    c1 = np.array([0, s, 1 + s]) / np.linalg.norm([0, s, 1 + s])
    assert intra == pytest.approx(np.mean([emb[0] @ c0, emb[1] @ c0, emb[2] @ c1, emb[3] @ c1]),
                                  abs=1e-12)
    assert inter == pytest.approx(c0 @ c1, abs=1e-12)
    assert evaluate.identity_spread(np.eye(3), [0, 1, 2]) == pytest.approx((1.0, 0.0))


# ----------------------------------------------------------------------- IJB 1:1 and identification

def similarity(scale, angle, tx, ty):
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def test_umeyama_recovers_a_known_similarity_exactly():
    rng = np.random.default_rng(0)
    for _ in range(5):
        M = similarity(rng.uniform(0.3, 3), rng.uniform(-np.pi, np.pi), *rng.uniform(-50, 50, 2))
        src = evaluate.ARCFACE_TEMPLATE + rng.normal(0, 5, (5, 2))
        dst = src @ M[:, :2].T + M[:, 2]
        assert np.allclose(evaluate.umeyama(src, dst), M, atol=1e-9)


def test_umeyama_is_the_least_squares_similarity_for_noisy_and_mirrored_points():
    # a similarity [[a, -b, tx], [b, a, ty]] is linear in (a, b, tx, ty): least squares has a closed
    # form
    rng = np.random.default_rng(1)
    src = evaluate.ARCFACE_TEMPLATE
    for dst in (
        src @ similarity(1.5, 0.4, 3, 7)[:, :2].T + rng.normal(0, 4, (5, 2)),
        src * [-1, 1] + rng.normal(0, 1, (5, 2))):  # a mirror image: the best fit is no reflection
        A = np.zeros((10, 4))
        A[0::2] = np.c_[src[:, 0], -src[:, 1], np.ones(5), np.zeros(5)]
        A[1::2] = np.c_[src[:, 1], src[:, 0], np.zeros(5), np.ones(5)]
        a, b, tx, ty = np.linalg.lstsq(A, dst.reshape(-1), rcond=None)[0]
        assert np.allclose(evaluate.umeyama(src, dst), [[a, -b, tx], [b, a, ty]], atol=1e-9)


def test_warp_uses_pixel_index_coordinates_like_cv2():
    image = np.zeros((40, 40, 3), np.uint8)
    image[20, 10] = 200  # the pixel at x = 10, y = 20
    out = evaluate.warp_affine(image, similarity(2.0, 0.0, 3, 1), 100)
    # x' = 2x + 3, y' = 2y + 1
    assert out[41, 23, 0] == 200 and out[41, 24, 0] == 100 and out[42, 23, 0] == 100
    # bilinear: the 3x3 tent around it, nothing else
    assert out.sum() == 3 * (200 + 4 * 100 + 4 * 50)
    # (x, y) -> (39 - y, x)
    rotated = evaluate.warp_affine(image, similarity(1.0, np.pi / 2, 39, 0), 40)
    assert rotated[10, 19, 0] == 200 and rotated.sum() == 600


def test_align_face_undoes_a_similarity_warp():
    face = pattern(7, size=112)
    M = similarity(1.1, 0.3, 10, -20)  # face -> loose crop; its landmarks move with it
    loose = evaluate.warp_affine(face, M, 160)
    landmarks = evaluate.ARCFACE_TEMPLATE @ M[:, :2].T + M[:, 2]
    aligned = evaluate.align_face(loose, landmarks)
    assert aligned.shape == (112, 112, 3)
    inner = np.abs(aligned[20:92, 20:92].astype(int) - face[20:92, 20:92].astype(int))
    assert inner.mean() < 1.0 and inner.max() <= 4


def test_template_features_average_media_then_sum():
    feats = np.array([[1.0, 0], [3, 0], [0, 2], [0, 5]])
    templates, medias = np.array([7, 7, 7, 3]), np.array([1, 1, 2, 9])
    tids, tf = evaluate.template_features(feats, templates, medias)
    assert tids.tolist() == [3, 7]
    # template 7: media 1 mean (2, 0) + media 2 (0, 2) = (2, 2) -> normalised; template 3: (0, 5)
    assert np.allclose(tf, [[0, 1], [2 ** -0.5, 2 ** -0.5]])


def make_ijb(root, identities=3, seed=0):
    """meta/ + loose_crop/ for `identities` x 2 templates x 2 media x 2 images, all template
    pairs."""
    rng = np.random.default_rng(seed)
    tid_mid, pts, pairs = [], [], []
    for ident in range(identities):
        face = pattern(ident, size=112)
        for t in range(2):
            tid = 10 * ident + t
            for m in range(2):
                for k in range(2):
                    name = f"{tid}_{m}_{k}.png"
                    M = similarity(rng.uniform(0.8, 1.2), rng.uniform(-0.3, 0.3),
                                   *(24 + rng.uniform(-5, 5, 2)))
                    loose = evaluate.warp_affine(noisy(face, rng.integers(1 << 30)), M, 160)
                    save_png(loose, os.path.join(root, "loose_crop", name))
                    lmk = evaluate.ARCFACE_TEMPLATE @ M[:, :2].T + M[:, 2]
                    tid_mid.append(f"{name} {tid} {100 * tid + m}")
                    coords = " ".join(f"{v:.4f}" for v in lmk.reshape(-1))
                    pts.append(f"{name} {coords} {rng.uniform(0.5, 1):.3f}")
    tids = [10 * i + t for i in range(identities) for t in range(2)]
    pairs = [f"{a} {b} {int(a // 10 == b // 10)}" for i, a in enumerate(tids) for b in tids[i + 1:]]
    os.makedirs(os.path.join(root, "meta"))
    for suffix, lines in (("face_tid_mid", tid_mid), ("template_pair_label", pairs),
                          ("name_5pts_score", pts)):
        with open(os.path.join(root, "meta", f"ijbc_{suffix}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


def test_ijb_synthetic_templates_verify_perfectly(tmp_path):
    make_ijb(str(tmp_path / "IJBC"))
    name, results = evaluate.ijb_tar([StandIn(), StandIn(seed=1)], str(tmp_path / "IJBC"),
                                     batch_size=5)
    assert name == "IJBC" and len(results) == 2
    for r in results:
        assert list(r) == [f"tar_at_far_1e-{k}" for k in (6, 5, 4, 3, 2, 1)]
        assert all(v == 1.0 for v in r.values())


def test_rank1_identification_with_distractors(tmp_path):
    root = tmp_path / "tinyface"
    for c in range(3):
        for n in range(2):
            save_png(noisy(pattern(c), 10 * c + n), str(root / "gallery" / f"id{c}" / f"{n}.png"))
    probes = {("id0", 0): noisy(pattern(0), 50), ("id0", 1): noisy(pattern(0), 51),
              ("id1", 0): noisy(pattern(1), 52), ("id1", 1): noisy(pattern(1), 53),
              ("id2", 0): noisy(pattern(2), 54),
              ("id2", 1): noisy(pattern(0), 55)}  # looks like id0: miss
    for (ident, n), im in probes.items():
        save_png(im, str(root / "probe" / ident / f"{n}.png"))
    assert evaluate.rank1_identification(StandIn(), str(root)) == pytest.approx(5 / 6)
    # an exact copy wins for that probe
    save_png(probes[("id1", 0)], str(root / "distractor" / "0.png"))
    save_png(pattern(9), str(root / "distractor" / "1.png"))
    assert evaluate.rank1_identification(StandIn(), str(root)) == pytest.approx(4 / 6)


# ----------------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def trained_model(tiny_toy, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "baseline"
    r = run_script("train_arcface.py", "--data", tiny_toy / "train", "--out", run, "--epochs", 1,
                   "--batch-size", 12)
    assert r.returncode == 0, r.stderr
    return run / "model.pt"


def test_cli_writes_results_json_and_table(trained_model, tiny_toy, tmp_path):
    bins = sorted((tiny_toy / "bench").glob("*.bin"))
    make_ijb(str(tmp_path / "IJBC"), identities=2)
    ident = tmp_path / "ident"
    for c in range(2):
        save_png(pattern(c), str(ident / "gallery" / f"id{c}" / "0.png"))
        save_png(noisy(pattern(c), c), str(ident / "probe" / f"id{c}" / "0.png"))
    out = tmp_path / "results.json"
    r = run_script("evaluate.py", "--model", trained_model, trained_model, "--bin", *bins, "--ijb",
                   tmp_path / "IJBC", "--identification", ident, "--out", out, "--batch-size", 32)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())["models"]
    assert list(res) == ["baseline", "baseline-2"]
    stems = [b.stem for b in bins]
    assert list(res["baseline"]) == stems + ["avg", "IJBC", "ident"]
    for s in stems:
        assert set(res["baseline"][s]) == {"accuracy", "std", "pooled_tar_at_far_1e-3",
                                           "pooled_tar_at_far_1e-4", "tar_at_far_1e-3",
                                           "tar_at_far_1e-4"}  # the old names kept for readers
        assert res["baseline"][s]["pooled_tar_at_far_1e-3"] == res["baseline"][s]["tar_at_far_1e-3"]
        assert 0 <= res["baseline"][s]["accuracy"] <= 100
    assert res["baseline"]["avg"]["accuracy"] == pytest.approx(
        np.mean([res["baseline"][s]["accuracy"] for s in stems]))
    assert res["baseline"] == res["baseline-2"]
    assert set(res["baseline"]["IJBC"]) == {f"tar_at_far_1e-{k}" for k in range(1, 7)}
    assert 0 <= res["baseline"]["ident"]["rank1"] <= 100
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("|")]
    assert (table[0].split("|")[1:-1][:len(stems) + 2]
            == [" Model "] + [f" {s} " for s in stems] + [" Avg "])
    assert table[2].startswith("| baseline |") and " +- " in table[2] and len(table) == 4


def test_cli_all_pairs_reports_tar_and_pair_counts(trained_model, tmp_path):
    toy = tmp_path / "toy"
    r = run_script("toy_faces.py", "--out", toy, "--identities", 2, "--per-identity", 2,
                   "--test-identities", 2, "--pairs", 2, "--heldout", 0, "--allpairs-identities",
                   30, "--allpairs-per-identity", 4)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "allpairs.json"
    r = run_script("evaluate.py", "--model", trained_model, "--allpairs", toy / "allpairs", "--out",
                   out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["allpairs"] == {"bench": "allpairs", "identities": 30, "images": 120,
                               "genuine_pairs": 180, "impostor_pairs": 7140 - 180}
    tars = res["models"]["baseline"]["allpairs"]
    assert set(tars) == {"tar_at_far_1e-3", "tar_at_far_1e-4", "tar_at_far_1e-5"}
    # 6960 impostors < 1e4
    assert 0 <= tars["tar_at_far_1e-3"] <= 100 and tars["tar_at_far_1e-4"] is None
    assert "| baseline |" in r.stdout


def test_cli_consistency_reports_real_reference(trained_model, tiny_toy, tmp_path):
    out = tmp_path / "consistency.json"
    r = run_script("evaluate.py", "--consistency", tiny_toy / "heldout", tiny_toy / "train",
                   "--data", tiny_toy / "train",
                   "--model", trained_model, "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    rows = res["samples"]
    assert 0 <= rows[str(tiny_toy / "heldout")]["consistency"] <= 100
    assert rows[str(tiny_toy / "train")]["neighbour_ratio"] == pytest.approx(1.0)
    # itself
    assert rows[str(tiny_toy / "train")]["nearest_real_distance"] == pytest.approx(0, abs=1e-2)
    assert rows[str(tiny_toy / "heldout")]["nearest_real_distance"] > 1
    assert (rows[str(tiny_toy / "train")]["intra_cosine"]
            == pytest.approx(res["real_intra_cosine"], abs=1e-5))
    assert -1 <= res["real_inter_cosine"] < res["real_intra_cosine"] <= 1
    assert "| Samples |" in r.stdout


def test_cli_bad_inputs_give_one_error_line(trained_model, tmp_path):
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(b"\x80\x02garbage")
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([b"x", b"y"], Evil(f"touch {tmp_path / 'marker'}")), protocol=2))
    for args, expect in ((["--bin", tmp_path / "missing.bin"], "no such file"),
                         (["--bin", corrupt], "corrupt.bin"),
                         (["--bin", evil], "refused to load global")):
        r = run_script("evaluate.py", "--model", trained_model, *args, "--out", tmp_path / "r.json")
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert "Traceback" not in r.stderr and expect in lines[-1], r.stderr
        assert lines[-1].startswith(("error: ", "evaluate.py: error: ")), r.stderr
    assert not (tmp_path / "marker").exists() and not (tmp_path / "r.json").exists()


def test_cli_takes_an_insightface_backbone_file_and_refuses_a_training_checkpoint(trained_model,
                                                                                  tiny_toy,
                                                                                  tmp_path):
    """A bare IResNet state dict (insightface's backbone.pth) scores as the model.pt it came
    from."""
    state = torch.load(trained_model, weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "backbone.pth")
    out = tmp_path / "r.json"
    r = run_script("evaluate.py", "--model", trained_model, tmp_path / "backbone.pth", "--names",
                   "ours", "theirs", "--bin", tiny_toy / "bench" / "toy_lfw.bin", "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())["models"]
    assert res["ours"] == res["theirs"]
    r = run_script("evaluate.py", "--model", trained_model.parent / "checkpoint.pt",
                   "--bin", tiny_toy / "bench" / "toy_lfw.bin")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert (lines[-1].startswith("error: ")
            and "is not a train_arcface.py model.pt" in lines[-1]), r.stderr


def test_pack_bin_cli_round_trips_through_load_bin(tmp_path):
    """A pairs list -> insightface .bin -> load_bin: the same pixels (PNG) and labels, in pair
    order."""
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "img" / "a")
    arrays = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(4)]
    for k, arr in enumerate(arrays):
        save_png(arr, str(tmp_path / "img" / "a" / f"{k}.png"))
    (tmp_path / "pairs.txt").write_text("# image1 image2 same\nimg/a/0.png img/a/1.png 1\n"
                                        "img/a/2.png,img/a/3.png,0\n")
    out = tmp_path / "mine.bin"
    r = run_script("evaluate.py", "--pack-bin", tmp_path / "pairs.txt", "--out", out)
    assert r.returncode == 0 and "2 pairs" in r.stdout, r.stderr
    images, issame = evaluate.load_bin(str(out))
    assert issame.tolist() == [True, False] and np.array_equal(images, np.stack(arrays))
    bins, same = pickle.load(open(out, "rb"), encoding="bytes")  # insightface's own reading
    assert isinstance(bins[0], bytes) and same == [True, False]
    (tmp_path / "bad.txt").write_text("img/a/0.png img/a/9.png 1\n")
    r = run_script("evaluate.py", "--pack-bin", tmp_path / "bad.txt", "--out", tmp_path / "bad.bin")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: image not found")
    assert not (tmp_path / "bad.bin").exists()
