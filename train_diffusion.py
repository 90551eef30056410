"""Train the generator: a class-conditional EDM denoiser (handwritten UNet) with EMA, snapshots and
the Heun sampler that the later stages reuse (ScoreMix, Rahimi & Marcel, arXiv 2506.10226).

A raw UNet F becomes the denoiser D by the EDM preconditioning (Karras et al. 2022, docs/formulas.md
1):
    D(x; s, y) = c_skip(s) x + c_out(s) F(c_in(s) x, ln(s)/4, y),  c_skip = sd^2/(s^2+sd^2), ...
trained on ln s ~ N(P_mean, P_std^2) with loss (s^2+sd^2)/(s*sd)^2 * (D(y+s*n; s, label) - y)^2
(+ EDM2's learned uncertainty u(s): loss/exp(u) + u), averaged over images. The EDM2 presets sum it
over pixels as EDM2 does; the `cpu` presets average it (a constant factor C*H*W that Adam's
normalisation cancels, except for epsilon's relative size).
The class embedding (one row per identity) is added to the noise embedding; its rows are the
"condition space" that ScoreMix compares with the discriminator (`condition_vectors`).

Two networks:
- `UNet` is EDM2's magnitude-preserving UNet (Karras et al. 2024, "Analyzing and Improving the
  Training Dynamics of Diffusion Models", Fig. 21), layer for layer and with EDM2's module names, so
  EDM2 weights load as they are (`from_edm2`). Presets `edm2-xs` / `edm2-s` / `edm2-m` use EDM2's
  img64 hyper-parameters and training rules: sigma_data 0.5, no flips unless --xflip, the
  inverse-square-root lr anchored in batches (`learning_rate`), two power-function EMA profiles per
  snapshot and post-hoc EMA reconstruction (`posthoc-ema` below).
- `CpuUNet` is the 2-core recipe of the toy benchmark (preset `cpu`: GroupNorm UNet, 32/64/128
  channels at 32/16/8 px, 2.6M parameters, batch 64, lr 2e-3 with warm-up, constant then linear to
  0); `cpu-guide` is a 4x cheaper version trained 1/3 as long, the light autoguidance guide of the
  `cpu` generator (as `edm2-xs` is for `edm2-s`).
State is counted in images; re-running a command resumes from RUN/checkpoint.pt and gives the same
weights as an uninterrupted run. Training images are decoded per item as they stream (bounded
memory).

    python train_diffusion.py --data toy/train --heldout toy/heldout --out runs/gen
    torchrun --nproc_per_node=8 train_diffusion.py --preset edm2-s --data train.rec --out runs/gen \
        --amp
    python train_diffusion.py posthoc-ema --run runs/gen --std 0.045 --out runs/gen/phema-0.045.pt
    python train_diffusion.py import-edm2 STATE.pt --out edm2-img64-s.pt --edm2-kwargs \
        '{"img_resolution": 64, "img_channels": 3, "label_dim": 1000, "model_channels": 192,
          "dropout": 0.0}'

`import-edm2` converts a state dict of EDM2's Precond (saved with `torch.save(net.state_dict())`)
and its constructor keyword arguments into a snapshot; `posthoc-ema` solves EDM2's post-hoc EMA
(Alg. 3) for a relative std from the EMA profiles stored in a run's snapshots.

Snapshot RUN/network-snapshot-<kimg:06d>[.<img:03d>].pt (load with `load_generator`,
weights_only=True):
    {"config": Denoiser kwargs, "ema": EMA state_dict for the first --ema-std,
     "ema_std_<x>": the others, "ema_stds": [...], "class_names": [...], "kimg": float,
     "sigma_data": float}
"""
import argparse
import copy
import functools
import json
import math
import os
import re
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

from common import (ArgumentParser, DataError, InputError, autocast_context, check_compile,
                    check_same_recipe, epoch_order, fail, finite_float, load_images, load_weights,
                    machine, non_negative_float, non_negative_int, open_datasets, positive_float,
                    positive_int, probability, run_folder_guard, save_atomic, seed_for,
                    setup_distributed, write_atomic)

# ----------------------------------------------------------------------------- EDM2 layers


def normalize(x, dim=None, eps=1e-4):
    """EDM2: scale x so that its elements have unit RMS over `dim` (all but the first by
    default)."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x):  # EDM2 eq. 81: SiLU rescaled to unit magnitude for unit-variance input
    return F.silu(x) / 0.596


def mp_sum(a, b, t=0.5):  # EDM2 eq. 88
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, t=0.5):  # EDM2 eq. 103
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=1)


def resample(x, f=(1, 1), mode="keep"):
    """EDM2 resampling with the separable filter f (normalised to sum 1 per axis): 'down' is a
    stride-2 depthwise convolution (f = [1, 1]: 2x2 average), 'up' a stride-2 transposed one with 4
    f x f ([1, 1]: nearest neighbour), 'keep' returns x."""
    if mode == "keep":
        return x
    f = torch.as_tensor(f, dtype=torch.float32)
    c, pad = x.shape[1], (len(f) - 1) // 2
    w = (torch.outer(f, f) / f.sum() ** 2).to(x.device, x.dtype)[None, None].tile([c, 1, 1, 1])
    if mode == "down":
        return F.conv2d(x, w, groups=c, stride=2, padding=pad)
    return F.conv_transpose2d(x, w * 4, groups=c, stride=2, padding=pad)


class Fourier(nn.Module):
    """Random Fourier features of the noise level (EDM2 eq. 75): sqrt(2) cos(2 pi (f c + phase))."""

    def __init__(self, num_channels, bandwidth=1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, c):
        return (c.float().ger(self.freqs) + self.phases).cos() * math.sqrt(2)


class MPConv(nn.Module):
    """EDM2 magnitude-preserving conv (kernel k) or linear (k = 0), eq. 47, with weight
    normalisation.

    EDM2's forced weight normalisation (eq. 66) rewrites the stored weight in every training
    forward; here the trainer calls `normalize_weight_` before each step's forward passes instead,
    which stores the same numbers and keeps the forward free of in-place writes (torch.compile,
    DDP)."""

    def __init__(self, cin, cout, kernel):
        super().__init__()
        self.out_channels = cout
        self.weight = nn.Parameter(torch.randn(cout, cin, *([kernel] * 2 if kernel else [])))

    @torch.no_grad()
    def normalize_weight_(self):
        self.weight.copy_(normalize(self.weight.to(torch.float32)))

    def forward(self, x, gain=1):
        w = normalize(self.weight.to(torch.float32))  # traditional weight normalisation
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)  # magnitude-preserving scaling
        return x @ w.t() if w.ndim == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """EDM2 encoder ('enc') or decoder ('dec') block (Fig. 21): resampling, pixel norm (encoder), a
    residual branch modulated by the embedding, mp_sum with t = res_balance, optional attention."""

    def __init__(self, in_channels, out_channels, emb_channels, flavor="enc", resample_mode="keep",
                 resample_filter=(1, 1), attention=False, channels_per_head=64, dropout=0.0,
                 res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        self.out_channels, self.flavor, self.dropout = out_channels, flavor, dropout
        self.resample_mode, self.resample_filter = resample_mode, list(resample_filter)
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, 3)
        self.emb_linear = MPConv(emb_channels, out_channels, 0)
        self.conv_res1 = MPConv(out_channels, out_channels, 3)
        self.conv_skip = (MPConv(in_channels, out_channels, 1) if in_channels != out_channels
                          else None)
        self.attn_qkv = MPConv(out_channels, out_channels * 3, 1) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, 1) if self.num_heads else None

    def attention(self, x):
        """Multi-head self-attention over pixels; q, k, v pixel-normalised per head (EDM2)."""
        y = self.attn_qkv(x)
        y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
        q, k, v = normalize(y, dim=2).transpose(2, 4).unbind(3)  # [N, heads, pixels, channels] each
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(channels)) v
        return self.attn_proj(y.transpose(2, 3).reshape(x.shape))

    def forward(self, x, emb):
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            x = normalize(x if self.conv_skip is None else self.conv_skip(x), dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self.attention(x), t=self.attn_balance)
        return x if self.clip_act is None else x.clip(-self.clip_act, self.clip_act)


class UNet(nn.Module):
    """EDM2's UNet (Fig. 21). Encoder: at the top level a conv of the image plus a constant channel,
    at each lower level a 'down' Block, then num_blocks Blocks; every output is kept as a skip.
    Decoder: at the lowest level two Blocks ('in0' with attention), at the others an 'up' Block,
    then num_blocks + 1 Blocks, each fed mp_cat(x, skip). Attention where the level's resolution is
    in attn_resolutions. Output: a conv with a learned gain (0 at init, so D starts as c_skip x)."""

    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192,
                 channel_mult=(1, 2, 3, 4), channel_mult_noise=None, channel_mult_emb=None,
                 num_blocks=3, attn_resolutions=(16, 8), label_balance=0.5, concat_balance=0.5,
                 **block_kwargs):
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        cnoise = (model_channels * channel_mult_noise if channel_mult_noise is not None
                  else widths[0])
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.label_dim, self.label_balance, self.concat_balance = (label_dim, label_balance,
                                                                   concat_balance)
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = Fourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, 0)
        # one-hot labels through a magnitude-preserving linear map
        self.emb_label = MPConv(label_dim, cemb, 0)
        self.enc, cout = nn.ModuleDict(), img_channels + 1
        for level, width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"], cout = MPConv(cout, width, 3), width
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, resample_mode="down",
                                                      **block_kwargs)
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = Block(cout, width, cemb,
                                                          attention=res in attn_resolutions,
                                                          **block_kwargs)
                cout = width
        skips = [block.out_channels for block in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, width in reversed(list(enumerate(widths))):
            res = img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True,
                                                     **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec",
                                                    resample_mode="up", **block_kwargs)
            for i in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{i}"] = Block(cout + skips.pop(), width, cemb,
                                                          flavor="dec",
                                                          attention=res in attn_resolutions,
                                                          **block_kwargs)
                cout = width
        self.out_conv = MPConv(cout, img_channels, 3)

    def class_embedding(self, labels):
        """int64 [B] -> one-hot; float class weights [B, L] (L = label_dim, or num_classes without
        the null column) -> the same weights: condition mixing. Scaled by sqrt(label_dim) as in
        EDM2."""
        if labels.is_floating_point():
            onehot = F.pad(labels.float(), (0, self.label_dim - labels.shape[1]))
        else:
            onehot = F.one_hot(labels, self.label_dim).float()
        return self.emb_label(onehot * math.sqrt(self.label_dim))

    def forward(self, x, c_noise, labels):
        emb = self.emb_noise(self.emb_fourier(c_noise))
        emb = mp_silu(mp_sum(emb, self.class_embedding(labels).to(emb.dtype), t=self.label_balance))
        # the constant input channel
        x, skips = torch.cat([x, torch.ones_like(x[:, :1])], dim=1), []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)

# ----------------------------------------------------------------------------- the CPU UNet


def group_norm(channels):
    return nn.GroupNorm(max(1, min(32, channels // 4)), channels)


class CpuBlock(nn.Module):
    """Residual block conditioned on the embedding, optionally followed by self-attention:
    x + conv(SiLU(GN(h) * (1 + scale) + shift)), h = conv(SiLU(GN(x))), (scale, shift) from emb."""

    def __init__(self, cin, cout, cemb, attention=False, dropout=0.0, channels_per_head=64):
        super().__init__()
        self.dropout = dropout
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.emb = nn.Linear(cemb, 2 * cout)
        self.heads = max(1, cout // channels_per_head) if attention else 0
        if attention:
            self.qkv, self.proj = nn.Conv2d(cout, 3 * cout, 1), nn.Conv2d(cout, cout, 1)
        self.norm0, self.norm1 = group_norm(cin), group_norm(cout)
        if attention:
            self.norm2 = group_norm(cout)
            nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)

    def attention(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, self.heads, c // self.heads, 3, h * w).unbind(3)
        y = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
        return self.proj(y.transpose(2, 3).reshape(b, c, h, w))

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(F.dropout(h, self.dropout, self.training))
        x = h + (x if self.skip is None else self.skip(x))
        return x + self.attention(self.norm2(x)) if self.heads else x


class CpuUNet(nn.Module):
    """The plain UNet of the CPU presets: levels at R, R/2, ... (widths channels * mult), num_blocks
    blocks per level on both sides, average-pool / nearest resampling, a middle block, class
    embedding added to the noise embedding, zero-initialised output layer."""

    def __init__(self, img_resolution, img_channels, label_dim, channels, channel_mult, num_blocks,
                 num_mid_blocks, attn_resolutions, dropout):
        super().__init__()
        self.label_dim = label_dim
        widths = [channels * m for m in channel_mult]
        cemb = 4 * channels
        self.fourier = Fourier(widths[0])
        self.emb_noise = nn.Sequential(nn.Linear(widths[0], cemb), nn.SiLU(), nn.Linear(cemb, cemb))
        self.emb_label = nn.Embedding(label_dim, cemb)
        kw = dict(cemb=cemb, dropout=dropout)
        self.conv_in = nn.Conv2d(img_channels, widths[0], 3, padding=1)
        self.enc, skips, cout = nn.ModuleList(), [], widths[0]
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(num_blocks):
                blocks.append(CpuBlock(cout, width,
                                       attention=(img_resolution >> level) in attn_resolutions,
                                       **kw))
                skips.append(cout := width)
            self.enc.append(blocks)
        low = img_resolution >> (len(widths) - 1)
        self.mid = nn.ModuleList(CpuBlock(cout, cout, attention=i == 0 and low in attn_resolutions,
                                          **kw)
                                 for i in range(num_mid_blocks))
        self.dec = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            blocks = nn.ModuleList()
            for _ in range(num_blocks):
                blocks.append(CpuBlock(cout + skips.pop(), width,
                                       attention=(img_resolution >> level) in attn_resolutions,
                                       **kw))
                cout = width
            self.dec.append(blocks)
        self.out_norm = group_norm(cout)
        self.out_conv = nn.Conv2d(cout, img_channels, 3, padding=1)
        # D starts as c_skip x
        nn.init.zeros_(self.out_conv.weight), nn.init.zeros_(self.out_conv.bias)

    def class_embedding(self, labels):
        """int64 [B] -> [B, d]: the learned class-condition vectors. Float class weights [B, L] (L =
        label_dim, or num_classes without the null column) -> weights @ table: condition mixing."""
        if labels.is_floating_point():
            return F.pad(labels.float(),
                         (0, self.label_dim - labels.shape[1])) @ self.emb_label.weight
        return self.emb_label(labels)

    def forward(self, x, c_noise, labels):
        emb = F.silu(self.emb_noise(self.fourier(c_noise)) + self.class_embedding(labels))
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
                x = block(torch.cat([x, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(x)))

# ----------------------------------------------------------------------------- the denoiser


def edm_precond(sigma, sigma_data):
    """EDM eq. 7 (docs/formulas.md 1) -> (c_skip, c_out, c_in, c_noise) for a sigma tensor."""
    s2, sd2 = sigma ** 2, sigma_data ** 2
    return (sd2 / (s2 + sd2), sigma * sigma_data / (s2 + sd2).sqrt(), 1 / (s2 + sd2).sqrt(),
            sigma.log() / 4)


# EDM2's UNet / Block / Precond keyword arguments beyond the Denoiser's own, with EDM2's defaults
EDM2_DEFAULTS = dict(channels_per_head=64, channel_mult_noise=None, channel_mult_emb=None,
                     label_balance=0.5, concat_balance=0.5, res_balance=0.3, attn_balance=0.3,
                     clip_act=256, resample_filter=[1, 1], logvar_channels=128)


class Denoiser(nn.Module):
    """D(x; sigma, class_labels) = c_skip x + c_out F(c_in x, c_noise, y); output in x's dtype.

    F is EDM2's `UNet` with mp=True (then EDM2_DEFAULTS' names may be given too) or the `CpuUNet`.
    With `null_class` the embedding has a row num_classes: the unconditional model of
    classifier-free guidance (class_labels=None selects it). `uncertainty` adds EDM2's u(sigma) head
    (eq. 21)."""

    def __init__(self, img_resolution, img_channels, num_classes, null_class=False, sigma_data=0.5,
                 uncertainty=False, channels=32, channel_mult=(1, 2, 4), num_blocks=2,
                 num_mid_blocks=1, attn_resolutions=(), mp=False, dropout=0.0, **edm2):
        super().__init__()
        if set(edm2) - set(EDM2_DEFAULTS) or (edm2 and not mp):
            raise TypeError(f"unexpected arguments {sorted(edm2)} (EDM2's names need mp=True)")
        # the constructor's arguments, for snapshots
        self.config = {k: list(v) if isinstance(v, tuple) else v
                       for k, v in {**locals(), **edm2}.items()
                       if k not in ("self", "__class__", "edm2")}
        self.img_resolution, self.img_channels, self.num_classes = (img_resolution, img_channels,
                                                                    num_classes)
        self.sigma_data, self.null_class, self.class_names = float(sigma_data), null_class, None
        label_dim = num_classes + null_class
        # EDM2's Precond: UNet, then the uncertainty head (num_mid_blocks: EDM2 always has 2)
        if mp:
            e = {**EDM2_DEFAULTS, **edm2}
            logvar_channels = e.pop("logvar_channels")
            self.unet = UNet(img_resolution, img_channels, label_dim, model_channels=channels,
                             channel_mult=channel_mult, num_blocks=num_blocks,
                             attn_resolutions=attn_resolutions, dropout=dropout, **e)
            if uncertainty:
                self.logvar_fourier = Fourier(logvar_channels)
                self.logvar_linear = MPConv(logvar_channels, 1, 0)
        else:
            self.unet = CpuUNet(img_resolution, img_channels, label_dim, channels, channel_mult,
                                num_blocks, num_mid_blocks, attn_resolutions, dropout)
            self.logvar = nn.Sequential(Fourier(128), nn.Linear(128, 1)) if uncertainty else None

    def logvar_of(self, c_noise):
        """u(sigma) [B] (EDM2 eq. 21), or 0 without the head."""
        if hasattr(self, "logvar_linear"):
            return self.logvar_linear(self.logvar_fourier(c_noise)).float().flatten()
        return (self.logvar(c_noise).float().flatten() if getattr(self, "logvar", None) is not None
                else 0)

    @torch.no_grad()
    def normalize_weights_(self):
        """EDM2's forced weight normalisation (eq. 66) of every MPConv; call before each training
        step."""
        for m in self.modules():
            if isinstance(m, MPConv):
                m.normalize_weight_()

    def forward(self, x, sigma, class_labels=None, return_logvar=False):
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        if class_labels is None:
            if not self.null_class:
                raise ValueError(
                    "this generator has no null class (train with --label-dropout > 0)")
            class_labels = self.num_classes
        # soft labels [B, L]: class weights
        if torch.is_tensor(class_labels) and class_labels.is_floating_point():
            labels = (class_labels.to(x.device, torch.float32)
                      .reshape(-1, class_labels.shape[-1]).expand(b, -1))
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.int64,
                                     device=x.device).reshape(-1).expand(b)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma.reshape(-1, 1, 1, 1), self.sigma_data)
        x32 = x.to(torch.float32)
        D = (c_skip * x32
             + c_out * self.unet(c_in * x32, c_noise.flatten(), labels).to(torch.float32))
        if not return_logvar:
            return D.to(x.dtype)
        logvar = self.logvar_of(c_noise.flatten())
        return D.to(x.dtype), torch.as_tensor(logvar, device=x.device).reshape(-1, 1, 1, 1)


def condition_vectors(net):
    """The learned class embeddings [num_classes, d] (the generator's "condition space")."""
    device = next(net.parameters()).device
    with torch.no_grad():
        return net.unet.class_embedding(torch.arange(net.num_classes, device=device)).float()


def load_generator(path, device="cpu", ema_std=None):
    """A network-snapshot .pt -> the EMA denoiser in eval mode (`ema_std` picks another stored
    EMA)."""
    snap = load_weights(path, map_location="cpu")
    if not (isinstance(snap, dict) and {"config", "ema", "class_names", "kimg"} <= snap.keys()):
        raise ValueError(f"{path} is not a network snapshot of train_diffusion.py")
    net = Denoiser(**snap["config"])
    key = "ema" if ema_std is None or ema_std == snap.get("ema_std") else f"ema_std_{ema_std:g}"
    try:
        net.load_state_dict(snap[key])
    except RuntimeError:
        raise ValueError(f"{path} was written for another network layout (an older "
                         "train_diffusion.py?)") from None
    net.class_names = list(snap["class_names"])
    return net.to(device).eval().requires_grad_(False)

# ----------------------------------------------------------------------------- EDM2 weights


EDM2_PRECOND_KWARGS = {"img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data",
                       "logvar_channels", "model_channels", "channel_mult", "num_blocks",
                       "attn_resolutions", "dropout"}


def from_edm2(state_dict, **edm2_kwargs):
    """EDM2 `Precond` weights -> the same denoiser D as a `Denoiser` (eval mode, fp32).

    `state_dict`: EDM2's Precond.state_dict() (any float dtype; EDM2's snapshots hold fp16);
    `edm2_kwargs`: Precond's / UNet's / Block's keyword arguments under EDM2's names
    (img_resolution, img_channels, label_dim, model_channels, channel_mult, num_blocks,
    attn_resolutions, dropout, sigma_data, logvar_channels, channels_per_head, ...), EDM2's defaults
    for the rest. `use_fp16` is accepted and ignored (run the net under autocast instead). Class
    names: "0" ... "label_dim-1"."""
    kw = dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8],
              dropout=0.0, sigma_data=0.5)
    unknown = set(edm2_kwargs) - EDM2_PRECOND_KWARGS - set(EDM2_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown EDM2 keyword argument(s): {', '.join(sorted(unknown))}")
    missing = {"img_resolution", "img_channels", "label_dim"} - set(edm2_kwargs)
    if missing:
        raise ValueError(f"missing EDM2 keyword argument(s): {', '.join(sorted(missing))}")
    kw.update(edm2_kwargs)
    kw.pop("use_fp16", None)
    if kw["label_dim"] < 1:
        raise ValueError("an unconditional EDM2 model (label_dim 0) has no classes to mix")
    extra = {k: kw.pop(k) for k in list(kw) if k in EDM2_DEFAULTS}
    net = Denoiser(kw["img_resolution"], kw["img_channels"], kw["label_dim"],
                   sigma_data=kw["sigma_data"], uncertainty=True, channels=kw["model_channels"],
                   channel_mult=list(kw["channel_mult"]), num_blocks=kw["num_blocks"],
                   num_mid_blocks=2, attn_resolutions=list(kw["attn_resolutions"]), mp=True,
                   dropout=kw["dropout"], **extra)
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError("the state dict does not fit these EDM2 arguments: "
                         f"{str(e).splitlines()[0]}") from None
    if not all(torch.isfinite(p).all() for p in net.parameters()):
        raise ValueError("the state dict has non-finite weights")
    net.class_names = [str(i) for i in range(net.num_classes)]
    return net.eval().requires_grad_(False)

# ---------------------------------------------------------------------- EMA, post-hoc EMA, lr, loss


def std_to_gamma(std):
    """EDM2 power-function EMA (eq. 126, Alg. 2): the exponent gamma whose profile has relative std
    `std`."""
    t = float(std) ** -2  # solve (g+1) / ((g+2)^2 (g+3)) = std^2 for the largest real g
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def power_function_beta(std, nimg, batch):
    """EMA decay after reaching `nimg` images with a step of `batch`: (1 - batch/nimg)^(gamma+1)
    (eq. 127)."""
    return (1 - batch / nimg) ** (std_to_gamma(std) + 1)


class PowerEMA:
    """One EMA copy of the net per relative std; the first update (nimg == batch) copies the net."""

    def __init__(self, net, stds):
        self.stds, self.emas = list(stds), [copy.deepcopy(net).eval().requires_grad_(False)
                                            for _ in stds]

    @torch.no_grad()
    def update(self, net, nimg, batch):
        for std, ema in zip(self.stds, self.emas):
            beta = power_function_beta(std, nimg, batch)
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p.detach(), 1 - beta)
            for b_ema, b in zip(ema.buffers(), net.buffers()):
                b_ema.copy_(b)


def profile_inner_product(t_a, std_a, t_b, std_b):
    """<p_a, p_b> of two power-function EMA profiles p(t) = (g+1)/T (t/T)^g on [0, T] (EDM2 eq.
    151): with T_a <= T_b it is (g_a+1)(g_b+1) / ((g_a+g_b+1) T_b) * (T_a/T_b)^g_b, symmetric
    otherwise."""
    g_a, g_b = np.vectorize(std_to_gamma)(std_a), np.vectorize(std_to_gamma)(std_b)
    t_a, t_b = np.float64(t_a), np.float64(t_b)
    ratio = np.where(t_a <= t_b, (t_a / t_b) ** g_b, (t_b / t_a) ** g_a)
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * np.maximum(t_a, t_b)) * ratio


def posthoc_coefficients(in_nimg, in_std, out_nimg, out_std):
    """EDM2 Alg. 3: weights [inputs, outputs] whose sums of the stored profiles (ending at in_nimg,
    relative stds in_std) are the least-squares fits of the requested profiles, normalised to sum
    1."""
    col = lambda v: np.float64(v).reshape(-1, 1)  # noqa: E731
    row = lambda v: np.float64(v).reshape(1, -1)  # noqa: E731
    in_nimg, in_std = np.broadcast_arrays(np.float64(in_nimg), np.float64(in_std))
    out_nimg, out_std = np.broadcast_arrays(np.float64(out_nimg), np.float64(out_std))
    A = profile_inner_product(col(in_nimg), col(in_std), row(in_nimg), row(in_std))
    B = profile_inner_product(col(in_nimg), col(in_std), row(out_nimg), row(out_std))
    X = np.linalg.solve(A, B)
    return X / X.sum(axis=0)


def snapshot_profiles(paths):
    """-> [(path, nimg, std, key)] for every EMA profile stored in these snapshots."""
    out = []
    for path in paths:
        snap = load_weights(path, map_location="cpu", mmap=True)
        if not (isinstance(snap, dict) and "ema_stds" in snap):
            raise ValueError(
                f"{path} holds no EMA profiles (a post-hoc output or an older snapshot?)")
        nimg = round(snap["kimg"] * 1e3)
        out += [(path, nimg, std,
                 "ema" if i == 0 else f"ema_std_{std:g}") for i, std in enumerate(snap["ema_stds"])]
    return out


def reconstruct_ema(paths, std, out_kimg=None):
    """EDM2 post-hoc EMA: the snapshot (a dict) whose EMA has relative std `std` at `out_kimg`
    (default: the latest snapshot's), a weighted sum of the profiles stored in the snapshots up to
    then."""
    profiles = snapshot_profiles(paths)
    out_nimg = max(p[1] for p in profiles) if out_kimg is None else round(out_kimg * 1e3)
    if not any(p[1] == out_nimg for p in profiles):
        raise ValueError(f"no snapshot at {out_nimg / 1e3:g} kimg (the reconstruction time must be "
                         "a snapshot's)")
    # a profile given twice: once (else A is singular)
    unique = {(p[1], p[2]): p for p in reversed(profiles)}
    profiles = sorted((p for p in unique.values() if 0 < p[1] <= out_nimg),
                      key=lambda p: (p[1], p[2]))
    coefs = posthoc_coefficients([p[1] for p in profiles], [p[2] for p in profiles], out_nimg,
                                 std)[:, 0]
    total, snap, last = None, None, None
    for (path, nimg, _, key), c in zip(profiles, coefs):
        if path != last:
            snap, last = load_weights(path, map_location="cpu", mmap=True), path
        if total is None:
            config, names, sigma_data = snap["config"], snap["class_names"], snap.get("sigma_data")
            with torch.device("meta"):
                params = {name for name, _ in Denoiser(**config).named_parameters()}
            total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in snap[key].items()}
        elif snap["config"] != config or snap["class_names"] != names:
            raise ValueError(
                f"{path} was made with another network or classes than the other snapshots")
        for k, v in snap[key].items():
            if k in params:
                total[k] += c * v.float()
            else:
                total[k] = v.clone()  # buffers: the last one
    return {"config": config, "ema": total, "class_names": names, "kimg": out_nimg / 1e3,
            "sigma_data": sigma_data,
            "posthoc_ema": {"std": float(std),
                            "inputs": [[os.path.basename(p[0]), p[1], p[2]] for p in profiles],
                            "coefficients": coefs.tolist()}}


def learning_rate(args, nimg):
    """lr of the step that starts after `nimg` images.

    isqrt (EDM2's schedule, anchored in batches): lr / sqrt(max(nimg / (ref_batches * batch), 1)),
    times min(nimg / rampup, 1); so any --batch-size / --grad-accum gives EDM2's lr at the same
    image count for the same global batch. linear (cpu): warm-up to lr, constant for half the run,
    then to 0, evaluated at the step's end."""
    if args.lr_schedule == "isqrt":
        lr = args.lr
        if args.ref_batches > 0:
            lr /= math.sqrt(max(nimg / (args.ref_batches * args.batch_size), 1))
        return lr * min(nimg / (args.rampup_kimg * 1e3), 1) if args.rampup_kimg > 0 else lr
    end = nimg + args.batch_size
    lr = args.lr * min(end / max(args.rampup_kimg * 1e3, 1), 1)
    return lr * min(1, 2 * max(0.0, 1 - end / (args.duration * 1e3)))


def edm_loss(net, y, labels, P_mean, P_std, sigma_data, generator, pixel_sum=False):
    """EDM loss averaged over images and over pixels, or summed over pixels (EDM2: `pixel_sum`),
    with EDM2's uncertainty weighting when the net has the head (eq. 21)."""
    sigma = (torch.randn([y.shape[0], 1, 1, 1], generator=generator,
                         device=y.device) * P_std + P_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    noise = torch.randn(y.shape, generator=generator, device=y.device) * sigma
    D, logvar = net(y + noise, sigma.flatten(), labels, return_logvar=True)
    loss = (weight / logvar.exp() * (D.float() - y) ** 2 + logvar).mean()
    return loss * y[0].numel() if pixel_sum else loss
# ----------------------------------------------------------------------------- sampler


def karras_sigmas(num_steps, sigma_min=0.002, sigma_max=80, rho=7):
    """Karras et al. noise levels, float64 [num_steps + 1], the last one 0."""
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho)
         + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
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
    """EDM Heun sampler (docs/formulas.md 1): x_0 = latents * sigmas[0]; Euler on the last step.

    `denoise(x, sigma)` -> D(x; sigma), sigma a 0-d tensor of x's dtype; x keeps its dtype. Churn
    noise comes from `randn_like(x)` or `generators.randn_like(x)` (a StackedRandomGenerator)."""
    randn_like = randn_like or (
        generators.randn_like if generators is not None else torch.randn_like)
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


def generate_images(denoise, class_labels, seeds, num_steps=32, batch_size=64, shape=None,
                    device=None, **sampler_kwargs):
    """Per-seed samples -> uint8 [N, C, H, W] on the CPU.

    `denoise` is a net (called as net(x, sigma, labels)) or, with class_labels=None, any
    denoise(x, sigma); `shape` (C, H, W) defaults to the net's."""
    if shape is None:
        shape = (denoise.img_channels, denoise.img_resolution, denoise.img_resolution)
    if device is None:
        device = (next(denoise.parameters()).device if isinstance(denoise, nn.Module)
                  else torch.device("cpu"))
    sigmas, out = karras_sigmas(num_steps), []
    for lo in range(0, len(seeds), batch_size):
        rnd = StackedRandomGenerator(device, seeds[lo:lo + batch_size])
        fn = denoise
        if class_labels is not None:
            labels = (torch.as_tensor(class_labels, device=device).reshape(-1)
                      .expand(len(seeds))[lo:lo + batch_size])
            fn = lambda x, sigma: denoise(x, sigma, labels)  # noqa: E731 (used in this iteration)
        x = heun_sample(fn, rnd.randn([len(rnd.generators), *shape], device=device), sigmas,
                        generators=rnd, **sampler_kwargs)
        out.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- training


def edm2_preset(channels, lr, dropout, duration_mimg):
    """EDM2's img64 configuration at width `channels` (batch 2048, isqrt decay after 35k batches,
    10 Mimg warm-up, ln sigma ~ N(-0.8, 1.6^2), EMA profiles 0.05 and 0.10, sigma_data 0.5, no
    flips)."""
    return dict(resolution=64, channels=channels, channel_mult=[1, 2, 3, 4], num_blocks=3,
                num_mid_blocks=2, attn=[16, 8], mp=True, uncertainty=True, dropout=dropout,
                batch_size=2048, lr=lr, lr_schedule="isqrt", rampup_kimg=10000, ref_batches=35000,
                duration=duration_mimg * 1048.576, p_mean=-0.8, p_std=1.6, ema_std=[0.05, 0.10],
                sigma_data="0.5", xflip=0, snapshot_every=8388.608, checkpoint_every=8388.608,
                status_every=131.072)


CPU_PRESET = dict(resolution=32, channels=32, channel_mult=[1, 2, 4], num_blocks=2,
                  num_mid_blocks=1, attn=[], mp=False, uncertainty=False, dropout=0.0,
                  batch_size=64, lr=2e-3, lr_schedule="linear", rampup_kimg=6.4, ref_batches=0,
                  duration=150, p_mean=-1.2, p_std=1.2, ema_std=[0.05], sigma_data="auto", xflip=1,
                  snapshot_every=50, checkpoint_every=10, status_every=1.0)
PRESETS = {
    "cpu": CPU_PRESET,
    "cpu-guide": {**CPU_PRESET, "channels": 16,
                  "duration": 50},  # ~1/4 of the cpu net's cost per call
    "edm2-xs": edm2_preset(128, 0.0120, 0.0, 1024),  # the light autoguidance guide of edm2-s
    "edm2-s": edm2_preset(192, 0.0100, 0.0, 1024),
    "edm2-m": edm2_preset(256, 0.0090, 0.1, 2048),
}
DENOISE_SIGMAS = (0.002, 0.01, 0.05, 0.2, 0.5, 1, 5, 20, 80)
# images decoded for sigma_data 'auto' and the mean image (all of a smaller set)
STATS_IMAGES = 10000
HELD_IMAGES = 128  # training images of the denoising-error table when there is no --heldout


epoch_permutation = functools.lru_cache(maxsize=4)(epoch_order)


def stream_indices(start, count, n, seed):
    """Items at global positions start..start+count-1 of an endless stream of seeded epoch
    permutations (the same stream whatever the number of ranks: each micro-batch takes its own
    slice)."""
    pos = torch.arange(start, start + count)
    return torch.cat([epoch_permutation(n, 1, seed, int(e))[pos[pos // n == e] % n]
                      for e in torch.unique(pos // n)])


class StreamSampler(torch.utils.data.Sampler):
    """This rank's micro-batches from image `start` on: micro-batch r of the step that starts at
    nimg holds stream positions nimg + (r * world + rank) * micro ... + micro - 1 (resume = same
    batches)."""

    def __init__(self, n, start, micro, batch_size, grad_accum, rank, world, seed):
        self.n, self.start, self.micro, self.batch_size = n, start, micro, batch_size
        self.grad_accum, self.rank, self.world, self.seed = grad_accum, rank, world, seed

    def __iter__(self):
        for nimg in range(self.start, 1 << 62, self.batch_size):
            for r in range(self.grad_accum):
                pos = nimg + (r * self.world + self.rank) * self.micro
                yield stream_indices(pos, self.micro, self.n, self.seed).tolist()


def to_float(images_u8):
    return images_u8.float() / 127.5 - 1


def decode(dataset, indices, chunk=None):
    """uint8 images + labels of dataset[indices], decoded per item, in chunks of `chunk` (an
    iterator)."""
    indices = [int(i) for i in indices]
    chunk = chunk or max(1, len(indices))
    for lo in range(0, len(indices), chunk):
        yield load_images(torch.utils.data.Subset(dataset, indices[lo:lo + chunk]), progress=False)


def statistics_sample(n, cap=None):
    """Indices of the images that sigma_data 'auto' and the mean image are measured on: all, or a
    seeded sample of `cap` (STATS_IMAGES) of a larger set."""
    cap = cap or STATS_IMAGES
    if n <= cap:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:cap].sort().values


def pixel_statistics(chunks):
    """uint8 image chunks -> (std of all pixels in [-1, 1], mean image [C,H,W]) in one float64
    pass."""
    s1 = s2 = 0
    count = 0
    for images in chunks:
        y = to_float(images).double()
        s1, s2, count = s1 + y.sum(0), s2 + y.square().sum(0), count + len(images)
    mean = s1 / count
    return math.sqrt((s2 / count).mean() - mean.mean() ** 2), mean.float()


def stats_chunk(image_shape):
    """Images per chunk of the statistics pass (at most 2^25 pixel values: 256 MB in float64)."""
    return max(64, min(4096, 2 ** 25 // math.prod(image_shape)))


@torch.no_grad()
def denoising_errors(net, images, labels, mean_image, device, seed=0):
    """RMS error of D on real images per sigma, next to D = noisy input (error sigma) and D = mean
    image."""
    y = to_float(images).to(device)
    n = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    rms = {s: float(torch.cat([
        ((net(y[i:i + 128] + s * n[i:i + 128], s, labels[i:i + 128].to(device))
          - y[i:i + 128]) ** 2).flatten() for i in range(0, len(y), 128)]).mean().sqrt())
        for s in DENOISE_SIGMAS}
    return rms, float(((y - mean_image.to(device)) ** 2).mean().sqrt())


def save_grid(net, path, device, num_steps=32):
    """Rows = up to 16 classes (evenly spaced), 8 fixed seeds per row, EMA net, Heun sampler."""
    rows = np.unique(
        np.linspace(0, net.num_classes - 1, min(16, net.num_classes)).round().astype(int))
    labels = torch.as_tensor(np.repeat(rows, 8))
    x = generate_images(net, labels, list(range(len(labels))), num_steps=num_steps, device=device)
    c, h, w = x.shape[1:]
    grid = x.reshape(len(rows), 8, c, h, w).permute(0, 3, 1, 4, 2).reshape(len(rows) * h, 8 * w, c)
    write_atomic(path,
                 lambda tmp: Image.fromarray(grid.squeeze(-1).numpy()).save(tmp, format="PNG"))


def attention_levels(args, preset, error):
    """--attn given: check it names level resolutions. Not given: the preset's attention levels (its
    resolutions at its own image size) at this --resolution, e.g. edm2's 16 and 8 px at 64 px become
    28 and 14 px at 112 px. Never silently none."""
    levels = [args.resolution >> lvl for lvl in range(len(args.channel_mult))]
    if args.attn is None:
        wanted = [lvl for lvl in range(len(preset["channel_mult"]))
                  if preset["resolution"] >> lvl in preset["attn"]]
        args.attn = [levels[lvl] for lvl in wanted if lvl < len(levels)]
        if wanted and not args.attn:
            error("--channel-mult leaves none of the preset's attention levels; give --attn "
                  f"(levels: {levels})")
    bad = [r for r in args.attn if r not in levels]
    if bad:
        error(f"--attn {bad} is not the resolution of a level at --resolution {args.resolution} "
              f"(levels: {levels})")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       epilog="Other commands: `train_diffusion.py import-edm2 --help` (EDM2 "
                              "weights -> snapshot), "
                              "`train_diffusion.py posthoc-ema --help` (post-hoc EMA).")
    p.add_argument("--data", nargs="+", required=True,
                   help="image folder(s) and/or train.rec file(s)")
    p.add_argument("--out", required=True,
                   help="run folder (re-running resumes from its checkpoint.pt)")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu",
                   help="defaults for every flag shown as None")
    p.add_argument("--heldout",
                   help="held-out real images (identity folders named as in --data) for the "
                        "denoising-error table; without it a slice of training images is used")
    g = p.add_argument_group("network (None: from --preset)")
    g.add_argument("--resolution", type=positive_int,
                   help="image size in pixels (images are resized to it)")
    g.add_argument("--channels", type=positive_int,
                   help="base width (a narrower net can serve as an autoguidance guide)")
    g.add_argument("--channel-mult", type=positive_int, nargs="+",
                   help="width multipliers per resolution level")
    g.add_argument("--num-blocks", type=positive_int,
                   help="residual blocks per level (EDM2: +1 in the decoder)")
    g.add_argument("--num-mid-blocks", type=non_negative_int,
                   help="cpu net: blocks at the lowest resolution (EDM2: 2)")
    g.add_argument("--attn", type=positive_int, nargs="*",
                   help="resolutions with self-attention (None: the preset's attention levels at "
                        "this --resolution)")
    g.add_argument("--mp", type=int, choices=[0, 1],
                   help="1: EDM2's magnitude-preserving UNet; 0: the cpu UNet")
    g.add_argument("--uncertainty", type=int, choices=[0, 1],
                   help="1: EDM2 learned loss weighting u(sigma)")
    g.add_argument("--dropout", type=probability, help="dropout in the residual blocks")
    g.add_argument("--label-dropout", type=probability, default=0.0,
                   help="probability of the null class in training (classifier-free guidance); 0: "
                        "conditional only")
    g.add_argument("--sigma-data", help="'auto' (pixel std of the data in [-1, 1]) or a number")
    g.add_argument("--xflip", type=int, choices=[0, 1], help="1: random horizontal flips")
    g = p.add_argument_group("optimisation (None: from --preset)")
    g.add_argument("--duration", type=positive_float, help="training length in kimg")
    g.add_argument("--batch-size", type=positive_int,
                   help="global batch size (images per optimiser step)")
    g.add_argument("--grad-accum", type=positive_int, default=1,
                   help="micro-batches per rank and step")
    g.add_argument("--lr", type=positive_float,
                   help="reference learning rate (Adam, betas 0.9 0.99)")
    g.add_argument("--lr-schedule", choices=["linear", "isqrt"],
                   help="linear: constant for half the run, then to 0; isqrt: EDM2's lr / "
                        "sqrt(max(nimg / "
                        "(ref_batches * batch), 1))")
    g.add_argument("--rampup-kimg", type=non_negative_float, help="linear lr warm-up length")
    g.add_argument("--ref-batches", type=non_negative_float,
                   help="isqrt: optimiser steps before the decay starts (EDM2)")
    g.add_argument("--p-mean", type=finite_float, help="mean of ln(sigma) in training")
    g.add_argument("--p-std", type=positive_float, help="std of ln(sigma) in training")
    g.add_argument("--ema-std", type=positive_float, nargs="+",
                   help="relative std(s) of the power-function EMA")
    g = p.add_argument_group("run")
    g.add_argument("--snapshot-every", type=non_negative_float,
                   help="kimg between snapshots + sample grids (None: preset)")
    g.add_argument("--checkpoint-every", type=non_negative_float,
                   help="kimg between checkpoints (None: preset)")
    g.add_argument("--status-every", type=non_negative_float,
                   help="kimg between status lines in log.jsonl (None: preset)")
    g.add_argument("--workers", type=non_negative_int,
                   help="data-loading processes per rank (None: 4 on CUDA, 0 on CPU)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--amp", action="store_true",
                   help="mixed precision: bf16 autocast where the GPU or CPU has native bf16, "
                        "else fp16 + GradScaler on CUDA")
    g.add_argument(
        "--amp-dtype", default="auto", choices=["auto", "bf16", "fp16"],
        help="force the --amp dtype (auto: bf16 where native, else fp16 + GradScaler on CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward pass")
    g.add_argument(
        "--compile-backend", default="inductor",
        help="torch.compile backend (aot_eager: no C++ compiler, for checking the graph only)")
    g.add_argument("--grid-steps", type=non_negative_int, default=32,
                   help="Heun steps of each snapshot's sample grid (0: no grid)")
    g.add_argument("--stop-after-kimg", type=positive_float,
                   help="debug: save the checkpoint and stop here, as if killed")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for k, v in preset.items():
        if getattr(args, k) is None and k != "attn":
            setattr(args, k, v)
    levels = 2 ** (len(args.channel_mult) - 1)
    if args.resolution % levels:
        p.error(f"--resolution {args.resolution} must be a multiple of {levels} for "
                f"{len(args.channel_mult)} levels")
    attention_levels(args, preset, p.error)
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


def load_scaler_state(scaler, state):
    """GradScaler state from a checkpoint, when both it and this run use one (fp16 --amp); a run
    written without it (fp32, bf16, CPU) stores an empty state, and this run may not need one."""
    if state and scaler.is_enabled():
        scaler.load_state_dict(state)


def open_training_data(args):
    """-> (dataset decoding resized uint8 items, image shape, held-out (images, labels) or None);
    only --heldout's first 256 matching images are decoded here."""
    dataset = open_datasets(args.data, size=args.resolution)
    if len(dataset) == 0:
        raise DataError("the dataset is empty")
    shape = tuple(dataset[0][0].shape)
    held = None
    if args.heldout:
        hds = open_datasets([args.heldout], size=args.resolution)
        index = {n: i for i, n in enumerate(dataset.classes)}
        keep = [i for i, t in enumerate(hds.targets) if hds.classes[t] in index]
        keep = keep[::max(1, len(keep) // 256)][:256]  # spread over the identities
        if not keep:
            raise DataError(
                f"no identity of --heldout {args.heldout} is among the training identities")
        hi, hl = next(decode(hds, keep))
        held = hi, torch.as_tensor([index[hds.classes[t]] for t in hl.tolist()])
    return dataset, shape, held


def kimg_tag(nimg, fine=False):
    """Snapshot name part: whole kimg as 000150 (as EDM2 names them); with `fine` (a run whose
    duration or snapshot interval is not a whole kimg) a sub-kimg position as 000000.008, so names
    never clash. Both sort in training order."""
    return f"{nimg // 1000:06d}" + (f".{nimg % 1000:03d}" if fine and nimg % 1000 else "")


def check_finite(net, nimg):
    if not all(torch.isfinite(p).all() for p in net.parameters()):
        sys.exit(f"error: non-finite weights at {nimg / 1e3:g} kimg; nothing saved (lower --lr or "
                 "check the data)")


# the flags a resumed run must share with its checkpoint (--duration may grow)
RECIPE = ("batch_size", "lr", "lr_schedule", "rampup_kimg", "ref_batches", "p_mean", "p_std",
          "ema_std", "label_dropout", "xflip", "seed")


def resume(ckpt, ckpt_path, args, net, ema, opt, scaler):
    """Load a checkpoint into the net, its EMAs, the optimiser, the scaler and the RNG -> images
    seen; a checkpoint of another recipe, network or class list is refused."""
    check_same_recipe(ckpt.get("args", {}), args, RECIPE, ckpt_path)
    if ckpt["config"] != net.config or ckpt["class_names"] != net.class_names:
        sys.exit(f"error: {ckpt_path} was made with another network or data (config "
                 f"{ckpt['config']}); "
                 "use another --out or the same settings")
    net.load_state_dict(ckpt["net"])
    for e, sd in zip(ema.emas, ckpt["ema"]):
        e.load_state_dict(sd)
    opt.load_state_dict(ckpt["optimizer"])
    load_scaler_state(scaler, ckpt["scaler"])
    return ckpt["nimg"]


def write_snapshot(out, tag, net, ema, nimg, sigma_data, device, grid_steps):
    """OUT/network-snapshot-TAG.pt: the first EMA profile as the network, the others stored for
    post-hoc EMA; and a sample grid when grid_steps > 0. Non-finite weights are refused."""
    check_finite(ema.emas[0], nimg)
    snap = {"config": net.config, "ema": ema.emas[0].state_dict(), "class_names": net.class_names,
            "kimg": nimg / 1e3, "sigma_data": sigma_data, "ema_stds": ema.stds,
            "ema_std": ema.stds[0]}
    snap.update({f"ema_std_{s:g}": e.state_dict() for s, e in zip(ema.stds[1:], ema.emas[1:])})
    save_atomic(snap, os.path.join(out, f"network-snapshot-{tag}.pt"))
    ema.emas[0].class_names = net.class_names
    if grid_steps:
        save_grid(ema.emas[0], os.path.join(out, f"samples-{tag}.png"), device, grid_steps)


def log_status(out, nimg, n_status, t_status, losses, lr):
    """Speed and mean loss since the last status line, printed and appended to OUT/log.jsonl ->
    now."""
    now = time.time()
    stat = {"kimg": nimg / 1e3, "images_per_s": (nimg - n_status) / (now - t_status),
            "loss": float(np.mean(losses)), "lr": lr, "time": now}
    tqdm.write(" ".join(f"{k} {v:.4g}" for k, v in stat.items() if k != "time"))
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps(stat) + "\n")
    return now


def truncate_log(out, nimg):
    """OUT/log.jsonl up to a resumed checkpoint: the records a killed run wrote after it come again,
    once."""
    path, keep = os.path.join(out, "log.jsonl"), []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["kimg"] * 1e3 <= nimg + 0.5:
                        keep.append(line)
                except (ValueError, KeyError):  # a line cut short by the kill
                    pass
        write_atomic(path, "".join(keep))


def log_denoising(out, rms, mean_rms, nimg, heldout):
    """The EMA's denoising error per noise level, printed and appended to OUT/log.jsonl."""
    lines = [f"denoising RMS error on {'held-out' if heldout else 'training'} images at "
             f"{nimg / 1e3:g} kimg "
             "(trivial: D = noisy input -> sigma; D = mean image -> " + f"{mean_rms:.4f})",
             "sigma  " + " ".join(f"{s:>7g}" for s in rms),
             "D_ema  " + " ".join(f"{v:7.4f}" for v in rms.values())]
    tqdm.write("\n".join(lines))
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps({"kimg": nimg / 1e3,
                            "denoise_rms": {f"{s:g}": v for s, v in rms.items()},
                            "mean_image_rms": mean_rms, "heldout": heldout}) + "\n")


def build_net(args, img_channels, classes, sigma_data, device):
    """The denoiser the flags describe, with the same initial weights on every rank (seeded)."""
    torch.manual_seed(args.seed)
    net = Denoiser(args.resolution, img_channels, len(classes), null_class=args.label_dropout > 0,
                   sigma_data=sigma_data, uncertainty=bool(args.uncertainty),
                   channels=args.channels, channel_mult=args.channel_mult,
                   num_blocks=args.num_blocks, num_mid_blocks=args.num_mid_blocks,
                   attn_resolutions=args.attn, mp=bool(args.mp),
                   dropout=args.dropout).to(device).train()
    net.class_names = list(classes)
    return net


def stream_loader(dataset, nimg, micro, args, rank, world, device):
    """An iterator over this rank's micro-batches from image nimg of the seeded stream on."""
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    return iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=StreamSampler(len(dataset), nimg, micro, args.batch_size,
                                             args.grad_accum, rank, world, args.seed),
        num_workers=workers, pin_memory=device.type == "cuda"))


def training_set_and_statistics(args):
    """-> (dataset, image shape, held-out (images, labels), pixel std, mean image). Without
    --heldout the denoising-error table uses a fixed slice of the training images (not held out)."""
    dataset, shape, held = open_training_data(args)
    if held is None:
        pick = torch.randperm(len(dataset),
                              generator=torch.Generator().manual_seed(0))[:HELD_IMAGES]
        held = next(decode(dataset, pick))
    sample = statistics_sample(len(dataset))
    pixel_std, mean_image = pixel_statistics(im for im, _ in decode(dataset, sample,
                                                                    stats_chunk(shape)))
    return dataset, shape, held, pixel_std, mean_image


def next_batch(loader, xflip, label_dropout, gen, null_class, device):
    """The next micro-batch in [-1, 1], flipped (--xflip) and its labels dropped to the null class
    (--label-dropout) by draws from gen, a function of the batch's place in the stream."""
    try:
        images, lab = next(loader)
    except DataError as e:  # from a loader process: the original message is the last line
        sys.exit(f"error: {str(e).strip().splitlines()[-1].split('DataError: ')[-1]}")
    y, lab = to_float(images.to(device, non_blocking=True)), lab.to(device, non_blocking=True)
    if xflip:
        flip = torch.rand(len(y), generator=gen, device=device) < 0.5
        y = torch.where(flip[:, None, None, None], y.flip(3), y)
    if label_dropout > 0:
        drop = torch.rand(len(y), generator=gen, device=device) < label_dropout
        lab = torch.where(drop, torch.full_like(lab, null_class), lab)
    return y, lab


def apply_gradients(net, opt, scaler):
    """One Adam step on the accumulated gradients (non-finite gradient entries zeroed, as EDM2)."""
    scaler.unscale_(opt)
    for p in net.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def save_checkpoint(path, net, ema, opt, scaler, nimg, args):
    save_atomic({"net": net.state_dict(), "ema": [e.state_dict() for e in ema.emas],
                 "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "nimg": nimg,
                 "config": net.config, "class_names": net.class_names,
                 "args": {k: getattr(args, k) for k in RECIPE}}, path)


def train(args):
    rank, _, world, device = setup_distributed(args.device)
    micro, rem = divmod(args.batch_size, world * args.grad_accum)
    if rem or micro == 0:
        sys.exit(f"error: --batch-size {args.batch_size} is not divisible by {world} ranks x "
                 f"--grad-accum {args.grad_accum}")
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        if args.compile and args.compile_backend == "inductor":
            check_compile(device)
        dataset, shape, held, pixel_std, mean_image = training_set_and_statistics(args)
    except DataError as e:
        sys.exit(f"error: {e}")
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    ckpt = None  # mapped, not read whole by every rank
    if os.path.exists(ckpt_path):
        ckpt = load_weights(ckpt_path, map_location="cpu", mmap=True)

    sigma_data = float(args.sigma_data) if args.sigma_data != "auto" else pixel_std
    sigma_data = ckpt["config"]["sigma_data"] if ckpt is not None else sigma_data
    net = build_net(args, shape[0], dataset.classes, sigma_data, device)
    ema = PowerEMA(net, args.ema_std)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.99), eps=1e-8)
    ctx, scaler = autocast_context(device, args.amp, args.amp_dtype)
    nimg = 0
    if ckpt is not None:
        nimg = resume(ckpt, ckpt_path, args, net, ema, opt, scaler)
        if rank == 0:
            truncate_log(args.out, nimg)
        log(f"resuming from {ckpt_path} at {nimg / 1e3:g} kimg")
        del ckpt
    log(f"{len(dataset)} images, {net.num_classes} classes, {args.resolution} px, sigma_data "
        f"{sigma_data:.4f}, {sum(p.numel() for p in net.parameters()):,} parameters, "
        f"{world} process(es) x {args.grad_accum} x {micro}")
    if rank == 0:
        write_atomic(os.path.join(args.out, "config.json"),
                     json.dumps({**vars(args), "net": net.config, "world_size": world,
                                 "machine": machine(device)}, indent=1))
    model = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    forward = torch.compile(model, backend=args.compile_backend) if args.compile else model
    loader = stream_loader(dataset, nimg, micro, args, rank, world, device)

    fine = args.duration % 1 or args.snapshot_every % 1  # sub-kimg snapshot names (kimg_tag)

    def crossed(every, before):
        step = max(1, int(every * 1e3))
        return every > 0 and nimg // step > before // step

    def save_snapshot():
        write_snapshot(args.out, kimg_tag(nimg, fine), net, ema, nimg, sigma_data, device,
                       args.grid_steps)
        rms, mean_rms = denoising_errors(ema.emas[0], *held, mean_image, device)
        log_denoising(args.out, rms, mean_rms, nimg, bool(args.heldout))

    total, stop = int(args.duration * 1e3), int((args.stop_after_kimg or args.duration) * 1e3)
    bar = tqdm(total=total, initial=nimg, unit="img", unit_scale=True, disable=rank != 0,
               dynamic_ncols=True)
    t_status, n_status, losses = time.time(), nimg, []
    while nimg < min(total, stop):
        lr = learning_rate(args, nimg)
        for group in opt.param_groups:
            group["lr"] = lr
        # EDM2's forced weight normalisation, outside the (compiled) forward
        net.normalize_weights_()
        loss_sum = torch.zeros((), device=device)
        for r in range(args.grad_accum):
            pos = nimg + (r * world + rank) * micro  # this micro-batch's place in the global stream
            gen = torch.Generator(device).manual_seed(seed_for(args.seed, pos))
            # network dropout: a function of the position too
            torch.manual_seed(seed_for(args.seed, pos, 1))
            y, lab = next_batch(loader, args.xflip, args.label_dropout, gen, net.num_classes,
                                device)
            sync = world > 1 and r < args.grad_accum - 1
            with model.no_sync() if sync else nullcontext(), ctx:
                loss = edm_loss(forward, y, lab, args.p_mean, args.p_std, sigma_data, gen,
                                pixel_sum=bool(args.mp))
            scaler.scale(loss / args.grad_accum).backward()
            # logged per pixel
            loss_sum += loss.detach() / (args.grad_accum * (y[0].numel() if args.mp else 1))
        if world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= world
        if not torch.isfinite(loss_sum):
            sys.exit(f"error: the loss became {loss_sum.item()} at {nimg / 1e3:g} kimg; lower --lr "
                     "or check the data")
        apply_gradients(net, opt, scaler)
        before, nimg = nimg, nimg + args.batch_size
        ema.update(net, nimg, args.batch_size)
        losses.append(loss_sum.item())
        bar.update(args.batch_size)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
        if rank == 0 and (crossed(args.status_every, before) or nimg >= total):
            t_status, n_status, losses = log_status(args.out, nimg, n_status, t_status, losses,
                                                    lr), nimg, []
        if rank == 0 and (crossed(args.snapshot_every, before) or nimg >= total):
            # before the checkpoint that passes it: a kill in between redoes it on resume
            save_snapshot()
        if rank == 0 and (crossed(args.checkpoint_every, before)
                          or crossed(args.snapshot_every, before) or nimg >= min(total, stop)):
            check_finite(net, nimg)
            save_checkpoint(ckpt_path, net, ema, opt, scaler, nimg, args)
    bar.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()

# ----------------------------------------------------------------------------- other commands


def import_edm2(argv):
    p = argparse.ArgumentParser(prog="train_diffusion.py import-edm2",
                                description="EDM2 Precond weights -> a snapshot that "
                                            "scoremix_sample.py --net reads. "
                                            "STATE.pt: torch.save(net.state_dict()) of EDM2's "
                                            "Precond, made with "
                                            "EDM2's own code from its network pickle.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("state", help="the saved state dict (.pt)")
    p.add_argument("--edm2-kwargs", required=True,
                   help="JSON object of EDM2's Precond/UNet keyword arguments (img_resolution, "
                        "img_channels, "
                        "label_dim, model_channels, channel_mult, num_blocks, attn_resolutions, "
                        "dropout, ...)")
    p.add_argument("--class-names",
                   help="text file with one class name per line (default: 0 ... label_dim-1)")
    p.add_argument("--out", required=True, help="output snapshot .pt")
    args = p.parse_args(argv)
    try:
        kwargs = json.loads(args.edm2_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("--edm2-kwargs must be a JSON object")
        if not os.path.isfile(args.state):
            raise ValueError(f"state dict not found: {args.state}")
        state = load_weights(args.state, map_location="cpu", mmap=True)
        if not isinstance(state, dict):
            raise ValueError(f"{args.state} is not a state dict")
        net = from_edm2(state, **kwargs)
        if args.class_names:
            with open(args.class_names) as f:
                names = [line.strip() for line in f if line.strip()]
            if len(names) != net.num_classes:
                raise ValueError(
                    f"--class-names has {len(names)} names for {net.num_classes} classes")
            net.class_names = names
    except Exception as e:  # a foreign or truncated file: torch / pickle raise many kinds
        sys.exit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    save_atomic({"config": net.config, "ema": net.state_dict(), "class_names": net.class_names,
                 "kimg": 0.0, "sigma_data": net.sigma_data, "source": "edm2"}, args.out)
    print(f"wrote {args.out}: {net.num_classes} classes, "
          f"{sum(q.numel() for q in net.parameters()):,} parameters")


def posthoc_ema(argv):
    p = argparse.ArgumentParser(prog="train_diffusion.py posthoc-ema",
                                description="EDM2 post-hoc EMA (Alg. 3): the EMA with relative std "
                                            "--std, solved "
                                            "from the EMA profiles that a run's snapshots store.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", help="run folder: all its network-snapshot-*.pt are the inputs")
    p.add_argument("--snapshots", nargs="+", help="these snapshots instead of all of --run's")
    p.add_argument("--std", type=float, required=True,
                   help="relative std of the reconstructed EMA (EDM2: 0.01-0.25)")
    p.add_argument("--kimg", type=float,
                   help="reconstruct at this snapshot's kimg (default: the latest)")
    p.add_argument("--out", required=True,
                   help="output snapshot .pt (scoremix_sample.py --net reads it)")
    args = p.parse_args(argv)
    if not 0 < args.std < 0.28:
        sys.exit("error: --std must be in (0, 0.28)")
    paths = args.snapshots
    if not paths and args.run and os.path.isdir(args.run):
        paths = sorted(os.path.join(args.run, f) for f in os.listdir(args.run)
                       if re.fullmatch(r"network-snapshot-\d+(\.\d{3})?\.pt", f))
    if not paths:
        sys.exit("error: no snapshots: give --run RUN (with network-snapshot-*.pt) or --snapshots")
    try:
        snap = reconstruct_ema(paths, args.std, args.kimg)
    except Exception as e:  # a foreign or truncated snapshot: torch / pickle raise many kinds
        sys.exit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if not all(torch.isfinite(v).all() for v in snap["ema"].values()):
        sys.exit(
            "error: the reconstruction has non-finite weights (too few or too similar profiles?)")
    save_atomic(snap, args.out)
    print(f"wrote {args.out}: std {args.std:g} at {snap['kimg']:g} kimg from "
          f"{len(snap['posthoc_ema']['inputs'])} "
          "EMA profiles")


COMMANDS = {"import-edm2": import_edm2, "posthoc-ema": posthoc_ema}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    args = parse_args(argv)
    try:
        with run_folder_guard(args.out):
            train(args)
    except InputError as e:
        fail(e)


if __name__ == "__main__":
    main()
