"""train_diffusion.py: EDM preconditioning, Karras schedule, Heun sampler against the Gaussian
oracle, power-function EMA, per-sample seeding, tiny training runs (resume, 2 processes, snapshot,
errors), and EDM2 itself: golden outputs of EDM2's Precond (tests/fixtures/edm2), parameter counts,
lr schedule and post-hoc EMA coefficients computed by running EDM2's code."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import last_snapshot, one_error_line, ROOT, run_script
import train_diffusion as td
from train_diffusion import (PRESETS, Denoiser, MPConv, PowerEMA, condition_vectors, edm_loss,
                             edm_precond, from_edm2, generate_images, heun_sample, karras_sigmas,
                             learning_rate, load_generator, main, normalize, parse_args,
                             posthoc_coefficients, power_function_beta, profile_inner_product,
                             std_to_gamma)

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "edm2", "tiny_precond.pt")

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--resolution", 16, "--channels", 8, "--batch-size", 8, "--duration", 0.064,
        "--rampup-kimg", 0, "--lr", 1e-2, "--snapshot-every", 0, "--status-every", 0.016,
        "--label-dropout", 0.25, "--ema-std", 0.05, 0.1, "--grid-steps", 2]


def tiny_net(**kw):
    """A small denoiser whose output layer is not zero, so D depends on the UNet."""
    torch.manual_seed(0)
    net = Denoiser(16, 3, 5, channels=8, channel_mult=[1, 2], **kw).eval()
    for p in net.unet.out_conv.parameters():
        nn.init.normal_(p, std=0.1)
    return net


def test_preconditioning_matches_edm_formulas():
    sd = 0.48
    for s in (0.002, 0.2, 1.0, 80.0):
        c_skip, c_out, c_in, c_noise = edm_precond(torch.tensor(s, dtype=torch.float64), sd)
        assert c_skip.item() == pytest.approx(sd ** 2 / (s ** 2 + sd ** 2), rel=1e-12)
        assert c_out.item() == pytest.approx(s * sd / math.sqrt(s ** 2 + sd ** 2), rel=1e-12)
        assert c_in.item() == pytest.approx(1 / math.sqrt(s ** 2 + sd ** 2), rel=1e-12)
        assert c_noise.item() == pytest.approx(math.log(s) / 4, rel=1e-12)
    net, x = tiny_net(sigma_data=sd), torch.randn(3, 3, 16, 16)
    sigma, y = torch.tensor([0.05, 1.0, 20.0]), torch.tensor([0, 2, 4])
    c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in edm_precond(sigma, sd))
    expected = c_skip * x + c_out * net.unet(c_in * x, c_noise.flatten(), y)
    torch.testing.assert_close(net(x, sigma, y), expected, rtol=1e-5, atol=1e-6)


def test_karras_schedule_18_steps_matches_golden():
    golden = [80, 57.585985, 40.785574, 28.374585, 19.352453, 12.910082, 8.400935, 5.315195,
              3.256822, 1.92334, 1.088171, 0.585348, 0.296442, 0.139516, 0.059947, 0.022935,
              0.007528, 0.002, 0]
    t = karras_sigmas(18)
    assert t.dtype == torch.float64 and len(t) == 19
    # golden rounded to 6 places
    np.testing.assert_allclose(t.numpy(), golden, rtol=1e-6, atol=5e-6)


class GaussianDenoiser(nn.Module):
    """The exact denoiser of N(mu, s0^2 I): D(x; s) = mu + s0^2 / (s0^2 + s^2) (x - mu)."""

    def __init__(self, mu, s0):
        super().__init__()
        self.mu, self.s0 = mu, s0

    def forward(self, x, sigma):
        return self.mu + self.s0 ** 2 / (self.s0 ** 2 + sigma ** 2) * (x - self.mu)


def test_heun_matches_gaussian_ode_and_is_second_order():
    mu, s0 = 0.3, 0.5
    z = torch.linspace(-math.sqrt(10), math.sqrt(10), 65, dtype=torch.float64).reshape(-1, 1, 1, 1)
    # the probability-flow ODE's endpoint
    exact = mu + s0 / math.sqrt(s0 ** 2 + 80 ** 2) * (z * 80 - mu)
    errors = {}  # the references are those of docs/formulas.md 2, for |latents| up to ~3.16
    for n, reference in [(18, 0.087), (32, 0.025), (64, 0.0058), (256, 3.3e-4)]:
        x = heun_sample(GaussianDenoiser(mu, s0), z, karras_sigmas(n))
        assert x.dtype == torch.float64
        errors[n] = (x - exact).abs().max().item()
        assert errors[n] == pytest.approx(reference, rel=0.15), (n, errors[n])
    # error ~ 1/N^2
    assert 3.5 < errors[32] / errors[64] < 4.5 and 14 < errors[64] / errors[256] < 18


def test_churn_sampler_draws_the_gaussian_with_fresh_noise():
    """EDM Alg. 2 with an exact denoiser: N(mu, s0^2) at many steps, and no longer a function of the
    latents."""
    mu, s0 = 0.3, 0.5
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 1, 1, 1, generator=g, dtype=torch.float64)
    x = heun_sample(GaussianDenoiser(mu, s0), z, karras_sigmas(256), S_churn=40,
                    randn_like=lambda v: torch.randn(v.shape, generator=g, dtype=v.dtype))
    assert (x.mean().item() == pytest.approx(mu, abs=0.012)
            and x.std().item() == pytest.approx(s0, rel=0.015))
    # deterministic: exactly 1
    assert torch.corrcoef(torch.stack([x.flatten(), z.flatten()]))[0, 1] < 0.95


def test_power_function_ema_golden_values_and_first_update_copies():
    assert std_to_gamma(0.05) == pytest.approx(16.9721986, abs=1e-6)
    assert std_to_gamma(0.10) == pytest.approx(6.93720394, abs=1e-7)
    assert power_function_beta(0.05, 20480, 2048) == pytest.approx(0.150534932, abs=1e-8)
    net = tiny_net()
    ema = PowerEMA(net, [0.05, 0.1])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, 8, 8)
    for e in ema.emas:
        for a, b in zip(e.state_dict().values(), net.state_dict().values()):
            assert torch.equal(a, b)


def test_linear_learning_rate_schedule():
    args = parse_args(
        ["--data", "d", "--out", "o", "--duration", "100", "--rampup-kimg", "10", "--lr", "1e-3"])
    # steps ending at n kimg
    ends = [learning_rate(args, n * 1000 - 64) for n in (5, 10, 50, 75, 100)]
    assert ends == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4, 0])


def test_seed_gives_the_same_image_alone_or_in_a_batch():
    net = tiny_net()
    kw = dict(num_steps=8, S_churn=10)  # churn: the per-sample generators also draw the extra noise
    batch = generate_images(net, torch.tensor([0, 1, 2, 3]), [10, 11, 12, 13], **kw)
    alone = generate_images(net, 2, [12], **kw)
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 16, 16)
    assert (batch[2:3].int() - alone.int()).abs().max() <= 1
    assert (batch[2].int() - batch[3].int()).abs().max() > 10  # different seeds differ


def test_net_keeps_dtype_and_broadcasts_labels_and_sigma():
    net = tiny_net()
    x = torch.randn(3, 3, 16, 16)
    assert net(x.double(), 0.5, 1).dtype == torch.float64
    assert net(x.to(torch.bfloat16), 0.5, 1).dtype == torch.bfloat16
    torch.testing.assert_close(net(x, 0.5, 4),
                               net(x, torch.full([3], 0.5), torch.tensor([4, 4, 4])))
    assert not torch.allclose(net(x, 0.5, 4), net(x, 0.5, 0))  # the class matters
    assert condition_vectors(net).shape == (5, 32)
    with pytest.raises(ValueError, match="null class"):
        net(x, 0.5, None)


def test_mp_variant_with_null_class_and_uncertainty_trains():
    net = Denoiser(16, 3, 4, null_class=True, uncertainty=True, channels=8, channel_mult=[1, 2],
                   attn_resolutions=[8], mp=True, num_mid_blocks=2).train()
    # EDM2 starts these gains at 0, which would hide the label path from the gradient
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.fill_(1.0) if name.endswith("gain") else None
    y = torch.rand(4, 3, 16, 16) * 2 - 1
    loss = edm_loss(net, y, torch.tensor([0, 1, 4, 4]), -0.8, 1.6, 0.5,
                    torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and net.logvar_linear.weight.grad.abs().sum() > 0
    assert net.unet.emb_label.weight.grad[:, 4].abs().sum() > 0  # the null class is trained
    assert net.eval()(y, 1.0, None).shape == y.shape and condition_vectors(net).shape == (4, 16)


@pytest.fixture(scope="module")
def runs(tiny_toy, tmp_path_factory):
    """A tiny run straight through (1 process, 2 micro-batches), stopped + resumed, and on 2
    processes."""
    out = tmp_path_factory.mktemp("diffusion")
    data = ["--data", tiny_toy / "train", "--heldout", tiny_toy / "heldout"]
    r = run_script("train_diffusion.py", *data, *TINY, "--grad-accum", 2, "--out", out / "straight",
                   env=ENV)
    assert r.returncode == 0, r.stderr
    for extra in (["--stop-after-kimg", 0.032], []):
        r = run_script("train_diffusion.py", *data, *TINY, "--grad-accum", 2, "--out",
                       out / "resumed", *extra, env=ENV)
        assert r.returncode == 0, r.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_diffusion.py"), *map(str, data + TINY), "--out",
           str(out / "ddp")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_cli_run_writes_a_loadable_snapshot_and_samples(runs, tiny_toy):
    run = runs / "straight"
    net = load_generator(last_snapshot(run))
    assert (net.img_resolution, net.img_channels, net.num_classes) == (16, 3, 6)
    other = load_generator(last_snapshot(run), ema_std=0.1)  # the second EMA
    x = torch.randn(2, 3, 16, 16)
    # null class
    assert net(x, 1.0, None).shape == x.shape and not torch.equal(net(x, 1.0, 0), other(x, 1.0, 0))
    with pytest.raises(ValueError, match="not a network snapshot"):
        load_generator(run / "checkpoint.pt")
    assert net.class_names == sorted(os.listdir(tiny_toy / "train"))
    config = json.loads((run / "config.json").read_text())
    assert (net.sigma_data == pytest.approx(config["net"]["sigma_data"])
            and 0.2 < net.sigma_data < 0.8)
    # what its bits depend on
    assert config["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    with Image.open(sorted(run.glob("samples-*.png"))[-1]) as im:
        assert im.size == (8 * 16, 6 * 16)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [round(e["kimg"], 3) for e in log if "loss" in e] == [0.016, 0.032, 0.048, 0.064]
    table = [e for e in log if "denoise_rms" in e][-1]
    assert table["heldout"] and set(table["denoise_rms"]) == {"0.002", "0.01", "0.05", "0.2", "0.5",
                                                              "1", "5", "20", "80"}
    # near the mean-image denoiser at least
    assert table["denoise_rms"]["80"] < 1.2 * table["mean_image_rms"]


def test_resumed_run_is_bit_identical(runs):
    a, b = (torch.load(runs / r / "checkpoint.pt",
                       weights_only=True) for r in ("straight", "resumed"))
    assert a["nimg"] == b["nimg"] == 64
    for key in a["net"]:
        assert (torch.equal(a["net"][key], b["net"][key])
                and torch.equal(a["ema"][0][key], b["ema"][0][key])), key
    assert any(not torch.equal(v, w) for v, w in zip(a["net"].values(), torch.load(
        last_snapshot(runs / "straight"), weights_only=True)["ema"].values()))  # EMA != net


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    # Each rank trains its slice of the same global batch (same images, same noise), so 2 ranks x 4
    # images equal 1 process x 2 accumulated micro-batches of 4, up to the order of a float sum.
    a, b = (torch.load(runs / r / "checkpoint.pt", weights_only=True) for r in ("straight", "ddp"))
    for key in a["net"]:
        torch.testing.assert_close(a["net"][key], b["net"][key], rtol=0, atol=1e-6)
        torch.testing.assert_close(a["ema"][0][key], b["ema"][0][key], rtol=0, atol=1e-6)


def test_bad_inputs_give_one_clear_error_line(runs, tiny_toy, tmp_path, capsys):
    r = run_script("train_diffusion.py", "--data", tmp_path / "missing", "--out", tmp_path / "o",
                   env=ENV)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"error: data source not found: {tmp_path / 'missing'}")
    # tiny if it runs
    data = ["--data", str(tiny_toy / "train"), "--out", str(tmp_path / "o"), *map(str, TINY)]
    cases = [(["--resolution", "18"], "multiple of 4"),
             (["--batch-size", "6", "--grad-accum", "4"], "not divisible"),
             (["--heldout", str(tiny_toy / "bench")], "data source|no identity"),
             (["--ema-std", "0.5"], "ema-std"),
             (["--lr", "1e30"], "loss became inf")]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            main(data + args)
        assert e.value.code != 0
        assert re.search(message, str(e.value.code) + capsys.readouterr().err), args
    shutil.copytree(runs / "straight", tmp_path / "mismatch")
    with pytest.raises(SystemExit, match="another network or data"):
        main(["--data", str(tiny_toy / "train"), "--out", str(tmp_path / "mismatch"),
              *map(str, TINY), "--channels", "16"])

# ----------------------------------------------------------------------------- EDM2, exactly


def relative_difference(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_from_edm2_equals_edm2_precond_on_the_golden_fixture():
    fx = torch.load(FIXTURE, weights_only=True)
    net = from_edm2(fx["state_dict"], **fx["edm2_kwargs"])
    x, sigma, labels = fx["x"], fx["sigma"], fx["labels"]
    D, logvar = net(x, sigma, labels, return_logvar=True)  # int64 labels
    assert relative_difference(D, fx["D"]) < 1e-5  # measured: 2.7e-7
    assert relative_difference(net(x, sigma, nn.functional.one_hot(labels, 5).float()),
                               fx["D"]) < 1e-5
    assert relative_difference(logvar.flatten(), fx["logvar"]) < 1e-5
    soft = fx["soft_labels"][None].expand(len(x), -1)
    # condition mixing = EDM2's soft labels
    assert relative_difference(net(x, sigma, soft), fx["D_soft"]) < 1e-5
    assert not net.training and net.class_names == ["0", "1", "2", "3", "4"] and not net.null_class


def test_edm2_unet_layout_and_names():
    fx = torch.load(FIXTURE, weights_only=True)
    net = from_edm2(fx["state_dict"], **fx["edm2_kwargs"])
    assert list(net.unet.enc) == ["16x16_conv", "16x16_block0", "8x8_down", "8x8_block0"]
    assert list(net.unet.dec) == ["8x8_in0", "8x8_in1", "8x8_block0", "8x8_block1", "16x16_up",
                                  "16x16_block0",
                                  "16x16_block1"]  # num_blocks + 1 decoder blocks per level
    assert (net.unet.enc["8x8_down"].resample_mode == "down"
            and net.unet.dec["16x16_up"].resample_mode == "up")
    heads = {name: block.num_heads for name, block in net.unet.dec.items()}
    assert heads == {"8x8_in0": 4, "8x8_in1": 0, "8x8_block0": 4, "8x8_block1": 4, "16x16_up": 0,
                     "16x16_block0": 0, "16x16_block1": 0}
    assert net.unet.enc["16x16_conv"].weight.shape[1] == 4  # RGB + the constant channel
    assert list(net.state_dict()) == list(fx["state_dict"])  # EDM2's names, in EDM2's order


@pytest.mark.parametrize("preset, params", [("edm2-xs", 124_710_949), ("edm2-s", 280_209_381),
                                            ("edm2-m", 497_803_173)])
def test_edm2_presets_have_edm2_parameter_counts_at_img64(preset, params):
    """Counted by instantiating EDM2's Precond(64, 3, 1000, model_channels=...): 203 state tensors
    each."""
    p = PRESETS[preset]
    args = parse_args(["--data", "d", "--out", "o", "--preset", preset])
    with torch.device("meta"):
        net = Denoiser(64, 3, 1000, uncertainty=True, channels=p["channels"],
                       channel_mult=p["channel_mult"], num_blocks=p["num_blocks"],
                       attn_resolutions=args.attn, mp=True, dropout=p["dropout"])
    assert sum(q.numel() for q in net.parameters()) == params and len(net.state_dict()) == 203
    assert (args.sigma_data, args.xflip, args.batch_size, args.p_mean,
            args.p_std) == ("0.5", 0, 2048, -0.8, 1.6)
    assert args.ema_std == [0.05, 0.10] and args.attn == [16, 8]


def test_cpu_guide_is_a_fraction_of_the_cpu_net():
    def count(preset):
        p = PRESETS[preset]
        return sum(q.numel() for q in Denoiser(32, 3, 32, channels=p["channels"],
                                               channel_mult=p["channel_mult"],
                                               num_blocks=p["num_blocks"]).parameters())
    assert (count("cpu") == pytest.approx(2.6e6, rel=0.05)
            and count("cpu-guide") < count("cpu") / 3.5)


def test_isqrt_lr_matches_edm2_schedule_in_batches():
    """EDM2's learning_rate_schedule(cur_nimg, batch_size, ref_lr=0.01, ref_batches=35000,
    rampup_Mimg=10), evaluated with EDM2's code, at three image counts for two global batch
    sizes."""
    golden = {2048: [0.005, 0.006912790078301718, 0.003456395039150859],
              256: [0.005, 0.002444040370643115, 0.0012220201853215575]}
    for batch, values in golden.items():
        for accum in (1, 4):
            args = parse_args(["--data", "d", "--out", "o", "--preset", "edm2-s", "--batch-size",
                               str(batch), "--grad-accum", str(accum)])
            lrs = [learning_rate(args, n) for n in (5_000_000, 150_000_000, 600_000_000)]
            assert lrs == pytest.approx(values, rel=1e-12)
    # EDM2's first step has lr 0 (the warm-up starts at 0 images)
    assert learning_rate(args, 0) == 0


def test_posthoc_ema_solver_matches_edm2():
    """EDM2's phema.solve_posthoc_coefficients / power_function_correlation, evaluated with EDM2's
    code."""
    assert (profile_inner_product(3.0, 0.05, 5.0, 0.1)
            == pytest.approx(0.03310742573981591, rel=1e-12))
    nimg, std = [100000, 200000, 300000, 400000] * 2, [0.05] * 4 + [0.10] * 4
    golden = [6.4121507127724e-08, 0.0013421340681085492, 0.6794188503302134, 0,
              -3.5112875832693634e-06, -0.012405097659733978, 0.3316475604274883, 0]
    np.testing.assert_allclose(posthoc_coefficients(nimg, std, 300000, 0.06)[:, 0], golden,
                               rtol=1e-9, atol=1e-15)
    golden = [[1.2044703402012271, 0.3364241579366232], [-0.2233718164818554, 0.6973172169973304]]
    X = posthoc_coefficients(nimg, std, 400000, [0.045, 0.075])
    np.testing.assert_allclose(X[[3, 7]], golden, rtol=1e-9)
    np.testing.assert_allclose(X.sum(0), 1, rtol=1e-12)


def test_mpconv_forward_leaves_its_weight_and_normalize_weights_is_edm2s_forced_normalisation():
    torch.manual_seed(0)
    conv = MPConv(4, 6, 3).train()
    w0 = conv.weight.detach().clone()
    x = torch.randn(2, 4, 5, 5)
    y = conv(x, gain=0.7)
    assert torch.equal(conv.weight, w0)  # no in-place write inside the forward (torch.compile, DDP)
    expected = nn.functional.conv2d(x, normalize(w0) * (0.7 / math.sqrt(36)), padding=1)
    torch.testing.assert_close(y, expected)
    net = Denoiser(16, 3, 4, channels=8, channel_mult=[1, 2], mp=True, uncertainty=True).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.normalize_weights_()  # EDM2: weight <- normalize(weight) in each training forward (eq. 66)
    convs = [name for name, m in net.named_modules() if isinstance(m, MPConv)]
    assert len(convs) > 20
    for name in convs:
        assert torch.equal(net.get_submodule(name).weight, normalize(before[name + ".weight"]))


def test_attention_follows_the_levels_at_any_resolution(capsys):
    args = parse_args(["--data", "d", "--out", "o", "--preset", "edm2-s", "--resolution", "112"])
    assert args.attn == [28, 14]  # EDM2's 16 and 8 px at 64 px: the two lowest levels
    assert parse_args(["--data", "d", "--out", "o", "--preset", "edm2-xs", "--resolution",
                       "32"]).attn == [8, 4]
    assert parse_args(["--data", "d", "--out", "o"]).attn == []  # the cpu net has none
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--out", "o", "--preset", "edm2-s", "--resolution", "112",
                    "--attn", "16", "8"])
    assert "not the resolution of a level" in capsys.readouterr().err


def edm2_tiny(*extra):
    return ["--preset", "edm2-xs", "--resolution", 16, "--channels", 8, "--channel-mult", 1, 2,
            "--num-blocks", 1,
            "--attn", 8, "--batch-size", 4, "--rampup-kimg", 0.004, "--ref-batches", 2,
            "--status-every", 0.004, "--grid-steps", 2, *extra]


def test_edm2_run_posthoc_ema_and_sampling(tiny_toy, tmp_path):
    """A tiny EDM2-preset run (2 snapshots x 2 EMA profiles), post-hoc EMA through the command,
    sampling."""
    run = tmp_path / "run"
    first, last = run / "network-snapshot-000000.008.pt", run / "network-snapshot-000000.016.pt"
    flags = ["--data", tiny_toy / "train", "--out", run,
             *edm2_tiny("--duration", 0.016, "--snapshot-every", 0.008)]
    main([*flags, "--stop-after-kimg", 0.008])
    main(flags)
    snap = torch.load(last, weights_only=True)
    assert snap["ema_stds"] == [0.05, 0.10] and "ema_std_0.1" in snap and snap["sigma_data"] == 0.5
    assert snap["kimg"] == 0.016 and torch.load(first, weights_only=True)["kimg"] == 0.008
    # a stored profile is reconstructed as itself
    for std, key in ((0.05, "ema"), (0.10, "ema_std_0.1")):
        out = tmp_path / f"phema-{std}.pt"
        main(["posthoc-ema", "--run", run, "--std", std, "--out", out])
        rec = torch.load(out, weights_only=True)
        for k, v in snap[key].items():
            torch.testing.assert_close(rec["ema"][k], v, rtol=1e-4, atol=1e-5)
    both = ["--snapshots", first, last]
    main(["posthoc-ema", *both, "--std", 0.07, "--out", tmp_path / "mid.pt"])
    mid = torch.load(tmp_path / "mid.pt", weights_only=True)
    assert len(mid["posthoc_ema"]["inputs"]) == 4 and mid["kimg"] == 0.016
    net = load_generator(tmp_path / "mid.pt")
    assert net.class_names == snap["class_names"]
    assert generate_images(net, 0, [0, 1], num_steps=2).shape == (2, 3, 16, 16)
    with pytest.raises(SystemExit, match="error: no snapshot at 0.004 kimg"):
        main(["posthoc-ema", *both, "--std", 0.07, "--kimg", 0.004, "--out", tmp_path / "x.pt"])
    with pytest.raises(SystemExit, match="error: --std"):
        main(["posthoc-ema", "--run", run, "--std", 0.5, "--out", tmp_path / "x.pt"])


def test_import_edm2_command_writes_a_snapshot_the_sampler_reads(tmp_path):
    fx = torch.load(FIXTURE, weights_only=True)
    torch.save(fx["state_dict"], tmp_path / "state.pt")
    out = tmp_path / "edm2.pt"
    main(["import-edm2", tmp_path / "state.pt", "--edm2-kwargs", json.dumps(fx["edm2_kwargs"]),
          "--out", out])
    net = load_generator(out)
    assert relative_difference(net(fx["x"], fx["sigma"], fx["labels"]), fx["D"]) < 1e-5
    bad = [(["--edm2-kwargs", "{"], "error: "),
           (["--edm2-kwargs", json.dumps({**fx["edm2_kwargs"], "model_channels": 16})],
            "does not fit"),
           (["--edm2-kwargs", json.dumps({**fx["edm2_kwargs"], "colour": 1})],
            "unknown EDM2 keyword argument")]
    for args, message in bad:
        with pytest.raises(SystemExit, match=message):
            main(["import-edm2", tmp_path / "state.pt", *args, "--out", tmp_path / "bad.pt"])
    r = run_script("train_diffusion.py", "import-edm2", tmp_path / "missing.pt", "--edm2-kwargs",
                   "{}", "--out", tmp_path / "bad.pt", env=ENV)
    assert (r.returncode != 0 and r.stderr.startswith("error: ")
            and len(r.stderr.strip().splitlines()) == 1)

# ----------------------------------------------------------------------------- real-data path fixes


def test_fp16_amp_resumes_from_a_checkpoint_written_without_a_scaler(runs, tiny_toy, tmp_path,
                                                                     monkeypatch):
    shutil.copytree(runs / "straight", tmp_path / "run")
    loads = []
    real_load = torch.load

    def spy_load(*a, **k):
        loads.append(k)
        return real_load(*a, **k)

    monkeypatch.setattr(td, "autocast_context",  # what --amp gives on a CUDA GPU without bf16
                        lambda device, amp, dtype="auto": (torch.autocast("cpu", enabled=False),
                                                           torch.amp.GradScaler("cpu")))
    monkeypatch.setattr(td.torch, "load", spy_load)
    main(["--data", tiny_toy / "train", "--out", tmp_path / "run", *TINY, "--duration", "0.072",
          "--amp"])
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0 and ckpt["args"]["seed"] == 0
    assert loads[0].get("mmap") and loads[0].get("weights_only")  # the resume maps the checkpoint


def test_resuming_with_another_recipe_is_refused(runs, tiny_toy, tmp_path, capsys):
    shutil.copytree(runs / "straight", tmp_path / "run")
    before = open(tmp_path / "run" / "checkpoint.pt", "rb").read()
    line = one_error_line(main, ["--data", tiny_toy / "train", "--out", tmp_path / "run", *TINY,
                                 "--duration", "0.072", "--seed", "3"], capsys)
    assert "--seed 0, not 3" in line
    assert open(tmp_path / "run" / "checkpoint.pt", "rb").read() == before


def test_training_images_stream_with_bounded_decoding(tiny_toy, tmp_path, monkeypatch):
    """36 training images: nothing decodes more than 8 at once (statistics and table samples capped
    at 8)."""
    real = td.load_images

    def bounded(dataset, *a, **k):
        assert len(dataset) <= 8, f"decoded {len(dataset)} images at once"
        return real(dataset, *a, **k)

    monkeypatch.setattr(td, "load_images", bounded)
    monkeypatch.setattr(td, "STATS_IMAGES", 8)
    monkeypatch.setattr(td, "HELD_IMAGES", 8)
    main(["--data", tiny_toy / "train", "--out", tmp_path / "run", "--resolution", "16",
          "--channels", "8", "--batch-size", "8", "--duration", "0.016", "--snapshot-every", "0",
          "--workers", "1", "--grid-steps", "2"])
    assert (last_snapshot(tmp_path / "run")).exists()


def test_guide_of_another_architecture_is_accepted_and_another_resolution_refused(runs, tiny_toy,
                                                                                  tmp_path):
    import scoremix_sample
    net = last_snapshot(runs / "straight")
    guide = tmp_path / "guide"
    main(["--data", tiny_toy / "train", "--out", guide, "--preset", "cpu-guide", "--resolution",
          "16", "--channels", "4", "--channel-mult", "1", "2", "--batch-size", "8", "--duration",
          "0.008", "--snapshot-every", "0", "--label-dropout", "0.25", "--grid-steps", "2"])
    names = load_generator(net).class_names
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"class_a,class_b,distance,rank\n{names[0]},{names[1]},1,0\n")
    common = ["--net", str(net), "--pairs", str(pairs), "--per-pair", "1", "--steps", "2"]
    scoremix_sample.main([*common, "--guide", str(last_snapshot(guide)),
                          "--out", str(tmp_path / "s")])
    assert len(list((tmp_path / "s").rglob("*.png"))) == 1
    other = tmp_path / "other"
    main(["--data", tiny_toy / "train", "--out", other, "--preset", "cpu-guide", "--resolution",
          "8", "--channels", "4", "--channel-mult", "1", "2", "--batch-size", "8", "--duration",
          "0.008", "--snapshot-every", "0", "--label-dropout", "0.25", "--grid-steps", "2"])
    with pytest.raises(SystemExit, match="error: --guide .* 8 px"):
        scoremix_sample.main([*common, "--guide", str(last_snapshot(other)),
                              "--out", str(tmp_path / "s2")])


def test_a_corrupt_image_met_by_a_loader_process_gives_one_error_line(tiny_toy, tmp_path,
                                                                      monkeypatch):
    data = tmp_path / "train"
    shutil.copytree(tiny_toy / "train", data)
    monkeypatch.setattr(td, "STATS_IMAGES", 1)
    monkeypatch.setattr(td, "HELD_IMAGES", 1)
    files = td.open_datasets([str(data)]).datasets[0].files
    decoded_first = {int(td.statistics_sample(len(files))[0]),
                     int(torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[0])}
    bad = next(f for i, f in enumerate(files) if i not in decoded_first and i > 0)
    with open(bad, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(SystemExit) as e:
        main(["--data", data, "--out", tmp_path / "run", "--resolution", "16", "--channels", "8",
              "--batch-size", "8", "--duration", "0.048", "--snapshot-every", "0", "--workers",
              "1"])
    message = str(e.value.code)
    assert message.startswith(f"error: corrupt image {bad}") and len(message.splitlines()) == 1


def test_a_resumed_run_rewrites_the_log_up_to_its_checkpoint(tmp_path):
    """Records a killed run wrote after its last checkpoint (and a line cut short) go; the run
    writes them again."""
    records = [{"kimg": k, "loss": 1.0} for k in (0.032, 0.064, 0.064, 0.096)]
    (tmp_path / "log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records) + '{"kimg": 0.1')
    td.truncate_log(tmp_path, 64)
    assert ([json.loads(line)["kimg"] for line in open(tmp_path / "log.jsonl")]
            == [0.032, 0.064, 0.064])
