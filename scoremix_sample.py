"""Sample new identities by score composition: ScoreMix (Rahimi & Marcel, arXiv 2506.10226).

The score of a class is (D(x; s, c) - x) / s^2; a weighted sum of class scores is the denoiser
x + sum_k w_k (D(x; s, c_k) - x), which for convex weights (w_k >= 0, sum 1) is exactly
    D_mix(x; s) = sum_k w_k D(x; s, c_k)    (docs/formulas.md 2; paper: w = (alpha, 1 - alpha))
ScoreMix hands D_mix to the generator's Heun sampler (deterministic as in the paper; `--churn` makes
it EDM's stochastic sampler, whose fresh noise is seeded per image too) at every evaluation of every
step, with guidance applied per class before mixing: autoguidance D_g = D_guide + w (D_net -
D_guide) (guide = a smaller / shorter-trained generator, w 1.3) or classifier-free guidance (guide =
the net's null class). Each mixed pair (or triplet) of real classes becomes one new identity. Modes:
`scoremix` (the paper), `repro` (plain class-conditional samples of the real classes, folders named
after them), `condmix` (AugGen: one network call on the weighted sum of the class embeddings).

    python scoremix_sample.py --net runs/gen/network-snapshot-000150.pt --pairs pairs.csv \
        --per-pair 16 --out runs/mix
    torchrun --nproc_per_node=8 scoremix_sample.py --net NET.pt --guide GUIDE.pt --pairs pairs.csv \
        --out DIR
    python scoremix_sample.py --net NET.pt --grid fig2.png --classes id00003 id00011

Output: DIR/<identity>/<n>.png (one folder per new identity, `mix_<a>_<b>`; real class names in
repro mode) and DIR/manifest.csv (identity, mode, sources, weights, images, seed, index, guidance,
steps, churn, net, guide). Image n of identity i uses the seed seed_for(--seed, i, n), so 1 or N
processes and any batch size give the same images; a re-run skips complete identities (each is
written to DIR/.<name>.partial and renamed when complete, so a visible identity folder is always
complete and is never removed). One process writes DIR at a time: the run holds DIR/.lock (rank 0,
for the whole run), and a second one on the same DIR stops at once with one `error:` line. pairs.csv
is read by column name (a spreadsheet's byte-order mark is fine); the classes of a tuple must be
distinct and known to --net. A generator or guide with a non-finite weight or output, or a guide of
another resolution, is refused.
"""
import argparse
import csv
import glob
import io
import math
import os
import re
import shutil
import sys
from contextlib import ExitStack, contextmanager

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from tqdm import tqdm

from common import (ArgumentParser, DataError, InputError, autocast_context, check_finite,
                    check_output_dir, check_output_file, fail, finite_float, load_checkpoint,
                    non_negative_float, non_negative_int, open_datasets, output_lock, pack_rec,
                    positive_float, positive_int, probability, read_csv, remove_stale_tmp, seed_for,
                    setup_distributed, write_atomic)
from train_diffusion import generate_images, load_generator

# ----------------------------------------------------------------------------- mixing denoisers


def check_weights(weights, classes):
    """Convex mixing weights as a list of floats; ValueError for anything else."""
    w = [float(v) for v in weights]
    if len(w) != len(classes) or not w:
        raise ValueError(
            f"{len(w)} mixing weight(s) for {len(classes)} class(es): give one weight per class")
    if not all(math.isfinite(v) and v >= 0 for v in w):
        raise ValueError(f"mixing weights must be non-negative and finite, got {w}")
    if abs(sum(w) - 1) > 1e-6:
        raise ValueError(f"mixing weights must sum to 1 (a convex mix), got {w} (sum "
                         f"{sum(w):.8g}); "
                         "score_mix_denoiser gives the non-convex score mixes")
    return w


def class_labels(c, b, device):
    """A class (int, or int64 tensor [B] of per-sample classes) -> int64 labels [b]."""
    if torch.is_tensor(c) and (c.is_floating_point() or c.is_complex()):
        raise ValueError(f"class labels must be integers, got a {c.dtype} tensor")
    labels = torch.as_tensor(c, dtype=torch.int64, device=device).reshape(-1)
    if labels.numel() not in (1, b):
        raise ValueError(f"{labels.numel()} per-sample classes for a batch of {b}")
    return labels.expand(b)


def per_sample(v, x):
    """A float or a [B] tensor -> a factor that broadcasts over x [B, ...] in x's dtype."""
    return torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.ndim - 1))


def guided(net, guide=None, guidance=1.0):
    """-> denoise(x, sigma, labels) = D_guide + w (D_net - D_guide) (EDM2 guidance; 2 calls).

    Autoguidance: `guide` is another denoiser given the same labels. Classifier-free guidance:
    guide=None and w != 1, the guide is the net's null class (labels None). w = 1: the net
    itself."""
    if guidance == 1:
        return net
    if guide is None and getattr(net, "null_class", True) is False:
        raise ValueError("classifier-free guidance needs a null class, and this generator has none "
                         "(train it with --label-dropout > 0, or give an autoguidance --guide)")

    def denoise(x, sigma, labels):
        g = net(x, sigma, None) if guide is None else guide(x, sigma, labels)
        return g + guidance * (net(x, sigma, labels) - g)
    return denoise


def each_class(denoise, classes):
    """denoise(x, sigma, labels) -> f(x, sigma) = [D(x; sigma, c_k) for k] as [K, B, ...], all K
    classes in ONE batched call (x repeated K times next to the K label vectors)."""
    def f(x, sigma):
        k, b = len(classes), x.shape[0]
        labels = torch.cat([class_labels(c, b, x.device) for c in classes])
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim:  # per-sample noise levels [B]
            sigma = sigma.reshape(-1).expand(b).repeat(k)
        return denoise(x.repeat(k, *[1] * (x.ndim - 1)), sigma, labels).reshape(k, *x.shape)
    return f


def mix_denoisers(net, classes, weights, guide=None, guidance=1.0):
    """ScoreMix: denoise(x, sigma) = sum_k w_k D_g(x; sigma, c_k) (docs/formulas.md 2), w convex.

    `classes`: ints (broadcast) or int64 tensors [B] (one class per sample, so a batch can hold many
    pairs); `guide`/`guidance`: see `guided`, applied per class before mixing. At most 2 network
    calls per evaluation. ValueError for negative weights, weights not summing to 1 (tol. 1e-6), or
    not one per class."""
    weights = check_weights(weights, classes)
    outputs = each_class(guided(net, guide, guidance), classes)

    def denoise(x, sigma):
        D = outputs(x, sigma)
        return sum(w * D[k] for k, w in enumerate(weights))
    return denoise


def score_mix_denoiser(net, classes, alpha, beta, guide=None, guidance=1.0):
    """Score-space mix of two classes for any alpha, beta (floats or [B] tensors), convex or not: x
    + alpha (D_A - x) + beta (D_B - x) (the score alpha s_A + beta s_B; docs/formulas.md 2, paper
    Fig. 2)."""
    if len(classes) != 2:
        raise ValueError(f"score_mix_denoiser mixes 2 classes, got {len(classes)}")
    outputs = each_class(guided(net, guide, guidance), classes)

    def denoise(x, sigma):
        D_a, D_b = outputs(x, sigma)
        return x + per_sample(alpha, x) * (D_a - x) + per_sample(beta, x) * (D_b - x)
    return denoise


def condition_mix_denoiser(net, classes, weights, guide=None, guidance=1.0, num_classes=None):
    """Condition mixing (AugGen, the predecessor): one network call with the class embedding sum_k
    w_k emb(c_k), passed as soft labels [B, num_classes] (train_diffusion.Denoiser accepts them)."""
    weights = check_weights(weights, classes)
    num_classes = num_classes or net.num_classes
    denoise = guided(net, guide, guidance)

    def f(x, sigma):
        b = x.shape[0]
        soft = torch.zeros(b, num_classes, device=x.device)
        for c, w in zip(classes, weights):
            soft.scatter_add_(1, class_labels(c, b, x.device)[:, None],
                              torch.full((b, 1), w, device=x.device))
        return denoise(x, sigma, soft)
    return f


def make_denoiser(mode, net, classes, weights, guide=None, guidance=1.0):
    """The sampler's denoiser for a --mode (repro: one class with weight 1)."""
    if mode == "condmix":
        return condition_mix_denoiser(net, classes, weights, guide, guidance)
    return mix_denoisers(net, classes, weights, guide, guidance)

# ----------------------------------------------------------------------------- identities


def safe_name(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "id"


def class_index(net, name, where):
    try:
        return net.class_names.index(name)
    except ValueError:
        raise ValueError(f"{where}: unknown class {name!r} (the generator has "
                         f"{len(net.class_names)} classes: "
                         f"{', '.join(net.class_names[:5])}"
                         f"{', ...' if len(net.class_names) > 5 else ''})")


def read_pairs(path, net):
    """pairs.csv (select_pairs.py) -> list of class-index tuples from its `class_*` columns, read by
    name (class_a first, whatever the column order); the classes of a tuple must be distinct."""
    header, rows = read_csv(path, ["class_a", "class_b"], "pairs file")
    columns = sorted(c for c in header if c.startswith("class_"))
    if not rows:
        raise InputError(f"{path} has a header but no pairs")
    tuples = []
    for line, row in rows:
        t = tuple(class_index(net, row[c], f"{path} line {line}") for c in columns)
        if len(set(t)) < len(t):
            raise InputError(f"{path} line {line}: a class appears twice in one tuple "
                             f"({', '.join(row[c] for c in columns)}); a mix needs distinct "
                             "classes")
        tuples.append(t)
    return tuples


def read_classes_file(path, net):
    if not os.path.isfile(path):
        raise ValueError(f"classes file not found: {path}")
    with open(path) as f:
        names = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return [class_index(net, n, f"{path}") for n in names]


def plan_identities(args, net):
    """-> list of dicts {name, classes (indices), weights}: the new identities, in a fixed order."""
    if args.mode == "repro":
        if args.pairs:
            order = list(dict.fromkeys(c for t in read_pairs(args.pairs, net) for c in t))
        elif args.classes_file:
            order = read_classes_file(args.classes_file, net)
        else:
            order = list(range(len(net.class_names)))
        for c in order:
            if safe_name(net.class_names[c]) != net.class_names[c]:
                raise ValueError(f"class name {net.class_names[c]!r} is not a plain folder name")
        return [{"name": net.class_names[c], "classes": [c], "sources": [net.class_names[c]],
                 "weights": [1.0]}
                for c in dict.fromkeys(order)]
    if not args.pairs:
        raise ValueError(f"--mode {args.mode} needs --pairs (or --grid for the figure)")
    tuples, out, taken = read_pairs(args.pairs, net), [], set()
    k = len(tuples[0])
    weights = args.weights or ([args.alpha, 1 - args.alpha] if k == 2 else [1 / k] * k)
    check_weights(weights, tuples[0])
    prefix = "mix" if args.mode == "scoremix" else "cmix"
    for t in tuples:
        base = name = safe_name(f"{prefix}_" + "_".join(net.class_names[c] for c in t))
        n = 1
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        out.append({"name": name, "classes": list(t), "sources": [net.class_names[c] for c in t],
                    "weights": [float(w) for w in weights]})
    return out


def is_complete(out, name, count):
    folder = os.path.join(out, name)
    return os.path.isdir(folder) and {f"{j}.png" for j in range(count)} <= set(os.listdir(folder))


def check_no_foreign_folders(args, identities):
    """An identity's name taken by something this sampler did not finish (a folder with fewer
    images, a file) is refused: identity folders only ever appear complete, and none is ever
    removed."""
    for d in identities:
        path = os.path.join(args.out, d["name"])
        if os.path.lexists(path) and not is_complete(args.out, d["name"], args.per_pair):
            raise InputError(f"{path} exists but is not a complete identity folder of "
                             f"{args.per_pair} "
                             "images; move it away or use another --out")


def check_room(args, net, identities):
    """Enough free disk for the missing identities' PNGs (at most about one raw image each)."""
    todo = sum(not is_complete(args.out, d["name"], args.per_pair) for d in identities)
    image = net.img_channels * net.img_resolution ** 2 + 1024
    check_output_dir(args.out, need_bytes=todo * args.per_pair * image)


def manifest_rows(args, identities):
    header = ["identity", "mode", "sources", "weights", "images", "seed", "index", "guidance",
              "steps", "churn", "net", "guide"]
    churn = (f"{args.churn:g};{args.churn_min:g};{args.churn_max:g};{args.churn_noise:g}"
             if args.churn else "")
    rows = [[ident["name"], args.mode, ";".join(ident["sources"]),
             ";".join(f"{w:g}" for w in ident["weights"]), args.per_pair, args.seed, i,
             f"{args.guidance:g}", args.steps, churn, args.net, args.guide or ""]
            for i, ident in enumerate(identities)]
    return header, rows


def check_manifest(args, identities):
    """A re-run into a folder must use the same settings for the identities both runs share."""
    path = os.path.join(args.out, "manifest.csv")
    if not os.path.isfile(path):
        return
    header, rows = manifest_rows(args, identities)
    with open(path, newline="") as f:
        old = {r["identity"]: r for r in csv.DictReader(f)}
    keys = ["mode", "sources", "weights", "images", "seed", "index", "guidance", "steps", "churn"]
    for row in rows:
        new = dict(zip(header, map(str, row)))
        # a column missing from an older manifest reads as empty (no churn)
        mine = old.get(new["identity"])
        if mine is not None and any(mine.get(k, "") != new[k] for k in keys):
            diff = {k: (mine.get(k, ""), new[k]) for k in keys if mine.get(k, "") != new[k]}
            raise ValueError(f"{args.out} already holds {new['identity']} made with other settings "
                             f"(old, new: {diff}); use another --out")


def write_manifest(args, identities):
    header, rows = manifest_rows(args, identities)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    write_atomic(os.path.join(args.out, "manifest.csv"), buf.getvalue())


def churn_kwargs(args):
    return dict(S_churn=args.churn, S_min=args.churn_min, S_max=args.churn_max,
                S_noise=args.churn_noise)


def save_png(image_u8, path):
    Image.fromarray(image_u8.permute(1, 2, 0).squeeze(-1).numpy()).save(path, format="PNG")


def sample_identities(args, net, guide, identities, rank, world, device):
    """This rank's share (identity i on rank i % world) of the incomplete identities, batched across
    identities up to --batch-size; each identity's folder is renamed into place when complete."""
    done = [is_complete(args.out, d["name"], args.per_pair) for d in identities]
    todo = [i for i, d in enumerate(done) if not d]
    if rank == 0:
        print(f"{len(identities)} identities: {sum(done)} already complete (skipped), {len(todo)} "
              "to sample "
              f"({len(todo) * args.per_pair} images, {args.mode}, {world} process(es))", flush=True)
    mine = todo[rank::world]
    for i in mine:  # a half-written identity from a killed run is redone from scratch
        shutil.rmtree(os.path.join(args.out, f".{identities[i]['name']}.partial"),
                      ignore_errors=True)
    items = [(i, j) for i in mine for j in range(args.per_pair)]
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    written = dict.fromkeys(mine, 0)
    ctx, _ = autocast_context(device, args.amp)
    bar = tqdm(total=len(items), unit="img", disable=rank != 0, dynamic_ncols=True,
               desc=f"{args.mode} (rank 0)")
    try:
        for lo in range(0, len(items), args.batch_size):
            chunk = items[lo:lo + args.batch_size]
            k = len(identities[chunk[0][0]]["classes"])
            classes = [torch.tensor([identities[i]["classes"][c] for i, _ in chunk], device=device)
                       for c in range(k)]
            denoise = make_denoiser(args.mode, net, classes, identities[chunk[0][0]]["weights"],
                                    guide, args.guidance)
            with ctx:
                images = generate_images(denoise, None,
                                         [seed_for(args.seed, i, j) for i, j in chunk],
                                         num_steps=args.steps, batch_size=len(chunk), shape=shape,
                                         device=device, **churn_kwargs(args))
            for (i, j), image in zip(chunk, images):
                name = identities[i]["name"]
                partial = os.path.join(args.out, f".{name}.partial")
                os.makedirs(partial, exist_ok=True)
                save_png(image, os.path.join(partial, f"{j}.png"))
                written[i] += 1
                # visible only when complete (foreign names refused)
                if written[i] == args.per_pair:
                    os.replace(partial, os.path.join(args.out, name))
            bar.update(len(chunk))
    except BaseException:  # a full disk, an interrupt: no half-written identity stays behind
        for i in mine:
            if written[i] < args.per_pair:
                partial = os.path.join(args.out, f".{identities[i]['name']}.partial")
                shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        bar.close()

# ----------------------------------------------------------------------------- figures


def labelled_grid(cells, row_labels, col_labels, title, zoom=2, pad=2, frames=()):
    """uint8 cells [R, C, 3, H, W] -> a PIL image with column labels on top, row labels on the left,
    a title line above, and a red frame around the cells (r, c) listed in `frames`."""
    rows, cols, _, h, w = cells.shape
    cw, ch = w * zoom, h * zoom
    left, top = 8 + 6 * max(len(s) for s in row_labels), 14 * (title.count("\n") + 1) + 16
    width = max(left + cols * (cw + pad) + pad, 12 + 6 * max(len(s) for s in title.split("\n")))
    canvas = Image.new("RGB", (width, top + rows * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.multiline_text((4, 2), title, fill="black", spacing=3)
    for c, text in enumerate(col_labels):
        draw.text((left + pad + c * (cw + pad) + 2, top - 13), text, fill="black")
    for r, text in enumerate(row_labels):
        draw.text((4, top + pad + r * (ch + pad) + ch // 2 - 5), text, fill="black")
        for c in range(cols):
            x0, y0 = left + pad + c * (cw + pad), top + pad + r * (ch + pad)
            cell = Image.fromarray(cells[r, c].permute(1, 2, 0).numpy()).resize((cw, ch),
                                                                                Image.NEAREST)
            canvas.paste(cell, (x0, y0))
            if (r, c) in frames:
                draw.rectangle((x0 - pad, y0 - pad, x0 + cw + pad - 1, y0 + ch + pad - 1),
                               outline="red", width=pad)
    return canvas


def save_image_atomic(image, path):
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def render_figures(args, net, guide, a, b, device):
    """Paper Fig. 2: the alpha x beta sweep x + alpha (D_A - x) + beta (D_B - x) of one pair, rows
    beta, columns alpha, one seed for every cell (alpha + beta = 1, framed red: the convex ScoreMix
    mixes). Paper Fig. 3 (OUT-triplets.png): rows = seeds; columns reproduction A, ScoreMix(A, B),
    reproduction B."""
    values = [0.0, 0.2, 0.5, 0.8, 1.0]
    seeds = [args.seed + r for r in range(args.grid_seeds)]
    alpha = ([al for _ in values for al in values]
             + [x for _ in seeds for x in (1.0, args.alpha, 0.0)])
    beta = ([be for be in values for _ in values]
            + [x for _ in seeds for x in (0.0, 1 - args.alpha, 1.0)])
    # same noise across a row
    all_seeds = [args.seed] * len(values) ** 2 + [s for s in seeds for _ in range(3)]
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    ctx, _ = autocast_context(device, args.amp)
    images = []
    # a per-sample (alpha, beta) in one batched sampler
    for lo in range(0, len(alpha), args.batch_size):
        hi = lo + args.batch_size
        denoise = score_mix_denoiser(net, [a, b], torch.tensor(alpha[lo:hi]),
                                     torch.tensor(beta[lo:hi]), guide, args.guidance)
        with ctx:
            images.append(generate_images(denoise, None, all_seeds[lo:hi], num_steps=args.steps,
                                          batch_size=args.batch_size, shape=shape, device=device,
                                          **churn_kwargs(args)))
    images = torch.cat(images)
    n = len(values)
    zoom = max(1, 64 // net.img_resolution)
    w = f"{args.guidance:g}" + (" (autoguidance)" if guide is not None and args.guidance != 1 else
                                " (CFG)" if args.guidance != 1 else "")
    title = (f"x + alpha (D_A - x) + beta (D_B - x); A = {args.classes[0]}, B = {args.classes[1]}\n"
             f"columns: alpha, rows: beta; red: alpha + beta = 1; {args.steps} Heun steps, "
             f"guidance {w}")
    grid = labelled_grid(
        images[:n * n].reshape(n, n, *shape), [f"b={v:g}" for v in values],
        [f"a={v:g}" for v in values], title, zoom=zoom,
        frames=[(r, c) for r in range(n) for c in range(n)
                if abs(values[r] + values[c] - 1) < 1e-9])
    save_image_atomic(grid, args.grid)
    triplets = labelled_grid(images[n * n:].reshape(len(seeds), 3, *shape),
                             [f"seed {s}" for s in seeds],
                             [args.classes[0][:10], f"mix a={args.alpha:g}", args.classes[1][:10]],
                             f"Repro A | ScoreMix(A, B) | Repro B\nguidance {w}", zoom=zoom)
    save_image_atomic(triplets, args.grid3)
    print(f"wrote {args.grid} and {args.grid3}")

# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--net", required=True,
                   help="generator snapshot (train_diffusion.py network-snapshot-*.pt)")
    p.add_argument("--pairs", help="pairs.csv of select_pairs.py: columns class_a, class_b[, "
                                   "class_c] name classes")
    p.add_argument("--per-pair", type=positive_int, default=16, help="images per new identity")
    p.add_argument("--out", help="output folder: <identity>/<n>.png and manifest.csv")
    p.add_argument("--mode", choices=["scoremix", "repro", "condmix"], default="scoremix",
                   help="scoremix: mix denoiser outputs; repro: plain samples of the real classes; "
                        "condmix: mix the class embeddings (AugGen)")
    p.add_argument("--classes-file",
                   help="repro without --pairs: class names, one per line (None: all classes)")
    p.add_argument("--guide",
                   help="autoguidance guide snapshot (same classes, smaller / shorter-trained)")
    p.add_argument("--guidance", type=finite_float,
                   help="guidance weight w (None: 1.3 with --guide, else 1 = none; w != 1 without "
                        "--guide: classifier-free, needs a null class)")
    p.add_argument("--alpha", type=probability, default=0.5,
                   help="weight of class_a in a pair (class_b: 1 - alpha)")
    p.add_argument("--weights", type=non_negative_float, nargs="+",
                   help="explicit convex weights, one per class column (None: alpha, 1 - alpha "
                        "for pairs; equal for tuples)")
    p.add_argument("--steps", type=positive_int, default=32,
                   help="Heun steps (deterministic, Karras schedule)")
    p.add_argument("--churn", type=non_negative_float, default=0,
                   help="S_churn of the stochastic Heun sampler (EDM Alg. 2; 0: deterministic); "
                        "the noise is seeded per image like the start")
    p.add_argument("--churn-min", type=non_negative_float, default=0.05,
                   help="S_min: churn only where sigma >= this")
    p.add_argument("--churn-max", type=non_negative_float, default=50,
                   help="S_max: churn only where sigma <= this")
    p.add_argument("--churn-noise", type=positive_float, default=1.003,
                   help="S_noise: scale of the churn noise")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per sampler batch per process")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="base seed: image n of identity i uses seed_for(seed, i, n)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (None: cuda if available)")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast where the GPU or CPU has native bf16")
    p.add_argument("--rec", metavar="OUT_DIR",
                   help="also pack the identities into OUT_DIR/train.rec + train.idx + property "
                        "(insightface's layout, JPEG)")
    p.add_argument("--rec-real", nargs="+", default=[], metavar="SRC",
                   help="with --rec: real sources (image folders / train.rec) packed first, the "
                        "synthetic "
                        "identities appended as new classes (as train_arcface.py --data SRC... "
                        "--out merges them)")
    p.add_argument("--rec-size", type=positive_int,
                   help="with --rec: resize every image to this square size (arcface_torch "
                        "expects 112; default: as they are)")
    g = p.add_argument_group("figures (instead of identity folders)")
    g.add_argument("--grid",
                   help="write the alpha x beta sweep of --classes A B here (paper Fig. 2)")
    g.add_argument("--grid3", help="the Repro A | ScoreMix | Repro B figure (paper Fig. 3) (None: "
                                   "<grid>-triplets.png)")
    g.add_argument("--classes", nargs=2, metavar=("A", "B"),
                   help="the two class names of the figures")
    g.add_argument("--grid-seeds", type=positive_int, default=4,
                   help="rows (seeds) of the triplet figure")
    args = p.parse_args(argv)
    if args.guidance is None:
        args.guidance = 1.3 if args.guide else 1.0
    if args.grid:
        if not args.classes:
            p.error("--grid needs --classes A B")
        args.grid3 = args.grid3 or os.path.splitext(args.grid)[0] + "-triplets.png"
    elif not args.out:
        p.error("--out is required (or --grid for the figure)")
    return args


def load(path, what):
    if os.path.isdir(path):
        sys.exit(f"error: {what} {path} is a folder, not a snapshot")
    if not os.path.isfile(path):
        sys.exit(f"error: {what} snapshot not found: {path}")
    try:
        return load_checkpoint(load_generator, path, "train_diffusion.py network snapshot")
    except InputError as e:
        sys.exit(f"error: cannot load {what} snapshot: {e}")


def check_generator(net, path, what):
    """Every parameter and buffer finite, and one forward pass (two noise levels, two classes)
    finite: a diverged snapshot is refused before it samples anything."""
    check_finite(f"{what} {path}", net.state_dict())
    x = torch.randn(2, net.img_channels, net.img_resolution, net.img_resolution,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        D = net(x, torch.tensor([80.0, 0.5]), torch.tensor([0, net.num_classes - 1]))
    check_finite(f"{what} {path}", {"its output": D})


def check_guide(net, guide):
    """Autoguidance runs the guide on the net's images and labels: same classes, same image
    shape."""
    if guide.class_names != net.class_names:
        raise InputError("--guide has other classes than --net (autoguidance uses the same labels)")
    mine, theirs = (net.img_channels, net.img_resolution), (guide.img_channels,
                                                            guide.img_resolution)
    if mine != theirs:
        raise InputError(f"--guide makes {theirs[0]} x {theirs[1]} px images and --net "
                         f"{mine[0]} x {mine[1]} px (autoguidance needs the same resolution)")


@contextmanager
def output_guard(args):
    """Before any work: the outputs checked and, for --out, the one-writer lock held by this
    job's rank 0 for the whole run (stale temporary files and half-written identities removed
    under it)."""
    with ExitStack() as stack:
        try:
            if args.grid:
                check_output_file(args.grid, flag="--grid")
                check_output_file(args.grid3, flag="--grid3")
            else:
                check_output_dir(args.out)
                if int(os.environ.get("RANK", 0)) == 0:
                    stack.enter_context(output_lock(args.out))
                    remove_stale_tmp(args.out)
                    for partial in glob.glob(os.path.join(glob.escape(args.out), ".*.partial")):
                        shutil.rmtree(partial, ignore_errors=True)  # a killed run's unfinished ones
        except InputError as e:
            fail(e)
        yield


def main(argv=None):
    args = parse_args(argv)
    with output_guard(args):  # one writer per --out; a second process stops here at once
        run(args)


def run(args):
    net = load(args.net, "--net")
    guide = load(args.guide, "--guide") if args.guide else None
    try:
        check_generator(net, args.net, "--net")
        if guide is not None:
            check_generator(guide, args.guide, "--guide")
            check_guide(net, guide)
    except InputError as e:
        fail(e)
    if guide is None and args.guidance != 1 and not net.null_class:
        sys.exit(f"error: --guidance {args.guidance:g} without --guide is classifier-free "
                 f"guidance, and {args.net} "
                 "has no null class (train with --label-dropout > 0, or give --guide)")
    try:
        if args.grid:
            pair = [class_index(net, n, "--classes") for n in args.classes]
        else:
            identities = plan_identities(args, net)
            check_manifest(args, identities)
            check_no_foreign_folders(args, identities)
            check_room(args, net, identities)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.grid:  # one process draws the figures
        if int(os.environ.get("RANK", 0)) == 0:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            render_figures(args, net.to(device), guide.to(device) if guide else None, *pair, device)
        return
    rank, _, world, device = setup_distributed(args.device)
    net, guide = net.to(device), guide.to(device) if guide is not None else None
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    if world > 1:
        dist.barrier()
    try:
        sample_identities(args, net, guide, identities, rank, world, device)
    except OSError as e:  # a full disk, a folder removed under us (half-written identities removed)
        fail(f"writing {args.out}: {e.strerror or e}")
    if world > 1:
        dist.barrier()
    if rank == 0:
        missing = [d["name"] for d in identities
                   if not is_complete(args.out, d["name"], args.per_pair)]
        if missing:
            sys.exit(f"error: {len(missing)} identities incomplete after sampling: "
                     f"{', '.join(missing[:5])}")
        write_manifest(args, identities)
        print(f"{len(identities)} identities x {args.per_pair} images in {args.out}")
        if args.rec:
            try:
                n, c = pack_rec(open_datasets([*args.rec_real, args.out]), args.rec,
                                size=args.rec_size, progress=False)
            except DataError as e:
                sys.exit(f"error: {e}")
            print(f"{n} images of {c} identities -> {os.path.join(args.rec, 'train.rec')}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
