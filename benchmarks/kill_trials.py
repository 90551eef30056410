"""Kill-and-resume and two-writer trials of the three long-running stages, on tiny runs.

For each stage: one uninterrupted reference run; then --trials runs killed (SIGKILL) at a random
moment of the reference's wall time and re-run by the same command to the end, each compared with
the reference (the trainers: every weight of the final checkpoint, the snapshots and the log's
records; the sampler: every image and the manifest); then --trials pairs of processes started on one
output (the second after a random delay): where they overlap, one must stop with one `error:` line
saying the output is in use (else the second finds the result complete), and the output must be the
reference's result. One thread per process, so the runs can be compared bit for bit.

    python benchmarks/kill_trials.py --trials 10
"""
import argparse
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# fields of timing and of the output path
IGNORED = {"images_per_s", "time", "elapsed", "seconds", "out"}


def command(script, *args):
    return [sys.executable, os.path.join(ROOT, script), *map(str, args)]


def run(cmd, env=ENV):
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"error: {' '.join(cmd[1:3])} failed: {r.stderr.strip().splitlines()[-1:]}")


def digest(out):
    """What a run produced, compared across runs: a hash of every result file (temporary, lock and
    timing data aside; JSON records without their timing fields)."""
    result = {}
    for path in sorted(glob.glob(os.path.join(out, "**", "*"), recursive=True)):
        name = os.path.relpath(path, out)
        if (os.path.isdir(path) or name.endswith((".tmp", ".lock"))
                or os.path.basename(name) == "config.json"):
            continue
        if name.endswith(".jsonl"):
            records = [json.loads(line) for line in open(path)]
            data = json.dumps([{k: v for k, v in r.items() if k not in IGNORED}
                               for r in records]).encode()
        elif name.endswith(".json"):
            record = json.load(open(path))
            if isinstance(record, dict):
                record = {k: v for k, v in record.items() if k not in IGNORED}
            data = json.dumps(record).encode()
        elif name.endswith(".pt"):
            import torch  # tensors by value: the pickle's bytes also hold storage names
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            data = repr(sorted(flatten(ckpt))).encode()
        else:
            data = open(path, "rb").read()
        result[name] = hashlib.sha1(data).hexdigest()
    return result


def flatten(obj, prefix=""):
    """(key, value) pairs of a nested checkpoint, tensors as (dtype, shape, bytes); timing entries
    aside."""
    import torch
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() if k not in IGNORED
                for kv in flatten(v, f"{prefix}/{k}")]
    if isinstance(obj, (list, tuple)):
        return [kv for i, v in enumerate(obj) for kv in flatten(v, f"{prefix}/{i}")]
    if isinstance(obj, torch.Tensor):
        t = obj.detach().contiguous().reshape(-1)
        return [(prefix, (str(t.dtype), tuple(obj.shape), t.view(torch.uint8).numpy().tobytes()))]
    return [(prefix, repr(obj))]


def kill_trial(cmd, out, seconds, rng):
    """Start, SIGKILL at a random moment, re-run to the end -> (killed before the end, its
    digest)."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=rng.uniform(0.05, 0.95) * seconds)
        killed = False
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
        killed = True
    run(cmd)
    return killed, digest(out)


def two_writers(cmd, seconds, rng):
    """Two processes on one output -> (exit codes, the loser's stderr)."""
    first = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    time.sleep(rng.uniform(0, 0.5) * seconds)
    second = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    errs = [p.communicate()[1] for p in (first, second)]
    codes = [first.returncode, second.returncode]
    return codes, errs[codes.index(max(codes))]


def stages(work, env=ENV):
    """(name, command writing `out`) of each stage, after the shared inputs are made."""
    toy = os.path.join(work, "toy")
    run(command("toy_faces.py", "--out", toy, "--identities", 6, "--per-identity", 6,
                "--test-identities", 4, "--pairs", 4, "--heldout", 0), env)
    data = os.path.join(toy, "train")
    gen = os.path.join(work, "gen")
    diffusion = lambda out: command(  # noqa: E731
        "train_diffusion.py", "--data", data, "--out", out, "--resolution", 16, "--channels", 8,
        "--channel-mult", 1, 2, "--batch-size", 8, "--duration", 0.4, "--checkpoint-every", 0.04,
        "--snapshot-every", 0.1, "--status-every", 0.04, "--label-dropout", 0.2, "--grid-steps", 4)
    run(diffusion(gen), env)
    snapshot = sorted(glob.glob(os.path.join(gen, "network-snapshot-*.pt")))[-1]
    pairs = os.path.join(work, "pairs.csv")
    with open(pairs, "w") as f:
        f.write("class_a,class_b\n" + "".join(f"id{i:05d},id{i + 3:05d}\n" for i in range(3)))
    return [
        ("train_arcface.py", lambda out: command("train_arcface.py", "--data", data, "--out", out,
                                                 "--epochs", 40, "--checkpoint-every", 7, "--width",
                                                 0.125, "--embedding-size", 16, "--batch-size", 8)),
        ("train_diffusion.py", diffusion),
        ("scoremix_sample.py", lambda out: command("scoremix_sample.py", "--net", snapshot,
                                                   "--pairs", pairs, "--per-pair", 6, "--steps", 12,
                                                   "--batch-size", 2, "--out", out))]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10,
                        help="kill trials and two-writer trials per stage")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the kill moments and start delays")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="kill_trials_")
    try:
        print(f"{'stage':20s} {'reference s':>11s} {'killed':>7s} {'identical':>9s} "
              f"{'two writers: one stopped (in use)':>34s} {'in turn':>8s} {'identical':>9s}")
        for name, cmd in stages(work):
            t0 = time.time()
            run(cmd(os.path.join(work, name, "reference")))
            seconds = time.time() - t0
            reference = digest(os.path.join(work, name, "reference"))
            killed = same = stopped = in_turn = same_writers = 0
            for i in range(args.trials):
                out = os.path.join(work, name, f"kill{i}")
                k, result = kill_trial(cmd(out), out, seconds, rng)
                killed, same = killed + k, same + (result == reference)
                out = os.path.join(work, name, f"writers{i}")
                codes, loser = two_writers(cmd(out), seconds, rng)
                stopped += sorted(codes)[0] == 0 and sorted(codes)[1] != 0 and "in use" in loser \
                    and len(loser.strip().splitlines()) == 1
                in_turn += codes == [0, 0]
                same_writers += digest(out) == reference
            n = args.trials
            print(f"{name:20s} {seconds:11.1f} {killed:>4d}/{n:<2d} {same:>6d}/{n:<2d} "
                  f"{stopped:>31d}/{n:<2d} "
                  f"{in_turn:>5d}/{n:<2d} {same_writers:>6d}/{n:<2d}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
