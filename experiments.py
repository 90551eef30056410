"""Long experiments on the toy faces, resumable across sittings.

Every run writes one small JSON file under results/<group>/ (config, seed, per-benchmark accuracy,
wall time) and is skipped when that file exists, so re-running a group continues where it stopped.
Run outputs (data, checkpoints) go to runs/exp/ and are not committed; the JSON results are.

    python experiments.py calibration          # baseline (N identities) vs oracle (2N), 3 seeds
    python experiments.py table calibration    # the markdown tables the README shows
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))
BENCH = ("toy_lfw", "toy_cfp_fp", "toy_agedb", "toy_calfw", "toy_cplfw")
RUNS = os.path.join(ROOT, "runs", "exp")
RESULTS = os.path.join(ROOT, "results")


def sh(*cmd):
    """Run a stage script with this interpreter; stream its output; stop on failure."""
    cmd = [sys.executable, *map(str, cmd)]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def toy_data(identities, seed=0):
    out = os.path.join(RUNS, "data", f"toy-n{identities}-s{seed}")
    sh("toy_faces.py", "--out", out, "--identities", identities, "--seed", seed)  # skips if complete
    return out


def write_json(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def discriminator_run(group, row, seed, data_dirs, bench_dir, extra=(), note=""):
    """Train one discriminator on `data_dirs`, evaluate it on the five toy benchmarks, record it."""
    result_path = os.path.join(RESULTS, group, f"{row}-seed{seed}.json")
    if os.path.exists(result_path):
        print(f"skip {result_path} (exists)")
        return
    run = os.path.join(RUNS, group, f"{row}-seed{seed}")
    bins = [os.path.join(bench_dir, f"{b}.bin") for b in BENCH]
    t0 = time.time()
    sh("train_arcface.py", "--data", *data_dirs, "--out", run, "--seed", seed, "--val", *bins, *extra)
    train_seconds = time.time() - t0
    sh("evaluate.py", "--model", os.path.join(run, "model.pt"), "--bin", *bins, "--names", row,
       "--out", os.path.join(run, "eval.json"))
    with open(os.path.join(run, "eval.json")) as f:
        scores = json.load(f)["models"][row]
    with open(os.path.join(run, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    curve = [{"epoch": e["epoch"], "loss": e["loss"], **e["val"]} for e in log if "val" in e]
    write_json({"group": group, "row": row, "seed": seed, "note": note, "data": data_dirs, "extra": list(extra),
                "steps": log[-1]["step"], "epochs": log[-1]["epoch"], "train_seconds": round(train_seconds, 1),
                "accuracy": {b: scores[b]["accuracy"] for b in BENCH},
                "tar_at_far_1e-3": {b: scores[b]["tar_at_far_1e-3"] for b in BENCH},
                "avg": float(np.mean([scores[b]["accuracy"] for b in BENCH])), "curve": curve}, result_path)


def calibration(args):
    """DESIGN.md, "What the toy benchmark must be able to show", point 1: the default baseline
    sits at 75-90% and twice as many real identities gain >= 3 points Toy Avg-H."""
    n = args.identities
    base, oracle = toy_data(n), toy_data(2 * n)
    for seed in args.seeds:
        discriminator_run("calibration", f"real-n{n}", seed, [os.path.join(base, "train")],
                          os.path.join(base, "bench"), extra=["--val-every", "2"])
        discriminator_run("calibration", f"real-n{2 * n}", seed, [os.path.join(oracle, "train")],
                          os.path.join(base, "bench"), extra=["--val-every", "2"])


def load_results(group):
    rows = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, group, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        rows.setdefault(r["row"], []).append(r)
    return rows


def mean_std(values):
    return f"{np.mean(values):.1f} +- {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def table(args):
    rows = load_results(args.group)
    if not rows:
        sys.exit(f"error: no results under results/{args.group}")
    print("| row | seeds | epochs | steps | train s | " + " | ".join(BENCH) + " | Toy Avg-H |")
    print("|---" * (len(BENCH) + 6) + "|")
    for row, runs in rows.items():
        cells = [mean_std([r["accuracy"][b] for r in runs]) for b in BENCH]
        print(f"| {row} | {len(runs)} | {runs[0]['epochs']} | {runs[0]['steps']} | "
              f"{np.mean([r['train_seconds'] for r in runs]):.0f} | " + " | ".join(cells) +
              f" | {mean_std([r['avg'] for r in runs])} |")
    print("\nToy Avg-H over epochs (mean over seeds):\n")
    epochs = [c["epoch"] for c in next(iter(rows.values()))[0]["curve"]]
    print("| row | " + " | ".join(f"ep {e}" for e in epochs) + " |")
    print("|---" * (len(epochs) + 1) + "|")
    for row, runs in rows.items():
        curves = [[np.mean([c[b] for b in BENCH]) for c in r["curve"]] for r in runs]
        length = min(map(len, curves))
        print(f"| {row} | " + " | ".join(f"{np.mean([c[i] for c in curves]):.1f}" for i in range(length)) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("calibration", help="baseline vs 2x real identities (the oracle)")
    p.add_argument("--identities", type=int, default=32, help="N: the default toy set's identities")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="discriminator seeds")
    p.set_defaults(func=calibration)
    p = sub.add_parser("table", help="print the markdown tables of one results group")
    p.add_argument("group", help="results/<group>")
    p.set_defaults(func=table)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
