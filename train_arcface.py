"""Train the face-recognition discriminator: an IResNet with a margin softmax (ArcFace / CosFace).

The backbone f maps an aligned face to an embedding; a class weight matrix W (one row per identity)
gives cos(theta_j) = <f(x)/|f(x)|, W_j/|W_j|>, and the target logit gets a margin (docs/formulas.md
3):
    ArcFace: s*cos(theta_y + m2)  (s=64, m2=0.5)        CosFace: s*(cos(theta_y) - m3)  (m3=0.4)
trained with SGD, linear lr decay and horizontal flips, as in insightface's arcface_torch recipe.
The ArcFace margin is straight-through as in current arcface_torch (--margin-grad textbook: the 2022
gradient through cos(theta + m2)). For 10^5-10^6 classes, --partial-fc shards W over the processes
and --sample-rate scores a share of it. This file also holds the data readers and writers (image
folders; MXNet RecordIO and insightface .bin without mxnet) and the small run helpers (distributed
setup, atomic saves, autocast) that the later stages import.

    python train_arcface.py --data toy/train --out runs/baseline --val toy/bench/*.bin
    torchrun --nproc_per_node=8 train_arcface.py --data faces_webface/train.rec --out runs/r50 \
        --network r50 --width 1 --embedding-size 512 --input-size 112 --batch-size 1024 \
        --epochs 20 --amp
    (Glint360K: add --partial-fc --sample-rate 0.1 --workers 8; several nodes: docs/scale.md)
    python train_arcface.py --data faces/ more_faces/ --pack-rec faces_rec --pack-size 112
"""
import argparse
import datetime
import gc
import json
import math
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import (PROGRESS, ArgumentParser, DataError, InputError, autocast_context,
                    check_compile, check_same_recipe, cuda_settings, epoch_order, fail,
                    jpeg_quality, load_images, load_weights, machine, non_negative_float,
                    non_negative_int, open_datasets, pack_rec, positive_float, positive_int,
                    probability, run_folder_guard, save_atomic, seed_for, setup_distributed,
                    write_atomic)


class RecordIODataset(common.RecordIODataset):
    """The discriminator's data reader under its contract name: an insightface train.rec (train.idx
    beside it); len(ds), ds[i] -> (image, int label). The reader itself lives in common.py."""


# ----------------------------------------------------------------------------- model

BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3], 100: [3, 13, 30, 3],
          200: [6, 26, 60, 6]}


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN, conv3x3, BN, PReLU, conv3x3(stride), BN, plus shortcut; no activation after the sum."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    def __init__(self, layers, width=1.0, embedding_size=512, input_size=112, dropout=0.0):
        super().__init__()
        if input_size % 16:
            raise ValueError(
                f"input_size must be a multiple of 16 (four stride-2 stages), got {input_size}")
        c = [max(1, int(round(w * width))) for w in (64, 64, 128, 256, 512)]  # stem, stages 1-4
        self.input_size = input_size
        self.conv1, self.bn1, self.prelu = (conv3x3(3, c[0]), nn.BatchNorm2d(c[0], eps=1e-5),
                                            nn.PReLU(c[0]))
        for i, n in enumerate(layers):  # stride 2 on the first block of every stage
            blocks = ([IBasicBlock(c[i], c[i + 1], 2)]
                      + [IBasicBlock(c[i + 1], c[i + 1]) for _ in range(n - 1)])
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn2 = nn.BatchNorm2d(c[4], eps=1e-5)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(c[4] * (input_size // 16) ** 2, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        # reference: the embedding BN has no learned scale
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)  # insightface's init

    def forward(self, x):
        # the caller's autocast, if any, runs the convolutions; the embedding layers always run in
        # fp32
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        with torch.autocast(x.device.type, enabled=False):
            return self.features(self.fc(x.float()))


def iresnet(depth=50, width=1.0, embedding_size=512, input_size=112, dropout=0.0):
    """IResNet-{18,34,50,100,200}; defaults are the 112-px, 512-d reference model."""
    if depth not in BLOCKS:
        raise ValueError(f"depth must be one of {sorted(BLOCKS)}, got {depth}")
    return IResNet(BLOCKS[depth], width, embedding_size, input_size, dropout)


class CombinedMarginLoss(nn.Module):
    """Target logit s*(cos(m1*theta + m2) - m3), other logits s*cos(theta_j) (ArcFace eq. 4).

    gradient="straight" (default, current arcface_torch): the margin is added to the value only,
    so d logit / d cos is s on every entry, the target's too (a straight-through margin, no
    threshold fallback: past theta + m2 > pi the logit follows cos(theta + m2)).
    gradient="textbook" (arcface_torch of 2022): the gradient goes through cos(theta + m2), which
    scales the target's by sin(theta + m2) / sin(theta); past theta + m2 > pi the logit is the
    monotone fallback cos(theta) - m2*sin(m2). Logits agree wherever theta + m2 <= pi."""

    GRADIENTS = ("straight", "textbook")

    def __init__(self, s=64.0, m1=1.0, m2=0.5, m3=0.0, gradient="straight"):
        super().__init__()
        if gradient not in self.GRADIENTS:
            raise ValueError(f"gradient must be one of {self.GRADIENTS}, got {gradient!r}")
        self.s, self.m1, self.m2, self.m3, self.gradient = s, m1, m2, m3, gradient

    def forward(self, cosine, labels):
        if cosine.dtype in (torch.float16, torch.bfloat16):
            cosine = cosine.float()
        t = cosine.gather(1, labels[:, None])
        if self.m1 == 1.0 and self.m2 == 0.0:
            # CosFace (and plain normalised softmax for m3 = 0): same either way
            target = t - self.m3
        elif self.gradient == "straight":
            with torch.no_grad():
                shift = torch.cos(self.m1 * torch.acos(t.clamp(-1, 1)) + self.m2) - self.m3 - t
            target = t + shift
        else:
            theta = torch.acos(t.clamp(-1 + 1e-7, 1 - 1e-7))
            angle = self.m1 * theta + self.m2
            target = torch.where(angle <= math.pi, torch.cos(angle) - self.m3,
                                 t - self.m3 - self.m2 * math.sin(self.m2))
        return self.s * cosine.scatter(1, labels[:, None], target)


MARGINS = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4)}
LOSS_CAP = -math.log(1e-30)  # insightface's logged loss clamps p_y at 1e-30


class MarginHead(nn.Module):
    """Class weights W [C, E] (kept apart from the backbone: not clipped, not saved in model.pt)."""

    def __init__(self, embedding_size, num_classes, s=64.0, margin="arcface",
                 margin_grad="straight"):
        super().__init__()
        self.weight = nn.Parameter(torch.normal(0, 0.01, (num_classes, embedding_size)))
        self.margin = CombinedMarginLoss(s, *MARGINS[margin], gradient=margin_grad)

    def forward(self, emb, labels):
        cosine = F.linear(F.normalize(emb.float()), F.normalize(self.weight.float()))
        loss = F.cross_entropy(self.margin(cosine.clamp(-1, 1), labels), labels, reduction="none")
        # the value as insightface logs it, -log max(p_y, 1e-30); the gradient of the plain loss
        return (loss + (loss.clamp_max(LOSS_CAP) - loss).detach()).mean()


def distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class AllGather(torch.autograd.Function):
    """Every rank's rows (equal counts) concatenated in rank order. The backward sums all ranks'
    gradients of this rank's rows and multiplies by the world size: each rank's loss is already the
    whole batch's, and DDP then averages the backbone's gradients (as insightface's Partial FC
    does)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        world, rank = dist.get_world_size(), dist.get_rank()
        n = len(grad) // world
        return grad[rank * n:(rank + 1) * n] * world


class ShardedCrossEntropy(torch.autograd.Function):
    """Mean cross entropy over the batch when each rank holds some of the columns of the logits: the
    row max, the sum of exp and the target logit (on the rank holding the class; label -1 elsewhere)
    are all-reduced. The gradient stays local: softmax minus one-hot on this rank's columns, over
    the batch."""

    @staticmethod
    def forward(ctx, logits, labels):
        mine = (labels >= 0).nonzero()[:, 0]
        row_max = logits.max(1).values
        if distributed():
            dist.all_reduce(row_max, dist.ReduceOp.MAX)
        exp = (logits - row_max[:, None]).exp_()
        total, target = exp.sum(1), torch.zeros_like(row_max)
        target[mine] = logits[mine, labels[mine]]
        if distributed():
            dist.all_reduce(total)
            dist.all_reduce(target)
        ctx.save_for_backward(exp.div_(total[:, None]), labels)
        # -log max(p_y, 1e-30), as insightface logs it (p_y underflows early in training);
        # the gradient (backward) is the unclamped softmax minus one-hot.
        return (total.log() + row_max - target).clamp_max(LOSS_CAP).mean()

    @staticmethod
    def backward(ctx, grad):
        # reused in place (no second backward): B x classes is the big tensor
        prob, labels = ctx.saved_tensors
        mine = (labels >= 0).nonzero()[:, 0]
        prob[mine, labels[mine]] -= 1
        return prob.mul_(grad / len(prob)), None


class PartialFCHead(nn.Module):
    """Partial FC (An et al., CVPR 2022; insightface's arcface_torch) for many classes on many GPUs.

    Rank r of `world` holds the rows of a contiguous 1/world of the classes. Each step it scores
    the embeddings of the whole global batch (all-gathered, with gradient) against the classes of
    its shard that are positives in the batch plus a random share of the others (`sample_rate` of
    its rows in all), and the softmax normaliser is all-reduced (ShardedCrossEntropy). With one
    process and sample_rate 1 it computes MarginHead's loss and gradients; rows not sampled get no
    gradient."""

    def __init__(self, embedding_size, num_classes, s=64.0, margin="arcface", sample_rate=1.0,
                 rank=0, world=1, margin_grad="straight"):
        super().__init__()
        per, extra = divmod(num_classes, world)
        self.sizes = [per + (r < extra) for r in range(world)]
        self.start, self.num_local = sum(self.sizes[:rank]), self.sizes[rank]
        self.rank, self.world, self.sample_rate = rank, world, sample_rate
        # MarginHead's init, then this rank's rows
        full = torch.normal(0, 0.01, (num_classes, embedding_size))
        self.weight = nn.Parameter(self.shard(full).clone())
        self.margin = CombinedMarginLoss(s, *MARGINS[margin], gradient=margin_grad)

    def shard(self, full):
        """All classes' rows [C, ...] -> this rank's."""
        return full[self.start:self.start + self.num_local]

    def gather(self, rows):
        """This rank's rows -> all classes' rows on rank 0 (None on the others); a collective."""
        if self.world == 1:
            return rows
        # gather needs equal shapes: the first shard is largest
        pad = rows.new_zeros(self.sizes[0], *rows.shape[1:])
        pad[:len(rows)] = rows
        parts = [torch.empty_like(pad) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(pad, parts, dst=0)
        return torch.cat([p[:n] for p, n in zip(parts, self.sizes)]) if self.rank == 0 else None

    def sample(self, positive):
        """Sorted local indices of the rows scored this step: every positive class, then random
        others up to int(sample_rate * rows)."""
        positive = torch.unique(positive)
        num = min(self.num_local, max(int(self.sample_rate * self.num_local), len(positive), 1))
        score = torch.rand(self.num_local, device=self.weight.device)
        score[positive] = 2.0  # above every random score: positives are always kept
        return score.topk(num).indices.sort().values

    def forward(self, emb, labels):
        emb = emb.float()  # gathered and scored in fp32, as insightface does under AMP
        if self.world > 1:
            emb = AllGather.apply(emb)
            parts = [torch.empty_like(labels) for _ in range(self.world)]
            dist.all_gather(parts, labels)
            labels = torch.cat(parts)
        local = labels - self.start
        mine = (local >= 0) & (local < self.num_local)
        weight = self.weight
        if self.sample_rate < 1:
            index = self.sample(local[mine])
            weight, local = weight[index], torch.searchsorted(index, local)
        local = torch.where(mine, local, -1)
        # fp32 under AMP
        cosine = F.linear(F.normalize(emb), F.normalize(weight.float())).float().clamp(-1, 1)
        logits = cosine * self.margin.s
        # the margin where this rank holds the class
        logits[mine] = self.margin(cosine[mine], local[mine])
        return ShardedCrossEntropy.apply(logits, local)


class FaceTrainer(nn.Module):
    """Backbone + margin head in one module, so that DDP averages the gradients of both (with
    Partial FC only the backbone is DDP-wrapped: each rank owns its shard of the head)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x, labels):
        return self.head(self.backbone(x), labels)


class BackboneError(ValueError):
    """A file that is not a backbone checkpoint; CLIs print the message as one line."""


def insightface_config(state, depth=None, input_size=None):
    """iresnet() arguments of an insightface IResNet state dict (the same parameter names): depth
    from the number of blocks per stage, width from the stem, embedding size and input size from
    fc's shape (fc maps 512*width x (input/16)^2 features). depth / input_size override."""
    blocks = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")})
              for i in range(1, 5)]
    if depth is None:
        depth = next((d for d, b in BLOCKS.items() if b == blocks), None)
        if depth is None:
            raise BackboneError(
                f"blocks per stage {blocks} match no IResNet depth {sorted(BLOCKS)}")
    stem, (embedding, fc_in) = state["conv1.weight"].shape[0], state["fc.weight"].shape
    if input_size is None:
        side = math.isqrt(fc_in // state["bn2.weight"].shape[0])
        input_size = 16 * side
    return {"depth": depth, "width": stem / 64, "embedding_size": embedding,
            "input_size": input_size}


def load_backbone(path, device="cpu", depth=None, input_size=None):
    """A model.pt written by this script, or an insightface backbone file (a bare IResNet state
    dict, e.g. backbone.pth; depth / input_size override what its shapes say) -> IResNet in eval
    mode with .input_size and .class_names (None for insightface files)."""
    what = (f"{path} is not a train_arcface.py model.pt or an insightface IResNet state dict "
            "(backbone.pth)")
    try:
        ckpt = load_weights(path, map_location=device)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise BackboneError(f"{what}: not a torch checkpoint ({type(e).__name__})") from None
    if isinstance(ckpt, dict) and "config" in ckpt and "state_dict" in ckpt:
        state, cfg, names = ckpt["state_dict"], ckpt["config"], ckpt.get("class_names")
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = {k.removeprefix("module."): v for k, v in ckpt.items()}  # saved from a DDP wrapper
        if not {"conv1.weight", "bn2.weight", "fc.weight", "layer1.0.conv1.weight"} <= state.keys():
            raise BackboneError(f"{what}: a state dict, but not an IResNet's")
        cfg, names = insightface_config(state, depth, input_size), None
    else:
        raise BackboneError(f"{what}: it holds {type(ckpt).__name__} "
                            f"{sorted(ckpt)[:4] if isinstance(ckpt, dict) else ''}")
    net = iresnet(cfg["depth"], cfg["width"], cfg["embedding_size"], cfg["input_size"])
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise BackboneError(f"{path} does not fit an IResNet-{cfg['depth']} "
                            f"({str(e).splitlines()[0].strip()})") from None
    net.input_size, net.class_names = cfg["input_size"], names
    return net.to(device).eval()

# ----------------------------------------------------------------------------- embeddings


@torch.no_grad()
def embed(model, images, batch_size=256, device=None, flip=True, amp=False, normalize=True):
    """uint8 images [N,3,H,W] or [N,H,W,3] (numpy or torch) -> float32 numpy [N, d].

    Resizes to model.input_size (bilinear, antialiased) when needed, normalises (x/255 - 0.5)/0.5,
    sums f(x) + f(flip x) (one batched forward pass) and L2-normalises (unless normalize=False).
    """
    device = (torch.device(device) if device is not None
              else next(model.parameters(), torch.empty(0)).device)
    images = torch.as_tensor(images)
    if len(images) == 0:
        raise ValueError("no images to embed")
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[-1]):
        raise ValueError(f"need uint8 images [N,3,H,W] or [N,H,W,3], got {tuple(images.shape)}")
    if images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    size = getattr(model, "input_size", None)
    ctx, _ = autocast_context(device, amp)
    was_training = model.training
    model.eval()
    feats = []
    batches = range(0, len(images), batch_size)
    for i in tqdm(batches, desc="embed", leave=False, disable=True if len(batches) == 1 else None):
        x = images[i:i + batch_size].to(device).float()
        if size and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True)
        x = (x / 255 - 0.5) / 0.5
        if flip:
            x = torch.cat([x, x.flip(3)])
        with ctx:
            f = model(x).float()
        if flip:
            f = f[: len(f) // 2] + f[len(f) // 2:]
        feats.append(f.cpu())
    model.train(was_training)
    feats = torch.cat(feats)
    return (F.normalize(feats, dim=1) if normalize else feats).numpy()


def class_centres(model, data, labels=None, num_classes=None, batch_size=256, device=None,
                  amp=False, workers=0):
    """Class centres [C, d] (float32, L2-normalised): mean of L2-normalised embeddings,
    re-normalised.

    `data` is a dataset (`.classes`, `ds[i] -> (uint8 [3,H,W], label)`), read in one pass that holds
    one batch of images at a time (resized as read; `workers` DataLoader processes), so millions of
    images fit; or uint8 images with `labels` [N] (then C = num_classes, default max label + 1). A
    class with no image gets a zero centre.
    """
    if labels is not None:
        return centres_of(embed(model, data, batch_size, device, amp=amp), labels,
                          num_classes).numpy()
    data.size = getattr(model, "input_size", None)
    sums = None
    for images, labels in tqdm(
        torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers),
        desc="class centres", disable=not PROGRESS, leave=False):
        emb = torch.from_numpy(embed(model, images, batch_size, device, amp=amp))
        if sums is None:
            sums = torch.zeros(len(data.classes) if num_classes is None else num_classes,
                               emb.shape[1])
        sums.index_add_(0, labels, emb)
    return F.normalize(sums, dim=1).numpy()


def centres_of(emb, labels, num_classes=None):
    """Embeddings [N, d] and labels [N] -> L2-normalised class means [C, d] (a tensor, emb's
    dtype)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    emb = torch.as_tensor(emb)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    return F.normalize(
        torch.zeros(num_classes, emb.shape[1], dtype=emb.dtype).index_add_(0, labels, emb), dim=1)

# ----------------------------------------------------------------------------- training


def lr_at(step, total, warmup, base):
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total` (stepped per
    iteration)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * max(0.0, 1 - (step - warmup) / max(1, total - warmup))


def rank_order(order, batch, rank, world):
    """This rank's share of an epoch's order: its 1/world of every global batch, batch after batch
    (a set smaller than one batch is one batch)."""
    return order.view(-1, min(batch, len(order)))[:, rank::world].reshape(-1)


def flip_batch(x, flip, device):
    """uint8 batch [B,3,H,W] -> float in [-1, 1] on `device`, images with flip[i] mirrored. The flip
    runs after the copy, so a pinned batch goes to the GPU as it is (non_blocking)."""
    x = x.to(device, non_blocking=True)
    x = torch.where(flip.to(device, non_blocking=True)[:, None, None, None], x.flip(3), x)
    # (x/255 - 0.5)/0.5
    return x.float().div_(127.5).sub_(1).contiguous(memory_format=torch.channels_last)


def sync_buffers(module, world):
    """Average floating-point buffers (BN running statistics) over the processes."""
    if world > 1:
        for b in module.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b /= world


def gather_state(trainer, opt, head, head_index, partial_fc):
    """(model state, optimiser state) with Partial FC's shards (and their momentum) gathered so a
    checkpoint looks like the plain head's; a collective: every rank calls it."""
    model_state, opt_state = trainer.state_dict(), opt.state_dict()
    if partial_fc:
        model_state["head.weight"] = head.gather(head.weight.detach())
        slot = opt_state["state"].get(head_index, {})
        if "momentum_buffer" in slot:  # a copy: opt_state's inner dicts are the optimiser's own
            opt_state["state"][head_index] = {
                **slot, "momentum_buffer": head.gather(slot["momentum_buffer"])}
    return model_state, opt_state


def checkpoint(state, scaler, step, steps_per_epoch, elapsed, args, classes, device,
               epoch_loss=(0.0, 0)):
    """The resume state of checkpoint.pt; "epoch" counts whole epochs done; "epoch_loss" (sum,
    steps) of the epoch under way, so that a run resumed mid-epoch logs the same epoch loss."""
    # for inspection: every step re-seeds from (seed, rank, step)
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {"model": state[0], "optimizer": state[1], "scaler": scaler.state_dict(), "step": step,
            "epoch": step // steps_per_epoch, "elapsed": elapsed, "args": vars(args),
            "class_names": classes, "rng": rng, "epoch_loss": list(epoch_loss)}


def refuse_non_finite(trainer, backbone, x, step):
    """Before any save: a diverged model (NaN / inf weights) is never kept as checkpoint or
    model.pt."""
    for name, t in trainer.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            sys.exit(f"error: non-finite weights ({name}) after step {step}; nothing saved "
                     "(lower --lr or check the data)")


def backbone_file(args, backbone, classes, step, steps_per_epoch):
    """The contents of model.pt: the backbone's weights and what load_backbone needs to rebuild
    it."""
    config = {"network": args.network, "depth": int(args.network[1:]), "width": args.width,
              "embedding_size": args.embedding_size, "input_size": args.input_size,
              "dropout": args.dropout, "margin": args.margin, "margin_grad": args.margin_grad,
              "epoch": step // steps_per_epoch, "step": step}
    return {"config": config, "state_dict": backbone.state_dict(), "class_names": classes}


def log_epoch(run, rec, epochs):
    """One line of RUN/log.jsonl and one printed line per epoch."""
    with open(os.path.join(run, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    val = ""
    if "val" in rec:
        val = (f"  val {rec['val_mean']:.2f} ("
               + ", ".join(f"{k} {v:.1f}" for k, v in rec["val"].items()) + ")")
    print(f"epoch {rec['epoch']}/{epochs}  step {rec['step']}  loss {rec['loss']:.4f}  lr "
          f"{rec['lr']:.5f}  "
          f"{rec['images_per_s']:.0f} img/s  {rec['time']:.1f} s{val}", flush=True)


def validate(run, model_path, bins, epoch):
    """Run evaluate.py on model.pt (the later stage's own command) -> {"val": {bench: %},
    "val_mean": %}."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaluate.py")
    out = os.path.join(run, f"val-epoch{epoch:03d}.json")
    env = {k: v for k, v in os.environ.items()  # the evaluation is a separate single-process job
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    try:
        r = subprocess.run(
            [sys.executable, script, "--model", model_path, "--bin", *bins, "--out", out],
            capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError((r.stderr.strip().splitlines() or ["failed"])[-1])
        with open(out) as f:
            scores = next(iter(json.load(f)["models"].values()))
    except Exception as e:
        print(f"warning: validation at epoch {epoch} failed: {e}", file=sys.stderr)
        return {}
    acc = {bench: v["accuracy"] for bench, v in scores.items() if bench != "avg"}
    return {"val": acc, "val_mean": sum(acc.values()) / max(1, len(acc))}


def build_model(args, num_classes, partial_fc, rank, world, device):
    """-> (backbone, head, trainer, SGD optimiser, the head's slot in the optimiser state),
    initialised identically on every rank."""
    torch.manual_seed(args.seed)
    backbone = iresnet(int(args.network[1:]), args.width, args.embedding_size, args.input_size,
                       args.dropout)
    if partial_fc:
        head = PartialFCHead(args.embedding_size, num_classes, args.scale, args.margin,
                             args.sample_rate, rank, world, args.margin_grad)
    else:
        head = MarginHead(args.embedding_size, num_classes, args.scale, args.margin,
                          args.margin_grad)
    # ~1.8x faster on CPU
    trainer = FaceTrainer(backbone, head).to(device, memory_format=torch.channels_last)
    params = [p for p in trainer.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay)
    head_index = next(i for i, p in enumerate(params) if p is head.weight)
    return backbone, head, trainer, opt, head_index


# the flags a resumed run must share with its checkpoint (the number of epochs / steps may grow)
RECIPE = ("network", "width", "embedding_size", "input_size", "dropout", "batch_size", "lr",
          "momentum", "weight_decay", "warmup_epochs", "clip_grad", "margin", "margin_grad",
          "scale", "partial_fc", "sample_rate", "merge_by_name", "seed")


def resume(ckpt_path, args, classes, trainer, opt, scaler, partial_fc, head_index, device):
    """Load checkpoint.pt into the trainer, optimiser and scaler -> (step, elapsed seconds); a
    checkpoint of another recipe or class list is refused."""
    ckpt = load_weights(ckpt_path, map_location=device)
    check_same_recipe(ckpt["args"], args, RECIPE, ckpt_path)
    if ckpt["class_names"] != classes:
        raise DataError(f"{ckpt_path} was trained on other classes; use another --out for new data")
    model_state, opt_state = ckpt["model"], ckpt["optimizer"]
    if partial_fc:  # checkpoints hold every class's row: keep this rank's
        model_state["head.weight"] = trainer.head.shard(model_state["head.weight"])
        slot = opt_state["state"].get(head_index, {})
        if "momentum_buffer" in slot:
            slot["momentum_buffer"] = trainer.head.shard(slot["momentum_buffer"])
    trainer.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    if scaler.is_enabled() and ckpt["scaler"]:  # empty when written without fp16 loss scaling
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["step"], ckpt["elapsed"], tuple(ckpt.get("epoch_loss", (0.0, 0)))


def wrap_model(trainer, partial_fc, world, local_rank, device, compile_model):
    """The trainer under DDP (Partial FC: the backbone only, each rank owns its shard of the head,
    which DDP must neither broadcast nor average) and torch.compile when asked."""
    model = trainer
    if compile_model:
        check_compile(device)
    if world > 1:
        ids = [local_rank] if device.type == "cuda" else None
        if partial_fc:
            model = FaceTrainer(
                nn.parallel.DistributedDataParallel(trainer.backbone, device_ids=ids), trainer.head)
        else:
            model = nn.parallel.DistributedDataParallel(trainer, device_ids=ids)
    return torch.compile(model) if compile_model else model


def epoch_batches(data, n, batch, seed, epoch, skip, rank, world, device):
    """This rank's batches of one epoch after its first `skip` ones, and the epoch's flip generator
    past the skipped batches' draws. Everything random derives from (seed, rank, epoch) and the
    step, so a run resumed from a checkpoint written mid-epoch repeats what an uninterrupted run
    does. data: (images, labels) decoded in memory, or (dataset, DataLoader workers)."""
    flip_gen = torch.Generator().manual_seed(seed_for(seed, rank, epoch, 1))
    per_rank = min(batch, n) // world  # a set smaller than --batch-size is one batch
    for _ in range(skip):
        torch.rand(per_rank, generator=flip_gen)
    order = rank_order(epoch_order(n, batch, seed, epoch), batch, rank, world)[skip * per_rank:]
    if isinstance(data[0], torch.Tensor):
        images, labels = data
        return ((images[i], labels[i]) for i in order.split(per_rank)), flip_gen
    ds, workers = data  # the same items per rank, decoded by workers
    loader = torch.utils.data.DataLoader(ds, batch_size=per_rank, sampler=order.tolist(),
                                         num_workers=workers, pin_memory=device.type == "cuda")
    return iter(loader), flip_gen


def open_training_set(args, world):
    """--data as one dataset, after the checks that need the process count (before any work)."""
    if args.batch_size % world:
        raise DataError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    for path in args.val:
        if not os.path.isfile(path):
            raise DataError(f"validation file not found: {path}")
    ds = open_datasets(args.data, args.merge_by_name)
    if (args.partial_fc or args.sample_rate < 1) and len(ds.classes) < world:
        raise DataError(f"--partial-fc shards {len(ds.classes)} classes over {world} processes: "
                        "too few classes")
    return ds


def training_data(ds, args, world, master):
    """The images decoded once into memory (batched by indexing) when they fit in --memory-limit and
    --workers is 0, else (dataset decoding per item, loader workers)."""
    if args.workers == 0 and len(ds) * 3 * args.input_size ** 2 <= args.memory_limit * 2 ** 30:
        return load_images(ds, args.input_size, progress=master)
    ds.size = args.input_size
    return ds, args.workers or min(8, max(1, (os.cpu_count() or 1) // world))


def optimise(model, backbone, opt, scaler, ctx, x, y, lr, clip_grad, world):
    """One SGD step at learning rate lr (gradient clipping on the backbone only, as in the recipe)
    -> the loss averaged over the processes; a non-finite loss returns before the update."""
    for g in opt.param_groups:
        g["lr"] = lr
    with ctx:
        loss = model(x, y)
    mean_loss = loss.detach().clone()
    if world > 1:
        dist.all_reduce(mean_loss)
        mean_loss /= world
    mean_loss = mean_loss.item()
    if not math.isfinite(mean_loss):
        return mean_loss
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    nn.utils.clip_grad_norm_(backbone.parameters(), clip_grad)
    scaler.step(opt)
    scaler.update()
    return mean_loss


def train(args):
    # validation pauses the other ranks at a barrier while rank 0 runs evaluate.py: allow it time
    timeout = datetime.timedelta(hours=args.val_timeout) if args.val else None
    rank, local_rank, world, device = setup_distributed(args.device, timeout)
    master = rank == 0
    if device.type == "cuda":
        cuda_settings(args.tf32)
    ds = open_training_set(args, world)
    n, classes, batch = len(ds), ds.classes, args.batch_size
    steps_per_epoch = max(1, n // batch)
    total = args.steps or args.epochs * steps_per_epoch
    epochs, warmup = math.ceil(total / steps_per_epoch), round(args.warmup_epochs * steps_per_epoch)
    ckpt_path, model_path = (os.path.join(args.out, "checkpoint.pt"),
                             os.path.join(args.out, "model.pt"))
    partial_fc = args.partial_fc or args.sample_rate < 1
    backbone, head, trainer, opt, head_index = build_model(args, len(classes), partial_fc, rank,
                                                           world, device)
    ctx, scaler = autocast_context(device, args.amp, args.amp_dtype)
    step, elapsed, epoch_loss = 0, 0.0, (0.0, 0)
    if os.path.exists(ckpt_path):
        step, elapsed, epoch_loss = resume(ckpt_path, args, classes, trainer, opt, scaler,
                                           partial_fc, head_index, device)
        if step >= total:
            if master:
                print(f"{args.out} already finished ({step} steps, {step // steps_per_epoch} "
                      "epochs); nothing to do")
            return
        if master:
            print(f"resuming {args.out} at epoch {step // steps_per_epoch}, step {step}")
    if master:
        print(f"{n} images, {len(classes)} classes, "
              f"{sum(p.numel() for p in backbone.parameters()):,} backbone "
              f"parameters, {steps_per_epoch} steps/epoch x {epochs} epochs, {world} process(es) "
              f"on {device}")
    data = training_data(ds, args, world, master)
    if master:  # after the data is read: a set that cannot be read leaves no run folder behind
        os.makedirs(args.out, exist_ok=True)
        write_atomic(os.path.join(args.out, "config.json"),
                     json.dumps({**vars(args), "machine": machine(device)}, indent=2) + "\n")
    model = wrap_model(trainer, partial_fc, world, local_rank, device, args.compile)

    start_epoch = step // steps_per_epoch  # whole epochs: a run stopped mid-epoch continues it
    stop_at = step + args.stop_after_steps if args.stop_after_steps else total
    for epoch in range(step // steps_per_epoch, epochs):
        skip = step - epoch * steps_per_epoch
        batches, flip_gen = epoch_batches(data, n, batch, args.seed, epoch, skip, rank, world,
                                          device)
        steps_now = min(steps_per_epoch - skip, total - step)
        trainer.train()
        t0, seen = time.time(), 0
        loss_sum, done = epoch_loss if skip else (0.0, 0)  # a resumed epoch: its loss so far
        bar = tqdm(total=steps_now, desc=f"epoch {epoch + 1}/{epochs}", disable=not master,
                   leave=False)
        for _, (x, y) in zip(range(steps_now), batches):
            torch.manual_seed(seed_for(args.seed, rank, step, 2))  # dropout, Partial FC sampling
            flip = torch.rand(len(x), generator=flip_gen) < 0.5  # the recipe's only augmentation
            x, y = flip_batch(x, flip, device), y.to(device, non_blocking=True)
            lr = lr_at(step, total, warmup, args.lr)
            mean_loss = optimise(model, backbone, opt, scaler, ctx, x, y, lr, args.clip_grad, world)
            if not math.isfinite(mean_loss):  # stopped before the update: the checkpoint is good
                bar.close()
                kept = (f"{ckpt_path} keeps step {step}" if os.path.exists(ckpt_path)
                        else "no checkpoint was written")
                sys.exit(f"error: loss is {mean_loss} at step {step + 1} (epoch {epoch + 1}); "
                         f"stopped ({kept}); try a lower --lr or --warmup-epochs")
            step, seen, loss_sum, done = (step + 1, seen + len(x) * world, loss_sum + mean_loss,
                                          done + 1)
            bar.update()
            bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.4f}",
                            img_s=f"{seen / (time.time() - t0):.0f}")
            if step >= stop_at:  # (testing) a kill: nothing more is written
                break
            if (args.checkpoint_every and step % args.checkpoint_every == 0
                    and step % steps_per_epoch):
                refuse_non_finite(trainer, backbone, x, step)
                sync_buffers(trainer, world)
                state = gather_state(trainer, opt, head, head_index, partial_fc)
                if master:
                    save_atomic(checkpoint(state, scaler, step, steps_per_epoch,
                                           elapsed + time.time() - t0, args, classes, device,
                                           (loss_sum, done)), ckpt_path)
        bar.close()
        if step >= stop_at and step < total:
            break
        refuse_non_finite(trainer, backbone, x, step)
        sync_buffers(trainer, world)  # BN running statistics differ per shard: all ranks agree
        dt = time.time() - t0
        elapsed += dt
        rec = {"epoch": epoch + 1, "step": step, "loss": loss_sum / max(1, done), "lr": lr,
               "images_per_s": seen / dt, "time": dt, "elapsed": elapsed}
        state = gather_state(trainer, opt, head, head_index, partial_fc)
        validating = args.val and ((epoch + 1) % args.val_every == 0 or step >= total)
        if master:
            save_atomic(backbone_file(args, backbone, classes, step, steps_per_epoch), model_path)
            save_atomic(
                checkpoint(state, scaler, step, steps_per_epoch, elapsed, args, classes, device),
                ckpt_path)
            # the other ranks wait at the barrier below: evaluate.py has the GPU to itself
            if validating:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rec.update(validate(args.out, model_path, args.val, epoch + 1))
            log_epoch(args.out, rec, epochs)
        if validating and world > 1:
            dist.barrier()
        if args.stop_after_epochs and epoch + 1 - start_epoch >= args.stop_after_epochs:
            break
    if args.debug_rank_weights:
        save_atomic(trainer.state_dict(), os.path.join(args.out, f"rank{rank}-weights.pt"))
    if master and step >= total:
        print(f"done: {step} steps in {elapsed:.0f} s; backbone in {model_path}")


def pack_cli(args):
    t0 = time.time()
    n, c = pack_rec(open_datasets(args.data, args.merge_by_name), args.pack_rec, args.pack_format,
                    args.pack_quality, args.pack_size)
    dt = time.time() - t0
    print(f"{n} images of {c} identities -> {os.path.join(args.pack_rec, 'train.rec')} "
          f"({dt:.1f} s, {n / max(dt, 1e-9):.0f} images/s)")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", nargs="+", required=True, metavar="SRC",
      help="image folders (one sub-folder per identity) and/or train.rec files; later sources' "
           "identities "
           "are appended as new classes")
    a("--out", metavar="RUN", help="run folder (re-running the same command resumes it)")
    a("--pack-rec", metavar="OUT_DIR",
      help="instead of training: write the --data sources, merged as training merges them, to "
           "OUT_DIR/train.rec + train.idx + property (insightface's layout) and exit")
    a("--pack-format", default="jpeg", choices=["jpeg", "png"],
      help="--pack-rec image encoding (images already in it and in size are copied as they are)")
    a("--pack-quality", type=jpeg_quality, default=95, help="--pack-rec JPEG quality")
    a("--pack-size", type=positive_int, default=None,
      help="--pack-rec: resize images to this square size (insightface: 112); default: keep their "
           "size")
    a("--merge-by-name", action="store_true",
      help="an identity whose name exists in an earlier source joins that class")
    a("--network", default="r18", choices=["r18", "r34", "r50", "r100", "r200"],
      help="IResNet depth")
    a("--width", type=positive_float, default=0.25,
      help="multiplier of the stage widths 64/128/256/512 (1 = reference)")
    a("--embedding-size", type=positive_int, default=128,
      help="embedding dimension (reference 512)")
    a("--input-size", type=positive_int, default=32,
      help="input resolution in pixels, a multiple of 16 (reference 112); images of another size "
           "are resized")
    a("--dropout", type=probability, default=0.0, help="dropout before the embedding layer")
    a("--epochs", type=positive_int, default=24, help="epochs over the data")
    a("--steps", type=positive_int, default=None,
      help="total optimiser steps, overriding --epochs (equal-steps controls)")
    a("--batch-size", type=positive_int, default=128,
      help="global batch size, split over the processes")
    a("--lr", type=positive_float, default=0.1,
      help="peak learning rate (SGD), decayed linearly to 0 per iteration")
    a("--momentum", type=probability, default=0.9, help="SGD momentum")
    a("--weight-decay", type=non_negative_float, default=5e-4, help="SGD weight decay")
    a("--warmup-epochs", type=non_negative_float, default=0.0,
      help="linear learning-rate warm-up length in epochs")
    a("--clip-grad", type=positive_float, default=5.0, help="gradient-norm clip on the backbone")
    a("--margin", default="arcface", choices=sorted(MARGINS),
      help="cosface: s(cos - 0.4); arcface: s cos(theta + 0.5)")
    a("--margin-grad", default="straight", choices=CombinedMarginLoss.GRADIENTS,
      help="ArcFace gradient: straight (current arcface_torch: margin on the value only) or "
           "textbook "
           "(arcface_torch of 2022: through cos(theta + m), fallback cos(theta) - m sin m past pi)")
    a("--scale", type=positive_float, default=64.0, help="logit scale s of the margin softmax")
    a("--partial-fc", action="store_true",
      help="Partial FC head for many classes: the class weights sharded over the processes, the "
           "softmax normaliser all-reduced")
    a("--sample-rate", type=positive_float, default=1.0,
      help="Partial FC: share of each shard's classes scored per step (the batch's classes "
           "always); below 1 implies --partial-fc")
    a("--val", nargs="*", default=[], metavar="FILE.bin",
      help="verification .bin files evaluated by evaluate.py")
    a("--val-every", type=positive_int, default=4,
      help="validate every this many epochs (and at the end)")
    a("--val-timeout", type=positive_float, default=2.0,
      help="hours the other processes wait for rank 0's validation")
    a("--checkpoint-every", type=non_negative_int, default=1000,
      help="also write checkpoint.pt every this many steps (besides every epoch end); 0: epoch "
           "ends only")
    a("--tf32", action=argparse.BooleanOptionalAction, default=True,
      help="TF32 matmuls and convolutions on CUDA")
    a("--seed", type=non_negative_int, default=0,
      help="random seed (initialisation, batch order, flips)")
    a("--amp", action="store_true",
      help="mixed precision: bf16 autocast where the GPU or CPU has native bf16, else fp16 with "
           "loss scaling on CUDA (fp32 on such a CPU)")
    a("--amp-dtype", default="auto", choices=["auto", "bf16", "fp16"], help="force the --amp dtype")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--workers", type=non_negative_int, default=0,
      help="DataLoader workers per process; 0 decodes the whole set into memory when it fits in "
           "--memory-limit, else uses min(8, cores) workers")
    a("--memory-limit", type=non_negative_float, default=8.0,
      help="GiB of decoded images the in-memory path may hold")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--stop-after-epochs", type=non_negative_int, default=0,
      help="(testing) stop after this many epochs, as if interrupted")
    a("--stop-after-steps", type=non_negative_int, default=0,
      help="(testing) stop after this many steps, as if killed")
    a("--debug-rank-weights", action="store_true",
      help="(testing) every rank saves its final weights to RUN/rank<r>-weights.pt")
    args = p.parse_args(argv)
    if not (args.out or args.pack_rec):
        p.error("give --out RUN (training) or --pack-rec OUT_DIR")
    if args.input_size % 16:
        p.error(f"--input-size must be a multiple of 16, got {args.input_size}")
    if not 0 < args.sample_rate <= 1:
        p.error(f"--sample-rate must be in (0, 1], got {args.sample_rate}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.pack_rec:
            pack_cli(args)
        else:
            with run_folder_guard(args.out):
                train(args)
    # errors re-raised from DataLoader workers carry their traceback: keep the message
    except DataError as e:
        sys.exit("error: " + str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1])
    except InputError as e:
        fail(e)
    finally:
        if dist.is_initialized():
            # DDP objects sit in reference cycles: freed after their group, exit aborts (1 run in 5)
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
