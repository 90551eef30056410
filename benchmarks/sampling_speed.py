"""Time ScoreMix sampling against plain class-conditional sampling on one generator, in one run.

Three samplers, same net, steps, batch and seeds: plain (one class, 1 network call of B images per
evaluation), ScoreMix without guidance (2 classes in one call of 2B images) and ScoreMix with
autoguidance (2 calls of 2B: the net and the guide). Prints images/s, the measured time ratios and the
ratios expected from the images pushed through the networks (2x; 2 + 2 x guide/net FLOP-ish cost,
taken as the parameter-count ratio). Without --net: a freshly initialised `cpu`-preset Denoiser
(32 px, 2.6M parameters) and, without --guide, a second one as the guide.

Usage: python benchmarks/sampling_speed.py [--net SNAPSHOT.pt --guide SNAPSHOT.pt --steps 32 --images 16
                                            --batch-size 16 --device cpu]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scoremix_sample import mix_denoisers  # noqa: E402
from train_diffusion import PRESETS, Denoiser, generate_images, load_generator  # noqa: E402


def fresh_net(seed, num_classes=16):
    p = PRESETS["cpu"]
    torch.manual_seed(seed)
    net = Denoiser(p["resolution"], 3, num_classes, channels=p["channels"], channel_mult=p["channel_mult"],
                   num_blocks=p["num_blocks"], num_mid_blocks=p["num_mid_blocks"], sigma_data=0.48)
    return net.eval().requires_grad_(False)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--net", help="generator snapshot (default: a fresh cpu-preset Denoiser)")
    p.add_argument("--guide", help="autoguidance guide snapshot (default: a second fresh net of the same size)")
    p.add_argument("--steps", type=int, default=32, help="Heun steps")
    p.add_argument("--images", type=int, default=16, help="images per sampler")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch")
    p.add_argument("--guidance", type=float, default=1.3, help="autoguidance weight")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
    args = p.parse_args()
    device = torch.device(args.device)
    net = (load_generator(args.net) if args.net else fresh_net(0)).to(device)
    guide = (load_generator(args.guide) if args.guide else fresh_net(1, net.num_classes)).to(device)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    seeds = list(range(args.images))
    a, b = torch.arange(args.images) % net.num_classes, (torch.arange(args.images) + 1) % net.num_classes

    def sample(make):  # per-sample classes, in batches of --batch-size
        for lo in range(0, args.images, args.batch_size):
            sl = slice(lo, lo + args.batch_size)
            generate_images(make(a[sl].to(device), b[sl].to(device)), None, seeds[sl], num_steps=args.steps,
                            batch_size=args.batch_size, shape=shape, device=device)

    samplers = {
        "plain": lambda ca, cb: (lambda x, sigma: net(x, sigma, ca)),
        "scoremix": lambda ca, cb: mix_denoisers(net, [ca, cb], [0.5, 0.5]),
        "scoremix+autoguidance": lambda ca, cb: mix_denoisers(net, [ca, cb], [0.5, 0.5], guide, args.guidance),
    }
    generate_images(net, 0, [0], num_steps=2, shape=shape, device=device)  # warm-up
    seconds = {name: timed(lambda: sample(make)) for name, make in samplers.items()}
    guide_cost = sum(q.numel() for q in guide.parameters()) / sum(q.numel() for q in net.parameters())
    expected = {"plain": 1.0, "scoremix": 2.0, "scoremix+autoguidance": 2.0 + 2.0 * guide_cost}
    print(f"{args.images} images, {args.steps} Heun steps ({2 * args.steps - 1} evaluations), batch {args.batch_size}, "
          f"{device}, {torch.get_num_threads()} threads, {sum(q.numel() for q in net.parameters()):,} parameters "
          f"({'snapshot' if args.net else 'fresh cpu preset'}), guide/net parameters {guide_cost:.2f}")
    print(f"{'sampler':<24}{'images/s':>10}{'time / plain':>14}{'expected':>10}")
    for name, s in seconds.items():
        print(f"{name:<24}{args.images / s:>10.2f}{s / seconds['plain']:>14.2f}{expected[name]:>10.2f}")


if __name__ == "__main__":
    main()
