"""run_demo.sh end to end in its --smoke size: every stage's plumbing, the report, resuming."""
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT


ENV = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")


def run_demo(out):
    env = ENV
    # the guided path (four snapshots, the first guides) has more plumbing than the unguided default
    return subprocess.run(["bash", os.path.join(ROOT, "run_demo.sh"), "--smoke", "--autoguidance",
                           "1.5", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_demo_smoke_writes_report_and_resumes(tmp_path):
    r = run_demo(tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = (tmp_path / "report.md").read_text().splitlines()
    table = [line for line in report if line.startswith("|")]
    header, rows = table[0], table[2:4]
    assert header.split("|")[-2].strip() == "Toy Avg-H" and "toy_cplfw" in header
    assert rows[0].startswith("| Baseline (real only) |") and rows[1].startswith("| ScoreMix")
    assert all(float(row.split("|")[-2]) > 0 for row in rows)
    assert any("autoguidance weight 1.5 (guide network-snapshot-" in line for line in report)
    for figure in ("alpha_beta.png", "alpha_beta-triplets.png", "data/preview.png"):
        assert (tmp_path / figure).exists()
    # a second run finds every stage done and only rewrites the report
    r = run_demo(tmp_path)
    assert r.returncode == 0 and r.stdout.count("done before, skipped") == 11


def test_demo_killed_mid_way_resumes_and_finishes(tmp_path):
    """The default (unguided) path, killed with its whole process group while ScoreMix sampling
    runs."""
    cmd = ["bash", os.path.join(ROOT, "run_demo.sh"), "--smoke", "--out", str(tmp_path)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                         start_new_session=True)
    for line in p.stdout:
        if line.startswith("== ScoreMix sampling"):
            time.sleep(1.0)
            os.killpg(p.pid, signal.SIGKILL)
            break
    p.wait(timeout=60)
    p.stdout.close()
    assert p.returncode == -signal.SIGKILL and not (tmp_path / "report.md").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for stage in ("toy faces", "baseline discriminator", "generator", "distant pairs"):
        assert f"== {stage}: done before, skipped" in r.stdout
    assert "== ScoreMix sampling\n" in r.stdout and (tmp_path / "report.md").exists()
    assert "autoguidance weight 1;" in (tmp_path / "report.md").read_text()
