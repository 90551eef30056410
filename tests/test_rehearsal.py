"""The real-data path rehearsed at the paper's configuration, tiny sizes: a 112-px insightface
train.rec packed by --pack-rec, IResNet-50 at width 1 with 512-d embeddings (plain; Partial FC
when retraining) under torchrun with 2 processes, mixed precision on both branches (bf16 autocast,
then fp16 with a GradScaler on resume), the EDM2 generator (edm2-s layout, narrow, 64 px) under
torchrun with --grad-accum, interrupted and resumed with --compile, post-hoc EMA, an edm2-xs guide;
pairs from the .rec, ScoreMix with autoguidance, retraining on real + synthetic identities (64-px
samples resized to 112), .bin and IJB-C evaluation, CKA. The edm2-s layout at 112 px (attention
at 28 and 14 px) takes one bf16 training step in-process, at a sixth of its width. Every command is
the README's, with small sizes."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script
from test_evaluate import make_ijb

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
R50 = ["--network", "r50", "--width", "1", "--embedding-size", "512", "--input-size", "112",
       "--batch-size", "4", "--lr", "0.01", "--workers", "0"]
EDM2 = ["--preset", "edm2-s", "--channels", "16", "--batch-size", "4", "--grid-steps", "0",
        "--workers", "0", "--status-every", "0.004"]


def torchrun(script, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


def ok(r, what):
    assert r.returncode == 0, f"{what} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    """6 identities x 4 toy faces at 112 px, packed into an insightface train.rec."""
    root = tmp_path_factory.mktemp("rehearsal")
    ok(run_script("toy_faces.py", "--out", root / "toy", "--identities", 6, "--per-identity", 4,
                  "--test-identities", 8, "--pairs", 20, "--heldout", 0, "--resolution",
                  112), "toy faces")
    ok(run_script("train_arcface.py", "--data", root / "toy" / "train", "--pack-rec", root / "rec"),
       "pack-rec")
    return root


def test_discriminator_r50_on_two_processes_resumes_across_precisions(rec):
    run = rec / "r50"
    base = ["--data", rec / "rec" / "train.rec", "--out", run, *R50, "--amp"]
    ok(torchrun("train_arcface.py", *base, "--amp-dtype", "bf16", "--steps", 1), "r50 bf16")
    r = ok(torchrun("train_arcface.py", *base, "--amp-dtype", "fp16", "--steps", 2,
                    "--val", rec / "toy" / "bench" / "toy_lfw.bin"), "r50 fp16 resume")
    assert "resuming" in r.stdout
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 2
    model = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in model["state_dict"].values()
               if v.is_floating_point())


def test_edm2_s_at_112_px_has_attention_at_28_and_14_px_and_takes_a_bf16_training_step():
    from train_diffusion import Denoiser, edm_loss, parse_args
    args = parse_args(
        ["--preset", "edm2-s", "--resolution", "112", "--data", "unused", "--out", "unused"])
    assert args.attn == [28, 14]  # the preset's 16 and 8 px at 64 px, never silently none

    def edm2_s(channels):
        return Denoiser(112, 3, 6, sigma_data=float(args.sigma_data), uncertainty=True,
                        channels=channels, channel_mult=args.channel_mult,
                        num_blocks=args.num_blocks, attn_resolutions=args.attn, mp=True)

    with torch.device("meta"):  # full width, no memory: where attention sits
        full = edm2_s(args.channels)
    with_attention = {n.split(".")[-1] for n, m in full.named_modules()
                      if getattr(m, "num_heads", 0)}
    assert {"28x28_block0", "14x14_block0", "14x14_in0", "28x28_block3"} <= with_attention
    net = edm2_s(32)  # the same layout at a sixth of the width: seconds per step, not a minute
    y = torch.rand(1, 3, 112, 112) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = edm_loss(net, y, torch.tensor([3]), args.p_mean, args.p_std, 0.5,
                        torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(q.grad).all() for q in net.parameters() if q.grad is not None)


def test_generator_edm2_on_two_processes_compiled_with_snapshots_resume_and_posthoc_ema(rec):
    run = rec / "gen"
    data = ["--data", rec / "rec" / "train.rec", "--out", run]
    args = [*data, *EDM2, "--grad-accum", 2, "--duration", 0.012, "--snapshot-every", 0.008,
            "--checkpoint-every", 0.004, "--amp"]
    ok(torchrun("train_diffusion.py", *args, "--stop-after-kimg", 0.008), "edm2, interrupted")
    r = ok(torchrun("train_diffusion.py", *args, "--compile", "--compile-backend", "aot_eager"),
           "edm2 resumed, compiled")  # the DDP graph split that a weight-writing forward broke
    assert "resuming" in r.stdout
    assert len(list(run.glob("network-snapshot-*.pt"))) == 2
    ok(run_script("train_diffusion.py", "posthoc-ema", "--run", run, "--std", 0.06,
                  "--out", run / "phema.pt"), "post-hoc EMA")
    ok(run_script("train_diffusion.py", "--data", rec / "rec" / "train.rec", "--out", rec / "guide",
                  *EDM2, "--preset", "edm2-xs", "--channels", 8, "--duration", 0.004,
                  "--snapshot-every", 0.004, env=ENV), "edm2-xs guide")


def test_pairs_scoremix_retraining_evaluation_and_cka(rec):
    pairs, mixed = rec / "pairs.csv", rec / "mixed"
    model = rec / "r50" / "model.pt"
    snap = rec / "gen" / "phema.pt"
    guide = sorted((rec / "guide").glob("network-snapshot-*.pt"))[-1]
    ok(run_script("select_pairs.py", "--fr", model, "--data", rec / "rec" / "train.rec", "--out",
                  pairs, "--strategy", "dist", "--num-pairs", 2, env=ENV), "select pairs")
    ok(run_script("scoremix_sample.py", "--net", snap, "--guide", guide, "--guidance", 1.3,
                  "--pairs", pairs, "--per-pair", 2, "--steps", 2, "--out", mixed,
                  env=ENV), "ScoreMix sampling")
    assert len([d for d in os.listdir(mixed) if (mixed / d).is_dir()]) == 2
    ok(torchrun("train_arcface.py", "--data", rec / "rec" / "train.rec", mixed, "--out",
                rec / "r50-mix", *R50, "--amp", "--partial-fc", "--sample-rate", "0.5",
                "--steps", 1),
       "retraining on real + ScoreMix with Partial FC")
    make_ijb(str(rec / "IJBC"), identities=2)
    ok(run_script("evaluate.py", "--model", rec / "r50-mix" / "model.pt", "--bin",
                  rec / "toy" / "bench" / "toy_lfw.bin", "--ijb", rec / "IJBC", "--ijb-name",
                  "IJBC", "--out", rec / "eval.json", env=ENV), "evaluation")
    ok(run_script("cka.py", "--generator", snap, "--fr", model, "--data", rec / "rec" / "train.rec",
                  "--k", 3, "--permutations", 2, "--out", rec / "cka.json", env=ENV), "CKA")
