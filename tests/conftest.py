"""Shared fixtures: a tiny toy-face set made once per test session by the real CLI."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_script(script, *args, env=None, timeout=300):
    """Run one of the repo's scripts with this interpreter; return the CompletedProcess."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def one_error_line(main, argv, capsys):
    """main(argv) in this process -> its single stderr / exit line, which must start with `error:
    `."""
    with pytest.raises(SystemExit) as e:
        main([*map(str, argv)])
    assert e.value.code not in (0, None)
    text = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text, text
    return lines[0]


def last_snapshot(run):
    """The latest network-snapshot-*.pt of a generator run folder (names sort in training order)."""
    snaps = sorted(glob.glob(os.path.join(str(run), "network-snapshot-*.pt")))
    assert snaps, f"no snapshot in {run}"
    return type(run)(snaps[-1]) if not isinstance(run, str) else snaps[-1]


@pytest.fixture(scope="session")
def tiny_toy(tmp_path_factory):
    """6 training identities x 6 images at 32 px, 40 pairs per benchmark (a few seconds)."""
    out = tmp_path_factory.mktemp("toy")
    r = run_script("toy_faces.py", "--out", out, "--identities", 6, "--per-identity", 6,
                   "--test-identities", 12, "--pairs", 40, "--heldout", 2, "--seed", 0)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_toy, tmp_path_factory):
    """A 4-step discriminator model.pt and a tiny generator snapshot (16 px, 8 channels, null class)
    on the tiny toy set, trained once per test session by the real CLIs (about 10 s)."""
    out = tmp_path_factory.mktemp("tiny_models")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = run_script("train_arcface.py", "--data", tiny_toy / "train", "--out", out / "fr", "--steps",
                   4, "--width", 0.125, "--embedding-size", 16, "--batch-size", 8, env=env)
    assert r.returncode == 0, r.stderr
    r = run_script("train_diffusion.py", "--data", tiny_toy / "train", "--out", out / "gen",
                   "--resolution", 16, "--channels", 8, "--channel-mult", 1, 2, "--batch-size", 8,
                   "--duration", 0.05, "--snapshot-every", 0, "--label-dropout", 0.25,
                   "--grid-steps", 2, env=env)
    assert r.returncode == 0, r.stderr
    return out / "fr" / "model.pt", last_snapshot(out / "gen")


def poisoned_copy(src, dst, key=None, value=float("nan")):
    """A copy of a model.pt ("state_dict") or network snapshot ("ema") with one weight entry set to
    `value` (default NaN): the first floating-point entry, or the one named `key`."""
    import torch
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"] if "state_dict" in ckpt else ckpt["ema"]
    key = key or next(k for k, v in state.items() if v.is_floating_point())
    flat = state[key].clone().reshape(-1)
    flat[0] = value
    state[key] = flat.reshape(state[key].shape)
    torch.save(ckpt, dst)
    return dst, key
