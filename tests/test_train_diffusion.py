"""train_diffusion.py: EDM preconditioning, Karras schedule, Heun sampler against the Gaussian oracle,
power-function EMA, per-sample seeding, and tiny training runs (resume, 2 processes, snapshot, errors)."""
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

from conftest import ROOT, run_script
from train_diffusion import (Denoiser, PowerEMA, condition_vectors, edm_loss, edm_precond, generate_images,
                             heun_sample, karras_sigmas, learning_rate, load_generator, main, parse_args,
                             power_function_beta, std_to_gamma)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--resolution", 16, "--channels", 8, "--batch-size", 8, "--duration", 0.064, "--rampup-kimg", 0,
        "--lr", 1e-2, "--snapshot-every", 0, "--status-every", 0.016, "--label-dropout", 0.25, "--ema-std", 0.05, 0.1]


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
    golden = [80, 57.585985, 40.785574, 28.374585, 19.352453, 12.910082, 8.400935, 5.315195, 3.256822,
              1.92334, 1.088171, 0.585348, 0.296442, 0.139516, 0.059947, 0.022935, 0.007528, 0.002, 0]
    t = karras_sigmas(18)
    assert t.dtype == torch.float64 and len(t) == 19
    np.testing.assert_allclose(t.numpy(), golden, rtol=1e-6, atol=5e-6)  # golden rounded to 6 places


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
    exact = mu + s0 / math.sqrt(s0 ** 2 + 80 ** 2) * (z * 80 - mu)  # the probability-flow ODE's endpoint
    errors = {}  # the references are PROTOCOLS.md's, for |latents| up to ~3.16
    for n, reference in [(18, 0.087), (32, 0.025), (64, 0.0058), (256, 3.3e-4)]:
        x = heun_sample(GaussianDenoiser(mu, s0), z, karras_sigmas(n))
        assert x.dtype == torch.float64
        errors[n] = (x - exact).abs().max().item()
        assert errors[n] == pytest.approx(reference, rel=0.15), (n, errors[n])
    assert 3.5 < errors[32] / errors[64] < 4.5 and 14 < errors[64] / errors[256] < 18  # error ~ 1/N^2


def test_churn_sampler_draws_the_gaussian_with_fresh_noise():
    """EDM Alg. 2 with an exact denoiser: N(mu, s0^2) at many steps, and no longer a function of the latents."""
    mu, s0 = 0.3, 0.5
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 1, 1, 1, generator=g, dtype=torch.float64)
    x = heun_sample(GaussianDenoiser(mu, s0), z, karras_sigmas(256), S_churn=40,
                    randn_like=lambda v: torch.randn(v.shape, generator=g, dtype=v.dtype))
    assert x.mean().item() == pytest.approx(mu, abs=0.012) and x.std().item() == pytest.approx(s0, rel=0.015)
    assert torch.corrcoef(torch.stack([x.flatten(), z.flatten()]))[0, 1] < 0.95  # deterministic: exactly 1


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
    args = parse_args(["--data", "d", "--out", "o", "--duration", "100", "--rampup-kimg", "10", "--lr", "1e-3"])
    ends = [learning_rate(args, n * 1000 - 64) for n in (5, 10, 50, 75, 100)]  # steps ending at n kimg
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
    torch.testing.assert_close(net(x, 0.5, 4), net(x, torch.full([3], 0.5), torch.tensor([4, 4, 4])))
    assert not torch.allclose(net(x, 0.5, 4), net(x, 0.5, 0))  # the class matters
    assert condition_vectors(net).shape == (5, 32)
    with pytest.raises(ValueError, match="null class"):
        net(x, 0.5, None)


def test_mp_variant_with_null_class_and_uncertainty_trains():
    net = Denoiser(16, 3, 4, null_class=True, uncertainty=True, channels=8, channel_mult=[1, 2],
                   attn_resolutions=[8], mp=True, num_mid_blocks=2).train()
    with torch.no_grad():  # EDM2 starts these gains at 0, which would hide the label path from the gradient
        for name, p in net.named_parameters():
            p.fill_(1.0) if name.endswith("gain") else None
    y = torch.rand(4, 3, 16, 16) * 2 - 1
    loss = edm_loss(net, y, torch.tensor([0, 1, 4, 4]), -0.8, 1.6, 0.5, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and net.logvar_linear.weight.grad.abs().sum() > 0
    assert net.unet.emb_label.weight.grad[:, 4].abs().sum() > 0  # the null class is trained
    assert net.eval()(y, 1.0, None).shape == y.shape and condition_vectors(net).shape == (4, 16)


@pytest.fixture(scope="module")
def runs(tiny_toy, tmp_path_factory):
    """A tiny run straight through (1 process, 2 micro-batches), stopped + resumed, and on 2 processes."""
    out = tmp_path_factory.mktemp("diffusion")
    data = ["--data", tiny_toy / "train", "--heldout", tiny_toy / "heldout"]
    r = run_script("train_diffusion.py", *data, *TINY, "--grad-accum", 2, "--out", out / "straight", env=ENV)
    assert r.returncode == 0, r.stderr
    for extra in (["--stop-after-kimg", 0.032], []):
        r = run_script("train_diffusion.py", *data, *TINY, "--grad-accum", 2, "--out", out / "resumed", *extra, env=ENV)
        assert r.returncode == 0, r.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_diffusion.py"), *map(str, data + TINY), "--out", str(out / "ddp")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_cli_run_writes_a_loadable_snapshot_and_samples(runs, tiny_toy):
    run = runs / "straight"
    net = load_generator(run / "network-snapshot-000000.pt")
    assert (net.img_resolution, net.img_channels, net.num_classes) == (16, 3, 6)
    other = load_generator(run / "network-snapshot-000000.pt", ema_std=0.1)  # the second EMA
    x = torch.randn(2, 3, 16, 16)
    assert net(x, 1.0, None).shape == x.shape and not torch.equal(net(x, 1.0, 0), other(x, 1.0, 0))  # null class
    with pytest.raises(ValueError, match="not a network snapshot"):
        load_generator(run / "checkpoint.pt")
    assert net.class_names == sorted(os.listdir(tiny_toy / "train"))
    config = json.loads((run / "config.json").read_text())
    assert net.sigma_data == pytest.approx(config["net"]["sigma_data"]) and 0.2 < net.sigma_data < 0.8
    with Image.open(run / "samples-000000.png") as im:
        assert im.size == (8 * 16, 6 * 16)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [round(e["kimg"], 3) for e in log if "loss" in e] == [0.016, 0.032, 0.048, 0.064]
    table = [e for e in log if "denoise_rms" in e][-1]
    assert table["heldout"] and set(table["denoise_rms"]) == {"0.002", "0.01", "0.05", "0.2", "0.5", "1", "5", "20", "80"}
    assert table["denoise_rms"]["80"] < 1.2 * table["mean_image_rms"]  # near the mean-image denoiser at least


def test_resumed_run_is_bit_identical(runs):
    a, b = (torch.load(runs / r / "checkpoint.pt", weights_only=True) for r in ("straight", "resumed"))
    assert a["nimg"] == b["nimg"] == 64
    for key in a["net"]:
        assert torch.equal(a["net"][key], b["net"][key]) and torch.equal(a["ema"][0][key], b["ema"][0][key]), key
    assert any(not torch.equal(v, w) for v, w in zip(a["net"].values(), torch.load(
        runs / "straight" / "network-snapshot-000000.pt", weights_only=True)["ema"].values()))  # EMA != net


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    # Each rank trains its slice of the same global batch (same images, same noise), so 2 ranks x 4
    # images equal 1 process x 2 accumulated micro-batches of 4, up to the order of a float sum.
    a, b = (torch.load(runs / r / "checkpoint.pt", weights_only=True) for r in ("straight", "ddp"))
    for key in a["net"]:
        torch.testing.assert_close(a["net"][key], b["net"][key], rtol=0, atol=1e-6)
        torch.testing.assert_close(a["ema"][0][key], b["ema"][0][key], rtol=0, atol=1e-6)


def test_bad_inputs_give_one_clear_error_line(runs, tiny_toy, tmp_path, capsys):
    r = run_script("train_diffusion.py", "--data", tmp_path / "missing", "--out", tmp_path / "o", env=ENV)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"error: data source not found: {tmp_path / 'missing'}")
    data = ["--data", str(tiny_toy / "train"), "--out", str(tmp_path / "o"), *map(str, TINY)]  # tiny if it runs
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
        main(["--data", str(tiny_toy / "train"), "--out", str(tmp_path / "mismatch"), *map(str, TINY[:2]),
              "--channels", "16"])
