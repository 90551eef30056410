"""Time ScoreMix sampling with and without light autoguidance against plain sampling, in one run.

Four samplers, same net, steps, batch and seeds: plain (one class, 1 network call of B images per
evaluation), ScoreMix without guidance (2 classes in one call of 2B images), ScoreMix guided by a
small guide (2B images through the net + 2B through the guide: EDM2's light autoguidance) and
ScoreMix guided by a same-size guide (an early snapshot of the net: twice the unguided cost).
Prints images/s, the time ratios to plain and the ratios expected from parameter counts.

Without snapshots the nets are freshly initialised from the presets: --preset cpu (32 px) with a
`cpu-guide` small guide, or --preset edm2-s (64 px) with an `edm2-xs` small guide (for a GPU).

Usage: python benchmarks/sampling_speed.py [--preset cpu|edm2-s|edm2-m --net NET.pt --small-guide
G.pt
                                            --same-guide G.pt --steps 32 --images 16 --batch-size 16
                                            --classes 16 --device cpu --amp]
"""
import argparse
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scoremix_sample import mix_denoisers  # noqa: E402
from train_diffusion import PRESETS, Denoiser, generate_images, load_generator  # noqa: E402

SMALL_GUIDE = {"cpu": "cpu-guide", "edm2-s": "edm2-xs", "edm2-m": "edm2-xs", "edm2-xs": "edm2-xs"}


def fresh_net(preset, seed, num_classes):
    """A freshly initialised Denoiser with the preset's architecture (speed does not depend on
    weights)."""
    p = PRESETS[preset]
    torch.manual_seed(seed)
    net = Denoiser(p["resolution"], 3, num_classes, sigma_data=0.5,
                   uncertainty=bool(p["uncertainty"]), channels=p["channels"],
                   channel_mult=p["channel_mult"], num_blocks=p["num_blocks"],
                   num_mid_blocks=p["num_mid_blocks"], attn_resolutions=p["attn"], mp=bool(p["mp"]),
                   dropout=p["dropout"])
    return net.eval().requires_grad_(False)


def parameters(net):
    return sum(q.numel() for q in net.parameters())


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(SMALL_GUIDE), default="cpu",
                   help="architecture of the fresh nets (the small guide: cpu-guide or edm2-xs)")
    p.add_argument("--net", help="generator snapshot (default: a fresh net of --preset)")
    p.add_argument("--small-guide",
                   help="small guide snapshot (default: a fresh net of the preset's guide preset)")
    p.add_argument("--same-guide",
                   help="same-size guide snapshot (default: a second fresh net of --preset)")
    p.add_argument("--classes", type=int, default=16, help="classes of the fresh nets")
    p.add_argument("--steps", type=int, default=32, help="Heun steps")
    p.add_argument("--images", type=int, default=16, help="images per sampler")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch")
    p.add_argument("--guidance", type=float, default=1.3, help="autoguidance weight")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    args = p.parse_args()
    device = torch.device(args.device)
    net = load_generator(args.net) if args.net else fresh_net(args.preset, 0, args.classes)
    small = load_generator(args.small_guide) if args.small_guide else fresh_net(
        SMALL_GUIDE[args.preset], 1, net.num_classes)
    same = (load_generator(args.same_guide) if args.same_guide
            else fresh_net(args.preset, 2, net.num_classes))
    net, small, same = net.to(device), small.to(device), same.to(device)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    seeds = list(range(args.images))
    a = torch.arange(args.images) % net.num_classes
    b = (torch.arange(args.images) + 1) % net.num_classes
    ctx = torch.autocast(device.type, torch.bfloat16) if args.amp else nullcontext()

    def sample(make):  # per-sample classes, in batches of --batch-size
        for lo in range(0, args.images, args.batch_size):
            sl = slice(lo, lo + args.batch_size)
            with ctx:
                generate_images(make(a[sl].to(device), b[sl].to(device)), None, seeds[sl],
                                num_steps=args.steps, batch_size=args.batch_size, shape=shape,
                                device=device)

    samplers = {"plain": lambda ca, cb: (lambda x, sigma: net(x, sigma, ca)), "scoremix": lambda ca,
                cb: mix_denoisers(net, [ca, cb], [0.5, 0.5]), "scoremix+small guide": lambda ca,
                cb: mix_denoisers(net, [ca, cb], [0.5, 0.5], small, args.guidance),
                "scoremix+same-size guide": lambda ca,
                cb: mix_denoisers(net, [ca, cb], [0.5, 0.5], same, args.guidance),}
    sample(lambda ca, cb: mix_denoisers(net, [ca, cb], [0.5, 0.5], small, args.guidance))  # warm-up
    seconds = {name: timed(lambda: sample(make)) for name, make in samplers.items()}
    small_cost, same_cost = parameters(small) / parameters(net), parameters(same) / parameters(net)
    expected = {"plain": 1.0, "scoremix": 2.0, "scoremix+small guide": 2.0 + 2.0 * small_cost,
                "scoremix+same-size guide": 2.0 + 2.0 * same_cost}
    print(f"{args.images} images, {args.steps} Heun steps ({2 * args.steps - 1} evaluations), "
          f"batch {args.batch_size}, {device}{' bf16' if args.amp else ''}, "
          f"{torch.get_num_threads()} threads; net {parameters(net):,} parameters "
          f"({args.net or 'fresh ' + args.preset}), small guide {parameters(small):,} "
          f"({args.small_guide or 'fresh ' + SMALL_GUIDE[args.preset]}), "
          f"same-size guide {parameters(same):,}")
    print(f"{'sampler':<26}{'images/s':>10}{'time / plain':>14}{'expected':>10}")
    for name, s in seconds.items():
        print(
            f"{name:<26}{args.images / s:>10.2f}{s / seconds['plain']:>14.2f}"
            f"{expected[name]:>10.2f}")


if __name__ == "__main__":
    main()
