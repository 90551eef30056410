"""Long experiments on the toy faces, resumable: a re-run continues where the last one stopped.

Every run writes one small JSON file under results/<group>/ (config, seed, per-benchmark accuracy,
wall time) and is skipped when that file exists, so re-running a group continues where it stopped.
Run outputs (data, checkpoints) go to runs/exp/ and are not committed; the JSON results are.

    python experiments.py calibration          # baseline (N identities) vs oracle (2N), 3 seeds
    python report.py table calibration    # the markdown tables the README shows
"""
import argparse
import csv
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

from common import write_atomic, write_json

ROOT = os.path.dirname(os.path.abspath(__file__))
BENCH = ("toy_lfw", "toy_cfp_fp", "toy_agedb", "toy_calfw", "toy_cplfw")
RUNS = os.path.join(ROOT, "runs", "exp")
RESULTS = os.path.join(ROOT, "results")
MERGE = ["--merge-by-name"]  # Repro images join their real classes
# The 32-identity regime (calibration, generator, repro_check, replication) was trained with the
# ArcFace gradient of arcface_torch 2022, the default when its results were made: its commands pin
# it so that they reproduce them. The paper's regime (regime-*) trains with the current default.
SMALL_REGIME = ["--margin-grad", "textbook"]


def sh(*cmd):
    """Run a stage script with this interpreter; stream its output; stop on failure."""
    cmd = [sys.executable, *map(str, cmd)]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def toy_data(identities, seed=0, per_identity=None):
    """The default toy set (or one with more images per identity: the first ones are the same
    images)."""
    out = os.path.join(
        RUNS, "data",
        f"toy-n{identities}" + (f"-p{per_identity}" if per_identity else "") + f"-s{seed}")
    more = ["--per-identity", per_identity] if per_identity else []
    # skips if complete
    sh("toy_faces.py", "--out", out, "--identities", identities, "--seed", seed, *more)
    return out


def images_per_identity(folder):
    """Images in the first identity folder of an image-folder dataset (the toy sets are
    balanced)."""
    return len(os.listdir(os.path.join(folder, sorted(os.listdir(folder))[0])))


def guide_flags(run, guide_kimg, guidance):
    """scoremix_sample.py flags of autoguidance by the run's own snapshot at guide_kimg (none
    without it)."""
    if not guide_kimg:
        return []
    return ["--guide", os.path.join(run, f"network-snapshot-{guide_kimg:06.0f}.pt"), "--guidance",
            guidance]


def measure_samples(samples, data, model):
    """Consistency, cleanliness, identity spread and nearest-real distance of a sample folder under
    a discriminator, next to the held-out real renders (evaluate.py --consistency; SAMPLES.json)."""
    sh("evaluate.py", "--consistency", samples, os.path.join(data, "heldout"), "--data",
       os.path.join(data, "train"), "--model", model, "--out", samples + ".json")
    with open(samples + ".json") as f:
        stats = json.load(f)
    return {
        "samples": stats["samples"][samples],
        "real_heldout": stats["samples"][os.path.join(data, "heldout")],
        "real_train": {"intra_cosine": stats["real_intra_cosine"],
                       "inter_cosine": stats["real_inter_cosine"]}}


def discriminator_run(group, row, seed, data_dirs, bench_dir, extra=(), note="", result_name=None,
                      need_model=False, bench=BENCH, allpairs=None, val=None, **fields):
    """Train one discriminator on `data_dirs`, evaluate it on the five toy benchmarks (`bench`:
    their names in bench_dir; `val`: the .bin files scored during training, default those) and
    optionally the all-pairs set, record it. -> its model.pt. A recorded run is skipped; with
    need_model, one whose run folder is gone (a new checkout: runs/ is not committed) is retrained
    by the same seeded command and not re-recorded."""
    result_path = os.path.join(RESULTS, group, f"{result_name or row}-seed{seed}.json")
    run = os.path.join(RUNS, group, f"{result_name or row}-seed{seed}")
    model = os.path.join(run, "model.pt")
    bins = [os.path.join(bench_dir, f"{b}.bin") for b in bench]
    recorded = os.path.exists(result_path)
    if recorded:
        print(f"skip {result_path} (exists)")
        if not need_model or os.path.exists(model):
            return model
    t0 = time.time()
    sh("train_arcface.py", "--data", *data_dirs, "--out", run, "--seed", seed, "--val",
       *(val or bins), *extra)
    train_seconds = time.time() - t0
    if recorded:
        return model
    sh("evaluate.py", "--model", os.path.join(run, "model.pt"), "--bin", *bins, "--names", row,
       *(["--allpairs", allpairs] if allpairs else []), "--out", os.path.join(run, "eval.json"))
    with open(os.path.join(run, "eval.json")) as f:
        scores = json.load(f)["models"][row]
    if allpairs:
        fields["allpairs"] = scores[os.path.basename(os.path.normpath(allpairs))]
    with open(os.path.join(run, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    # on `val`
    curve = [{"epoch": e["epoch"], "loss": e["loss"], **e["val"]} for e in log if "val" in e]
    with open(os.path.join(run, "config.json")) as f:
        fields.setdefault("machine", json.load(f).get("machine"))  # what the run's bits depend on
    write_json({"group": group, "row": row, "seed": seed, "note": note, "data": data_dirs,
                "extra": list(extra), "steps": log[-1]["step"], "epochs": log[-1]["epoch"],
                "train_seconds": round(train_seconds, 1),
                "train_loop_seconds": round(log[-1]["elapsed"], 1),
                "accuracy": {b: scores[b]["accuracy"] for b in bench},
                "tar_at_far_1e-3": {b: scores[b]["tar_at_far_1e-3"] for b in bench},
                "avg": float(np.mean([scores[b]["accuracy"] for b in bench])), "curve": curve,
                **fields}, result_path)
    return model


def calibration(args):
    """Calibration: the default baseline
    sits at 75-90% and twice as many real identities gain >= 3 points Toy Avg-H."""
    n, tag = args.identities, args.tag
    base, oracle = toy_data(n), toy_data(2 * n)
    for seed in args.seeds:
        for row, data in ((f"real-n{n}{tag}", base), (f"real-n{2 * n}{tag}", oracle)):
            discriminator_run("calibration", row, seed, [os.path.join(data, "train")],
                              os.path.join(base, "bench"),
                              extra=[*SMALL_REGIME, "--val-every", "2",
                                     *shlex.split(args.train_args)])


def generator(args):
    """The generator's measurements: train the CPU-preset generator once on the default toy set,
    then for every snapshot sample the real classes (Repro) and measure identity consistency and
    cleanliness under the baseline discriminator, next to fresh real renders (heldout/)."""
    data = toy_data(args.identities)
    baseline = discriminator_run("calibration", f"real-n{args.identities}", 0,
                                 [os.path.join(data, "train")], os.path.join(data, "bench"),
                                 extra=[*SMALL_REGIME, "--val-every", "2"], need_model=True)
    run = os.path.join(RUNS, "generator", args.name)
    t0 = time.time()
    sh("train_diffusion.py", "--data", os.path.join(data, "train"), "--heldout",
       os.path.join(data, "heldout"), "--out", run, "--duration", args.kimg, "--snapshot-every",
       args.snapshot_every, *args.extra)
    train_seconds = time.time() - t0
    measure_snapshots(run, data, baseline, args.name, "generator", args.per_class, args.steps,
                      train_seconds)


def measure_snapshots(run, data, baseline, name, group, per_class, steps, train_seconds,
                      sample_flags=(), every=None, tag=""):
    """For every snapshot of a generator run (or those at multiples of `every` kimg): Repro samples
    of every class, their identity consistency and cleanliness under the baseline next to fresh real
    renders; results/GROUP/NAME[TAG]-kimgK.json (TAG names the sampler flags, e.g. a guide)."""
    with open(os.path.join(run, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    for snap in sorted(glob.glob(os.path.join(run, "network-snapshot-*.pt"))):
        kimg = int(os.path.basename(snap)[17:23])
        if every and kimg % every:
            continue
        result_path = os.path.join(RESULTS, group, f"{name}{tag}-kimg{kimg:06d}.json")
        if os.path.exists(result_path):
            print(f"skip {result_path} (exists)")
            continue
        samples = os.path.join(run, f"repro{tag}-{kimg:06d}")
        t1 = time.time()
        sh("scoremix_sample.py", "--mode", "repro", "--net", snap, "--per-pair", per_class,
           "--steps", steps, "--out", samples, *sample_flags)
        sample_seconds = time.time() - t1
        sh("evaluate.py", "--consistency", samples, os.path.join(data, "heldout"), "--data",
           os.path.join(data, "train"), "--model", baseline, "--out", samples + ".json")
        with open(samples + ".json") as f:
            cons = json.load(f)["samples"]
        gen, real = cons[samples], cons[os.path.join(data, "heldout")]
        denoise = [e for e in log if "denoise_rms" in e and abs(e["kimg"] - kimg) < 1]
        speed = [e["images_per_s"] for e in log if "images_per_s" in e]
        write_json({"run": name + tag, "kimg": kimg, "snapshot": os.path.relpath(snap, ROOT),
                    "steps": steps,
                    "sample_flags": [os.path.relpath(f, ROOT) if os.path.isabs(str(f)) else str(f)
                                     for f in sample_flags],
                    "consistency": gen["consistency"], "real_consistency": real["consistency"],
                    "neighbour_ratio": gen["neighbour_ratio"],
                    "real_neighbour_ratio": real["neighbour_ratio"],
                    "sample_images_per_s": round(gen["images"] / sample_seconds, 2),
                    "train_images_per_s": float(np.median(speed)) if speed else None,
                    "train_seconds_this_run": round(train_seconds, 1),
                    "denoise_rms": denoise[-1]["denoise_rms"] if denoise else None,
                    "mean_image_rms": denoise[-1]["mean_image_rms"] if denoise else None},
                   result_path)


def repro_check(args):
    """The generator's usefulness check: the baseline recipe on real + Repro samples of the real
    classes (labelled as those classes, as many images as the real set) against real only."""
    data = toy_data(args.identities)
    run = os.path.join(RUNS, "generator", args.name)
    snap = sorted(glob.glob(os.path.join(run, "network-snapshot-*.pt")))[-1]
    tag = f"-guide{args.guide_kimg:g}-w{args.guidance:g}" if args.guide_kimg else ""
    tag += f"-steps{args.steps}" if args.steps != 32 else ""
    tag += f"-churn{args.churn:g}" if args.churn else ""
    samples = os.path.join(run, "repro-full" + tag)
    per_class = images_per_identity(os.path.join(data, "train"))
    guide = guide_flags(run, args.guide_kimg, args.guidance)
    t0 = time.time()
    sh("scoremix_sample.py", "--mode", "repro", "--net", snap, "--per-pair", per_class, "--steps",
       args.steps, "--out", samples, "--seed", 1, "--churn", args.churn,
       *guide)  # seed 1: not the consistency samples
    note = (f"{os.path.relpath(snap, ROOT)}, {per_class} Repro images per class, "
            f"{args.steps} steps, guide {args.guide_kimg or 'none'} kimg "
            f"w {args.guidance if args.guide_kimg else 1}, churn {args.churn:g}, "
            f"sampling {time.time() - t0:.0f} s in this run")
    with open(os.path.join(RESULTS, "calibration", f"real-n{args.identities}-seed0.json")) as f:
        # the (=) row: real + Repro at real only's number of steps
        baseline_steps = json.load(f)["steps"]
    stats = measure_samples(samples, data, os.path.join(RUNS, "calibration",
                                                        f"real-n{args.identities}-seed0",
                                                        "model.pt"))  # these very samples
    for seed in args.seeds:
        for row, flags in ((f"real+repro-{args.name}{tag}", []),
                           (f"real+repro-{args.name}{tag} (=)", ["--steps", str(baseline_steps)])):
            discriminator_run("repro_check", row, seed, [os.path.join(data, "train"), samples],
                              os.path.join(data, "bench"),
                              extra=[*SMALL_REGIME, *MERGE, "--val-every", "24", *flags],
                              note=note,
                              result_name=row_file(row), **stats)


# ----------------------------------------------------------------------------- the paper's regime
# Many identities with few images each (16 per identity, the paper's ratio), the oracle at 2N (the
# first N bit-identical), validation benchmarks of their own identities for every choice of recipe,
# sampler or size (never the test benchmarks), and the all-pairs 1:1 test set for TAR at FAR down to
# 1e-5.

VAL = tuple("val_" + b[len("toy_"):] for b in BENCH)
# discriminator recipes: name -> (epochs, train_arcface.py flags); each also runs at 2x epochs
RECIPES = {
    "e24": (24, []),
    "e12": (12, []),
    "e24-wd5e-3": (24, ["--weight-decay", "5e-3"]),
}


def regime_data(identities, per_identity, seed=0):
    """A regime toy set with val/ (400 identities) and allpairs/ (1000 identities x 8 images)."""
    out = os.path.join(RUNS, "data", f"regime-n{identities}-p{per_identity}-s{seed}")
    sh("toy_faces.py", "--out", out, "--identities", identities, "--per-identity", per_identity,
       "--seed", seed, "--val-identities", 400, "--allpairs-identities", 1000,
       "--allpairs-per-identity", 8)  # skips if complete
    return out


def recipe_run(name, seed, train_dir, val_dir, mult=1, row=None, need_model=False):
    """Real only (or the oracle set) with recipe `name` at `mult` times its epochs, scored on
    validation."""
    epochs, flags = RECIPES[name]
    return discriminator_run(
        "regime_recipe", row or (name if mult == 1 else f"{name}-2x"), seed, [train_dir], val_dir,
        extra=["--epochs", mult * epochs, "--val-every", mult * epochs, *flags], bench=VAL,
        need_model=need_model, recipe=name, epoch_multiple=mult)


def regime_recipe(args):
    """Choose the discriminator recipe on validation only: real only at each recipe's epochs and at
    twice them (the paper's protocol trains merged sets for the same epochs, so twice the images
    means twice the steps; a recipe whose 2x run is within a seed std of its 1x run makes that
    protocol fair)."""
    data = regime_data(args.identities, args.per_identity)
    oracle = regime_data(2 * args.identities, args.per_identity) if args.oracle else None
    val = os.path.join(data, "val")
    for name in args.recipes:
        for seed in args.seeds:
            for mult in (1, 2):
                recipe_run(name, seed, os.path.join(data, "train"), val, mult)
            if oracle:
                recipe_run(name, seed, os.path.join(oracle, "train"), val, row=f"{name}-oracle")


def regime_generator(args):
    """Train the generator on the regime set; per snapshot, Repro consistency under the recipe's
    seed-0 baseline (nearest class centre over all training identities) next to fresh real
    renders."""
    data = regime_data(args.identities, args.per_identity)
    baseline = recipe_run(args.recipe, 0, os.path.join(data, "train"), os.path.join(data, "val"),
                          need_model=True)  # the reference of every regime choice
    run = os.path.join(RUNS, "regime", "generator", args.name)
    t0 = time.time()
    sh("train_diffusion.py", "--data", os.path.join(data, "train"), "--heldout",
       os.path.join(data, "heldout"), "--out", run, "--duration", args.kimg, "--snapshot-every",
       args.snapshot_every, *args.extra)
    # optionally autoguided by an early snapshot of the same run (no second training)
    flags = ((["--amp"] if "--amp" in args.extra else [])
             + guide_flags(run, args.guide_kimg, args.guidance))
    tag = f"-guide{args.guide_kimg:g}-w{args.guidance:g}" if args.guide_kimg else ""
    measure_snapshots(run, data, baseline, args.name, "regime_generator", args.per_class,
                      args.steps, time.time() - t0, sample_flags=flags, every=args.measure_every,
                      tag=tag)


# -------------------------------------------------------------------------- the regime's main table
# The paper's protocol (24 epochs over each row's own set; 2x epochs of real only does not hurt
# here, see regime-recipe) is primary; equal steps (=) is a control. Every synthetic set: 256
# identities x 16 images from the committed 700-kimg generator; the main ScoreMix and Repro sets
# have a second draw (sampler seed 2), used by the odd discriminator seeds, so seed-paired intervals
# include the set's own variance.

# synthetic sets of both regimes: name -> (sampler mode, pair selection (space, strategy,
# tuple size) or None)
SYNTHETIC = {
    "repro": ("repro", None),
    "condmix-dist-emb": ("condmix", ("embedding", "dist", 2)),
    "scoremix-random": ("scoremix", ("embedding", "random", 2)),
    "scoremix-dist-emb": ("scoremix", ("embedding", "dist", 2)),
    "scoremix-close-emb": ("scoremix", ("embedding", "close", 2)),
    "scoremix-dist-cond": ("scoremix", ("condition", "dist", 2)),
    "scoremix-close-cond": ("scoremix", ("condition", "close", 2)),
    "scoremix-summax-emb": ("scoremix", ("embedding", "dist", 3)),
    "scoremix-summin-emb": ("scoremix", ("embedding", "close", 3)),
}
REGIME_SNAPSHOTS = os.path.join(RESULTS, "regime_generator", "snapshots")
REGIME_SETS = {name: SYNTHETIC[name] for name in ("repro", "scoremix-dist-emb",
                                                  "scoremix-close-emb", "scoremix-dist-cond",
                                                  "condmix-dist-emb")}
REGIME_SETS["scoremix-random-emb"] = SYNTHETIC["scoremix-random"]
REGIME_SETS["average-dist-emb"] = ("average", ("embedding", "dist", 2))  # parents' pixel mean
TWO_DRAWS = ("repro", "scoremix-dist-emb")
# (row, training sources, epochs, train_arcface.py flags); "=" in flags: the real row's number of
# steps
REGIME_ROWS = [
    ("real", ["real"], 24, []),
    ("real-2x", ["real"], 48, []),
    ("oracle", ["oracle"], 24, []),
    ("real+scoremix-dist-emb", ["real", "scoremix-dist-emb"], 24, []),
    ("real+repro", ["real", "repro"], 24, MERGE),
    ("real+scoremix-close-emb", ["real", "scoremix-close-emb"], 24, []),
    ("real+scoremix-random-emb", ["real", "scoremix-random-emb"], 24, []),
    ("real+scoremix-dist-cond", ["real", "scoremix-dist-cond"], 24, []),
    ("real+condmix-dist-emb", ["real", "condmix-dist-emb"], 24, []),
    # attribution controls: existing-class samples labelled as new classes; the parents' pixel mean
    # as new classes; equal steps, and real only at the (=) row's real exposure (12 epochs)
    ("real+repro-as-new", ["real", "repro"], 24, []),
    ("real+average-dist-emb", ["real", "average-dist-emb"], 24, []),
    ("real+scoremix-dist-emb (=)", ["real", "scoremix-dist-emb"], 24, ["="]),
    ("real-12ep", ["real"], 12, []),
]


def regime(args):
    """The regime's main table and controls: every row x every seed (seed-major, so a stopped run
    leaves whole seeds), results/regime/ROW-seedK.json with the test benchmarks and the all-pairs
    TARs."""
    data, oracle = (regime_data(args.identities, args.per_identity),
                    regime_data(2 * args.identities, args.per_identity))
    baseline = recipe_run("e24", 0, os.path.join(data, "train"), os.path.join(data, "val"),
                          need_model=True)
    sources = {"real": os.path.join(data, "train"), "oracle": os.path.join(oracle, "train")}
    net = os.path.join(REGIME_SNAPSHOTS, f"network-snapshot-{args.kimg:06d}.pt")
    guide = (os.path.join(REGIME_SNAPSHOTS, f"network-snapshot-{args.guide_kimg:06d}.pt")
             if args.guidance != 1 else None)
    val = [os.path.join(data, "val", f"{b}.bin") for b in VAL]
    rows = [r for r in REGIME_ROWS if not args.rows or r[0] in args.rows]
    for seed in args.seeds:
        for row, srcs, epochs, flags in rows:
            recorded = os.path.join(RESULTS, "regime", f"{row_file(row)}-seed{seed}.json")
            if os.path.exists(recorded):  # before sampling: a new checkout has no synthetic images
                print(f"skip {recorded} (exists)")
                continue
            dirs = []
            for s in srcs:
                name = s + ("-draw2" if s in TWO_DRAWS and seed % 2 else "")
                dirs.append(sources.get(s) or sample_set("regime", name, *REGIME_SETS[s], data, net,
                                                         baseline, steps=args.steps, guide=guide,
                                                         guidance=args.guidance,
                                                         draw=2 if name.endswith("-draw2") else 1,
                                                         flags=["--amp"]))
            if "=" in flags:
                real = os.path.join(RESULTS, "regime", "real-seed0.json")
                if not os.path.exists(real):
                    sys.exit(f"error: {row} trains for the real row's steps: "
                             "run the real row first")
                with open(real) as f:
                    flags = [f for f in flags if f != "="] + ["--steps", str(json.load(f)["steps"])]
            discriminator_run("regime", row, seed, dirs, os.path.join(data, "bench"),
                              extra=["--epochs", epochs, "--val-every", epochs, *flags], val=val,
                              allpairs=os.path.join(data, "allpairs"), result_name=row_file(row),
                              sources=srcs,
                              draw=2 if seed % 2 and set(srcs) & set(TWO_DRAWS) else 1)
    # the paper's Sec. 5 on this set: the sampling snapshot and an early one vs two real-only seeds
    # and the oracle (its centres of the same 256 classes)
    alignment("regime", [os.path.join(REGIME_SNAPSHOTS, f"network-snapshot-{k:06d}.pt")
                         for k in (200, args.kimg)],
              [("real", 0), ("real", 1), ("oracle", 0)], sources["real"])


# ----------------------------------------------------------------------------- replication
# Issue "Replication": one generator for every row, the baseline recipe on each row's training set
# (24 epochs over its own set, as the paper), the (=) rows again at the baseline's number of steps.
# Every synthetic set has as many identities as the real set, with as many images each.

# rows in table order: (row, training sources, train_arcface.py flags, main row: all seeds, else the
# first) sources: "real", "oracle" (2N real identities), "fresh" (the real set with twice the images
# per identity, what a perfect Repro generator would add), or a synthetic set; "=" in flags: the
# baseline's steps


def with_twin(row, sources, flags=(), all_seeds=True):
    """A row and its (=) twin: the same training set, trained for the baseline's number of steps."""
    return [(row, sources, list(flags), all_seeds), (f"{row} (=)", sources, list(flags) + ["="],
                                                     all_seeds)]


REPLICATION_ROWS = [
    ("real", ["real"], [], True),
    ("real-48ep", ["real"], ["--epochs", "48"],
     True),  # as many steps as the merged rows: the length control
    ("real-r50", ["real"], ["--network", "r50"], False),
    *with_twin("oracle", ["oracle"]),
    *with_twin("real+fresh", ["fresh"]),  # Repro's oracle: as many fresh renders of the identities
    *with_twin("real+repro", ["real", "repro"], MERGE),
    *with_twin("real+condmix-dist-emb", ["real", "condmix-dist-emb"]),
    *with_twin("real+scoremix-random", ["real", "scoremix-random"], all_seeds=False),
    *with_twin("real+scoremix-dist-emb", ["real", "scoremix-dist-emb"]),
    *with_twin("real+scoremix-close-emb", ["real", "scoremix-close-emb"]),
    *with_twin("real+scoremix-dist-cond", ["real", "scoremix-dist-cond"], all_seeds=False),
    *with_twin("real+scoremix-close-cond", ["real", "scoremix-close-cond"], all_seeds=False),
    *with_twin("real+scoremix-summax-emb", ["real", "scoremix-summax-emb"], all_seeds=False),
    *with_twin("real+scoremix-summin-emb", ["real", "scoremix-summin-emb"], all_seeds=False),
    ("repro-only", ["repro"], [], False),
    ("scoremix-only", ["scoremix-dist-emb"], [], False),
]


def row_file(row):
    return row.replace(" (=)", "-eq")


def sample_set(group, name, mode, selection, data, net, baseline, steps=32, alpha=0.5, guide=None,
               guidance=1.0, identities=None, per_identity=None, churn=0, draw=1, flags=()):
    """Sample one synthetic set (resumable) into runs/exp/GROUP/synthetic/NAME, record its cost and
    image statistics (under the seed-0 baseline) in results/GROUP/synthetic/NAME.json. Pairs are
    selected by the baseline (embedding space) or the generator (condition space); draw k samples
    with --seed k."""
    real = os.path.join(data, "train")
    identities = identities or len(os.listdir(real))
    per_identity = per_identity or images_per_identity(real)
    info_path = os.path.join(RESULTS, group, "synthetic", f"{name}.json")
    out = os.path.join(RUNS, group, "synthetic", name)
    count = lambda: len(glob.glob(os.path.join(out, "*", "*.png")))  # noqa: E731
    recorded = os.path.exists(info_path)
    measure = lambda: measure_samples(out, data, baseline)  # noqa: E731

    if recorded and os.path.isdir(out) and count() >= identities * per_identity:
        with open(info_path) as f:
            info = json.load(f)
        # a record from before the copy measurement
        if "nearest_real_distance" not in info["samples"]:
            write_json({**info, **measure()}, info_path)
        # else a new checkout: sample again (seeded: the same images), keep the first record
        return out
    pairs = None
    if selection:
        space, strategy, size = selection
        pairs = os.path.join(RUNS, group, "pairs", f"{space}-{strategy}-{size}-{identities}.csv")
        if not os.path.exists(pairs):
            os.makedirs(os.path.dirname(pairs), exist_ok=True)
            sh("select_pairs.py", "--space", space, "--strategy", strategy, "--tuple-size", size,
               "--num-pairs", identities, "--fr", baseline, "--data", real, "--generator", net,
               "--out", pairs)
    before, t0 = (count() if os.path.isdir(out) else 0), time.time()
    if mode == "average":
        pixel_average_set(pairs, real, out, per_identity)
    else:
        sh("scoremix_sample.py", "--mode", mode, "--out", out, "--net", net, "--steps", steps,
           "--per-pair", per_identity, "--alpha", alpha, "--seed", draw,
           *(["--pairs", pairs] if pairs else []), *(["--churn", churn] if churn else []),
           *(["--guide", guide, "--guidance", guidance] if guide else []), *flags)
    seconds, made = time.time() - t0, count() - before
    if recorded:
        return out
    write_json({"name": name, "mode": mode, "selection": selection, "alpha": alpha,
                "guidance": guidance if guide else 1,
                "guide": os.path.relpath(guide, ROOT) if guide else None, "steps": steps,
                "churn": churn, "draw": draw, "identities": identities,
                "per_identity": per_identity, "snapshot": os.path.relpath(net, ROOT),
                "sampler_flags": list(map(str, flags)), "images_sampled_this_run": made,
                "sampling_seconds_this_run": round(seconds, 1),
                "cpu_seconds_per_1000": round(seconds * (os.cpu_count() or 1) / made * 1000,
                                              1) if made else None,
                **measure()}, info_path)
    return out


def pixel_average_set(pairs, real, out, per_identity):
    """An attribution control: new identity avg_<a>_<b>, its image n the pixel mean of image n of
    a and of b (no generator). Each identity is written to .<name>.partial and renamed when
    complete."""
    from PIL import Image
    with open(pairs, newline="", encoding="utf-8-sig") as f:
        tuples = [(r["class_a"], r["class_b"]) for r in csv.DictReader(f)]
    os.makedirs(out, exist_ok=True)
    for a, b in tuples:
        folder = os.path.join(out, f"avg_{a}_{b}")
        if os.path.isdir(folder):
            continue
        partial = os.path.join(out, f".avg_{a}_{b}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        files = [sorted(glob.glob(os.path.join(real, c, "*.png")))[:per_identity] for c in (a, b)]
        for n, (fa, fb) in enumerate(zip(*files)):
            xa, xb = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (fa, fb))
            Image.fromarray(np.round((xa + xb) / 2).astype(np.uint8)).save(
                os.path.join(partial, f"{n}.png"))
        os.replace(partial, folder)
    write_atomic(
        os.path.join(out, "manifest.csv"),
        "identity,mode,sources\n" + "".join(f"avg_{a}_{b},average,{a};{b}\n" for a, b in tuples))


def replication_set(args, name, mode, selection, data, guidance=None, **over):
    """A replication set: the last snapshot of its generator run, autoguided by --guide-kimg when w
    != 1."""
    gen = os.path.join(RUNS, "generator", args.name)
    guidance = args.guidance if guidance is None else guidance
    return sample_set(
        "replication", name, mode, selection, data,
        sorted(glob.glob(os.path.join(gen, "network-snapshot-*.pt")))[-1],
        os.path.join(RUNS, "replication", "real-seed0", "model.pt"),
        steps=over.pop("steps", args.steps),
        guide=((guide_flags(gen, args.guide_kimg, guidance) or [None, None])[1] if guidance != 1
               else None),
        guidance=guidance, **over)


def replication(args):
    """The main table (+ the sensitivity rows with --sensitivity): every row trains args.seeds
    discriminators (the secondary rows only the first seed) and writes
    results/replication/ROW-seedK.json."""
    n = args.identities
    data, oracle = toy_data(n), toy_data(2 * n)
    bench = os.path.join(data, "bench")
    fresh = toy_data(n, per_identity=2 * images_per_identity(os.path.join(data, "train")))
    sources = {"real": os.path.join(data, "train"), "oracle": os.path.join(oracle, "train"),
               "fresh": os.path.join(fresh, "train")}
    rows = REPLICATION_ROWS + (sensitivity_rows(args) if args.sensitivity else [])
    for row, srcs, flags, main_row in rows:
        if args.rows and row not in args.rows:
            continue
        dirs = []
        for s in srcs:
            if s in sources:
                dirs.append(sources[s])
            else:
                spec = SYNTHETIC.get(s) or SENSITIVITY[s]
                dirs.append(
                    replication_set(args, s, *spec[:2], data, **(spec[2] if len(spec) > 2 else {})))
        if "=" in flags:
            with open(os.path.join(RESULTS, "replication", "real-seed0.json")) as f:
                flags = [f for f in flags if f != "="] + ["--steps", str(json.load(f)["steps"])]
        for seed in (args.seeds if main_row else args.seeds[:1]):
            discriminator_run("replication", row, seed, dirs, bench,
                              extra=[*SMALL_REGIME, *flags, "--val-every", "24"],
                              result_name=row_file(row),
                              need_model=row in ("real", "real-r50"), sources=srcs)
    gen = os.path.join(RUNS, "generator", args.name)
    alignment("replication", sorted(glob.glob(os.path.join(gen, "network-snapshot-*.pt")))[-1:],
              [("real", 0), ("real", 1), ("real-r50", 0)], sources["real"])


def alignment(group, snapshots, runs, data):
    """results/GROUP/cka.json (cka.py): the generator's condition space vs the discriminators'
    class centres, discriminator vs discriminator (seeds, backbones), each against a permutation
    null; once every run (row, seed) of the group has its model."""
    path = os.path.join(RESULTS, group, "cka.json")
    models = [os.path.join(RUNS, group, f"{row}-seed{seed}", "model.pt") for row, seed in runs]
    if not os.path.exists(path) and all(map(os.path.exists, models)):
        sh("cka.py", "--generator", *snapshots, "--fr", *models, "--data", data, "--permutations",
           100, "--out", path)


# sensitivity on the dist-embedding row: name -> (mode, selection, sampler overrides); the Repro
# entries are the generator's Repro check with the paper's guidance (w 1.3, autoguided by an early
# snapshot) and with the stochastic sampler
SENSITIVITY = {
    "scoremix-dist-emb-alpha0.3": ("scoremix", ("embedding", "dist", 2), {"alpha": 0.3}),
    "scoremix-dist-emb-alpha0.7": ("scoremix", ("embedding", "dist", 2), {"alpha": 0.7}),
    "scoremix-dist-emb-w1": ("scoremix", ("embedding", "dist", 2), {"guidance": 1.0}),
    "scoremix-dist-emb-w1.3": ("scoremix", ("embedding", "dist", 2), {"guidance": 1.3}),
    "scoremix-dist-emb-w2": ("scoremix", ("embedding", "dist", 2), {"guidance": 2.0}),
    "scoremix-dist-emb-steps16": ("scoremix", ("embedding", "dist", 2), {"steps": 16}),
    "scoremix-dist-emb-steps32": ("scoremix", ("embedding", "dist", 2), {"steps": 32}),
    "scoremix-dist-emb-ids0.5": ("scoremix", ("embedding", "dist", 2),
                                 {"identities": 16, "per_identity": 64}),
    "scoremix-dist-emb-ids2": ("scoremix", ("embedding", "dist", 2),
                               {"identities": 64, "per_identity": 16}),
    "scoremix-dist-emb-churn40": ("scoremix", ("embedding", "dist", 2), {"churn": 40}),
    "repro-w1.3": ("repro", None, {"guidance": 1.3}),
    "repro-churn10": ("repro", None, {"churn": 10}),  # stochastic Heun (EDM Alg. 2), S 0.05..50
    "repro-churn40": ("repro", None, {"churn": 40}),
    "repro-w1.3-churn40": ("repro", None, {"guidance": 1.3, "churn": 40}),
}


def sensitivity_rows(args):
    """Each variant at 24 epochs and at the baseline's steps (=), one seed (Repro variants: all
    seeds, as the main Repro rows); variants equal to the main setting are skipped (the main row is
    that point)."""
    main, rows = {"guidance": args.guidance, "steps": args.steps}, []
    for name, (mode, _, over) in SENSITIVITY.items():
        if not all(main.get(k) == v for k, v in over.items()):
            repro = mode == "repro"  # Repro images join their real classes, and get every seed
            rows += with_twin(f"real+{name}", ["real", name], MERGE if repro else [], repro)
    return rows


def figure(args):
    """One image of each of the first identities (columns) of the real set and of each synthetic set
    (rows)."""
    import torch
    from PIL import Image

    from scoremix_sample import labelled_grid, save_image_atomic
    folders = {"real": os.path.join(toy_data(args.identities), "train")}
    folders.update((name,
                    os.path.join(RUNS, "replication", "synthetic", name)) for name in args.sets)
    rows = []
    for name, folder in folders.items():
        if not os.path.isdir(folder):
            sys.exit(f"error: {folder} does not exist (run the replication first)")
        ids = sorted(d for d in os.listdir(folder)
                     if os.path.isdir(os.path.join(folder, d)))[:args.columns]
        rows.append([torch.from_numpy(np.array(
            Image.open(sorted(glob.glob(os.path.join(folder, i, "*.png")))[0]).convert("RGB")))
            .permute(2, 0, 1) for i in ids])
    grid = labelled_grid(torch.stack([torch.stack(r) for r in rows]), list(folders),
                         [""] * args.columns,
                         "first image of the first identities of each training set (replication)")
    save_image_atomic(grid, args.out)
    print(f"wrote {args.out}")


def generator_flags(p, identities, name, kimg, snapshot_every, per_class):
    """The flags of the commands that train a generator and measure its snapshots."""
    p.add_argument("--identities", type=int, default=identities, help="N: training identities")
    default_name, where = name.split(" ", 1)
    p.add_argument("--name", default=default_name, help=f"run name {where}")
    p.add_argument("--kimg", type=float, default=kimg, help="training length in kimg")
    p.add_argument("--snapshot-every", type=float, default=snapshot_every,
                   help="snapshot interval in kimg")
    p.add_argument("--per-class", type=int, default=per_class,
                   help="Repro samples per class for the consistency figure")
    p.add_argument("--steps", type=int, default=32, help="Heun steps")
    p.add_argument("extra", nargs="*",
                   help="more train_diffusion.py flags (after --), e.g. -- --amp")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("calibration", help="baseline vs 2x real identities (the oracle)")
    p.add_argument("--identities", type=int, default=32, help="N: the default toy set's identities")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="discriminator seeds")
    p.add_argument("--tag", default="",
                   help="suffix of the result names (a re-run beside the recorded one, e.g. "
                        "-straight: results/calibration/real-n32-straight-seed0.json)")
    p.add_argument("--train-args", default="", metavar="'ARGS'",
                   help="extra train_arcface.py flags as one string, after the pinned "
                        f"{' '.join(SMALL_REGIME)}, e.g. --train-args='--margin-grad straight'")
    p.set_defaults(func=calibration)
    p = sub.add_parser("regime-recipe",
                       help="the paper's regime: discriminator recipes at 1x and 2x epochs, "
                            "scored on validation")
    p.add_argument("--identities", type=int, default=256, help="N: training identities")
    p.add_argument("--per-identity", type=int, default=16, help="training images per identity")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                   help="recipes to run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="discriminator seeds")
    p.add_argument("--oracle", action="store_true", help="also each recipe on the 2N-identity set")
    p.set_defaults(func=regime_recipe)
    p = sub.add_parser("regime-generator",
                       help="the paper's regime: train the generator; Repro consistency per "
                            "snapshot")
    generator_flags(p, 256, "cpu-amp (runs/exp/regime/generator/NAME)", 400, 50, 2)
    p.add_argument("--per-identity", type=int, default=16, help="training images per identity")
    p.add_argument("--recipe", default="e24", choices=list(RECIPES), help="the baseline's recipe")
    p.add_argument("--measure-every", type=float,
                   help="measure only the snapshots at multiples of this many kimg (None: every "
                        "snapshot)")
    p.add_argument("--guide-kimg", type=float,
                   help="autoguidance: the snapshot of the same run at this kimg guides")
    p.add_argument("--guidance", type=float, default=1.3,
                   help="guidance weight w with --guide-kimg")
    p.set_defaults(func=regime_generator)
    p = sub.add_parser("regime",
                       help="the paper's regime: main table and attribution controls, resumable")
    p.add_argument("--identities", type=int, default=256, help="N: training identities")
    p.add_argument("--per-identity", type=int, default=16, help="training images per identity")
    p.add_argument(
        "--kimg", type=int, default=700,
        help="the generator: results/regime_generator/snapshots/network-snapshot-KIMG.pt")
    p.add_argument("--guide-kimg", type=int, default=200,
                   help="autoguidance by the snapshot at this kimg (w != 1)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="guidance weight w (1: unguided, half the sampling cost on CPU)")
    p.add_argument("--steps", type=int, default=32, help="Heun steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="discriminator seeds")
    p.add_argument("--rows", nargs="+", choices=[r[0] for r in REGIME_ROWS], metavar="ROW",
                   help="run only these rows (names as in the table)")
    p.set_defaults(func=regime)
    p = sub.add_parser(
        "generator", help="train the CPU generator once; consistency and cleanliness per snapshot")
    generator_flags(p, 32, "cpu-100k (runs/exp/generator/NAME)", 100, 25, 8)
    p.set_defaults(func=generator)
    p = sub.add_parser("repro-check",
                       help="baseline recipe on real + Repro samples of the last snapshot")
    p.add_argument("--identities", type=int, default=32, help="N: the default toy set's identities")
    p.add_argument("--name", default="cpu-100k", help="generator run name")
    p.add_argument("--steps", type=int, default=32, help="Heun steps")
    p.add_argument("--guide-kimg", type=float,
                   help="autoguidance: the snapshot of the same run at this kimg guides")
    p.add_argument("--guidance", type=float, default=1.3,
                   help="guidance weight w with --guide-kimg")
    p.add_argument("--churn", type=float, default=0,
                   help="S_churn of the stochastic sampler (0: deterministic)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="discriminator seeds (the replication's real rows have the same ones)")
    p.set_defaults(func=repro_check)
    p = sub.add_parser("replication",
                       help="the replication's main table (and --sensitivity rows), resumable")
    p.add_argument("--identities", type=int, default=32, help="N: the default toy set's identities")
    p.add_argument("--name", default="cpu-100k",
                   help="generator run (runs/exp/generator/NAME, last snapshot)")
    p.add_argument("--guide-kimg", type=float, default=25,
                   help="autoguidance guide: the snapshot at this kimg")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="guidance weight w of the main rows (1: unguided; the paper's 1.3 doubles "
                        "the sampling "
                        "cost on CPU and is a sensitivity row)")
    p.add_argument("--steps", type=int, default=32, help="Heun steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="seeds of the main rows and the Repro rows (others: the first)")
    p.add_argument("--rows", nargs="+", help="run only these rows (names as in the table)")
    p.add_argument("--sensitivity", action="store_true",
                   help="also the alpha / w / steps / identities rows")
    p.set_defaults(func=replication)
    p = sub.add_parser("figure",
                       help="a grid of the replication's training sets (rows) and identities")
    p.add_argument("--sets", nargs="+", default=["repro", "repro-w1.3", "condmix-dist-emb",
                                                 "scoremix-dist-emb", "scoremix-close-emb",
                                                 "scoremix-summax-emb", "scoremix-dist-emb-w1.3"],
                   help="synthetic sets under runs/exp/replication/synthetic")
    p.add_argument("--identities", type=int, default=32,
                   help="N: the real toy set shown in the first row")
    p.add_argument("--columns", type=int, default=10, help="identities shown per set")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "figures", "replication_sets.png"),
                   help="PNG path")
    p.set_defaults(func=figure)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
