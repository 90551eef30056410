"""Train the generator: a class-conditional EDM denoiser (handwritten UNet) with EMA, snapshots and
the Heun sampler that the later stages reuse (ScoreMix, Rahimi & Marcel, arXiv 2506.10226).

A raw UNet F becomes the denoiser D by the EDM preconditioning (Karras et al. 2022, PROTOCOLS.md 1):
    D(x; s, y) = c_skip(s) x + c_out(s) F(c_in(s) x, ln(s)/4, y),  c_skip = sd^2/(s^2+sd^2), ...
trained on ln s ~ N(P_mean, P_std^2) with loss (s^2+sd^2)/(s*sd)^2 * (D(y+s*n; s, label) - y)^2
(+ EDM2's learned uncertainty u(s): loss/exp(u) + u). The loss is averaged over pixels where EDM sums
them: a constant factor C*H*W that Adam's normalisation cancels (only epsilon's relative size changes;
with SGD it would be a rescaled learning rate).
The class embedding (one row per identity) is added to the noise embedding; its rows are the
"condition space" that ScoreMix compares with the discriminator (`condition_vectors`).

Presets: `cpu` (default) is the 2-core recipe of DESIGN.md (plain GroupNorm UNet, 32/64/128 channels
at 32/16/8 px, 2.6M parameters, batch 64, lr 2e-3 with warm-up, constant then linear to 0);
`edm2-s` is EDM2-S-like (magnitude-preserving layers, 192 x [1,2,3,4] channels, attention at 16 and
8 px, learned uncertainty, inverse-sqrt lr). State is counted in images; re-running a command resumes
from RUN/checkpoint.pt and gives the same weights as an uninterrupted run.

    python train_diffusion.py --data toy/train --heldout toy/heldout --out runs/gen
    torchrun --nproc_per_node=8 train_diffusion.py --preset edm2-s --data train.rec --out runs/gen --amp

Snapshot RUN/network-snapshot-<kimg:06d>.pt (load with `load_generator`, weights_only=True):
    {"config": Denoiser kwargs, "ema": EMA state_dict for the first --ema-std,
     "ema_std_<x>": the others, "class_names": [...], "kimg": float, "sigma_data": float}
"""
import argparse
import copy
import functools
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from train_arcface import (DataError, autocast_context, epoch_order, load_images, open_datasets, save_atomic,
                           seed_for, setup_distributed, write_text_atomic)

# ----------------------------------------------------------------------------- layers


def normalize(x, dim=None, eps=1e-4):
    """EDM2: scale x so that its elements have unit RMS over `dim` (all but the first by default)."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x):  # EDM2: SiLU rescaled to unit magnitude for unit-variance input
    return F.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, t=0.5):
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=1)


class MPConv(nn.Module):
    """EDM2 magnitude-preserving conv (kernel k) or linear (k = 0) with forced weight normalisation."""

    def __init__(self, cin, cout, kernel):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, *([kernel] * 2 if kernel else [])))

    def forward(self, x, gain=1):
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalisation
        w = (normalize(w) * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        return x @ w.t() if w.ndim == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)


def layer(cin, cout, kernel, mp):
    """Conv (kernel > 0) or linear (kernel 0), plain or magnitude-preserving."""
    if mp:
        return MPConv(cin, cout, kernel)
    return nn.Conv2d(cin, cout, kernel, padding=kernel // 2) if kernel else nn.Linear(cin, cout)


def group_norm(channels):
    return nn.GroupNorm(max(1, min(32, channels // 4)), channels)


class Fourier(nn.Module):
    """Random Fourier features of the noise level (EDM2 MPFourier): sqrt(2) cos(2 pi (f c + phase))."""

    def __init__(self, num_channels, bandwidth=1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, c):
        return (c.float().ger(self.freqs) + self.phases).cos() * math.sqrt(2)


class Block(nn.Module):
    """Residual block conditioned on the embedding, optionally followed by self-attention.

    plain: x + conv(SiLU(GN(h) * (1 + scale) + shift)), h = conv(SiLU(GN(x))), (scale, shift) from emb.
    mp:    EDM2 block: pixel norm (encoder), mp_silu, multiplicative embedding, mp_sum with t = 0.3."""

    def __init__(self, cin, cout, cemb, mp, flavor="enc", attention=False, dropout=0.0, channels_per_head=64):
        super().__init__()
        self.mp, self.flavor, self.dropout = mp, flavor, dropout
        self.conv0 = layer(cout if mp and flavor == "enc" else cin, cout, 3, mp)
        self.conv1 = layer(cout, cout, 3, mp)
        self.skip = layer(cin, cout, 1, mp) if cin != cout else None
        self.emb = layer(cemb, cout if mp else 2 * cout, 0, mp)
        self.heads = max(1, cout // channels_per_head) if attention else 0
        if attention:
            self.qkv, self.proj = layer(cout, 3 * cout, 1, mp), layer(cout, cout, 1, mp)
        if mp:
            self.emb_gain = nn.Parameter(torch.zeros([]))
        else:
            self.norm0, self.norm1 = group_norm(cin), group_norm(cout)
            if attention:
                self.norm2 = group_norm(cout)
                nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)

    def attention(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, self.heads, c // self.heads, 3, h * w).unbind(3)
        if self.mp:
            q, k, v = normalize(q, dim=2), normalize(k, dim=2), normalize(v, dim=2)
        y = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
        return self.proj(y.transpose(2, 3).reshape(b, c, h, w))

    def forward(self, x, emb):
        if not self.mp:
            h = self.conv0(F.silu(self.norm0(x)))
            scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
            h = self.conv1(F.dropout(h, self.dropout, self.training))
            x = h + (x if self.skip is None else self.skip(x))
            return x + self.attention(self.norm2(x)) if self.heads else x
        if self.flavor == "enc":
            x = normalize(x if self.skip is None else self.skip(x), dim=1)  # pixel norm
        y = self.conv0(mp_silu(x))
        c = self.emb(emb, gain=self.emb_gain) + 1
        y = self.conv1(F.dropout(mp_silu(y * c[:, :, None, None].to(y.dtype)), self.dropout, self.training))
        if self.flavor == "dec" and self.skip is not None:
            x = self.skip(x)
        x = mp_sum(x, y, t=0.3)
        if self.heads:
            x = mp_sum(x, self.attention(x), t=0.3)
        return x.clip(-256, 256)


class UNet(nn.Module):
    """Encoder/decoder with skip connections; levels at resolution R, R/2, ... (widths channels*mult)."""

    def __init__(self, img_resolution, img_channels, label_dim, channels, channel_mult, num_blocks,
                 num_mid_blocks, attn_resolutions, mp, dropout):
        super().__init__()
        self.mp, self.label_dim = mp, label_dim
        widths = [channels * m for m in channel_mult]
        cemb = max(widths) if mp else 4 * channels
        self.fourier = Fourier(widths[0])
        if mp:  # EDM2: one-hot labels through a magnitude-preserving linear map
            self.emb_noise, self.emb_label = MPConv(widths[0], cemb, 0), MPConv(label_dim, cemb, 0)
            self.out_gain = nn.Parameter(torch.zeros([]))
        else:
            self.emb_noise = nn.Sequential(nn.Linear(widths[0], cemb), nn.SiLU(), nn.Linear(cemb, cemb))
            self.emb_label = nn.Embedding(label_dim, cemb)
        kw = dict(cemb=cemb, mp=mp, dropout=dropout)
        self.conv_in = layer(img_channels + mp, widths[0], 3, mp)  # EDM2 appends a constant channel
        self.enc, skips, cout = nn.ModuleList(), [], widths[0]
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(num_blocks):
                blocks.append(Block(cout, width, attention=(img_resolution >> level) in attn_resolutions, **kw))
                skips.append(cout := width)
            self.enc.append(blocks)
        low = img_resolution >> (len(widths) - 1)  # as EDM2: attention in the first middle block
        self.mid = nn.ModuleList(Block(cout, cout, flavor="dec", attention=i == 0 and low in attn_resolutions, **kw)
                                 for i in range(num_mid_blocks))
        self.dec = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            blocks = nn.ModuleList()
            for _ in range(num_blocks):
                blocks.append(Block(cout + skips.pop(), width, flavor="dec",
                                    attention=(img_resolution >> level) in attn_resolutions, **kw))
                cout = width
            self.dec.append(blocks)
        self.out_norm = None if mp else group_norm(cout)
        self.out_conv = layer(cout, img_channels, 3, mp)
        if not mp:  # zero-initialised output: D starts as c_skip * x
            nn.init.zeros_(self.out_conv.weight), nn.init.zeros_(self.out_conv.bias)

    def class_embedding(self, labels):
        """int64 [B] -> [B, d]: the learned class-condition vectors. Float class weights [B, L] (L =
        label_dim, or num_classes without the null column) -> weights @ table: condition mixing."""
        if labels.is_floating_point():
            weights = F.pad(labels.float(), (0, self.label_dim - labels.shape[1]))
            return self.emb_label(weights * math.sqrt(self.label_dim)) if self.mp else weights @ self.emb_label.weight
        if self.mp:
            return self.emb_label(F.one_hot(labels, self.label_dim).float() * math.sqrt(self.label_dim))
        return self.emb_label(labels)

    def forward(self, x, c_noise, labels):
        emb = self.emb_noise(self.fourier(c_noise))
        if self.mp:
            emb = mp_silu(mp_sum(emb, self.class_embedding(labels), t=0.5))
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        else:
            emb = F.silu(emb + self.class_embedding(labels))
        x, skips = self.conv_in(x), []
        for level, blocks in enumerate(self.enc):
            x = F.avg_pool2d(x, 2) if level else x
            for block in blocks:
                skips.append(x := block(x, emb))
        for block in self.mid:
            x = block(x, emb)
        for level, blocks in enumerate(self.dec):
            x = F.interpolate(x, scale_factor=2, mode="nearest") if level else x
            for block in blocks:
                x = block(mp_cat(x, skips.pop()) if self.mp else torch.cat([x, skips.pop()], dim=1), emb)
        if self.mp:
            return self.out_conv(x, gain=self.out_gain)
        return self.out_conv(F.silu(self.out_norm(x)))


def edm_precond(sigma, sigma_data):
    """EDM eq. 7 (PROTOCOLS.md 1) -> (c_skip, c_out, c_in, c_noise) for a sigma tensor."""
    s2, sd2 = sigma ** 2, sigma_data ** 2
    return sd2 / (s2 + sd2), sigma * sigma_data / (s2 + sd2).sqrt(), 1 / (s2 + sd2).sqrt(), sigma.log() / 4


class Denoiser(nn.Module):
    """D(x; sigma, class_labels) = c_skip x + c_out F(c_in x, c_noise, y); output in x's dtype.

    With `null_class` the embedding has a row num_classes: the unconditional model of classifier-free
    guidance (class_labels=None selects it)."""

    def __init__(self, img_resolution, img_channels, num_classes, null_class=False, sigma_data=0.5,
                 uncertainty=False, channels=32, channel_mult=(1, 2, 4), num_blocks=2, num_mid_blocks=1,
                 attn_resolutions=(), mp=False, dropout=0.0):
        super().__init__()
        self.config = {k: list(v) if isinstance(v, tuple) else v for k, v in locals().items()
                       if k not in ("self", "__class__")}  # the constructor's arguments, stored in snapshots
        self.img_resolution, self.img_channels, self.num_classes = img_resolution, img_channels, num_classes
        self.sigma_data, self.null_class, self.class_names = float(sigma_data), null_class, None
        self.unet = UNet(img_resolution, img_channels, num_classes + null_class, channels, channel_mult,
                         num_blocks, num_mid_blocks, attn_resolutions, mp, dropout)
        self.logvar = nn.Sequential(Fourier(128), layer(128, 1, 0, mp)) if uncertainty else None

    def forward(self, x, sigma, class_labels=None, return_logvar=False):
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        if class_labels is None:
            if not self.null_class:
                raise ValueError("this generator has no null class (train with --label-dropout > 0)")
            class_labels = self.num_classes
        if torch.is_tensor(class_labels) and class_labels.is_floating_point():  # soft labels [B, L]: class weights
            labels = class_labels.to(x.device, torch.float32).reshape(-1, class_labels.shape[-1]).expand(b, -1)
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.int64, device=x.device).reshape(-1).expand(b)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma.reshape(-1, 1, 1, 1), self.sigma_data)
        x32 = x.to(torch.float32)
        D = c_skip * x32 + c_out * self.unet(c_in * x32, c_noise.flatten(), labels).to(torch.float32)
        if not return_logvar:
            return D.to(x.dtype)
        logvar = self.logvar(c_noise.flatten()).float().reshape(-1, 1, 1, 1) if self.logvar is not None else 0
        return D.to(x.dtype), logvar  # u(sigma), EDM2 eq. 21


def condition_vectors(net):
    """The learned class embeddings [num_classes, d] (the generator's "condition space")."""
    with torch.no_grad():
        return net.unet.class_embedding(torch.arange(net.num_classes, device=net.unet.fourier.freqs.device)).float()


def load_generator(path, device="cpu", ema_std=None):
    """A network-snapshot .pt -> the EMA denoiser in eval mode (`ema_std` picks another stored EMA)."""
    snap = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(snap, dict) and {"config", "ema", "class_names", "kimg"} <= snap.keys()):
        raise ValueError(f"{path} is not a network snapshot of train_diffusion.py")
    net = Denoiser(**snap["config"])
    net.load_state_dict(snap["ema" if ema_std is None else f"ema_std_{ema_std:g}"])
    net.class_names = list(snap["class_names"])
    return net.to(device).eval().requires_grad_(False)

# ----------------------------------------------------------------------------- EMA, lr, loss


def std_to_gamma(std):
    """EDM2 power-function EMA: the exponent gamma whose profile has relative std `std`."""
    t = float(std) ** -2  # solve (g+1) / ((g+2)^2 (g+3)) = std^2 for the largest real g
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def power_function_beta(std, nimg, batch):
    """EMA decay after reaching `nimg` images with a step of `batch`: (1 - batch/nimg)^(gamma+1)."""
    return (1 - batch / nimg) ** (std_to_gamma(std) + 1)


class PowerEMA:
    """One EMA copy of the net per relative std; the first update (nimg == batch) copies the net."""

    def __init__(self, net, stds):
        self.stds, self.emas = list(stds), [copy.deepcopy(net).eval().requires_grad_(False) for _ in stds]

    @torch.no_grad()
    def update(self, net, nimg, batch):
        for std, ema in zip(self.stds, self.emas):
            beta = power_function_beta(std, nimg, batch)
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p.detach(), 1 - beta)
            for b_ema, b in zip(ema.buffers(), net.buffers()):
                b_ema.copy_(b)


def learning_rate(args, nimg):
    """lr for the step that ends at `nimg` images: warm-up, then linear (constant, then to 0) or isqrt."""
    lr = args.lr * min(nimg / max(args.rampup_kimg * 1e3, 1), 1)
    if args.lr_schedule == "isqrt":  # EDM2
        return lr / math.sqrt(max(nimg / (args.ref_kimg * 1e3), 1))
    return lr * min(1, 2 * max(0.0, 1 - nimg / (args.duration * 1e3)))


def edm_loss(net, y, labels, P_mean, P_std, sigma_data, generator):
    """EDM loss averaged over pixels and images (EDM2 uncertainty when the net has the head)."""
    sigma = (torch.randn([y.shape[0], 1, 1, 1], generator=generator, device=y.device) * P_std + P_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    noise = torch.randn(y.shape, generator=generator, device=y.device) * sigma
    D, logvar = net(y + noise, sigma.flatten(), labels, return_logvar=True)
    return (weight / torch.as_tensor(logvar).exp() * (D.float() - y) ** 2 + logvar).mean()

# ----------------------------------------------------------------------------- sampler


def karras_sigmas(num_steps, sigma_min=0.002, sigma_max=80, rho=7):
    """Karras et al. noise levels, float64 [num_steps + 1], the last one 0."""
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


class StackedRandomGenerator:
    """One torch.Generator per sample, so a seed gives the same image whatever the batch."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(s) % (1 << 63)) for s in seeds]

    def randn(self, size, dtype=torch.float32, device=None):
        return torch.stack([torch.randn(size[1:], generator=g, dtype=dtype, device=g.device)
                            for g in self.generators]).to(device or self.generators[0].device)

    def randn_like(self, x):
        return self.randn(x.shape, dtype=x.dtype, device=x.device)


@torch.no_grad()
def heun_sample(denoise, latents, sigmas, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1,
                generators=None, randn_like=None):
    """EDM Heun sampler (PROTOCOLS.md 1): x_0 = latents * sigmas[0]; Euler on the last step.

    `denoise(x, sigma)` -> D(x; sigma), sigma a 0-d tensor of x's dtype; x keeps its dtype. Churn noise
    comes from `randn_like(x)` or `generators.randn_like(x)` (a StackedRandomGenerator)."""
    randn_like = randn_like or (generators.randn_like if generators is not None else torch.randn_like)
    sigmas = torch.as_tensor(sigmas).to(latents.device, latents.dtype)
    n = len(sigmas) - 1
    x = latents * sigmas[0]
    for i in range(n):
        t, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_min <= t <= S_max else 0
        t_hat = t * (1 + gamma)
        if gamma > 0:
            x = x + (t_hat ** 2 - t ** 2).sqrt() * S_noise * randn_like(x)
        d = (x - denoise(x, t_hat)) / t_hat
        x_next = x + (t_next - t_hat) * d
        if i < n - 1:
            d2 = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * (d + d2) / 2
        x = x_next
    return x


def generate_images(denoise, class_labels, seeds, num_steps=32, batch_size=64, shape=None, device=None,
                    **sampler_kwargs):
    """Per-seed samples -> uint8 [N, C, H, W] on the CPU.

    `denoise` is a net (called as net(x, sigma, labels)) or, with class_labels=None, any
    denoise(x, sigma); `shape` (C, H, W) defaults to the net's."""
    if shape is None:
        shape = (denoise.img_channels, denoise.img_resolution, denoise.img_resolution)
    if device is None:
        device = next(denoise.parameters()).device if isinstance(denoise, nn.Module) else torch.device("cpu")
    sigmas, out = karras_sigmas(num_steps), []
    for lo in range(0, len(seeds), batch_size):
        rnd = StackedRandomGenerator(device, seeds[lo:lo + batch_size])
        fn = denoise
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, device=device).reshape(-1).expand(len(seeds))[lo:lo + batch_size]
            fn = lambda x, sigma: denoise(x, sigma, labels)  # noqa: E731 (used at once, in this iteration)
        x = heun_sample(fn, rnd.randn([len(rnd.generators), *shape], device=device), sigmas,
                        generators=rnd, **sampler_kwargs)
        out.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu())
    return torch.cat(out)

# ----------------------------------------------------------------------------- training


PRESETS = {
    "cpu": dict(resolution=32, channels=32, channel_mult=[1, 2, 4], num_blocks=2, num_mid_blocks=1, attn=[],
                mp=False, uncertainty=False, batch_size=64, lr=2e-3, lr_schedule="linear", rampup_kimg=6.4,
                ref_kimg=0, duration=150, p_mean=-1.2, p_std=1.2, ema_std=[0.05], snapshot_every=50,
                checkpoint_every=10),
    "edm2-s": dict(resolution=64, channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, num_mid_blocks=2,
                   attn=[16, 8], mp=True, uncertainty=True, batch_size=2048, lr=1e-2, lr_schedule="isqrt",
                   rampup_kimg=10000, ref_kimg=71680, duration=1073741.824, p_mean=-0.8, p_std=1.6,
                   ema_std=[0.05, 0.10], snapshot_every=8192, checkpoint_every=2048),
}
DENOISE_SIGMAS = (0.002, 0.01, 0.05, 0.2, 0.5, 1, 5, 20, 80)


epoch_permutation = functools.lru_cache(maxsize=4)(epoch_order)


def stream_indices(start, count, n, seed):
    """Items at global positions start..start+count-1 of an endless stream of seeded epoch permutations
    (the same stream whatever the number of ranks: each micro-batch takes its own slice)."""
    pos = torch.arange(start, start + count)
    return torch.cat([epoch_permutation(n, 1, seed, int(e))[pos[pos // n == e] % n] for e in torch.unique(pos // n)])


def to_float(images_u8):
    return images_u8.float() / 127.5 - 1


def pixel_statistics(images, chunk=4096):
    """-> (std of all pixels in [-1, 1], mean image [C,H,W]) in one chunked float64 pass."""
    s1 = s2 = 0
    for i in range(0, len(images), chunk):
        y = to_float(images[i:i + chunk]).double()
        s1, s2 = s1 + y.sum(0), s2 + y.square().sum(0)
    mean = s1 / len(images)
    return math.sqrt((s2 / len(images)).mean() - mean.mean() ** 2), mean.float()


@torch.no_grad()
def denoising_errors(net, images, labels, mean_image, device, seed=0):
    """RMS error of D on real images per sigma, next to D = noisy input (error sigma) and D = mean image."""
    y = to_float(images).to(device)
    n = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    rms = {s: float(torch.cat([((net(y[i:i + 128] + s * n[i:i + 128], s, labels[i:i + 128].to(device))
                                 - y[i:i + 128]) ** 2).flatten() for i in range(0, len(y), 128)]).mean().sqrt())
           for s in DENOISE_SIGMAS}
    return rms, float(((y - mean_image.to(device)) ** 2).mean().sqrt())


def save_grid(net, path, device, num_steps=32):
    """Rows = up to 16 classes (evenly spaced), 8 fixed seeds per row, EMA net, Heun sampler."""
    rows = np.unique(np.linspace(0, net.num_classes - 1, min(16, net.num_classes)).round().astype(int))
    labels = torch.as_tensor(np.repeat(rows, 8))
    x = generate_images(net, labels, list(range(len(labels))), num_steps=num_steps, device=device)
    c, h, w = x.shape[1:]
    grid = x.reshape(len(rows), 8, c, h, w).permute(0, 3, 1, 4, 2).reshape(len(rows) * h, 8 * w, c)
    tmp = f"{path}.{os.getpid()}.tmp"
    Image.fromarray(grid.squeeze(-1).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="image folder(s) and/or train.rec file(s)")
    p.add_argument("--out", required=True, help="run folder (re-running resumes from its checkpoint.pt)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="defaults for every flag shown as None")
    p.add_argument("--heldout", help="held-out real images (identity folders named as in --data) for the "
                                     "denoising-error table; without it a slice of training images is used")
    g = p.add_argument_group("network (None: from --preset)")
    g.add_argument("--resolution", type=int, help="image size in pixels (images are resized to it)")
    g.add_argument("--channels", type=int, help="base width (a narrower net can serve as an autoguidance guide)")
    g.add_argument("--channel-mult", type=int, nargs="+", help="width multipliers per resolution level")
    g.add_argument("--num-blocks", type=int, help="residual blocks per level (encoder and decoder)")
    g.add_argument("--num-mid-blocks", type=int, help="blocks at the lowest resolution")
    g.add_argument("--attn", type=int, nargs="*", help="resolutions with self-attention")
    g.add_argument("--mp", type=int, choices=[0, 1], help="1: EDM2 magnitude-preserving layers")
    g.add_argument("--uncertainty", type=int, choices=[0, 1], help="1: EDM2 learned loss weighting u(sigma)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in the residual blocks")
    g.add_argument("--label-dropout", type=float, default=0.0,
                   help="probability of the null class in training (classifier-free guidance); 0: conditional only")
    g.add_argument("--sigma-data", default="auto", help="'auto' (pixel std of the data in [-1, 1]) or a number")
    g = p.add_argument_group("optimisation (None: from --preset)")
    g.add_argument("--duration", type=float, help="training length in kimg")
    g.add_argument("--batch-size", type=int, help="global batch size (images per optimiser step)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per rank and step")
    g.add_argument("--lr", type=float, help="reference learning rate (Adam, betas 0.9 0.99)")
    g.add_argument("--lr-schedule", choices=["linear", "isqrt"],
                   help="linear: constant for half the run, then to 0; isqrt: lr / sqrt(max(kimg/ref_kimg, 1))")
    g.add_argument("--rampup-kimg", type=float, help="linear lr warm-up length")
    g.add_argument("--ref-kimg", type=float, help="isqrt decay reference")
    g.add_argument("--p-mean", type=float, help="mean of ln(sigma) in training")
    g.add_argument("--p-std", type=float, help="std of ln(sigma) in training")
    g.add_argument("--ema-std", type=float, nargs="+", help="relative std(s) of the power-function EMA")
    g = p.add_argument_group("run")
    g.add_argument("--snapshot-every", type=float, help="kimg between snapshots + sample grids (None: preset)")
    g.add_argument("--checkpoint-every", type=float, help="kimg between checkpoints (None: preset)")
    g.add_argument("--status-every", type=float, default=1.0, help="kimg between status lines in log.jsonl")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (fp16 + GradScaler without bf16)")
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward pass")
    g.add_argument("--stop-after-kimg", type=float, help="debug: save the checkpoint and stop here, as if killed")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    levels = 2 ** (len(args.channel_mult) - 1)
    if args.resolution % levels:
        p.error(f"--resolution {args.resolution} must be a multiple of {levels} for {len(args.channel_mult)} levels")
    if not 0 <= args.label_dropout < 1:
        p.error("--label-dropout must be in [0, 1)")
    if not all(0 < s < 0.28 for s in args.ema_std):
        p.error("--ema-std values must be in (0, 0.28)")
    if args.sigma_data != "auto":
        try:
            assert float(args.sigma_data) > 0
        except (ValueError, AssertionError):
            p.error(f"--sigma-data must be 'auto' or a positive number, not {args.sigma_data!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, _, world, device = setup_distributed(args.device)
    micro, rem = divmod(args.batch_size, world * args.grad_accum)
    if rem or micro == 0:
        sys.exit(f"error: --batch-size {args.batch_size} is not divisible by {world} ranks x --grad-accum "
                 f"{args.grad_accum}")
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        dataset = open_datasets(args.data)
        images, labels = load_images(dataset, args.resolution, progress=rank == 0)
        held = None
        if args.heldout:
            hds = open_datasets([args.heldout])
            index = {n: i for i, n in enumerate(dataset.classes)}
            keep = [i for i, t in enumerate(hds.targets) if hds.classes[t] in index]
            keep = keep[::max(1, len(keep) // 256)][:256]  # spread over the identities
            if not keep:
                sys.exit(f"error: no identity of --heldout {args.heldout} is among the training identities")
            hi, hl = load_images(torch.utils.data.Subset(hds, keep), args.resolution, progress=False)
            held = hi, torch.as_tensor([index[hds.classes[t]] for t in hl.tolist()])
    except DataError as e:
        sys.exit(f"error: {e}")
    if held is None:  # no held-out set: a fixed slice of the training images (not held out)
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:128]
        held = images[pick], labels[pick]
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if os.path.exists(ckpt_path) else None

    pixel_std, mean_image = pixel_statistics(images)
    sigma_data = float(args.sigma_data) if args.sigma_data != "auto" else pixel_std
    sigma_data = ckpt["config"]["sigma_data"] if ckpt is not None else sigma_data
    torch.manual_seed(args.seed)  # same initial weights on every rank
    net = Denoiser(args.resolution, images.shape[1], len(dataset.classes), null_class=args.label_dropout > 0,
                   sigma_data=sigma_data, uncertainty=bool(args.uncertainty), channels=args.channels,
                   channel_mult=args.channel_mult, num_blocks=args.num_blocks, num_mid_blocks=args.num_mid_blocks,
                   attn_resolutions=args.attn, mp=bool(args.mp), dropout=args.dropout).to(device).train()
    net.class_names = list(dataset.classes)
    ema = PowerEMA(net, args.ema_std)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.99), eps=1e-8)
    ctx, scaler = autocast_context(device, args.amp)
    nimg = 0
    if ckpt is not None:
        if ckpt["config"] != net.config or ckpt["class_names"] != net.class_names:
            sys.exit(f"error: {ckpt_path} was made with another network or data (config {ckpt['config']}); "
                     "use another --out or the same settings")
        net.load_state_dict(ckpt["net"])
        for e, sd in zip(ema.emas, ckpt["ema"]):
            e.load_state_dict(sd)
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"])
        nimg = ckpt["nimg"]
        log(f"resuming from {ckpt_path} at {nimg / 1e3:g} kimg")
    log(f"{len(images)} images, {net.num_classes} classes, {args.resolution} px, sigma_data {sigma_data:.4f}, "
        f"{sum(p.numel() for p in net.parameters()):,} parameters, {world} process(es) x {args.grad_accum} x {micro}")
    if rank == 0:
        write_text_atomic(json.dumps({**vars(args), "net": net.config, "world_size": world}, indent=1),
                          os.path.join(args.out, "config.json"))
    model = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    forward = torch.compile(model) if args.compile else model

    def save_checkpoint():
        save_atomic({"net": net.state_dict(), "ema": [e.state_dict() for e in ema.emas], "optimizer": opt.state_dict(),
                     "scaler": scaler.state_dict(), "nimg": nimg, "rng": torch.get_rng_state(),
                     "config": net.config, "class_names": net.class_names}, ckpt_path)

    def save_snapshot():
        snap = {"config": net.config, "ema": ema.emas[0].state_dict(), "class_names": net.class_names,
                "kimg": nimg / 1e3, "sigma_data": sigma_data}
        snap.update({f"ema_std_{s:g}": e.state_dict() for s, e in zip(ema.stds[1:], ema.emas[1:])})
        save_atomic(snap, os.path.join(args.out, f"network-snapshot-{nimg // 1000:06d}.pt"))
        ema.emas[0].class_names = net.class_names
        save_grid(ema.emas[0], os.path.join(args.out, f"samples-{nimg // 1000:06d}.png"), device)
        rms, mean_rms = denoising_errors(ema.emas[0], *held, mean_image, device)
        lines = [f"denoising RMS error on {'held-out' if args.heldout else 'training'} images at {nimg / 1e3:g} kimg "
                 "(trivial: D = noisy input -> sigma; D = mean image -> " + f"{mean_rms:.4f})",
                 "sigma  " + " ".join(f"{s:>7g}" for s in rms), "D_ema  " + " ".join(f"{v:7.4f}" for v in rms.values())]
        tqdm.write("\n".join(lines))
        with open(os.path.join(args.out, "log.jsonl"), "a") as f:
            f.write(json.dumps({"kimg": nimg / 1e3, "denoise_rms": {f"{s:g}": v for s, v in rms.items()},
                                "mean_image_rms": mean_rms, "heldout": bool(args.heldout)}) + "\n")

    def crossed(every, before):
        step = max(1, int(every * 1e3))
        return every > 0 and nimg // step > before // step

    total, stop = int(args.duration * 1e3), int((args.stop_after_kimg or args.duration) * 1e3)
    bar = tqdm(total=total, initial=nimg, unit="img", unit_scale=True, disable=rank != 0, dynamic_ncols=True)
    t_status, n_status, losses = time.time(), nimg, []
    while nimg < min(total, stop):
        lr = learning_rate(args, nimg + args.batch_size)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for r in range(args.grad_accum):
            pos = nimg + (r * world + rank) * micro  # this micro-batch's place in the global stream
            gen = torch.Generator(device).manual_seed(seed_for(args.seed, pos))
            idx = stream_indices(pos, micro, len(images), args.seed)
            y = to_float(images[idx].to(device))
            flip = torch.rand(micro, generator=gen, device=device) < 0.5
            y = torch.where(flip[:, None, None, None], y.flip(3), y)
            lab = labels[idx].to(device)
            if args.label_dropout > 0:
                drop = torch.rand(micro, generator=gen, device=device) < args.label_dropout
                lab = torch.where(drop, torch.full_like(lab, net.num_classes), lab)
            sync = world > 1 and r < args.grad_accum - 1
            with model.no_sync() if sync else nullcontext(), ctx:
                loss = edm_loss(forward, y, lab, args.p_mean, args.p_std, sigma_data, gen)
            scaler.scale(loss / args.grad_accum).backward()
            loss_sum += loss.detach() / args.grad_accum
        if world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= world
        if not torch.isfinite(loss_sum):
            sys.exit(f"error: the loss became {loss_sum.item()} at {nimg / 1e3:g} kimg; lower --lr or check the data")
        scaler.unscale_(opt)
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        before, nimg = nimg, nimg + args.batch_size
        ema.update(net, nimg, args.batch_size)
        losses.append(loss_sum.item())
        bar.update(args.batch_size)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
        if rank == 0 and (crossed(args.status_every, before) or nimg >= total):
            now = time.time()
            stat = {"kimg": nimg / 1e3, "images_per_s": (nimg - n_status) / (now - t_status), "loss": float(np.mean(losses)),
                    "lr": lr, "time": now}
            tqdm.write(" ".join(f"{k} {v:.4g}" for k, v in stat.items() if k != "time"))
            with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(stat) + "\n")
            t_status, n_status, losses = now, nimg, []
        if rank == 0 and (crossed(args.checkpoint_every, before) or crossed(args.snapshot_every, before)
                          or nimg >= min(total, stop)):
            save_checkpoint()
        if rank == 0 and (crossed(args.snapshot_every, before) or nimg >= total):
            save_snapshot()
    bar.close()
    snap_path = os.path.join(args.out, f"network-snapshot-{nimg // 1000:06d}.pt")
    if rank == 0 and nimg >= total and not os.path.exists(snap_path):  # re-run of a run that ended before its snapshot
        save_snapshot()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
