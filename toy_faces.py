"""Toy faces: a procedural face-identity benchmark that runs anywhere in minutes.

Each identity is a vector of face parameters (face shape, skin tone, hair colour/style/hairline,
eyes, brows, nose, mouth, optional glasses/beard/mole, base age); each image draws nuisances (yaw,
roll, scale, shift, lighting, expression, background, blur, noise, JPEG quality, age drift,
occlusion). The renderer evaluates soft-edged shapes analytically on a supersampled grid and
box-filters down, so any resolution up to 112 px comes out clean. Training and test identities
are disjoint (open set). The five benchmarks are LFW-style `.bin` files, so `evaluate.py` reads
them exactly like the real LFW / CFP-FP / AgeDB-30 / CALFW / CPLFW files:

    toy_lfw     mixed negatives (random and look-alike), moderate nuisance
    toy_cfp_fp  frontal vs profile in every pair
    toy_agedb   large age gap inside positives
    toy_calfw   age gap, negatives are look-alikes of the first identity
    toy_cplfw   pose gap, negatives are look-alikes of the first identity

Optional: validation benchmarks of the same five kinds in val/ (val_lfw.bin ...: their own
identities and pairs, for choosing a recipe without looking at the test benchmarks) and an all-pairs
1:1 test set in allpairs/<identity>/ (evaluate.py --allpairs: TAR at FAR down to 1e-5 over every
pair of images).

Determinism: every identity, image and benchmark pair has its own seed derived from
(--seed, stream, index), so `--identities 2N` keeps the first N identities and their images
bit-identical, and the benchmarks do not depend on --identities.

    python toy_faces.py --out data/toy
"""
import argparse
import io
import json
import os
import time

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

from common import (ArgumentParser, InputError, check_output_dir, fail, non_negative_float,
                    non_negative_int, output_lock, positive_int, probability, remove_stale_tmp,
                    write_atomic, write_bin)

BENCHMARKS = ("toy_lfw", "toy_cfp_fp", "toy_agedb", "toy_calfw", "toy_cplfw")
# seed streams: each kind of random draw has its own, so adding identities changes nothing else
STREAM_IDENTITY, STREAM_TRAIN, STREAM_HELDOUT, STREAM_TEST_IDENTITY, STREAM_BENCH = range(5)
STREAM_VAL_IDENTITY, STREAM_VAL_BENCH, STREAM_ALLPAIRS_IDENTITY, STREAM_ALLPAIRS_IMAGE = range(5, 9)

SKIN_LIGHT, SKIN_DARK = np.array([0.96, 0.80, 0.68]), np.array([0.36, 0.22, 0.14])
HAIR_COLOURS = np.array([[0.08, 0.06, 0.06], [0.30, 0.18, 0.10], [0.55, 0.36, 0.18],
                         [0.90, 0.78, 0.45], [0.70, 0.26, 0.10], [0.85, 0.85, 0.82]])
IRIS_COLOURS = np.array(
    [[0.30, 0.18, 0.08], [0.25, 0.50, 0.85], [0.30, 0.60, 0.30], [0.05, 0.05, 0.05]])
FRAME_COLOURS = np.array(
    [[0.05, 0.05, 0.05], [0.85, 0.65, 0.15], [0.75, 0.10, 0.10], [0.20, 0.30, 0.80]])
GREY = np.array([0.80, 0.80, 0.80])

# ----------------------------------------------------------------------------------------------
# Identities

# continuous parameters: name -> (low, high); discrete: name -> number of choices
CONTINUOUS = {
    "face_w": (0.52, 0.70), "face_h": (0.70, 0.88), "chin": (0.0, 1.0), "skin": (0.0, 1.0),
    "skin_red": (-1.0, 1.0), "hairline": (0.0, 1.0), "hair_jitter": (-1.0, 1.0),
    "eye_gap": (0.20, 0.34), "eye_size": (0.065, 0.11), "eye_y": (-0.20, -0.02),
    "brow_w": (0.025, 0.06), "brow_tilt": (-0.35, 0.35), "nose_len": (0.12, 0.30),
    "nose_w": (0.05, 0.12), "mouth_w": (0.13, 0.28), "lip": (0.025, 0.06), "mouth_y": (0.34, 0.50),
    "ear": (0.08, 0.16), "age": (0.10, 0.65), "mole_x": (-0.4, 0.4), "mole_y": (-0.1, 0.4),
    "eye_aspect": (0.45, 0.95), "eye_tilt": (-0.3, 0.3), "brow_len": (1.1, 2.0),
    # complexion: smooth light/dark regions of the skin, fixed to the face (a high-dimensional,
    # identity-specific code, so that many identities are needed to learn it)
    **{f"complexion{k}": (-1.0, 1.0) for k in range(8)},
}
COMPLEXION_FREQS = [(1, 0), (0, 1), (1, 1), (1, -1), (2, 0), (0, 2), (2, 1), (1, 2)]
DISCRETE = {"hair_colour": len(HAIR_COLOURS) - 1, "hair_style": 6, "iris": len(IRIS_COLOURS),
            "glasses": 3, "frame": len(FRAME_COLOURS), "beard": 4, "mole": 2}
# probabilities of the optional attributes (glasses: none / round / square, beard: none / full /
# goatee / moustache, mole: no / yes)
DISCRETE_P = {"glasses": [0.65, 0.2, 0.15], "beard": [0.7, 0.12, 0.09, 0.09], "mole": [0.7, 0.3]}


def rng_for(seed, stream, index):
    return np.random.default_rng([seed, stream, index])


def random_identity(rng):
    p = {k: rng.uniform(lo, hi) for k, (lo, hi) in CONTINUOUS.items()}
    for k, n in DISCRETE.items():
        p[k] = int(rng.choice(n, p=DISCRETE_P.get(k)))
    return p


def lookalike(p, rng, jitter, keep):
    """A different identity close to p: continuous parameters moved by up to +-jitter of their
    range, each discrete attribute kept with probability `keep` (else redrawn)."""
    q = dict(p)
    for k, (lo, hi) in CONTINUOUS.items():
        q[k] = float(np.clip(p[k] + rng.uniform(-jitter, jitter) * (hi - lo), lo, hi))
    for k, n in DISCRETE.items():
        if rng.random() > keep:
            q[k] = int(rng.choice(n, p=DISCRETE_P.get(k)))
    return q


def random_nuisance(rng, strength=1.0, age=None, yaw=None):
    s = strength
    return {
        "yaw": np.clip(rng.normal(0, 0.45), -1.1, 1.1) if yaw is None else yaw,  # radians
        "roll": rng.normal(0, 0.14 * s), "scale": rng.uniform(1 - 0.12 * s, 1 + 0.12 * s),
        "dx": rng.normal(0, 0.06 * s), "dy": rng.normal(0, 0.06 * s),
        "light_dir": rng.uniform(0, 2 * np.pi), "light": rng.uniform(0, 0.55 * s),
        "brightness": rng.uniform(1 - 0.25 * s, 1 + 0.15 * s), "smile": rng.uniform(-1, 1),
        "mouth_open": rng.uniform(0, 1) ** 3, "brow_raise": rng.normal(0, 0.02),
        "bg": rng.uniform(0.05, 0.95, 3), "bg_grad": rng.normal(0, 0.25, 3),
        "blur": rng.uniform(0, 0.9 * s), "noise": rng.uniform(0, 0.035 * s),
        "jpeg": int(rng.integers(int(95 - 60 * min(s, 1)), 96)),
        "age_drift": rng.normal(0, 0.15) if age is None else age,
        "occlusion": rng.random() < 0.12 * s, "occ_box": rng.uniform(-1, 1, 4),
        "occ_colour": rng.uniform(0, 1, 3),
    }


# ----------------------------------------------------------------------------------------------
# Rendering

def soft_ellipse(u, v, cx, cy, a, b, pixel, angle=0.0):
    """Coverage in [0, 1] of an ellipse, anti-aliased over about one pixel."""
    c, s = np.cos(angle), np.sin(angle)
    x, y = (u - cx) * c + (v - cy) * s, -(u - cx) * s + (v - cy) * c
    q = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    return np.clip(0.5 - (q - 1) * min(a, b) / pixel, 0, 1)


def soft_ring(u, v, cx, cy, a, b, width, pixel):
    return np.clip(soft_ellipse(u, v, cx, cy, a, b, pixel)
                   - soft_ellipse(u, v, cx, cy, a - width, b - width, pixel), 0, 1)


def soft_box(u, v, x0, y0, x1, y1, pixel):
    return (np.clip(0.5 - (np.maximum(x0 - u, u - x1)) / pixel, 0, 1)
            * np.clip(0.5 - (np.maximum(y0 - v, v - y1)) / pixel, 0, 1))


def paint(img, alpha, colour):
    rows = np.flatnonzero(alpha.any(axis=1))  # most shapes cover a few rows: update only those
    if len(rows):
        r0, r1 = rows[0], rows[-1] + 1
        img[r0:r1] += alpha[r0:r1, :, None] * (np.asarray(colour) - img[r0:r1])


def paint_eyes(img, p, n, u, v, px, project, face, hair):
    """Eyes, brows and glasses: paired features placed on the face sphere by project()."""
    ey, sy = p["eye_y"], np.sin(n["yaw"])
    for side in (-1, 1):
        ex, squash, vis = project(side * p["eye_gap"])
        r = p["eye_size"]
        paint(img, vis * soft_ellipse(u, v, ex, ey, r * 1.35 * squash, r * 1.1 * p["eye_aspect"],
                                      px, angle=side * p["eye_tilt"]), [0.95, 0.95, 0.95])
        paint(img, vis * soft_ellipse(u, v, ex + 0.1 * r * sy, ey, r * 0.7 * squash, r * 0.7, px),
              IRIS_COLOURS[p["iris"]])
        paint(img, vis * soft_ellipse(u, v, ex + 0.1 * r * sy, ey, r * 0.3 * squash, r * 0.3, px),
              [0.02, 0.02, 0.02])
        by = ey - r * 1.3 - 0.06 - n["brow_raise"]
        paint(img, vis * soft_ellipse(u, v, ex, by, r * p["brow_len"] * squash, p["brow_w"], px,
                                      angle=side * p["brow_tilt"]),
              hair * 0.8)
        if p["glasses"]:
            g = r * 2.0
            shape = (soft_ring(u, v, ex, ey, g * squash, g * 0.85, 0.035,
                               px) if p["glasses"] == 1 else
                     np.clip(soft_box(u, v, ex - g * squash, ey - g * 0.8, ex + g * squash,
                                      ey + g * 0.8, px)
                             - soft_box(u, v, ex - g * squash + 0.035, ey - g * 0.8 + 0.035,
                                        ex + g * squash - 0.035, ey + g * 0.8 - 0.035, px), 0, 1))
            paint(img, vis * shape, FRAME_COLOURS[p["frame"]])
    if p["glasses"]:
        ex0, ex1 = project(-p["eye_gap"])[0], project(p["eye_gap"])[0]
        paint(img, soft_box(u, v, ex0, ey - 0.015, ex1, ey + 0.015, px) * face,
              FRAME_COLOURS[p["frame"]])


def camera(img, n, gu, gv, resolution, ss):
    """The capture: lighting, the box filter down from ss-times supersampling, blur, sensor noise
    and JPEG -> uint8 [R, R, 3]."""
    # lighting: a directional gradient and a global brightness
    shade = 1 + n["light"] * (np.cos(n["light_dir"]) * gu + np.sin(n["light_dir"]) * gv)
    img = img * shade[..., None] * n["brightness"]
    img = img.reshape(resolution, ss, resolution, ss, 3).mean(axis=(1, 3))  # box filter down
    out = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    if n["blur"] > 0.05:
        out = out.filter(ImageFilter.GaussianBlur(n["blur"] * resolution / 32))
    arr = np.asarray(out).astype(np.float32)
    arr += n["noise"] * 255 * n.get("noise_field", 0)
    out = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=n["jpeg"])
    return np.asarray(Image.open(buf).convert("RGB"))


def render(p, n, resolution):
    """Render identity p under nuisance n to a uint8 [R, R, 3] RGB array."""
    ss = max(2, -(-64 // resolution))  # supersampling factor: at least 64 px internally
    size = resolution * ss
    pixel = 2.0 / size
    grid = (np.arange(size) + 0.5) * pixel - 1
    gu, gv = np.meshgrid(grid, grid)
    # pose: canvas -> face coordinates (inverse of scale, roll and shift)
    c, s = np.cos(n["roll"]), np.sin(n["roll"])
    x, y = (gu - n["dx"]) / n["scale"], (gv - n["dy"] - 0.06) / n["scale"]
    u, v = x * c + y * s, -x * s + y * c
    px = pixel / n["scale"]
    age = float(np.clip(p["age"] + n["age_drift"], 0, 1))
    yaw, sy = n["yaw"], np.sin(n["yaw"])

    skin = (SKIN_LIGHT + p["skin"] * (SKIN_DARK - SKIN_LIGHT)
            + p["skin_red"] * np.array([0.04, -0.02, -0.03]))
    skin = skin * (1 - 0.12 * age)
    hair = HAIR_COLOURS[p["hair_colour"]] * (1 + 0.15 * p["hair_jitter"])
    hair = np.clip(hair + (GREY - hair) * np.clip((age - 0.45) * 1.8, 0, 1), 0, 1)  # greying
    fw, fh = p["face_w"], p["face_h"]

    def project(fx, depth=1.0):
        """Horizontal position and foreshortening of a face-surface point under yaw (a sphere)."""
        phi = np.arcsin(np.clip(fx / (fw * 1.05), -0.99, 0.99))
        ang = phi + yaw
        visible = float(np.clip((1.45 - abs(ang)) / 0.2, 0, 1))
        return (fw * 1.05 * depth * np.sin(ang), max(np.cos(ang), 0.05) / max(np.cos(phi), 0.05),
                visible)

    # background: a colour with a linear gradient
    img = np.clip(n["bg"] + n["bg_grad"] * gu[..., None] * 0.5, 0, 1)
    cx = 0.2 * fw * sy  # the face's visible centre moves with yaw; the back of the head opposite
    style = p["hair_style"]
    if style in (2, 5):  # long hair / big curly hair behind the head
        a, b = fw * (1.35 if style == 5 else 1.18), fh * (1.2 if style == 5 else 1.35)
        paint(img, soft_ellipse(u, v, -0.5 * cx, 0.15 if style == 2 else -0.1, a, b, px), hair)
    for side in (-1, 1):  # ears
        ex, squash, vis = project(side * fw * 1.0)
        paint(img, vis * soft_ellipse(u, v, ex, -0.02, p["ear"] * squash, p["ear"] * 1.5, px),
              skin * 0.92)
    # face: an ellipse whose lower half narrows towards the chin
    taper = 1 - 0.35 * p["chin"] * np.clip(v / fh, 0, 1) ** 2
    face = soft_ellipse((u - cx) / taper + cx, v, cx, 0, fw, fh, px)
    paint(img, face, skin)
    fu, fv = (u - cx) / fw, v / fh
    pattern = sum(p[f"complexion{k}"] * np.cos(np.pi * (a * fu + b * fv) + k)
                  for k, (a, b) in enumerate(COMPLEXION_FREQS))
    img *= 1 + 0.09 * face[..., None] * pattern[..., None]
    # beard (below the nose), before the mouth so lips stay visible
    if p["beard"]:
        my = p["mouth_y"]
        region = {1: soft_ellipse(u, v, cx, my + 0.05, fw * 0.95, fh * 0.55,
                                  px) * np.clip((v - my + 0.16) / 0.05, 0, 1),
                  2: soft_ellipse(u, v, cx, my + 0.2, p["mouth_w"] * 0.9, 0.22, px),
                  3: soft_ellipse(u, v, cx, my - 0.07, p["mouth_w"] * 1.1, 0.05, px)}[p["beard"]]
        paint(img, region * face, hair * 0.9)
    # hair on top: the head above a hairline that recedes with age
    if style != 0:
        line = -fh * (0.42 + 0.25 * p["hairline"] + 0.3 * max(age - 0.3, 0)) + 0.25 * (u - cx) ** 2
        if style == 3:  # fringe
            line = line + 0.14 * np.exp(-((u - cx) / (0.6 * fw)) ** 2)
        if style == 4:  # side parting
            line = line + 0.12 * np.tanh((u - cx) * 6)
        top = soft_ellipse(u, v, cx * 0.7, -0.05, fw * 1.1, fh * 1.08,
                           px) * np.clip((line - v) / px, 0, 1)
        paint(img, top, hair)
    else:  # bald: a short buzz just tints the scalp
        paint(img, 0.35 * soft_ellipse(u, v, cx, -0.05, fw * 1.02, fh * 1.02,
                                       px) * (v < -fh * 0.55), hair)
    # forehead wrinkles grow with age
    if age > 0.4:
        for k in range(3):
            wy = p["eye_y"] - 0.28 - 0.07 * k
            paint(img, (age - 0.4) * 0.8 * soft_box(u, v, cx - fw * 0.45, wy, cx + fw * 0.45,
                                                    wy + 0.012, px) * face,
                  skin * 0.6)
    paint_eyes(img, p, n, u, v, px, project, face, hair)
    ey = p["eye_y"]
    # nose: it sticks out, so it moves further than the surface under yaw
    nx, _, _ = project(0.0, depth=1.25)
    nl, nw = p["nose_len"], p["nose_w"]
    paint(img, 0.55 * soft_ellipse(u, v, nx, ey + 0.1 + nl * 0.5, nw * 0.45, nl * 0.55, px),
          skin * 0.7)
    paint(img, 0.8 * soft_ellipse(u, v, nx, ey + 0.1 + nl, nw, nw * 0.45, px), skin * 0.62)
    # mouth: a smile bends it, an open mouth shows a dark gap
    mx, squash, _ = project(0.0)
    my, mw = p["mouth_y"], p["mouth_w"] * squash
    bend = -0.6 * n["smile"] * ((u - mx) / max(mw, 1e-3)) ** 2 * 0.08
    lip_colour = skin * np.array([0.85, 0.45, 0.45]) + np.array([0.1, 0.0, 0.0])
    paint(img, soft_ellipse(u, v - bend, mx, my, mw, p["lip"] + 0.03 * n["mouth_open"], px),
          lip_colour)
    if n["mouth_open"] > 0.1:
        paint(img, soft_ellipse(u, v - bend, mx, my, mw * 0.8, 0.03 * n["mouth_open"], px),
              [0.15, 0.05, 0.05])
    if p["mole"]:
        mx_, _, vis = project(p["mole_x"] * fw)
        paint(img, vis * soft_ellipse(u, v, mx_, p["mole_y"], 0.035, 0.035, px) * face, skin * 0.35)
    if n["occlusion"]:  # a hand or an object over part of the face
        b = np.sort(n["occ_box"].reshape(2, 2), axis=0)
        paint(img, soft_box(gu, gv, b[0, 0], max(b[0, 1], 0.2), b[0, 0] + 0.5, 1.2, pixel),
              n["occ_colour"])
    return camera(img, n, gu, gv, resolution, ss)


def draw(p, rng, resolution, strength=1.0, **fixed):
    """One image of identity p with fresh nuisances from rng (some of them optionally fixed)."""
    n = random_nuisance(rng, strength, **fixed)
    n["noise_field"] = rng.standard_normal((resolution, resolution, 1))
    return render(p, n, resolution)


# ----------------------------------------------------------------------------------------------
# Benchmarks: LFW-style pairs, pickled as (list of PNG bytes, list of bool)

def bench_pair(name, i, same, test_ids, seed, resolution, jitter, keep, age_gap, strength=1.0,
               stream=STREAM_BENCH):
    """The two images of pair i of benchmark `name` (its own seed: benchmarks never change)."""
    rng = rng_for(seed, stream, BENCHMARKS.index(name) * 10_000_000 + i)
    p = test_ids[rng.integers(len(test_ids))]
    lookalike_negative = {"toy_calfw": True, "toy_cplfw": True}.get(name, rng.random() < 0.5)
    if same:
        q = p
    elif lookalike_negative:
        q = lookalike(p, rng, jitter, keep)
    else:
        q = test_ids[rng.integers(len(test_ids))]
        while q is p:
            q = test_ids[rng.integers(len(test_ids))]
    sign = rng.choice([-1, 1])
    if name == "toy_cfp_fp":  # frontal vs profile
        kw1, kw2 = {"yaw": rng.normal(0, 0.08)}, {"yaw": sign * rng.uniform(0.7, 1.0)}
    elif name == "toy_cplfw":  # pose gap in positives; negatives at random poses
        kw1, kw2 = ({"yaw": rng.normal(0, 0.1)},
                    {"yaw": sign * rng.uniform(0.6, 1.0)}) if same else ({}, {})
    elif name == "toy_agedb":  # a large age gap in every pair
        kw1, kw2 = {"age": -age_gap / 2}, {"age": age_gap / 2}
    # half the age gap in positives: its look-alike negatives are hard already
    elif name == "toy_calfw":
        kw1, kw2 = ({"age": -age_gap / 4}, {"age": age_gap / 4}) if same else ({}, {})
    else:
        kw1, kw2 = {}, {}
    return draw(p, rng, resolution, strength, **kw1), draw(q, rng, resolution, strength, **kw2)


def png_bytes(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def contact_sheet(rows, zoom=2):
    """rows: list of lists of equal-size uint8 images -> one PIL image."""
    h, w = rows[0][0].shape[:2]
    sheet = np.full((len(rows) * (h + 1), max(map(len, rows)) * (w + 1), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            sheet[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = img
    return Image.fromarray(sheet).resize((sheet.shape[1] * zoom, sheet.shape[0] * zoom),
                                         Image.NEAREST)


def pair_labels(pairs):
    """issame of a benchmark: 10 folds of `pairs // 20` positives then as many negatives."""
    half = max(1, pairs // 20)
    return [k < half for _ in range(10) for k in range(2 * half)] if pairs >= 20 else \
        [k % 2 == 0 for k in range(pairs)]


def write_benchmarks(folder, prefix, ids, issame, stream, args):
    """The five .bin benchmarks (named prefix + the kind without 'toy_') over identities `ids`;
    returns 4 positive and 4 negative pairs of each for the preview."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for name in BENCHMARKS:
        out_name = prefix + name[len("toy_"):] if prefix else name
        bins = []
        for i, same in enumerate(tqdm(issame, desc=f"{out_name:10s}", unit="pair")):
            a, b = bench_pair(name, i, same, ids, args.seed, args.resolution, args.lookalike_jitter,
                              args.lookalike_keep, args.age_gap, args.nuisance, stream)
            bins += [png_bytes(a), png_bytes(b)]
        pos = [i for i, s in enumerate(issame) if s][:4]
        neg = [i for i, s in enumerate(issame) if not s][:4]
        rows.append([np.asarray(Image.open(io.BytesIO(bins[2 * i + j])))
                     for i in pos + neg for j in (0, 1)])
        write_bin(os.path.join(folder, f"{out_name}.bin"), bins, issame)
    return rows


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--identities", type=positive_int, default=32, help="training identities")
    parser.add_argument("--per-identity", type=positive_int, default=32,
                        help="training images per identity")
    parser.add_argument("--test-identities", type=positive_int, default=400,
                        help="benchmark identities (disjoint from training)")
    parser.add_argument("--resolution", type=positive_int, default=32,
                        help="image size in pixels (up to 112)")
    parser.add_argument("--pairs", type=positive_int, default=1000,
                        help="pairs per benchmark (half positive)")
    parser.add_argument("--heldout", type=non_negative_int, default=8,
                        help="fresh renders per training identity in heldout/")
    parser.add_argument("--nuisance", type=non_negative_float, default=1.0,
                        help="strength of the nuisance factors")
    parser.add_argument(
        "--lookalike-jitter", type=probability, default=0.5,
        help="look-alike negatives: continuous parameters move by up to this share of their range")
    parser.add_argument("--lookalike-keep", type=probability, default=0.3,
                        help="look-alike negatives: probability of keeping each discrete attribute")
    parser.add_argument("--age-gap", type=probability, default=0.4,
                        help="age difference inside toy_agedb pairs (half of it in toy_calfw "
                             "positives) (ages run 0..1; training images drift by about 0.15)")
    parser.add_argument("--val-identities", type=non_negative_int, default=0,
                        help="identities of the validation benchmarks in val/ (their own identity "
                             "and pair streams; "
                             "for choosing recipes, never the test benchmarks); 0: none")
    parser.add_argument("--allpairs-identities", type=non_negative_int, default=0,
                        help="identities of the all-pairs 1:1 test set in allpairs/<identity>/ "
                             "(evaluate.py "
                             "--allpairs); 0: none")
    parser.add_argument("--allpairs-per-identity", type=positive_int, default=8,
                        help="images per all-pairs identity")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    args = parser.parse_args(argv)
    if not 8 <= args.resolution <= 112:
        parser.error("--resolution must be between 8 and 112")
    if args.test_identities < 2:
        parser.error("--test-identities must be >= 2")
    if args.val_identities == 1 or args.allpairs_identities == 1 or args.allpairs_per_identity < 2:
        parser.error("--val-identities and --allpairs-identities must be 0 or >= 2, "
                     "--allpairs-per-identity >= 2")
    args.defaults = {k: parser.get_default(k) for k in vars(args)}
    return args


def main(argv=None):
    args = parse_args(argv)
    defaults = args.__dict__.pop("defaults")
    meta_path = os.path.join(args.out, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            done = json.load(f).get("args", {})
        # a set made before a flag existed counts as made with that flag's default (a moved set too)
        if {**defaults, **done, "out": args.out} == vars(args):
            print(f"{args.out} is already complete with these arguments")
            return
    try:
        check_output_dir(args.out)
        with output_lock(args.out):
            remove_stale_tmp(args.out)
            make(args, meta_path)
    except InputError as e:
        fail(e)


def make(args, meta_path):
    """Render the training identities, held-out renders, benchmarks, validation and all-pairs
    sets."""
    t0 = time.time()
    R = args.resolution
    identities = [random_identity(rng_for(args.seed, STREAM_IDENTITY, i))
                  for i in range(args.identities)]
    test_ids = [random_identity(rng_for(args.seed, STREAM_TEST_IDENTITY, j))
                for j in range(args.test_identities)]
    preview = []
    for split, stream, count in (("train", STREAM_TRAIN, args.per_identity),
                                 ("heldout", STREAM_HELDOUT, args.heldout)):
        for i, p in enumerate(tqdm(identities, desc=f"{split:7s}", unit="id", disable=count == 0)):
            folder = os.path.join(args.out, split, f"id{i:05d}")
            os.makedirs(folder, exist_ok=True)
            row = []
            for k in range(count):
                img = draw(p, rng_for(args.seed, stream, i * 100_000 + k), R, args.nuisance)
                write_atomic(os.path.join(folder, f"{k:04d}.png"), png_bytes(img))
                row.append(img)
            if split == "train" and i < 12:
                preview.append(row[:12])
    issame = pair_labels(args.pairs)
    bench_rows = write_benchmarks(os.path.join(args.out, "bench"), "", test_ids, issame,
                                  STREAM_BENCH, args)
    # model selection: its own identities and pairs, never the test benchmarks
    if args.val_identities:
        val_ids = [random_identity(rng_for(args.seed, STREAM_VAL_IDENTITY, j))
                   for j in range(args.val_identities)]
        write_benchmarks(os.path.join(args.out, "val"), "val_", val_ids, issame, STREAM_VAL_BENCH,
                         args)
    if args.allpairs_identities:  # IJB-style all-pairs test set: DIR/allpairs/<identity>/*.png
        for j in tqdm(range(args.allpairs_identities), desc="allpairs", unit="id"):
            p = random_identity(rng_for(args.seed, STREAM_ALLPAIRS_IDENTITY, j))
            folder = os.path.join(args.out, "allpairs", f"id{j:05d}")
            os.makedirs(folder, exist_ok=True)
            for k in range(args.allpairs_per_identity):
                img = draw(p, rng_for(args.seed, STREAM_ALLPAIRS_IMAGE, j * 100_000 + k), R,
                           args.nuisance)
                write_atomic(os.path.join(folder, f"{k:04d}.png"), png_bytes(img))
    for name, rows in (("preview.png", preview), ("bench_preview.png", bench_rows)):
        sheet = contact_sheet(rows)
        write_atomic(os.path.join(args.out, name), lambda tmp: sheet.save(tmp, format="PNG"))
    meta = {"args": vars(args), "train_images": args.identities * args.per_identity,
            "heldout_images": args.identities * args.heldout, "pairs_per_benchmark": len(issame),
            "allpairs_images": args.allpairs_identities * args.allpairs_per_identity,
            "positives_per_benchmark": int(sum(issame)), "seconds": round(time.time() - t0, 1)}
    write_atomic(meta_path, json.dumps(meta, indent=2).encode())
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
