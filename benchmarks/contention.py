"""CPU training speed of the cpu-preset generator alone and beside one competing busy process, with
OpenMP's default (spinning) and passive waiting, side by side in one run.

    python benchmarks/contention.py --data data/toy/train [--kimg 2]

On a 2-core machine a busy neighbour takes one core; PyTorch's OpenMP threads then spin-wait for
each other at every parallel region while the neighbour holds the core they wait for. Rows: images/s
(median of the status lines after the first) and the ratio to the default run alone."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_speed(data, kimg, env_extra):
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(ROOT, "train_diffusion.py"), "--data", data, "--out",
               out, "--duration", str(kimg), "--snapshot-every", "0", "--checkpoint-every", "0",
               "--status-every", "0.256"]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **env_extra})
        with open(os.path.join(out, "log.jsonl")) as f:
            speeds = [json.loads(line)["images_per_s"] for line in f if "images_per_s" in line]
    return statistics.median(speeds[1:] or speeds)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True,
                   help="toy training images (python toy_faces.py --out D: D/train)")
    p.add_argument("--kimg", type=float, default=2, help="training length of each run")
    args = p.parse_args()
    cases = [("alone", {}, False), ("alone", {"OMP_WAIT_POLICY": "PASSIVE"}, False),
             ("beside a busy process", {}, True),
             ("beside a busy process", {"OMP_WAIT_POLICY": "PASSIVE"}, True),
             ("beside a busy process", {"OMP_NUM_THREADS": "1"}, True)]
    print(f"{os.cpu_count()} cores\n\n| run | environment | images/s | vs default alone "
          "|\n|---|---|---|---|")
    base = None
    for name, env, busy in cases:
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            speed = train_speed(args.data, args.kimg, env)
        finally:
            if neighbour:
                neighbour.kill()
        base = base or speed
        label = " ".join(f"{k}={v}" for k, v in env.items()) or "default"
        print(f"| {name} | {label} | {speed:.1f} | {speed / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
