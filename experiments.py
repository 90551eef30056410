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

from evaluate import write_json

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
                "train_loop_seconds": round(log[-1]["elapsed"], 1),
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


def generator(args):
    """The generator issue's measurements: train the CPU-preset generator once on the default toy set,
    then for every snapshot sample the real classes (Repro) and measure identity consistency and
    cleanliness under the baseline discriminator, next to fresh real renders (heldout/)."""
    data = toy_data(args.identities)
    baseline = os.path.join(RUNS, "calibration", f"real-n{args.identities}-seed0", "model.pt")
    if not os.path.exists(baseline):
        sys.exit("error: run `python experiments.py calibration` first (its seed-0 baseline judges the samples)")
    run = os.path.join(RUNS, "generator", args.name)
    t0 = time.time()
    sh("train_diffusion.py", "--data", os.path.join(data, "train"), "--heldout", os.path.join(data, "heldout"),
       "--out", run, "--duration", args.kimg, "--snapshot-every", args.snapshot_every, *args.extra)
    train_seconds = time.time() - t0
    with open(os.path.join(run, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    for snap in sorted(glob.glob(os.path.join(run, "network-snapshot-*.pt"))):
        kimg = int(os.path.basename(snap)[17:23])
        result_path = os.path.join(RESULTS, "generator", f"{args.name}-kimg{kimg:06d}.json")
        if os.path.exists(result_path):
            print(f"skip {result_path} (exists)")
            continue
        samples = os.path.join(run, f"repro-{kimg:06d}")
        t1 = time.time()
        sh("scoremix_sample.py", "--mode", "repro", "--net", snap, "--per-pair", args.per_class, "--steps", args.steps,
           "--out", samples)
        sample_seconds = time.time() - t1
        sh("evaluate.py", "--consistency", samples, os.path.join(data, "heldout"), "--data", os.path.join(data, "train"),
           "--model", baseline, "--out", samples + ".json")
        with open(samples + ".json") as f:
            cons = json.load(f)["samples"]
        gen, real = cons[samples], cons[os.path.join(data, "heldout")]
        denoise = [e for e in log if "denoise_rms" in e and abs(e["kimg"] - kimg) < 1]
        speed = [e["images_per_s"] for e in log if "images_per_s" in e]
        write_json({"run": args.name, "kimg": kimg, "snapshot": os.path.relpath(snap, ROOT), "steps": args.steps,
                    "consistency": gen["consistency"], "real_consistency": real["consistency"],
                    "neighbour_ratio": gen["neighbour_ratio"], "real_neighbour_ratio": real["neighbour_ratio"],
                    "sample_images_per_s": round(gen["images"] / sample_seconds, 2),
                    "train_images_per_s": float(np.median(speed)) if speed else None,
                    "train_seconds_this_sitting": round(train_seconds, 1),
                    "denoise_rms": denoise[-1]["denoise_rms"] if denoise else None,
                    "mean_image_rms": denoise[-1]["mean_image_rms"] if denoise else None}, result_path)


def repro_check(args):
    """The generator issue's usefulness check: the baseline recipe on real + Repro samples of the real
    classes (labelled as those classes, as many images as the real set) against real only."""
    data = toy_data(args.identities)
    run = os.path.join(RUNS, "generator", args.name)
    snap = sorted(glob.glob(os.path.join(run, "network-snapshot-*.pt")))[-1]
    samples = os.path.join(run, "repro-full")
    per_class = len(os.listdir(os.path.join(data, "train", sorted(os.listdir(os.path.join(data, "train")))[0])))
    t0 = time.time()
    sh("scoremix_sample.py", "--mode", "repro", "--net", snap, "--per-pair", per_class, "--steps", args.steps,
       "--out", samples, "--seed", 1)  # seed 1: other images than the consistency samples
    note = f"{os.path.relpath(snap, ROOT)}, {per_class} Repro images per class, {args.steps} steps, " \
           f"sampling {time.time() - t0:.0f} s this sitting"
    for seed in args.seeds:
        discriminator_run("repro_check", f"real+repro-{args.name}", seed, [os.path.join(data, "train"), samples],
                          os.path.join(data, "bench"), extra=["--merge-by-name", "--val-every", "24"], note=note)


def generator_table(rows):
    runs = sorted((r for rs in rows.values() for r in rs), key=lambda r: (r["run"], r["kimg"]))
    sigmas = ("0.002", "0.05", "0.2", "1", "5", "80")
    print("| run | kimg | consistency % (real held-out) | neighbour ratio (real held-out) | Repro images/s | "
          + " | ".join(f"RMS at {s}" for s in sigmas) + " |")
    print("|---" * (5 + len(sigmas)) + "|")
    for r in runs:
        d = r["denoise_rms"] or {}
        print(f"| {r['run']} | {r['kimg']} | {r['consistency']:.1f} ({r['real_consistency']:.1f}) | "
              f"{r['neighbour_ratio']:.2f} ({r['real_neighbour_ratio']:.2f}) | {r['sample_images_per_s']:.2f} | "
              + " | ".join(f"{d[s]:.4f}" if s in d else "" for s in sigmas) + " |")
    print(f"\ntrivial denoisers: RMS = sigma (D = noisy input); {runs[-1]['mean_image_rms']:.4f} (D = mean image)")


def load_results(group):
    rows = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, group, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        rows.setdefault(r.get("row", r.get("run")), []).append(r)
    return rows


def mean_std(values):
    return f"{np.mean(values):.1f} +- {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def table(args):
    rows = load_results(args.group)
    if not rows:
        sys.exit(f"error: no results under results/{args.group}")
    if args.group == "generator":
        return generator_table(rows)
    print("| row | seeds | epochs | steps | train s (loop) | " + " | ".join(BENCH) + " | Toy Avg-H |")
    print("|---" * (len(BENCH) + 6) + "|")
    for row, runs in rows.items():
        cells = [mean_std([r["accuracy"][b] for r in runs]) for b in BENCH]
        print(f"| {row} | {len(runs)} | {runs[0]['epochs']} | {runs[0]['steps']} | "
              f"{np.mean([r.get('train_loop_seconds', np.nan) for r in runs]):.0f} | " + " | ".join(cells) +
              f" | {mean_std([r['avg'] for r in runs])} |")
    print("\nToy Avg-H over epochs (mean over seeds):\n")
    epochs = [c["epoch"] for c in next(iter(rows.values()))[0]["curve"]]
    print("| row | " + " | ".join(f"ep {e}" for e in epochs) + " |")
    print("|---" * (len(epochs) + 1) + "|")
    for row, runs in rows.items():
        curves = [[np.mean([c[b] for b in BENCH]) for c in r["curve"]] for r in runs]
        length = min(map(len, curves))
        print(f"| {row} | " + " | ".join(f"{np.mean([c[i] for c in curves]):.1f}" for i in range(length)) + " |")


def demo_report(args):
    """runs/demo/report.md from the demo's JSON outputs: the results table first (DESIGN.md)."""
    out = args.run
    with open(os.path.join(out, "eval.json")) as f:
        models = json.load(f)["models"]
    lines = ["# ScoreMix demo report", "", "| Discriminator | " + " | ".join(BENCH) + " | Toy Avg-H |",
             "|---" * (len(BENCH) + 2) + "|"]
    for name, scores in models.items():
        cells = [f"{scores[b]['accuracy']:.1f} +- {scores[b]['std']:.1f}" for b in BENCH]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.mean([scores[b]['accuracy'] for b in BENCH]):.1f} |")
    avgs = [np.mean([s[b]["accuracy"] for b in BENCH]) for s in models.values()]
    if len(avgs) == 2:
        verdict = "beats" if avgs[1] > avgs[0] else "does not beat"
        lines += ["", f"ScoreMix {verdict} the baseline in this run ({avgs[1] - avgs[0]:+.1f} points Toy Avg-H, one "
                      "seed each; the replication measures seed spread and the controls)."]
    with open(os.path.join(out, "consistency.json")) as f:
        cons = json.load(f)
    lines += ["", "Generated images under the baseline discriminator (identity consistency: share of images whose "
                  "nearest class centre is their own class; neighbour ratio: mean neighbouring-pixel difference "
                  "over that of the real training images):", "",
              "| Images | Consistency (%) | Neighbour ratio |", "|---|---|---|"]
    for d, r in cons["samples"].items():
        c = "n/a (new identities)" if r["consistency"] is None else f"{r['consistency']:.1f}"
        lines.append(f"| {os.path.relpath(d, out)} | {c} | {r['neighbour_ratio']:.2f} |")
    with open(os.path.join(out, "cka.json")) as f:
        cka = json.load(f)["pairs"][0]
    lines += ["", f"Condition space vs baseline embedding space ({cka['a']}): CKA {cka['cka']:.3f} "
                  f"(permutation null {cka['null']['cka']['mean']:.3f} +- {cka['null']['cka']['std']:.3f}), "
                  f"CKNNA {cka['cknna']:.3f} (null {cka['null']['cknna']['mean']:.3f} +- "
                  f"{cka['null']['cknna']['std']:.3f}).", "",
              "Figures: `data/preview.png` (toy faces), `data/bench_preview.png` (benchmark pairs), "
              "`generator/samples-*.png` (class-conditional samples, rows = classes), `alpha_beta.png` "
              "(alpha x beta sweep, paper Fig. 2), `alpha_beta-triplets.png` (Repro A | ScoreMix | Repro B, Fig. 3).",
              "", "| Stage | Wall time (s) |", "|---|---|"]
    with open(os.path.join(out, "stage_times.tsv")) as f:
        times = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    lines += [f"| {name} | {sec} |" for name, sec in times]
    lines.append(f"| total | {sum(int(sec) for _, sec in times)} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    print(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("calibration", help="baseline vs 2x real identities (the oracle)")
    p.add_argument("--identities", type=int, default=32, help="N: the default toy set's identities")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="discriminator seeds")
    p.set_defaults(func=calibration)
    p = sub.add_parser("generator", help="train the CPU generator once; consistency and cleanliness per snapshot")
    p.add_argument("--identities", type=int, default=32, help="N: the default toy set's identities")
    p.add_argument("--name", default="cpu-150k", help="run name (runs/exp/generator/NAME)")
    p.add_argument("--kimg", type=float, default=150, help="training length")
    p.add_argument("--snapshot-every", type=float, default=25, help="snapshot interval in kimg")
    p.add_argument("--per-class", type=int, default=8, help="Repro samples per class for the consistency figure")
    p.add_argument("--steps", type=int, default=32, help="Heun steps")
    p.add_argument("extra", nargs="*", help="more train_diffusion.py flags (after --)")
    p.set_defaults(func=generator)
    p = sub.add_parser("repro-check", help="baseline recipe on real + Repro samples of the last snapshot")
    p.add_argument("--identities", type=int, default=32, help="N: the default toy set's identities")
    p.add_argument("--name", default="cpu-150k", help="generator run name")
    p.add_argument("--steps", type=int, default=32, help="Heun steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="discriminator seeds")
    p.set_defaults(func=repro_check)
    p = sub.add_parser("table", help="print the markdown tables of one results group")
    p.add_argument("group", help="results/<group>")
    p.set_defaults(func=table)
    p = sub.add_parser("demo-report", help="write RUN/report.md from run_demo.sh's outputs")
    p.add_argument("run", help="the demo's output folder (runs/demo)")
    p.set_defaults(func=demo_report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
