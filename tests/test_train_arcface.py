"""Tests for train_arcface.py: IResNet shapes and sizes, margin logits, the Partial FC head, data
readers, the training CLI."""
import io
import json
import math
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import last_snapshot, ROOT, run_script
from train_arcface import (BackboneError, CombinedMarginLoss, MarginHead, PartialFCHead,
                           RecordIODataset, ShardedCrossEntropy, flip_batch, insightface_config,
                           iresnet, load_backbone, lr_at)
from common import (DataError, ImageFolderDataset, RecordWriter, amp_dtype, autocast_context,
                    cuda_settings, load_images, open_datasets, pack_rec, record_chunks,
                    record_header)

MAGIC = 0xCED7230A
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--width", "0.125", "--embedding-size", "16", "--input-size", "32", "--batch-size", "8",
        "--lr", "0.05"]


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def random_image(rng, label, size=32):
    """A noisy image whose mean colour depends on the label (so a tiny net can learn it)."""
    base = np.array([(label * 70) % 256, (label * 130 + 40) % 256, (label * 200 + 90) % 256])
    return np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)


def make_folder(root, names, per=6, size=32, seed=0):
    rng = np.random.default_rng(seed)
    for label, name in enumerate(names):
        os.makedirs(os.path.join(root, name))
        for k in range(per):
            Image.fromarray(random_image(rng, label, size)).save(
                os.path.join(root, name, f"{k}.png"))
    return str(root)


# --------------------------------------------------------------------- a RecordIO writer of our own


def write_chunks(f, payload):
    """MXNet's writer: split the payload at every 4-aligned occurrence of the magic word."""
    magic = struct.pack("<I", MAGIC)
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == magic]
    starts, ends = [0] + [c + 4 for c in cuts], cuts + [len(payload)]
    pieces = [payload[a:b] for a, b in zip(starts, ends)]
    for j, piece in enumerate(pieces):
        cflag = 0 if len(pieces) == 1 else 1 if j == 0 else 3 if j == len(pieces) - 1 else 2
        f.write(struct.pack("<II", MAGIC,
                            (cflag << 29) | len(piece)) + piece + b"\0" * ((-len(piece)) % 4))
    return len(pieces)


def write_rec(prefix, records):
    """records: list of (key, payload) in file order -> prefix.rec / prefix.idx."""
    chunk_counts = []
    with open(prefix + ".rec", "wb") as f, open(prefix + ".idx", "w") as idx:
        for key, payload in records:
            idx.write(f"{key}\t{f.tell()}\n")
            chunk_counts.append(write_chunks(f, payload))
    return prefix + ".rec", chunk_counts


def header(flag, label, id_=0, extra=()):
    return struct.pack("<IfQQ", flag, label, id_, 0) + struct.pack(f"<{len(extra)}f", *extra)


def insightface_rec(tmp_path, per_class=(2, 3, 1)):
    """Images keys 1..N, identity records N+1..N+C holding (first, end) key ranges, record 0 written
    last."""
    rng = np.random.default_rng(1)
    images, records, key = [], [], 1
    ranges = []
    for label, count in enumerate(per_class):
        ranges.append((key, key + count))
        for _ in range(count):
            image = random_image(rng, label)
            payload = header(0, label) + png_bytes(image)
            if key == 2:  # the magic word at aligned offsets: in the id field and after the image
                payload = header(0, label, id_=MAGIC) + png_bytes(image)
                payload += b"\0" * ((-len(payload)) % 4) + struct.pack("<I", MAGIC) + b"tail"
            records.append((key, payload))
            images.append((image, label))
            key += 1
    first = key
    for a, b in ranges:
        records.append((key, header(2, 0, extra=(a, b))))
        key += 1
    records.append((0, header(2, 0, extra=(first, key))))
    rec, chunks = write_rec(str(tmp_path / "train"), records)
    return rec, images, chunks


# --------------------------------------------------------------------------- model and margin


def test_parameter_counts_match_reference():
    expected = {18: 24_025_600, 50: 43_590_848, 100: 65_156_160}
    for depth, count in expected.items():
        with torch.device("meta"):
            net = iresnet(depth)
        assert sum(p.numel() for p in net.parameters()) == count
    keys = net.state_dict().keys()
    for k in ("conv1.weight", "bn1.running_mean", "prelu.weight", "layer1.0.bn1.weight",
              "layer1.0.conv1.weight", "layer1.0.bn2.weight", "layer1.0.prelu.weight",
              "layer1.0.conv2.weight", "layer1.0.bn3.weight", "layer1.0.downsample.0.weight",
              "layer1.0.downsample.1.weight", "layer4.2.conv2.weight", "bn2.weight", "fc.weight",
              "features.weight", "features.running_var"):
        assert k in keys
    assert not net.features.weight.requires_grad


def test_tiny_width_and_input_size():
    net = iresnet(18, width=0.25, embedding_size=128, input_size=32).eval()
    assert net.fc.in_features == 128 * 2 * 2 and net.conv1.out_channels == 16
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 128)


def test_textbook_arcface_logits_match_the_formula_and_carry_its_gradient():
    torch.manual_seed(0)
    cos = torch.empty(16, 10).uniform_(-0.95, 0.95).requires_grad_()
    labels = torch.randint(0, 10, (16,))
    logits = CombinedMarginLoss(64, 1.0, 0.5, 0.0, gradient="textbook")(cos, labels)
    theta = torch.acos(cos.detach())
    expected = 64 * cos.detach().clone()
    rows = torch.arange(16)
    t = theta[rows, labels]
    expected[rows, labels] = 64 * torch.where(t + 0.5 <= math.pi, torch.cos(t + 0.5),
                                              torch.cos(t) - 0.5 * math.sin(0.5))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    # d/dcos of s*cos(theta + m) = s*(cos m + sin m * cos(theta)/sin(theta)) on the target entries
    logits.sum().backward()
    inside = t + 0.5 <= math.pi
    grad = 64 * (math.cos(0.5) + math.sin(0.5) * torch.cos(t) / torch.sin(t))
    torch.testing.assert_close(cos.grad[rows, labels][inside], grad[inside], rtol=1e-4, atol=1e-3)


def test_textbook_arcface_threshold_keeps_the_target_logit_monotone():
    cos = torch.linspace(-1, 1, 401)[:, None]
    margin = CombinedMarginLoss(1.0, 1.0, 0.5, 0.0, gradient="textbook")
    logits = margin(cos, torch.zeros(401, dtype=torch.long))[:, 0]
    assert (logits[1:] - logits[:-1] >= -1e-6).all()


GOLDEN = os.path.join(ROOT, "tests", "fixtures", "insightface", "combined_margin_loss.json")


@pytest.mark.parametrize("case,gradient", [("arcface_current", "straight"),
                                           ("arcface_2022", "textbook"),
                                           ("cosface_current", "straight")])
def test_margin_logits_and_gradients_match_insightface(case, gradient):
    with open(GOLDEN) as f:
        golden = json.load(f)
    ref = golden[case]
    cos = torch.tensor(golden["cosine"], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor(golden["labels"])
    logits = CombinedMarginLoss(64.0, *ref["margins"], gradient=gradient)(cos, labels)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    torch.testing.assert_close(logits.detach(), torch.tensor(ref["logits"], dtype=torch.float64),
                               rtol=0, atol=1e-9)
    assert abs(loss.item() - ref["loss"]) < 1e-9
    grad = torch.tensor(ref["grad_cosine"], dtype=torch.float64)
    assert (cos.grad - grad).abs().max() < 1e-9, (cos.grad - grad).abs().max()


def test_straight_through_arcface_passes_the_softmax_gradient_unscaled():
    torch.manual_seed(2)
    cos = torch.empty(6, 4).uniform_(-0.9, 0.9).requires_grad_()
    labels = torch.randint(0, 4, (6,))
    logits = CombinedMarginLoss(64, 1.0, 0.5, 0.0)(cos, labels)
    F.cross_entropy(logits, labels).backward()
    expected = 64 * (logits.detach().softmax(1) - F.one_hot(labels, 4)) / 6
    torch.testing.assert_close(cos.grad, expected)


def test_cosface_logits_match_textbook_formula():
    torch.manual_seed(1)
    cos = torch.empty(8, 5).uniform_(-1, 1)
    labels = torch.randint(0, 5, (8,))
    expected = 64 * cos.clone()
    expected[torch.arange(8), labels] -= 64 * 0.4
    torch.testing.assert_close(CombinedMarginLoss(64, 1.0, 0.0, 0.4)(cos, labels), expected)


def test_backbone_runs_in_bf16_under_autocast_with_fp32_embedding_layers():
    """insightface keeps fc and the feature BatchNorm in fp32; the convolutions follow the
    autocast."""
    net = iresnet(18, width=0.125, embedding_size=16, input_size=32).eval()
    seen = {}
    for name in ("conv1", "layer4", "fc", "features"):
        getattr(net, name).register_forward_hook(lambda m, i, o,
                                                 name=name: seen.__setitem__(name, o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 3, 32, 32))
    assert seen == {"conv1": torch.bfloat16, "layer4": torch.bfloat16, "fc": torch.float32,
                    "features": torch.float32}
    assert out.dtype == torch.float32


def test_amp_dtype_takes_bf16_only_where_it_is_native(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)
    assert amp_dtype("cuda") == torch.float16  # an emulating GPU (V100, T4): fp16 + loss scaling
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp_dtype("cuda") == torch.bfloat16
    assert amp_dtype("cpu", "fp16") == torch.float16
    ctx, scaler = autocast_context("cpu", True, "fp16")
    assert scaler.is_enabled() and isinstance(ctx, torch.autocast)
    ctx, scaler = autocast_context("cpu", False)
    assert not scaler.is_enabled() and not isinstance(ctx, torch.autocast)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_insightface_state_dict_loads_with_its_config_read_from_keys_and_shapes(tmp_path, prefix):
    torch.manual_seed(0)
    net = iresnet(34, width=0.125, embedding_size=24, input_size=48).eval()
    torch.save({prefix + k: v for k, v in net.state_dict().items()}, tmp_path / "backbone.pth")
    loaded = load_backbone(tmp_path / "backbone.pth")
    assert (loaded.input_size, loaded.class_names, loaded.fc.out_features) == (48, None, 24)
    assert len(loaded.layer3) == 6 and loaded.conv1.out_channels == 8 and not loaded.training
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(loaded(x), net(x))


@pytest.mark.parametrize("depth", [18, 34, 50, 100, 200])
def test_insightface_config_reads_every_reference_depth(depth):
    with torch.device("meta"):
        state = iresnet(depth).state_dict()
    assert insightface_config(state) == {"depth": depth, "width": 1.0, "embedding_size": 512,
                                         "input_size": 112}
    assert insightface_config(state, input_size=96)["input_size"] == 96


def test_a_checkpoint_of_the_wrong_kind_gets_one_clear_error(tmp_path):
    torch.save({"model": {}, "optimizer": {}}, tmp_path / "checkpoint.pt")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "linear.pt")
    torch.save(iresnet(34, 0.125, 16, 32).state_dict(), tmp_path / "r34.pth")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for name, needle in [("checkpoint.pt",
                          "is not a train_arcface.py model.pt"), ("linear.pt", "not an IResNet"),
                         ("junk.pt", "not a torch checkpoint")]:
        with pytest.raises(BackboneError, match=needle):
            load_backbone(tmp_path / name)
    with pytest.raises(BackboneError, match="does not fit an IResNet-18"):
        load_backbone(tmp_path / "r34.pth", depth=18)


# --------------------------------------------------------------------------- Partial FC


def heads_and_batch(margin, num_classes=37, sample_rate=1.0, batch=24, dim=16, seed=0):
    """The plain head and a one-process Partial FC head from the same seed, and a batch of
    embeddings."""
    torch.manual_seed(seed)
    plain = MarginHead(dim, num_classes, margin=margin)
    torch.manual_seed(seed)
    partial = PartialFCHead(dim, num_classes, margin=margin, sample_rate=sample_rate)
    gen = torch.Generator().manual_seed(seed + 1)
    emb, labels = torch.randn(batch, dim, generator=gen), torch.randint(0, num_classes, (batch,),
                                                                        generator=gen)
    return plain, partial, emb, labels


@pytest.mark.parametrize("margin", ["arcface", "cosface"])
def test_partial_fc_with_one_process_and_rate_1_equals_the_plain_head(margin):
    plain, partial, emb, labels = heads_and_batch(margin)
    assert torch.equal(plain.weight, partial.weight)
    grads = []
    for head in (plain, partial):
        e = emb.clone().requires_grad_()
        loss = head(e, labels)
        loss.backward()
        grads.append((loss.detach(), e.grad, head.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    assert grads[0][2].abs().max() > 0.01  # the gradients compared are not all zero


def test_partial_fc_sampling_keeps_every_positive_and_the_share_asked_for():
    head = PartialFCHead(8, 200, sample_rate=0.1)
    positive = torch.tensor([3, 3, 150, 7, 199, 0])
    for seed in range(5):
        torch.manual_seed(seed)
        index = head.sample(positive)
        assert len(index) == 20 and torch.equal(index, index.unique())  # sorted, distinct
        assert set(positive.tolist()) <= set(index.tolist())
    many = torch.arange(0, 200, 5)  # 40 positives > 20: exactly the positives
    assert torch.equal(head.sample(many), many)
    assert len({tuple(head.sample(positive).tolist()) for _ in range(3)}) == 3  # random otherwise


@pytest.mark.parametrize("margin", ["arcface", "cosface"])
def test_partial_fc_sampled_loss_is_the_softmax_over_the_sampled_classes(margin):
    plain, partial, emb, labels = heads_and_batch(margin, num_classes=100, sample_rate=0.3)
    torch.manual_seed(7)
    index = partial.sample(labels)  # the draw forward makes under the same seed
    torch.manual_seed(7)
    loss = partial(emb, labels)
    loss.backward()
    cosine = F.linear(F.normalize(emb), F.normalize(plain.weight[index])).clamp(-1, 1)
    column = torch.searchsorted(index, labels)  # each label's place among the sampled classes
    per_row = F.cross_entropy(plain.margin(cosine, column), column, reduction="none")
    expected = per_row.clamp_max(-math.log(1e-30)).mean()  # the logged value, as insightface's
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert len(index) == 30 and set(labels.tolist()) <= set(index.tolist())
    touched = partial.weight.grad.abs().sum(1) > 0
    assert touched.nonzero()[:, 0].tolist() == index.tolist()  # rows not sampled get no gradient


def test_partial_fc_logged_loss_clamps_p_y_like_insightface_and_keeps_the_gradient():
    """insightface logs -log(max(p_y, 1e-30)); the gradient stays softmax minus one-hot."""
    logits = torch.tensor([[0.0, 100.0, 0.0], [2.0, 1.0, 0.0]], dtype=torch.float64,
                          requires_grad=True)
    labels = torch.tensor([0, 1])
    loss = ShardedCrossEntropy.apply(logits, labels)
    per_row = F.cross_entropy(logits.detach(), labels, reduction="none")
    assert per_row[0] > 99  # p_y = e^-100 underflows insightface's clamp
    assert loss.item() == pytest.approx((-math.log(1e-30) + per_row[1].item()) / 2, rel=1e-12)
    loss.backward()
    expected = (logits.detach().softmax(1) - F.one_hot(labels, 3)) / 2
    torch.testing.assert_close(logits.grad, expected)


TWO_RANKS = """
import gc
import sys
import torch, torch.distributed as dist, torch.nn as nn
sys.path.insert(0, {root!r})
from train_arcface import PartialFCHead
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
backbone = nn.Linear(8, 16)
head = PartialFCHead(16, 11, margin={margin!r}, rank=rank, world=world)  # shards of 6 and 5 classes
x, labels = torch.randn(12, 8), torch.randint(0, 11, (12,))
ddp, b = nn.parallel.DistributedDataParallel(backbone), len(x) // world
loss = head(ddp(x[rank * b:(rank + 1) * b]), labels[rank * b:(rank + 1) * b])
loss.backward()
torch.save({{"loss": loss.detach(),
            "backbone": {{n: p.grad for n, p in backbone.named_parameters()}},
            "head": head.gather(head.weight.grad)}}, f"{{sys.argv[1]}}/rank{{rank}}.pt")
del ddp
gc.collect()  # the DDP object before its process group
dist.destroy_process_group()
"""


def test_partial_fc_on_two_processes_equals_one_process_with_the_plain_head(tmp_path):
    """Each rank: half the batch and 6 or 5 of the 11 classes; loss and gradients as one plain
    process."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(root=ROOT, margin="arcface"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    torch.manual_seed(0)
    backbone = torch.nn.Linear(8, 16)
    head = MarginHead(16, 11, margin="arcface")
    x, labels = torch.randn(12, 8), torch.randint(0, 11, (12,))
    loss = head(backbone(x), labels)
    loss.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for got in ranks:
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
        for name, p in backbone.named_parameters():
            torch.testing.assert_close(got["backbone"][name], p.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[0]["head"], head.weight.grad, rtol=1e-5, atol=1e-7)
    assert ranks[1]["head"] is None and head.weight.grad.abs().max() > 1e-3


def test_lr_decays_linearly_to_zero_after_warmup():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0) == 0.0


# --------------------------------------------------------------------------- data


def test_recordio_round_trip_with_split_records(tmp_path):
    rec, images, chunks = insightface_rec(tmp_path)
    assert max(chunks) == 3  # the record with two aligned magic words was split into 3 chunks
    ds = RecordIODataset(rec)
    assert len(ds) == len(images) and ds.classes == ["0", "1", "2"]
    assert list(ds.targets) == [label for _, label in images]
    for i, (image, label) in enumerate(images):
        got, got_label = ds[i]
        assert got.dtype == torch.uint8 and got_label == label
        assert torch.equal(got, torch.from_numpy(image).permute(2, 0, 1))
    batch, labels = load_images(ds, progress=False)
    assert batch.shape == (len(images), 3, 32, 32) and labels.tolist() == ds.targets


def test_recordio_flag0_layout_means_every_key_is_an_image(tmp_path):
    rng = np.random.default_rng(2)
    labels = [5, 3, 5, 9]
    records = [(k,
                header(0, lab) + png_bytes(random_image(rng, lab))) for k, lab in enumerate(labels)]
    # label given as an array
    records[1] = (1, header(1, 0, extra=(3,)) + png_bytes(random_image(rng, 3)))
    ds = RecordIODataset(write_rec(str(tmp_path / "flat"), records)[0])
    assert len(ds) == 4 and ds.classes == ["3", "5", "9"] and list(ds.targets) == [1, 0, 1, 2]


def test_recordio_with_two_workers_reads_what_one_process_reads(tmp_path):
    """Each DataLoader worker opens the .rec itself (a handle shared across fork would share its
    offset)."""
    rec, images, _ = insightface_rec(tmp_path, per_class=(5, 7, 4, 8))
    ds = RecordIODataset(rec)
    ds[0]  # the parent now holds an open handle that forked workers inherit
    parent_fd = ds._file.fileno()

    class Probe(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            image, label = ds[i]
            return image, label, ds._file.fileno()

    serial = [ds[i] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(Probe(), batch_size=3, num_workers=2)
    batches = list(loader)
    got_images = torch.cat([b[0] for b in batches])
    assert torch.equal(got_images, torch.stack([im for im, _ in serial]))
    assert torch.cat([b[1] for b in batches]).tolist() == [lab for _, lab in serial] == ds.targets
    assert parent_fd not in torch.cat([b[2] for b in batches]).tolist()


def test_truncated_recordio_names_the_file(tmp_path):
    rec, _, _ = insightface_rec(tmp_path)
    with open(rec, "r+b") as f:
        f.truncate(os.path.getsize(rec) // 2)
    with pytest.raises(DataError, match="truncated or corrupt .*train.rec"):
        load_images(RecordIODataset(rec), progress=False)
    r = run_script("train_arcface.py", "--data", rec, "--out", tmp_path / "run", env=ENV)
    assert r.returncode != 0 and "train.rec" in r.stderr and "Traceback" not in r.stderr


FIXTURES = os.path.join(ROOT, "tests", "fixtures", "insightface")


def test_record_writer_matches_mxnet_byte_for_byte(tmp_path):
    """The same payloads, written by mxnet's MXIndexedRecordIO (fixture) and by RecordWriter."""
    with open(os.path.join(FIXTURES, "mxnet_records.json")) as f:
        records = [(r["key"], bytes.fromhex(r["payload_hex"])) for r in json.load(f)["records"]]
    # mx.recordio.pack, image record
    assert records[3][1] == record_header(3.0, 1) + b"\xff\xd8jpeg"
    assert records[4][1] == record_header(0, labels=(5, 9))  # insightface's header record
    with RecordWriter(str(tmp_path / "train.rec")) as w:
        for key, payload in records:
            w.write(key, payload)
    for ext in ("rec", "idx"):
        with open(os.path.join(FIXTURES, f"mxnet_records.{ext}"), "rb") as f:
            assert (tmp_path / f"train.{ext}").read_bytes() == f.read(), ext
    # and the reader's record layer reads mxnet's file (raw payloads)
    ds = object.__new__(RecordIODataset)
    ds.rec_path, ds._file, ds._pid = os.path.join(FIXTURES, "mxnet_records.rec"), None, None
    with open(os.path.join(FIXTURES, "mxnet_records.idx")) as f:
        ds.offsets = {int(k): int(o) for k, o in (ln.split("\t") for ln in f)}
    assert [ds.read_record(k) for k, _ in records] == [p for _, p in records]


def test_record_framing_follows_the_recordio_specification():
    """Hand-computed from the format: magic 0xCED7230A (little-endian 0a 23 d7 ce), lrec = cflag <<
    29 | length, zero padding to 4 bytes; a magic word at an aligned offset splits the record (cflag
    1, 2, 3)."""
    magic = bytes([0x0A, 0x23, 0xD7, 0xCE])
    assert record_chunks(b"abcde") == magic + bytes([5, 0, 0, 0]) + b"abcde" + bytes(3)
    assert record_chunks(b"abcd") == magic + bytes([4, 0, 0, 0]) + b"abcd"
    # magic at 4 and 16 (aligned), 10 (not)
    payload = b"ABCD" + magic + b"EF" + magic + b"GH" + magic + b"xyz"
    # cflag 1 = 0x20 in the top byte, 4 bytes; cflag 2, the unaligned magic kept; cflag 3, padded
    expected = (magic + bytes([4, 0, 0, 0x20]) + b"ABCD"
                + magic + bytes([8, 0, 0, 0x40]) + b"EF" + magic + b"GH"
                + magic + bytes([3, 0, 0, 0x60]) + b"xyz" + bytes(1))
    assert record_chunks(payload) == expected


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_packed_rec_reads_back_with_counts_labels_and_pixels(tmp_path, fmt):
    a = make_folder(tmp_path / "a", ["alice", "bob"], per=3)
    b = make_folder(tmp_path / "b", ["bob", "carol"], per=2, seed=1)
    merged = open_datasets([a, b])
    r = run_script("train_arcface.py", "--data", a, b, "--pack-rec", tmp_path / "rec",
                   "--pack-format", fmt, env=ENV)
    assert r.returncode == 0 and "10 images of 4 identities" in r.stdout, r.stderr
    ds = RecordIODataset(str(tmp_path / "rec" / "train.rec"))
    assert (len(ds) == 10 and ds.classes == ["0", "1", "2", "3"]
            and ds.targets == list(merged.targets))
    assert (tmp_path / "rec" / "property").read_text() == "4,32,32\n"
    flag, labels, image = ds.read_header(0)
    assert (flag, labels, image) == (2, [11.0, 15.0], b"")  # images 1..10, identity records 11..14
    assert [ds.read_header(k)[1] for k in range(11, 15)] == [[1, 4], [4, 7], [7, 9], [9, 11]]
    got, labels = load_images(ds, progress=False)
    want, _ = load_images(merged, progress=False)
    diff = (got.float() - want.float()).abs()
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    if fmt == "png":
        assert diff.max() == 0
    else:  # JPEG drops the fine noise of these images (4:2:0 chroma): compare 4x4 block means
        pooled = F.avg_pool2d(got.float(), 4) - F.avg_pool2d(want.float(), 4)
        assert pooled.abs().mean() < 3, pooled.abs().mean()
    r = run_script("train_arcface.py", "--data", tmp_path / "missing", "--pack-rec", tmp_path / "x",
                   env=ENV)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: data source "
                                                                              "not found")


def test_pack_rec_copies_jpeg_bytes_and_resizes_when_asked(tmp_path):
    os.makedirs(tmp_path / "src" / "a")
    Image.fromarray(random_image(np.random.default_rng(0), 0, 48)).save(
        tmp_path / "src" / "a" / "0.jpg")
    raw = (tmp_path / "src" / "a" / "0.jpg").read_bytes()
    assert pack_rec(open_datasets([str(tmp_path / "src")]), str(tmp_path / "same"),
                    progress=False) == (1, 1)
    assert RecordIODataset(str(tmp_path / "same" / "train.rec")).encoded(0)[0] == raw
    pack_rec(open_datasets([str(tmp_path / "src")]), str(tmp_path / "small"), size=32,
             progress=False)
    assert RecordIODataset(str(tmp_path / "small" / "train.rec"))[0][0].shape == (3, 32, 32)
    assert (tmp_path / "small" / "property").read_text() == "1,32,32\n"


def test_two_sources_append_classes_and_merge_by_name(tmp_path):
    a = make_folder(tmp_path / "a", ["alice", "bob"], per=2)
    b = make_folder(tmp_path / "b", ["bob", "carol"], per=3)
    ds = open_datasets([a, b])
    assert ds.classes == ["alice", "bob", "bob.1", "carol"] and len(ds) == 10
    assert list(ds.targets) == [0, 0, 1, 1, 2, 2, 2, 3, 3, 3] and ds[9][1] == 3
    merged = open_datasets([a, b], merge_by_name=True)
    assert merged.classes == ["alice", "bob", "carol"]
    assert list(merged.targets) == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2] and merged[5][1] == 1
    images, labels = load_images(merged, size=16, progress=False)
    assert images.shape == (10, 3, 16, 16) and labels.tolist() == list(merged.targets)


def test_hidden_folders_are_not_identities(tmp_path):
    """A sampler's unfinished `.name.partial` folder must not become a class."""
    root = make_folder(tmp_path / "a", ["alice", "bob", ".carol.partial"], per=2)
    assert ImageFolderDataset(root).classes == ["alice", "bob"]


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt"])
def test_bad_input_gives_one_clear_error_line(tmp_path, case):
    root = make_folder(tmp_path / "data", ["a", "b"], per=2)
    if case == "missing":
        root, needle = str(tmp_path / "nowhere"), "nowhere"
    elif case == "empty":
        os.makedirs(os.path.join(root, "c")), None
        needle = os.path.join(root, "c")
    else:
        with open(os.path.join(root, "b", "1.png"), "wb") as f:
            f.write(b"\x89PNG not really")
        needle = os.path.join(root, "b", "1.png")
    if case != "missing":
        with pytest.raises(DataError):
            load_images(ImageFolderDataset(root), progress=False)
    r = run_script("train_arcface.py", "--data", root, "--out", tmp_path / "run", *TINY, env=ENV)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert needle in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error:")


# --------------------------------------------------------------------------- training CLI


def test_cli_smoke_run_with_validation(tiny_toy, tmp_path):
    out = tmp_path / "run"
    bins = [str(tiny_toy / "bench" / f) for f in ("toy_lfw.bin", "toy_cfp_fp.bin")]
    r = run_script("train_arcface.py", "--data", tiny_toy / "train", "--out", out, *TINY, "--steps",
                   "6", "--val", *bins, "--val-every", "5", env=ENV)
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [e["step"] for e in log] == [4, 6] and all(math.isfinite(e["loss"]) for e in log)
    assert set(log[-1]["val"]) == {"toy_lfw", "toy_cfp_fp"} and 0 <= log[-1]["val_mean"] <= 100
    config = json.load(open(out / "config.json"))
    assert os.path.exists(out / "val-epoch002.json") and config["steps"] == 6
    # bits depend on
    assert config["machine"]["threads"] == int(ENV["OMP_NUM_THREADS"]) and config["machine"]["cpu"]
    net = load_backbone(out / "model.pt")
    assert net.input_size == 32 and not net.training and len(net.class_names) == 6
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 16)
    r = run_script("train_arcface.py", "--data", tiny_toy / "train", "--out", out, *TINY, "--steps",
                   "6", env=ENV)
    assert r.returncode == 0 and "already finished" in r.stdout


def test_resumed_run_and_dataloader_path_give_bit_identical_weights(tmp_path):
    """Straight through with DataLoader workers vs in memory, interrupted after one epoch and
    resumed."""
    # resized to 32 on the fly
    data = make_folder(tmp_path / "data", ["a", "b", "c", "d"], per=6, size=48)
    args = ["--data", data, *TINY, "--epochs", "2", "--warmup-epochs", "0.5"]
    r = run_script("train_arcface.py", *args, "--out", tmp_path / "straight", "--workers", "1",
                   env=ENV)
    assert r.returncode == 0, r.stderr
    r = run_script("train_arcface.py", *args, "--out", tmp_path / "resumed", "--stop-after-epochs",
                   "1", env=ENV)
    assert r.returncode == 0, r.stderr
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    r = run_script("train_arcface.py", *args, "--out", tmp_path / "resumed", env=ENV)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert len(open(tmp_path / "resumed" / "log.jsonl").readlines()) == 2


def test_resume_with_fp16_amp_from_a_checkpoint_written_without_it(tmp_path):
    """A checkpoint without loss scaling holds an empty GradScaler state: resuming under fp16
    works."""
    data = make_folder(tmp_path / "data", ["a", "b", "c"], per=4)
    args = ["--data", data, "--out", tmp_path / "run", *TINY, "--epochs", "2"]
    r = run_script("train_arcface.py", *args, "--stop-after-epochs", "1", env=ENV)
    assert r.returncode == 0, r.stderr
    r = run_script("train_arcface.py", *args, "--lr", "0.02", env=ENV)  # another recipe: refused
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'run' / 'checkpoint.pt'} was trained with --lr 0.05, not 0.02; resume "
        "with the "
        "same flags (a longer run is allowed) or use another --out"], r.stderr
    r = run_script("train_arcface.py", *args, "--amp", "--amp-dtype", "fp16", env=ENV)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["scaler"]["scale"] > 0


def test_killed_mid_epoch_and_resumed_from_a_step_checkpoint_gives_bit_identical_weights(tmp_path):
    """3 steps per epoch, a checkpoint every 2 steps; killed after step 5, the run resumes at step 4
    (one batch into epoch 2) and ends where an uninterrupted run does, bit for bit (dropout
    included)."""
    data = make_folder(tmp_path / "data", ["a", "b", "c", "d"], per=6)
    args = ["--data", data, *TINY, "--epochs", "3", "--checkpoint-every", "2", "--dropout", "0.2"]
    r = run_script("train_arcface.py", *args, "--out", tmp_path / "straight", env=ENV)
    assert r.returncode == 0, r.stderr
    r = run_script("train_arcface.py", *args, "--out", tmp_path / "killed", "--stop-after-steps",
                   "5", env=ENV)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"]) == (4, 1)
    r = run_script("train_arcface.py", *args, "--out", tmp_path / "killed", env=ENV)
    assert r.returncode == 0 and "step 4" in r.stdout, r.stderr
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 9
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")]
            for run in ("straight", "killed")]
    # epoch 2 too
    assert [(e["step"], e["loss"]) for e in logs[0]] == [(e["step"], e["loss"]) for e in logs[1]]


def test_steps_stopping_mid_epoch_leave_the_epoch_open_for_more_steps(tmp_path):
    data = make_folder(tmp_path / "data", ["a", "b", "c", "d"], per=6)  # 3 steps per epoch
    args = ["--data", data, "--out", tmp_path / "run", *TINY]
    r = run_script("train_arcface.py", *args, "--steps", "4", env=ENV)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"]) == (4, 1)
    r = run_script("train_arcface.py", *args, "--steps", "8", env=ENV)
    assert (r.returncode == 0 and "resuming" in r.stdout
            and "already finished" not in r.stdout), r.stderr
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 8


def test_a_set_smaller_than_one_batch_trains_as_one_batch(tmp_path):
    data = make_folder(tmp_path / "data", ["a", "b"], per=3)  # 6 images, --batch-size 8
    r = run_script("train_arcface.py", "--data", data, "--out", tmp_path / "run", *TINY, "--steps",
                   "2", env=ENV)
    assert r.returncode == 0, r.stderr
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2


def test_compile_without_a_working_compiler_is_one_error_line(tmp_path):
    data = make_folder(tmp_path / "data", ["a", "b"], per=4)
    env = {**ENV, "CXX": str(tmp_path / "no-such-compiler")}
    r = run_script("train_arcface.py", "--data", data, "--out", tmp_path / "run", *TINY,
                   "--compile", env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert lines[-1].startswith("error: --compile does not work"), r.stderr


def test_cuda_settings_turn_on_tf32_and_cudnn_autotuning():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    try:
        cuda_settings()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
        cuda_settings(tf32=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def test_flip_batch_mirrors_the_chosen_images_after_the_copy():
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.uint8).reshape(2, 3, 2, 4)
    out = flip_batch(x, torch.tensor([True, False]), torch.device("cpu"))
    expected = torch.stack([x[0].flip(2), x[1]]).float() / 127.5 - 1
    torch.testing.assert_close(out, expected)


def test_bf16_amp_run_trains_with_partial_fc(tmp_path):
    """--amp in bf16 (CPU autocast): the backbone in bf16, the head's fp32 path; finite losses."""
    data = make_folder(tmp_path / "data", ["a", "b", "c"], per=4)
    r = run_script("train_arcface.py", "--data", data, "--out", tmp_path / "run", *TINY, "--steps",
                   "3", "--amp", "--amp-dtype", "bf16", "--partial-fc", env=ENV)
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert log[-1]["step"] == 3 and all(math.isfinite(e["loss"]) for e in log)


def test_partial_fc_cli_with_one_process_trains_like_the_plain_head(tmp_path):
    """Same weights after 2 steps (float rounding of the two cross entropies grows ~1000x by step
    4)."""
    data = make_folder(tmp_path / "data", ["a", "b", "c", "d", "e"], per=4)
    args = ["--data", data, *TINY, "--steps", "2"]
    for out, extra in [("plain", []), ("pfc", ["--partial-fc"])]:
        r = run_script("train_arcface.py", *args, "--out", tmp_path / out, *extra, env=ENV)
        assert r.returncode == 0, r.stderr
    a, b = (torch.load(tmp_path / out / "checkpoint.pt",
                       weights_only=True) for out in ("plain", "pfc"))
    assert a["model"].keys() == b["model"].keys() and b["model"]["head.weight"].shape == (5, 16)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert load_backbone(tmp_path / "pfc" / "model.pt").input_size == 32


def test_nan_loss_stops_with_a_message_naming_the_step(tmp_path):
    data = make_folder(tmp_path / "data", ["a", "b"], per=8)
    r = run_script("train_arcface.py", "--data", data, "--out", tmp_path / "run", *TINY, "--lr",
                   "1e12", env=ENV)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert re.search(r"error: loss is (nan|inf) at step \d+", r.stderr.strip().splitlines()[-1])
    assert not os.path.exists(tmp_path / "run" / "model.pt")


def test_two_process_run_keeps_ranks_identical(tmp_path, tiny_toy):
    """Rank 0 validates at the end while rank 1 waits at a barrier (no second job beside
    training)."""
    data = make_folder(tmp_path / "data", ["a", "b", "c", "d"], per=4)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_arcface.py"), "--data", data, "--out", str(out), *TINY,
           "--epochs", "2", "--debug-rank-weights", "--val",
           str(tiny_toy / "bench" / "toy_lfw.bin"), "--val-every", "5"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    w0 = torch.load(out / "rank0-weights.pt", weights_only=True)
    w1 = torch.load(out / "rank1-weights.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [e["step"] for e in log] == [2, 4] and "toy_lfw" in log[-1]["val"]
    # rank 1 waited for rank 0's validation (its weights are written after the loop)
    assert os.path.getmtime(out / "rank1-weights.pt") >= os.path.getmtime(out / "val-epoch002.json")
    assert load_backbone(out / "model.pt").input_size == 32


def test_scale_benchmark_quick_run_prints_its_four_tables():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "scale.py"), "--quick"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| classes")
            and not line.startswith(("| workers", "| source files"))]
    # heads, selections, workers, packs
    assert len(rows) == 2 + 4 + 3 + 3 and "failed" not in r.stdout, r.stdout
    # read images/s
    assert all(float(row.split("|")[2].replace(",", "")) > 0 for row in rows[-6:-3])
    assert all(float(row.split("|")[3].replace(",", "")) > 0 for row in rows[-3:])  # pack images/s


def test_scoremix_sample_packs_its_identities_after_the_real_set(tiny_toy, tmp_path):
    """scoremix_sample.py --rec: real classes first, then one new class per sampled identity."""
    r = run_script("train_diffusion.py", "--data", tiny_toy / "train", "--out", tmp_path / "gen",
                   "--resolution", 16, "--channels", 8, "--batch-size", 8, "--duration", 0.016,
                   "--rampup-kimg", 0, "--snapshot-every", 0, "--grid-steps", 2, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    snapshot = last_snapshot(tmp_path / "gen")
    names = sorted(os.listdir(tiny_toy / "train"))
    (tmp_path / "pairs.csv").write_text(
        f"class_a,class_b\n{names[0]},{names[1]}\n{names[2]},{names[3]}\n")
    r = run_script("scoremix_sample.py", "--net", snapshot, "--pairs", tmp_path / "pairs.csv",
                   "--per-pair", 2, "--steps", 2, "--out", tmp_path / "mix", "--rec",
                   tmp_path / "rec", "--rec-real", tiny_toy / "train", "--rec-size", 32, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    ds = RecordIODataset(str(tmp_path / "rec" / "train.rec"))
    real = open_datasets([str(tiny_toy / "train")])
    assert len(ds) == len(real) + 4 and len(ds.classes) == len(real.classes) + 2
    assert ds.targets[-4:] == [6, 6, 7, 7]
    assert (tmp_path / "rec" / "property").read_text() == "8,32,32\n"
    assert ds[len(ds) - 1][0].shape == (3, 32, 32)  # the 16-px samples stored at --rec-size


def test_a_diverged_model_is_refused_before_it_is_saved():
    from train_arcface import refuse_non_finite
    backbone = iresnet(18, width=0.125, embedding_size=16, input_size=32)
    x = torch.randn(2, 3, 32, 32)
    refuse_non_finite(backbone, backbone, x, step=1)  # a healthy model passes
    with torch.no_grad():
        backbone.fc.weight[0, 0] = float("nan")
    with pytest.raises(SystemExit, match="non-finite weights .*fc.weight.* nothing saved"):
        refuse_non_finite(backbone, backbone, x, step=3)
    assert backbone.training  # the probe forward does not leave the model in eval mode
