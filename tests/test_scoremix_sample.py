"""scoremix_sample.py: the convex score mix against the Gaussian oracle, guidance, weight checks,
one batched forward pass, per-sample classes, condition mixing (soft labels), and the CLI on a tiny
generator (scoremix / repro / condmix / figures, 1 vs 2 processes, resume, bad inputs)."""
import csv
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import last_snapshot, ROOT, run_script
from scoremix_sample import condition_mix_denoiser, main, mix_denoisers, score_mix_denoiser
from common import open_datasets
from train_diffusion import Denoiser, heun_sample, karras_sigmas, load_generator

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class GaussianClasses(nn.Module):
    """Exact denoisers of classes N(mu_k, s0^2 I): D(x; s, k) = mu_k + s0^2 / (s0^2 + s^2) (x -
    mu_k). labels None: the null class N(mu_null, s0^2 I); float labels [B, K]: mean = weights @ mu.
    Counts calls."""

    def __init__(self, mus, s0, mu_null=None):
        super().__init__()
        self.mus, self.s0, self.mu_null = torch.tensor(mus, dtype=torch.float64), s0, mu_null
        self.null_class = mu_null is not None
        self.calls = []

    def forward(self, x, sigma, labels):
        self.calls.append(x.shape[0])
        shape = (-1, *[1] * (x.ndim - 1))
        if labels is None:
            mu = torch.tensor(self.mu_null, dtype=x.dtype)
        else:
            mu = (labels.to(x.dtype) @ self.mus.to(x.dtype) if labels.is_floating_point()
                  else self.mus[labels])
        mu, sigma = (mu.to(x.dtype).reshape(shape),
                     torch.as_tensor(sigma, dtype=x.dtype).reshape(shape))
        return mu + self.s0 ** 2 / (self.s0 ** 2 + sigma ** 2) * (x - mu)


def ode_endpoint(mu, s0, z, sigma_max=80.0):
    """The probability-flow ODE of N(mu, s0^2) from x_T = z sigma_max (docs/formulas.md 2)."""
    return mu + s0 / math.sqrt(s0 ** 2 + sigma_max ** 2) * (z * sigma_max - mu)


def test_convex_mix_follows_the_mixed_gaussians_ode_per_sample():
    # alpha 0.5: mu = 0.3, the reference case of docs/formulas.md 2
    oracle = GaussianClasses([0.8, -0.2], 0.5)
    z = torch.linspace(-math.sqrt(10), math.sqrt(10), 65, dtype=torch.float64).reshape(-1, 1, 1, 1)
    exact = ode_endpoint(0.3, 0.5, z)
    x = heun_sample(mix_denoisers(oracle, [0, 1], [0.5, 0.5]), z, karras_sigmas(32))
    assert x.dtype == torch.float64
    # Heun's own error at 32 steps
    assert (x - exact).abs().max().item() == pytest.approx(0.025, rel=0.15)
    x = heun_sample(mix_denoisers(oracle, [0, 1], [0.5, 0.5]), z, karras_sigmas(256))
    assert (x - exact).abs().max().item() < 4e-4


def test_mix_at_alpha_samples_the_gaussian_with_the_mixed_mean():
    alpha, mu_a, mu_b, s0 = 0.3, 0.8, -0.2, 0.5
    z = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = heun_sample(mix_denoisers(GaussianClasses([mu_a, mu_b], s0), [0, 1], [alpha, 1 - alpha]), z,
                    karras_sigmas(64))
    mu = alpha * mu_a + (1 - alpha) * mu_b
    assert x.mean().item() == pytest.approx(mu, abs=0.012)  # standard error 0.0035
    assert x.std().item() == pytest.approx(s0, rel=0.02)
    assert (x - ode_endpoint(mu, s0, z)).abs().max().item() < 0.01


def test_guidance_one_equals_no_guidance():
    net, guide = GaussianClasses([0.8, -0.2], 0.5, mu_null=0.0), GaussianClasses([0.1, 0.9], 0.7)
    x, sigma = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    plain = mix_denoisers(net, [0, 1], [0.4, 0.6])(x, sigma)
    assert torch.equal(mix_denoisers(net, [0, 1], [0.4, 0.6], guide=guide, guidance=1.0)(x, sigma),
                       plain)
    # no CFG either
    assert torch.equal(mix_denoisers(net, [0, 1], [0.4, 0.6], guidance=1.0)(x, sigma), plain)
    assert guide.calls == []


def test_a_guide_identical_to_the_net_gives_the_net_for_any_weight():
    net, twin = GaussianClasses([0.8, -0.2], 0.5), GaussianClasses([0.8, -0.2], 0.5)
    z = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = heun_sample(mix_denoisers(net, [0, 1], [0.5, 0.5]), z, karras_sigmas(16))
    for w in (0.0, 1.3, 2.5, -1.0):
        guided = heun_sample(mix_denoisers(net, [0, 1], [0.5, 0.5], guide=twin, guidance=w), z,
                             karras_sigmas(16))
        torch.testing.assert_close(guided, plain, rtol=0, atol=1e-12)


def test_guidance_is_applied_per_class_then_mixed():
    net, guide = GaussianClasses([0.8, -0.2], 0.5, mu_null=0.05), GaussianClasses([0.1, 0.9], 0.7)
    x, sigma, w, a = (torch.randn(3, 1, 2, 2, dtype=torch.float64),
                      torch.tensor(0.7, dtype=torch.float64), 1.7, 0.3)
    D = [net(x, sigma, torch.full([3], k)) for k in (0, 1)]
    G = [guide(x, sigma, torch.full([3], k)) for k in (0, 1)]
    auto = sum(wk * (g + w * (d - g)) for wk, d, g in zip((a, 1 - a), D, G))
    torch.testing.assert_close(
        mix_denoisers(net, [0, 1], [a, 1 - a], guide=guide, guidance=w)(x, sigma), auto)
    null = net(x, sigma, None)
    cfg = sum(wk * (null + w * (d - null)) for wk, d in zip((a, 1 - a), D))
    torch.testing.assert_close(mix_denoisers(net, [0, 1], [a, 1 - a], guidance=w)(x, sigma), cfg)


def test_classifier_free_guidance_is_refused_without_a_null_class():
    net = Denoiser(16, 3, 4, channels=8, channel_mult=[1, 2])
    with pytest.raises(ValueError, match="null class"):
        mix_denoisers(net, [0, 1], [0.5, 0.5], guidance=2.0)


@pytest.mark.parametrize("weights", [[0.6, 0.6], [1.5, -0.5], [1.0], [0.5, 0.5, 0.0],
                                     [float("nan"), 1.0], [0.5, 0.5 + 2e-6]])
def test_bad_weights_raise_value_error(weights):
    with pytest.raises(ValueError, match="weight"):
        mix_denoisers(GaussianClasses([0.0, 1.0], 0.5), [0, 1], weights)
    with pytest.raises(ValueError, match="weight"):
        condition_mix_denoiser(GaussianClasses([0.0, 1.0], 0.5), [0, 1], weights, num_classes=2)


def test_weights_within_tolerance_are_accepted():
    mix_denoisers(GaussianClasses([0.0, 1.0], 0.5), [0, 1], [0.5, 0.5 + 5e-7])
    mix_denoisers(GaussianClasses([0.0, 1.0, 2.0], 0.5), [0, 1, 2], torch.tensor([0.2, 0.3, 0.5]))


@pytest.mark.parametrize("guide", ["none", "auto", "cfg"])
def test_all_classes_go_through_one_batched_forward_pass(guide):
    net, other = (GaussianClasses([0.8, -0.2, 0.1], 0.5, mu_null=0.0),
                  GaussianClasses([0.1, 0.9, 0.0], 0.7))
    kw = {"none": {}, "auto": dict(guide=other, guidance=1.3), "cfg": dict(guidance=1.3)}[guide]
    steps, batch = 6, 5
    heun_sample(mix_denoisers(net, [0, 1, 2], [0.2, 0.3, 0.5], **kw),
                torch.randn(batch, 1, 2, 2).double(), karras_sigmas(steps))
    evaluations = 2 * steps - 1
    assert net.calls + other.calls == [3 * batch] * evaluations * (1 if guide == "none" else 2)
    net.calls.clear()
    heun_sample(condition_mix_denoiser(net, [0, 1], [0.5, 0.5], num_classes=3),
                torch.randn(batch, 1, 2, 2).double(), karras_sigmas(steps))
    assert net.calls == [batch] * evaluations  # condition mixing: one call on the mixed embedding


def test_per_sample_classes_match_separate_runs():
    net = GaussianClasses([0.8, -0.2, 0.4, -0.6], 0.5)
    z = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 3, 0, 2])
    together = heun_sample(mix_denoisers(net, [a, b], [0.3, 0.7]), z, karras_sigmas(8))
    for i in range(4):
        alone = heun_sample(mix_denoisers(net, [int(a[i]), int(b[i])], [0.3, 0.7]), z[i:i + 1],
                            karras_sigmas(8))
        torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=1e-12)


def test_score_mix_cells_convex_zero_and_sum():
    net = GaussianClasses([0.8, -0.2], 0.5)
    x, sigma = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    D_a, D_b = (net(x, sigma, torch.full([3], k)) for k in (0, 1))
    torch.testing.assert_close(score_mix_denoiser(net, [0, 1], 0.2, 0.8)(x, sigma),
                               mix_denoisers(net, [0, 1], [0.2, 0.8])(x, sigma))
    # no score: x stays put
    assert torch.equal(score_mix_denoiser(net, [0, 1], 0.0, 0.0)(x, sigma), x)
    torch.testing.assert_close(score_mix_denoiser(net, [0, 1], 1.0, 1.0)(x, sigma), D_a + D_b - x)
    # one cell per sample
    alpha, beta = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, 0.5, 0.2])
    out = score_mix_denoiser(net, [0, 1], alpha, beta)(x, sigma)
    torch.testing.assert_close(out, x + alpha.double().reshape(-1, 1, 1, 1) * (D_a - x)
                               + beta.double().reshape(-1, 1, 1, 1) * (D_b - x))


@pytest.mark.parametrize("mp", [False, True])
def test_denoiser_accepts_soft_labels_for_condition_mixing(mp):
    torch.manual_seed(0)
    net = Denoiser(16, 3, 4, null_class=True, channels=8, channel_mult=[1, 2], mp=mp).eval()
    for p in net.unet.out_conv.parameters():
        nn.init.normal_(p, std=0.1)
    if mp:
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.fill_(1.0) if name.endswith("gain") else None
    x, labels = torch.randn(3, 3, 16, 16), torch.tensor([0, 3, 4])
    torch.testing.assert_close(net(x, 0.7, nn.functional.one_hot(labels, 5).float()),
                               net(x, 0.7, labels))
    table = net.unet.class_embedding(torch.arange(5))
    soft = torch.tensor([[0.25, 0.0, 0.75, 0.0]])  # no null column: padded with 0
    torch.testing.assert_close(net.unet.class_embedding(soft),
                               0.25 * table[0:1] + 0.75 * table[2:3])
    mixed = condition_mix_denoiser(net, [torch.tensor([0, 1, 2]), 2],
                                   [0.25, 0.75])(x, torch.tensor(0.7))
    expected = net(x, 0.7, torch.tensor([[0.25, 0, 0.75, 0], [0, 0.25, 0.75, 0], [0, 0, 1.0, 0]]))
    torch.testing.assert_close(mixed, expected)
    assert not torch.allclose(mixed[0], net(x, 0.7, 0)[0])

# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def gen(tiny_toy, tmp_path_factory):
    """A tiny generator (16 px, 8 channels, 64 images of training, null class) and a pairs.csv."""
    out = tmp_path_factory.mktemp("gen")
    r = run_script("train_diffusion.py", "--data", tiny_toy / "train", "--out", out / "run",
                   "--resolution", 16, "--channels", 8, "--batch-size", 8, "--duration", 0.064,
                   "--rampup-kimg", 0, "--lr", 1e-2, "--snapshot-every", 0, "--label-dropout", 0.25,
                   "--grid-steps", 2, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    snapshot = last_snapshot(out / "run")
    names = load_generator(snapshot).class_names
    pairs = out / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["class_a", "class_b", "distance", "rank"], [names[0], names[3], 1.2, 0],
                     [names[1], names[4], 1.1, 1],
                     [names[0], names[3], 1.0, 2]])  # a pair twice: a unique name
    return snapshot, pairs, names


SAMPLE = ["--per-pair", 3, "--steps", 4, "--batch-size", 4]


def read_folder(root):
    """{identity: uint8 array [n, H, W, 3]} of every identity folder (hidden ones too)."""
    folders = [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]
    return {d: np.stack([np.asarray(Image.open(os.path.join(root, d, f)))
                         for f in sorted(os.listdir(root / d))])
            for d in folders}


@pytest.fixture(scope="module")
def mixed(gen, tmp_path_factory):
    """ScoreMix with autoguidance on 1 process and on 2 processes (torchrun, gloo)."""
    snapshot, pairs, _ = gen
    out = tmp_path_factory.mktemp("mix")
    args = ["--net", snapshot, "--guide", snapshot, "--pairs", pairs, *SAMPLE]
    r = run_script("scoremix_sample.py", *args, "--out", out / "one", env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "scoremix_sample.py"), *map(str, args), "--out", str(out / "two")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_scoremix_cli_writes_identity_folders_and_manifest(mixed, gen):
    _, _, names = gen
    images = read_folder(mixed / "one")
    expected = [f"mix_{names[0]}_{names[3]}", f"mix_{names[1]}_{names[4]}",
                f"mix_{names[0]}_{names[3]}_2"]
    assert sorted(images) == sorted(expected)
    assert all(v.shape == (3, 16, 16, 3) for v in images.values())
    first, dup = images[expected[0]].astype(int), images[expected[2]].astype(int)
    assert np.abs(first - dup).max() > 10 and np.abs(first[0] - first[1]).max() > 10  # seeds differ
    with open(mixed / "one" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["identity"] for r in rows] == expected
    assert rows[0]["sources"] == f"{names[0]};{names[3]}" and rows[0]["weights"] == "0.5;0.5"
    settings = {(r["mode"], r["guidance"], r["steps"], r["images"], r["seed"]) for r in rows}
    assert settings == {("scoremix", "1.3", "4", "3", "0")}


def test_two_processes_give_the_same_images(mixed):
    one, two = read_folder(mixed / "one"), read_folder(mixed / "two")
    assert sorted(one) == sorted(two)
    for name in one:
        assert np.abs(one[name].astype(int) - two[name].astype(int)).max() <= 1, name
    assert ((mixed / "one" / "manifest.csv").read_text()
            == (mixed / "two" / "manifest.csv").read_text())


def test_resume_redoes_only_missing_or_half_written_identities(mixed, gen, tmp_path):
    snapshot, pairs, names = gen
    out = tmp_path / "resume"
    shutil.copytree(mixed / "one", out)
    before = read_folder(out)
    keep, gone, half = (f"mix_{names[0]}_{names[3]}", f"mix_{names[1]}_{names[4]}",
                        f"mix_{names[0]}_{names[3]}_2")
    mtimes = {f: os.stat(out / keep / f).st_mtime_ns for f in os.listdir(out / keep)}
    shutil.rmtree(out / gone)
    os.rename(out / half, out / f".{half}.partial")  # as if killed before the rename
    os.remove(out / f".{half}.partial" / "2.png")
    r = run_script("scoremix_sample.py", "--net", snapshot, "--guide", snapshot, "--pairs", pairs,
                   *SAMPLE, "--out", out, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 already complete (skipped), 2 to sample" in r.stdout
    assert {f: os.stat(out / keep / f).st_mtime_ns for f in os.listdir(out / keep)} == mtimes
    after = read_folder(out)
    assert sorted(after) == sorted(before)  # no partial folder left
    for name in before:
        assert np.abs(after[name].astype(int) - before[name].astype(int)).max() <= 1
    r = run_script("scoremix_sample.py", "--net", snapshot, "--pairs", pairs, *SAMPLE, "--out", out,
                   env=ENV)
    # guidance 1 vs 1.3 into the same folder
    assert r.returncode != 0 and "other settings" in r.stderr


def test_repro_and_condmix_modes(gen, tiny_toy, tmp_path):
    snapshot, pairs, names = gen
    r = run_script("scoremix_sample.py", "--net", snapshot, "--mode", "repro", "--guidance", 1.5,
                   *SAMPLE, "--out", tmp_path / "repro",
                   env=ENV)  # guidance without --guide: classifier-free
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(read_folder(tmp_path / "repro")) == sorted(names)
    merged = open_datasets([tiny_toy / "train", tmp_path / "repro"], merge_by_name=True)
    assert (merged.classes == sorted(names)
            and len(merged) == len(open_datasets([tiny_toy / "train"])) + 3 * len(names))
    r = run_script("scoremix_sample.py", "--net", snapshot, "--mode", "condmix", "--pairs", pairs,
                   *SAMPLE, "--out", tmp_path / "condmix", env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    images = read_folder(tmp_path / "condmix")
    assert sorted(images) == sorted([f"cmix_{names[0]}_{names[3]}", f"cmix_{names[1]}_{names[4]}",
                                     f"cmix_{names[0]}_{names[3]}_2"])
    with open(tmp_path / "condmix" / "manifest.csv", newline="") as f:
        assert {r["mode"] for r in csv.DictReader(f)} == {"condmix"}


def test_churn_is_seeded_per_image_and_recorded(gen, tmp_path):
    snapshot, _, names = gen
    churned = []
    for out, batch in (("a", 4), ("b", 3)):  # other batch compositions: the same images
        r = run_script("scoremix_sample.py", "--net", snapshot, "--mode", "repro", "--per-pair", 3,
                       "--steps", 4, "--batch-size", batch, "--churn", 40, "--out", tmp_path / out,
                       env=ENV)
        assert r.returncode == 0, r.stderr[-3000:]
        churned.append(read_folder(tmp_path / out))
    r = run_script("scoremix_sample.py", "--net", snapshot, "--mode", "repro", *SAMPLE, "--out",
                   tmp_path / "det", env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    deterministic = read_folder(tmp_path / "det")
    for name in names:
        assert np.abs(churned[0][name].astype(int) - churned[1][name].astype(int)).max() <= 1
        assert np.abs(churned[0][name].astype(int) - deterministic[name].astype(int)).max() > 10
    with open(tmp_path / "a" / "manifest.csv", newline="") as f:
        assert {r["churn"] for r in csv.DictReader(f)} == {"40;0.05;50;1.003"}
    r = run_script("scoremix_sample.py", "--net", snapshot, "--mode", "repro", *SAMPLE, "--out",
                   tmp_path / "a", env=ENV)
    assert r.returncode != 0 and "other settings" in r.stderr  # no churn into a churned folder


def test_grid_figures(gen, tmp_path):
    snapshot, _, names = gen
    r = run_script("scoremix_sample.py", "--net", snapshot, "--grid", tmp_path / "fig.png",
                   "--classes", names[0], names[2], "--steps", 4, "--grid-seeds", 2, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    with (Image.open(tmp_path / "fig.png") as grid,
          Image.open(tmp_path / "fig-triplets.png") as triplets):
        # 5 x 5 cells of 16 px drawn at 4x, plus labels
        assert grid.width > 5 * 64 and grid.height > 5 * 64
        assert triplets.width > 3 * 64 and 2 * 64 < triplets.height < 5 * 64


def test_bad_inputs_give_one_clear_error_line(gen, tmp_path):
    snapshot, pairs, _ = gen
    bad = tmp_path / "bad.csv"
    bad.write_text("class_a,class_b,distance,rank\nnobody,id00000,1.0,0\n")
    for args, message in [(["--net", snapshot, "--pairs", bad], "unknown class 'nobody'"),
                          (["--net", snapshot, "--pairs", tmp_path / "missing.csv"],
                           "pairs file not found")]:
        r = run_script("scoremix_sample.py", *args, "--out", tmp_path / "o", env=ENV)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert r.stderr.startswith("error: ") and message in r.stderr, (args, r.stderr)
    cases = [(["--net", tmp_path / "missing.pt", "--pairs", pairs], "snapshot not found"),
             (["--net", pairs, "--pairs", pairs], "cannot load --net snapshot"),
             (["--net", snapshot, "--pairs", pairs, "--weights", 0.7, 0.7], "sum to 1"),
             (["--net", snapshot, "--mode", "condmix"], "needs --pairs"),
             (["--net", snapshot, "--grid", tmp_path / "g.png", "--classes", "id00000", "nobody"],
              "unknown class")]
    for args, message in cases:  # the same exits, in this process (faster)
        with pytest.raises(SystemExit) as e:
            main([*map(str, args), "--out", str(tmp_path / "o")])
        text = str(e.value.code)
        assert text.startswith("error: ") and message in text and "\n" not in text, (args, text)
    assert not (tmp_path / "o").exists()

# ----------------------------------------------------------------------------- nothing bad is kept


def error_of(argv):
    """main(argv) in this process -> its one `error:` line (SystemExit with a message or status
    2)."""
    with pytest.raises(SystemExit) as e:
        main([*map(str, argv)])
    assert e.value.code not in (0, None)
    return str(e.value.code)


def assert_one_error_line(text, *needles):
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text, text
    for needle in needles:
        assert needle in lines[0], (needle, text)


@pytest.mark.parametrize("key,value,needle", [
    ("unet.emb_label.weight", float("nan"), "1 non-finite value(s) in unet.emb_label.weight"),
    ("unet.out_conv.bias", float("inf"), "non-finite value(s) in unet.out_conv.bias"),
    ("unet.out_conv.weight", 3.4e38,
     "non-finite value(s) in its output"),  # finite weights, inf output
])
def test_a_generator_with_non_finite_weights_or_output_is_refused(gen, tmp_path, key, value,
                                                                  needle):
    from conftest import poisoned_copy
    snapshot, pairs, _ = gen
    bad, _ = poisoned_copy(snapshot, tmp_path / "bad.pt", key, value)
    for argv in (["--net", bad], ["--net", snapshot, "--guide", bad]):
        text = error_of([*argv, "--pairs", pairs, *SAMPLE, "--out", tmp_path / "o"])
        assert_one_error_line(text, str(bad), needle)
    assert not (tmp_path / "o").exists()


def snapshot_like(snapshot, path, **config):
    """A copy of `snapshot` built with other Denoiser settings (fresh weights, the same classes)."""
    snap = torch.load(snapshot, weights_only=True)
    net = Denoiser(**{**snap["config"], **config})
    torch.save({**snap, "config": net.config, "ema": net.state_dict()}, path)
    return path


def test_a_guide_of_another_resolution_or_other_classes_is_refused(gen, tmp_path):
    snapshot, pairs, names = gen
    small = snapshot_like(snapshot, tmp_path / "small.pt", img_resolution=8)
    text = error_of(
        ["--net", snapshot, "--guide", small, "--pairs", pairs, *SAMPLE, "--out", tmp_path / "o"])
    assert_one_error_line(text, "--guide makes 3 x 8 px images and --net 3 x 16 px")
    snap = torch.load(snapshot, weights_only=True)
    other = tmp_path / "other.pt"
    torch.save({**snap, "class_names": [n + "x" for n in names]}, other)
    text = error_of(
        ["--net", snapshot, "--guide", other, "--pairs", pairs, *SAMPLE, "--out", tmp_path / "o"])
    assert_one_error_line(text, "other classes")
    assert not (tmp_path / "o").exists()

# ----------------------------------------------------------------------------- pairs.csv


def write_pairs_file(path, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        csv.writer(f).writerows(rows)
    return path


def test_pairs_are_read_by_column_name_with_or_without_a_byte_order_mark(gen, tmp_path):
    from scoremix_sample import read_pairs
    snapshot, _, names = gen
    net = load_generator(snapshot)
    plain = write_pairs_file(tmp_path / "p.csv", [["class_a", "class_b", "distance"],
                                                  [names[0], names[3], 1], [names[2], names[5], 1]])
    bom = write_pairs_file(tmp_path / "bom.csv", [["class_a", "class_b", "distance"],
                                                  [names[0], names[3], 1],
                                                  [names[2], names[5], 1]], encoding="utf-8-sig")
    moved = write_pairs_file(tmp_path / "moved.csv", [["rank", "class_b", "distance", " class_a "],
                                                      [1, names[3], 1, names[0]], [],
                                                      [2, names[5], 1, names[2]]])
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    expected = [(0, 3), (2, 5)]
    assert read_pairs(plain, net) == read_pairs(bom, net) == read_pairs(moved, net) == expected


@pytest.mark.parametrize("rows,needle", [
    ([["class_a", "class_b"], ["N0", "N0"]], "line 2: a class appears twice in one tuple"),
    ([["class_a", "class_b", "class_c"], ["N0", "N1", "N0"]], "appears twice"),
    ([["class_a", "class_b"], ["N0", "nobody"]], "line 2: unknown class 'nobody'"),
    ([["class_a", "klass_b"], ["N0", "N1"]], "no column 'class_b'"),
    ([["class_a", "class_b"]], "no pairs"),
    ([], "no column 'class_a'"),
    ([["class_a", "class_b"], ["N0", "N1"], ["N0"]], "line 3: 1 fields, the header has 2"),
    ([["class_a", "class_b"], ["N0", ""]], "line 2: empty class_b"),
])
def test_bad_pairs_files_give_one_clear_line(gen, tmp_path, rows, needle):
    snapshot, _, names = gen
    rows = [[{"N0": names[0], "N1": names[1]}.get(v, v) for v in row] for row in rows]
    pairs = write_pairs_file(tmp_path / "p.csv", rows)
    assert_one_error_line(
        error_of(["--net", snapshot, "--pairs", pairs, *SAMPLE, "--out", tmp_path / "o"]), needle)
    assert not (tmp_path / "o").exists()

# ----------------------------------------------------------------------------- the output folder


@pytest.mark.parametrize("argv,needle", [
    (["--batch-size", 0], "--batch-size: must be a positive integer, got 0"),
    (["--per-pair", -3], "--per-pair: must be a positive integer"),
    (["--steps", 0], "--steps: must be a positive integer"),
    (["--alpha", 1.5], "--alpha: must be a number in [0, 1]"),
    (["--alpha", "nan"], "--alpha: not a finite number"),
    (["--churn", -1], "--churn: must be a number >= 0"),
    (["--seed", -1], "--seed: must be an integer >= 0"),
    (["--weights", 0.5, -0.5], "--weights: must be a number >= 0"),
    (["--guidance", "inf"], "--guidance: not a finite number"),
    (["--steps", "ten"], "--steps: not an integer: 'ten'"),
])
def test_numeric_flags_are_checked_at_the_door(gen, tmp_path, capsys, argv, needle):
    snapshot, pairs, _ = gen
    with pytest.raises(SystemExit) as e:
        main([*map(str, ["--net", snapshot, "--pairs", pairs, "--out", tmp_path / "o", *argv])])
    assert e.value.code == 2
    assert_one_error_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "o").exists()


def test_an_output_that_is_a_file_or_read_only_is_refused_before_any_work(gen, tmp_path):
    snapshot, pairs, _ = gen
    (tmp_path / "file").write_text("keep me")
    assert_one_error_line(
        error_of(["--net", snapshot, "--pairs", pairs, "--out", tmp_path / "file"]),
        "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "keep me"
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        for out in (tmp_path / "ro", tmp_path / "ro" / "new"):
            assert_one_error_line(error_of(["--net", snapshot, "--pairs", pairs, "--out", out]),
                                  "not writable")
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert os.listdir(tmp_path / "ro") == []


def test_a_half_written_or_foreign_identity_folder_is_never_overwritten(gen, tmp_path):
    snapshot, pairs, names = gen
    out = tmp_path / "o"
    (out / f"mix_{names[0]}_{names[3]}").mkdir(parents=True)
    (out / f"mix_{names[0]}_{names[3]}" / "0.png").write_bytes(b"mine")
    (out / "manifest.csv.123.tmp").write_text("stale")
    text = error_of(["--net", snapshot, "--pairs", pairs, *SAMPLE, "--out", out])
    assert_one_error_line(text,
                          f"mix_{names[0]}_{names[3]} exists but is not a complete identity folder")
    assert (out / f"mix_{names[0]}_{names[3]}" / "0.png").read_bytes() == b"mine"
    # the stale temporary file is gone
    assert sorted(os.listdir(out)) == [f"mix_{names[0]}_{names[3]}"]


def test_a_second_writer_on_the_same_out_stops_at_once(gen, tmp_path):
    from common import output_lock
    snapshot, pairs, _ = gen
    out = tmp_path / "o"
    with output_lock(str(out)):
        text = error_of(["--net", snapshot, "--pairs", pairs, *SAMPLE, "--out", out])
        assert_one_error_line(text, f"--out {out} is in use by another process (pid {os.getpid()})")
        assert os.listdir(out) == [".lock"]
    assert not out.exists()  # the lock and the folder it made are gone: nothing was written
    (tmp_path / "o").mkdir()
    (out / ".lock").write_text("999999999\n")  # left by a process that no longer exists
    r = run_script("scoremix_sample.py", "--net", snapshot, "--pairs", pairs, *SAMPLE, "--out", out,
                   env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ".lock" not in os.listdir(out) and "manifest.csv" in os.listdir(out)

# --------------------------------------------------------------------- kill and resume, two writers


# a few seconds on one core
SLOW = ["--guide", None, "--per-pair", 8, "--steps", 12, "--batch-size", 2]


def slow_args(gen, out):
    snapshot, pairs, _ = gen
    return ["--net", snapshot, "--pairs", pairs, *[snapshot if a is None else a for a in SLOW],
            "--out", out]


def start(args):
    cmd = [sys.executable, os.path.join(ROOT, "scoremix_sample.py"), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=ROOT)


def wait_for(condition, process, timeout=120):
    """Poll until condition() or the process ends; -> whether the condition held first."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    raise TimeoutError


def visible_folders(out):
    return ([d for d in os.listdir(out) if not d.startswith(".") and os.path.isdir(out / d)]
            if out.exists() else [])


def partial_images(out):
    return (sum(len(os.listdir(out / d)) for d in os.listdir(out) if d.endswith(".partial"))
            if out.exists() else 0)


@pytest.fixture(scope="module")
def slow_reference(gen, tmp_path_factory):
    out = tmp_path_factory.mktemp("slow") / "ref"
    r = run_script("scoremix_sample.py", *slow_args(gen, out), env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return read_folder(out), (out / "manifest.csv").read_text()


@pytest.mark.parametrize("moment", ["first partial image", "first identity complete"])
def test_a_killed_sampler_resumes_to_the_same_images(gen, slow_reference, tmp_path, moment):
    import signal
    out = tmp_path / "o"
    p = start(slow_args(gen, out))
    when = (lambda: partial_images(out) > 0) if moment == "first partial image" else \
        (lambda: len(visible_folders(out)) > 0)
    killed = wait_for(when, p)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert killed, "the sampler finished before the kill"
    for name in visible_folders(out):  # only complete identities are visible, and no manifest yet
        assert len(os.listdir(out / name)) == 8, name
    assert not (out / "manifest.csv").exists()
    r = run_script("scoremix_sample.py", *slow_args(gen, out), env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    images, manifest = slow_reference
    resumed = read_folder(out)
    assert sorted(resumed) == sorted(images) and (out / "manifest.csv").read_text() == manifest
    for name in images:
        # same seeds, same batches: bit-identical
        assert np.array_equal(resumed[name], images[name]), name
    # no lock, partial or temporary file
    assert sorted(os.listdir(out)) == sorted([*images, "manifest.csv"])


def test_two_writers_on_one_out_give_one_complete_result(gen, slow_reference, tmp_path):
    out = tmp_path / "o"
    first = start(slow_args(gen, out))
    assert wait_for(lambda: (out / ".lock").exists(), first)
    second = run_script("scoremix_sample.py", *slow_args(gen, out), env=ENV)
    seen = visible_folders(out)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    assert second.returncode != 0
    assert_one_error_line(second.stderr, "is in use by another process")
    for name in seen:
        assert len(os.listdir(out / name)) == 8
    images, manifest = slow_reference
    result = read_folder(out)
    assert sorted(result) == sorted(images) and (out / "manifest.csv").read_text() == manifest
    assert all(np.array_equal(result[n], images[n]) for n in images)


def test_a_full_disk_leaves_complete_identities_and_nothing_half_written(gen, tmp_path,
                                                                         monkeypatch):
    import errno
    import scoremix_sample
    snapshot, pairs, _ = gen
    saved, real = [], scoremix_sample.save_png

    def save_until_full(image, path):
        if len(saved) == 4:  # one identity of 3 complete, the second half-written
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(path)
        real(image, path)
    monkeypatch.setattr(scoremix_sample, "save_png", save_until_full)
    out = tmp_path / "o"
    text = error_of(["--net", snapshot, "--pairs", pairs, *SAMPLE, "--out", out])
    assert_one_error_line(text, f"writing {out}: No space left on device")
    # only the complete one
    assert len(os.listdir(out)) == 1 and len(os.listdir(out / os.listdir(out)[0])) == 3
    monkeypatch.setattr(scoremix_sample, "save_png", real)
    # the re-run completes it
    main([*map(str, ["--net", snapshot, "--pairs", pairs, *SAMPLE, "--out", out])])
    assert len(read_folder(out)) == 3 and (out / "manifest.csv").exists()
