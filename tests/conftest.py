"""Shared fixtures: a tiny toy-face set made once per test session by the real CLI."""
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


@pytest.fixture(scope="session")
def tiny_toy(tmp_path_factory):
    """6 training identities x 6 images at 32 px, 40 pairs per benchmark (a few seconds)."""
    out = tmp_path_factory.mktemp("toy")
    r = run_script("toy_faces.py", "--out", out, "--identities", 6, "--per-identity", 6,
                   "--test-identities", 12, "--pairs", 40, "--heldout", 2, "--seed", 0)
    assert r.returncode == 0, r.stderr
    return out
