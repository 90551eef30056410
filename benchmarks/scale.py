"""Scale: margin-head memory and step time (plain head vs Partial FC sampling), blockwise
pair-selection time and memory, RecordIO read throughput and .rec write (pack) throughput, at
10^4-10^6 classes, in one run.

Memory is measured, not computed: each case runs in a forked child, which resets its peak resident
size (Linux /proc/self/clear_refs) after building its inputs; the table shows the peak above the
resident size at that moment (so the head's rows include its parameters, their gradient and every
activation of the step). Head step = forward + backward of the margin head alone on random
embeddings, one process (Partial FC on one rank: the sampling, not the sharding). Pair selection =
select_pairs.select_blockwise ("dist", one pair per class) on random unit vectors; where the whole
run would take too long, the partner search (C^2 d of the cost) is timed on a share of the rows and
extrapolated, and the greedy passes are not run (marked). RecordIO: a temporary .rec of small JPEGs
written with common.RecordWriter, read through a DataLoader.

Usage: python benchmarks/scale.py [--quick] [--dim 128 --batch 64 --sample-rate 0.1 --images 3000]
"""
import argparse
import gc
import io
import multiprocessing
import os
import platform
import re
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# noqa: E402
from select_pairs import (PAIR_PARTNERS, best_partners, cosine_distances, full_path_bytes,
                          select_blockwise, select_tuples)
from train_arcface import MarginHead, PartialFCHead  # noqa: E402
from common import (RecordIODataset, RecordWriter, open_datasets, pack_rec,  # noqa: E402
                    record_header)

MiB = 2 ** 20


def status(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def measured(setup, run):
    """run(setup()) in a forked child -> (its result, peak resident bytes above the child's size
    after setup), or (None, None) if the child died (out of memory)."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child():
        state = setup()
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak resident size := resident size now
        base = status("VmRSS")
        result = run(state)
        send.send((result, status("VmHWM") - base))

    p = ctx.Process(target=child)
    p.start()
    send.close()
    try:
        out = receive.recv()
    except EOFError:
        out = (None, None)
    p.join()
    return out


def timed_steps(step, min_time=1.0, min_steps=3, max_steps=20):
    """Mean seconds per call after one warm-up call."""
    step()
    t0, n = time.perf_counter(), 0
    while n < min_steps or (time.perf_counter() - t0 < min_time and n < max_steps):
        step()
        n += 1
    return (time.perf_counter() - t0) / n

# ----------------------------------------------------------------------------- margin head


def head_case(num_classes, sample_rate, dim, batch):
    def setup():
        torch.manual_seed(0)
        return torch.randn(batch, dim), torch.randint(0, num_classes, (batch,))

    def run(state):
        emb, labels = state
        if sample_rate == 1:
            head = MarginHead(dim, num_classes)
        else:
            head = PartialFCHead(dim, num_classes, sample_rate=sample_rate)

        def step():
            head.weight.grad = None
            e = emb.clone().requires_grad_()
            head(e, labels).backward()
        return timed_steps(step)
    return measured(setup, run)

# ----------------------------------------------------------------------------- pair selection


def unit_vectors(num_classes, dim):
    x = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.normalize(x, dim=1).numpy()


def select_case(num_classes, dim, block_bytes, rows=None, full=False):
    """Whole blockwise (or full-matrix) selection; with `rows`, only the partner search of that many
    rows."""
    def run(X):
        t0 = time.perf_counter()
        if full:
            select_tuples(cosine_distances(X), "dist", num_classes, 2)
        elif rows:
            best_partners(torch.from_numpy(X), np.arange(rows), PAIR_PARTNERS, "dist", block_bytes)
        else:
            select_blockwise(X, "dist", num_classes, 2, block_bytes=block_bytes)
        return (time.perf_counter() - t0) * (num_classes / rows if rows else 1)
    return measured(lambda: unit_vectors(num_classes, dim), run)

# ----------------------------------------------------------------------------- RecordIO


def write_jpeg_rec(prefix, count, size, classes=100):
    """count JPEGs of size x size (a smooth gradient plus noise, like a face crop in bytes) ->
    prefix.rec."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size)
    base = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                     np.full((size, size), 128.0)], 2)
    with RecordWriter(prefix + ".rec") as writer:
        for k in range(count):
            image = np.clip(base + rng.normal(0, 12, base.shape) + rng.integers(-60, 60, 3), 0,
                            255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="JPEG", quality=90)
            writer.write(k, record_header(k % classes) + buf.getvalue())
    return prefix + ".rec"


def read_throughput(rec, workers, batch=64):
    ds = RecordIODataset(rec)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
    t0, n = time.perf_counter(), 0
    for images, _ in loader:
        n += len(images)
    return n / (time.perf_counter() - t0)

def pack_throughput(rec, folder, ext, fmt):
    """The .rec's images written as an image folder (`ext` files), then timed through pack_rec."""
    if not os.path.isdir(folder):
        ds = RecordIODataset(rec)
        for i in range(len(ds)):
            image, label = ds[i]
            os.makedirs(os.path.join(folder, f"id{label:03d}"), exist_ok=True)
            path = os.path.join(folder, f"id{label:03d}", f"{i}.{ext}")
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    out = os.path.join(os.path.dirname(folder), f"packed-{ext}-{fmt}")
    t0 = time.perf_counter()
    n, _ = pack_rec(open_datasets([folder]), out, fmt, progress=False)
    return n / (time.perf_counter() - t0)

# ----------------------------------------------------------------------------- main


def fmt(x, spec):
    return "failed" if x is None else format(x, spec)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long run: 10^3-10^4 classes, 300 images")
    p.add_argument("--dim", type=int, default=128,
                   help="embedding size of the head and of the class centres")
    p.add_argument("--batch", type=int, default=64, help="embeddings per head step")
    p.add_argument("--sample-rate", type=float, default=0.1,
                   help="Partial FC sample rate of the sampled head")
    p.add_argument("--block-gb", type=float, default=0.25,
                   help="distance block budget of the blockwise selection")
    p.add_argument("--select-whole-max", type=int, default=100_000,
                   help="classes up to which the whole selection runs (above: the partner search, "
                        "extrapolated)")
    p.add_argument("--search-rows", type=int, default=4000,
                   help="rows timed where the search is extrapolated")
    p.add_argument("--images", type=int, default=3000, help="JPEGs in the temporary .rec")
    p.add_argument("--image-size", type=int, default=112, help="their side in pixels")
    args = p.parse_args()
    heads = [10 ** 3, 10 ** 4] if args.quick else [10 ** 4, 10 ** 5, 10 ** 6]
    selects = [2000, 5000] if args.quick else [10 ** 4, 10 ** 5, 10 ** 6]
    images = 300 if args.quick else args.images
    block = args.block_gb * 2 ** 30
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); peak memory measured (module docstring)\n")

    print(f"### Margin head: forward + backward, batch {args.batch}, embedding {args.dim}, one "
          "process\n")
    print(f"| classes | class centres (MiB) | plain head: peak MiB | plain: ms/step "
          f"| Partial FC {args.sample_rate:g}: peak MiB | Partial FC: ms/step |")
    print("|---|---|---|---|---|---|")
    for c in heads:
        full_t, full_m = head_case(c, 1.0, args.dim, args.batch)
        pfc_t, pfc_m = head_case(c, args.sample_rate, args.dim, args.batch)
        print(f"| {c:,} | {c * args.dim * 4 / MiB:.0f} | {fmt(full_m and full_m / MiB, '.0f')} | "
              f"{fmt(full_t and 1e3 * full_t, '.1f')} | {fmt(pfc_m and pfc_m / MiB, '.0f')} | "
              f"{fmt(pfc_t and 1e3 * pfc_t, '.1f')} |", flush=True)

    print("\n### Pair selection: 'dist', one pair per class, unit vectors of dimension "
          f"{args.dim}, "
          f"blocks of {args.block_gb:g} GiB\n")
    print("| classes | path | time (s) | peak MiB | full C x C path would need (GiB, estimate) |")
    print("|---|---|---|---|---|")
    for c in selects:
        est = f"{full_path_bytes(c) / 2 ** 30:,.1f}"
        if c <= 10 ** 4:
            t, m = select_case(c, args.dim, block, full=True)
            print(
                f"| {c:,} | full matrix | {fmt(t, '.1f')} | {fmt(m and m / MiB, '.0f')} | {est} |",
                flush=True)
        if c <= args.select_whole_max:
            t, m = select_case(c, args.dim, block)
            print(f"| {c:,} | blockwise | {fmt(t, '.1f')} | {fmt(m and m / MiB, '.0f')} | {est} |",
                  flush=True)
        else:
            rows = min(args.search_rows, c)
            t, m = select_case(c, args.dim, block, rows=rows)
            print(f"| {c:,} | blockwise, partner search only: timed on {rows:,} rows, extrapolated "
                  f"| {fmt(t, '.0f')} | "
                  f"{fmt(m and m / MiB, '.0f')} (search) | {est} |", flush=True)

    print(f"\n### RecordIO read: {images:,} JPEGs of {args.image_size}x{args.image_size}, "
          "DataLoader batch 64\n")
    with tempfile.TemporaryDirectory() as tmp:
        rec = write_jpeg_rec(os.path.join(tmp, "train"), images, args.image_size)
        size = os.path.getsize(rec) / MiB
        print("| workers | images/s | MiB/s |")
        print("|---|---|---|")
        for w in (0, 1, 2):
            ips = read_throughput(rec, w)
            print(f"| {w} | {ips:,.0f} | {ips * size / images:.1f} |", flush=True)

        print(f"\n### RecordIO write (train_arcface.py --pack-rec): {images:,} images of "
              f"{args.image_size}x{args.image_size} from an image folder, 100 identities\n")
        print("| source files | stored as | images/s |")
        print("|---|---|---|")
        for ext, fmt_ in (("jpg", "jpeg"), ("png", "jpeg"), ("png", "png")):
            ips = pack_throughput(rec, os.path.join(tmp, ext), ext, fmt_)
            note = " (copied)" if ext == "jpg" else " (re-encoded)" if fmt_ == "jpeg" else ""
            print(f"| {ext} | {fmt_}{note} | {ips:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
