"""CPU speed of the CPU presets, side by side in one run: fp32, bf16 autocast, channels_last and
torch.compile (inductor) for a training step of each trainer and for the sampler's denoiser call.

    python benchmarks/cpu_precision.py [--seconds 10]

Discriminator: the toy default (IResNet-18 x0.25, 128-d ArcFace head, 32 px, batch 128, SGD).
Generator: the `cpu` preset (plain UNet, 32 px, batch 64, Adam). Sampler: one Heun evaluation of
the cpu net on a batch of 64 (no gradient). "diff" is the largest difference of the variant's
loss (or denoiser output) from fp32 on the same input, the equivalence check for adopting it."""
import argparse
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train_arcface import FaceTrainer, MarginHead, iresnet  # noqa: E402
from train_diffusion import PRESETS, Denoiser, edm_loss  # noqa: E402


def discriminator(channels_last):
    torch.manual_seed(0)
    net = FaceTrainer(iresnet(18, width=0.25, embedding_size=128, input_size=32),
                      MarginHead(128, 32))
    x = torch.rand(128, 3, 32, 32) * 2 - 1
    y = torch.randint(0, 32, (128,), generator=torch.Generator().manual_seed(0))
    if channels_last:
        net, x = (net.to(memory_format=torch.channels_last),
                  x.contiguous(memory_format=torch.channels_last))
    return net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), (lambda m: m(x, y)), 128


def generator(channels_last):
    torch.manual_seed(0)
    p = PRESETS["cpu"]
    net = Denoiser(32, 3, 32, sigma_data=0.5, channels=p["channels"],
                   channel_mult=p["channel_mult"], num_blocks=p["num_blocks"],
                   num_mid_blocks=p["num_mid_blocks"], mp=False)
    # the output layer starts at zero: perturb it, or every variant gives D(x) = c_skip x
    with torch.no_grad():
        for w in net.parameters():
            if w.dim() > 1 and not w.any():
                w.normal_(0, 0.02)
    y = torch.rand(64, 3, 32, 32) * 2 - 1
    labels = torch.arange(64) % 32
    if channels_last:
        net, y = (net.to(memory_format=torch.channels_last),
                  y.contiguous(memory_format=torch.channels_last))
    # noqa: E731
    loss = lambda m: edm_loss(m, y, labels, -1.2, 1.2, 0.5, torch.Generator().manual_seed(0))
    return net, torch.optim.Adam(net.parameters(), lr=1e-4), loss, 64


def time_training(build, variant, seconds):
    net, opt, loss_fn, batch = build(variant == "channels_last")
    model = torch.compile(net) if variant == "compile" else net
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if variant == "bf16" else nullcontext()
    with ctx:
        first = loss_fn(model).item()  # the loss at the initial weights, for the equivalence check
    steps, t0 = 0, None
    while t0 is None or time.time() - t0 < seconds:
        with ctx:
            loss = loss_fn(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if t0 is None and steps == 3:  # warm-up (and compilation) excluded
            t0, steps = time.time(), 0
    return steps * batch / (time.time() - t0), first


@torch.no_grad()
def time_sampling(variant, seconds):
    net = generator(variant == "channels_last")[0].eval()
    x = torch.randn(64, 3, 32, 32) * 5
    if variant == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(64) % 32
    model = torch.compile(net) if variant == "compile" else net
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if variant == "bf16" else nullcontext()
    with ctx:
        out = model(x, 5.0, labels).float()
    calls, t0 = 0, None
    while t0 is None or time.time() - t0 < seconds:
        with ctx:
            model(x, 5.0, labels)
        calls += 1
        if t0 is None and calls == 3:
            t0, calls = time.time(), 0
    return calls * 64 / (time.time() - t0), out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seconds", type=float, default=10,
                   help="timed seconds per case (after 3 warm-up steps)")
    p.add_argument("--variants", nargs="+", default=["fp32", "bf16", "channels_last", "compile"])
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"native bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}\n")
    print("| case | variant | images/s | vs fp32 | diff from fp32 |\n|---|---|---|---|---|")
    for name, build in (("discriminator training", discriminator),
                        ("generator training", generator)):
        base = None
        for v in args.variants:
            speed, first = time_training(build, v, args.seconds)
            base = base or (speed, first)
            print(f"| {name} | {v} | {speed:.1f} | {speed / base[0]:.2f} | "
                  f"{abs(first - base[1]):.2e} |",
                  flush=True)
    base = None
    for v in args.variants:
        speed, out = time_sampling(v, args.seconds)
        base = base or (speed, out)
        print(f"| sampler (one Heun evaluation) | {v} | {speed:.1f} | {speed / base[0]:.2f} | "
              f"{float((out - base[1]).abs().max()):.2e} |", flush=True)


if __name__ == "__main__":
    main()
