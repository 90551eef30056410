"""Overhead of train_diffusion.py's training loop over a bare forward + backward + Adam step.

Both run in one process, on the same data, network and batch: first the real command (images
decoded per item as they stream, --workers loader processes, flips, lr schedule, weight
normalisation, EMA, logging; snapshots and checkpoints switched off), then a bare loop over images
decoded beforehand that only calls edm_loss, backward and the optimiser. Prints images/s of each and
their ratio.

    python benchmarks/diffusion_loop_overhead.py --data data/toy/train --kimg 3
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_diffusion as td  # noqa: E402
from common import load_images, open_datasets  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True,
                        help="training image folder (e.g. the default toy set)")
    parser.add_argument("--kimg", type=float, default=3.0,
                        help="images (thousands) timed in each loop")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of both loops")
    parser.add_argument("--workers", type=int, default=0,
                        help="data-loading processes of the training loop")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as run:
        warm = 0.64  # the first status window (warm-up) is left out of the loop's figure
        td.main(["--data", args.data, "--out", run, "--duration", str(warm + args.kimg),
                 "--batch-size", str(args.batch_size), "--snapshot-every", "0",
                 "--checkpoint-every", "0", "--status-every", str(warm), "--workers",
                 str(args.workers)])
        with open(os.path.join(run, "log.jsonl")) as f:
            status = [json.loads(line) for line in f if '"images_per_s"' in line]
        first, last = status[0], status[-1]  # from the end of the warm-up window to the end
        loop = (last["kimg"] - first["kimg"]) * 1e3 / (last["time"] - first["time"])
        config = json.load(open(os.path.join(run, "config.json")))["net"]

    images, labels = load_images(open_datasets([args.data]), config["img_resolution"],
                                 progress=False)
    net = td.Denoiser(**config).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(0)
    steps = int(args.kimg * 1e3 / args.batch_size)
    batches = [torch.randint(len(images), (args.batch_size,),
                             generator=gen) for _ in range(steps + 3)]
    for i, idx in enumerate(batches):
        if i == 3:  # three warm-up steps
            t0 = time.perf_counter()
        loss = td.edm_loss(net, td.to_float(images[idx]), labels[idx], -1.2, 1.2,
                           config["sigma_data"], gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    bare = steps * args.batch_size / (time.perf_counter() - t0)
    print(f"\nbatch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{sum(p.numel() for p in net.parameters()):,} "
          f"parameters\nfull training loop: {loop:.1f} images/s\nbare fwd+bwd+step: {bare:.1f} "
          "images/s\n"
          f"ratio loop / bare: {loop / bare:.3f}")


if __name__ == "__main__":
    main()
