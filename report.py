"""Tables and reports from the recorded results: the markdown the README and docs/results.md show.

    python report.py table calibration    # results/calibration/*.json -> markdown tables
    python report.py table replication    # the replication's main, sensitivity, sets, CKA tables
    python report.py table regime_recipe  # the paper regime's recipe choice on validation
    python report.py table regime         # the paper regime's main table, claims and synthetic sets
    python report.py table cka            # condition vs embedding space alignment (cka.py outputs)
    python report.py table repro          # the replication's Repro rows and their controls
    python report.py table brief          # the README's summary of the replication
    python report.py table regime_brief   # the README's summary of the paper regime
    python report.py table regimes        # the claims both regimes test, side by side
    python report.py table regime --into docs/results.md  # and replace the block it owns there
    python report.py table all --into docs/results.md     # every block the page has
    python report.py demo runs/demo       # runs/demo/report.md from run_demo.sh's outputs

One meaning of +- in every table of seeded runs: mean +- the sample standard deviation (ddof 1)
over seeds. (In the CKA tables +- is the std of the permutation null, as cka.py records it; in the
demo's .bin accuracies, the std over the 10 folds, as insightface prints it.) A comparison of two
rows is the mean of their seed-paired differences (same seed: same initialisation and batch order)
with its 95% t-interval in brackets and the number of seeds: +1.23 [+0.09, +2.37] (5).
"""
import argparse
import contextlib
import glob
import io
import json
import os
import re
import sys

import numpy as np

from common import write_atomic
from experiments import BENCH, RECIPES, REGIME_ROWS, REPLICATION_ROWS, RESULTS

def load_results(group):
    rows = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, group, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        if "row" in r or "run" in r:  # not the group's other files (cka.json)
            rows.setdefault(r.get("row", r.get("run")), []).append(r)
    return rows


def mean_std(values, digits=1):
    """'mean +- sample std (ddof 1)', the one meaning of +- in every table."""
    return (f"{np.mean(values):.{digits}f} +- {np.std(values, ddof=1):.{digits}f}"
            if len(values) > 1 else f"{values[0]:.{digits}f}")


# t quantile 0.975, df 1..10
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def toy_avg(run):
    return run["avg"]


def paired_interval(runs, reference, value=toy_avg):
    """Seed-paired differences of value(run) (runs minus reference, same seeds): 'mean [95%
    t-interval] (n)'."""
    ref = {r["seed"]: value(r) for r in reference}
    d = np.array([value(r) - ref[r["seed"]] for r in runs if r["seed"] in ref])
    if len(d) < 2:
        return f"{d[0]:+.2f} (1 seed)" if len(d) else ""
    half = T975[len(d) - 2] * d.std(ddof=1) / np.sqrt(len(d))
    return f"{d.mean():+.2f} [{d.mean() - half:+.2f}, {d.mean() + half:+.2f}] ({len(d)})"


def regime_recipe_table(rows):
    """Per recipe: validation Avg at 1x and 2x epochs, their seed-paired difference, the oracle's
    gain."""
    print("Validation benchmarks only (val_*: identities of their own); +- is the sample std over "
          "seeds; [ ] a 95% t-interval of seed-paired differences.\n")
    print("| recipe | epochs | seeds | val Avg 1x | val Avg 2x | 2x - 1x | 2x within one std of 1x "
          "| oracle - 1x |")
    print("|---" * 8 + "|")
    for name in (r for r in RECIPES if r in rows):
        one, two, oracle = rows[name], rows.get(f"{name}-2x", []), rows.get(f"{name}-oracle", [])
        sd = np.std([r["avg"] for r in one], ddof=1) if len(one) > 1 else float("nan")
        gap = (np.mean([r["avg"] for r in two]) - np.mean([r["avg"] for r in one]) if two
               else float("nan"))
        print(f"| {name} | {one[0]['epochs']} | {len(one)} | "
              f"{mean_std([r['avg'] for r in one], 2)} | "
              f"{mean_std([r['avg'] for r in two], 2) if two else ''} | "
              f"{paired_interval(two, one)} | "
              f"{'' if np.isnan(gap * sd) else ('yes' if abs(gap) <= sd else 'no')} | "
              f"{paired_interval(oracle, one)} |")


def allpairs(far):
    return lambda r: r["allpairs"][f"tar_at_far_{far}"]


def load_synthetic(group):
    synth = {}
    for path in glob.glob(os.path.join(RESULTS, group, "synthetic", "*.json")):
        with open(path) as f:
            r = json.load(f)
        synth[r["name"]] = r
    return synth


REGIME_COMPARISONS = [  # (claim, row, reference row)
    ("ScoreMix (distant, embedding) > real", "real+scoremix-dist-emb", "real"),
    ("distant > close pairs", "real+scoremix-dist-emb", "real+scoremix-close-emb"),
    ("distant > random pairs", "real+scoremix-dist-emb", "real+scoremix-random-emb"),
    ("embedding space > condition space (distant)", "real+scoremix-dist-emb",
     "real+scoremix-dist-cond"),
    ("ScoreMix > Repro", "real+scoremix-dist-emb", "real+repro"),
    ("ScoreMix > condition mixing", "real+scoremix-dist-emb", "real+condmix-dist-emb"),
    ("ScoreMix > pixel average of the parents", "real+scoremix-dist-emb", "real+average-dist-emb"),
    ("Repro samples as new classes > real", "real+repro-as-new", "real"),
    ("ScoreMix at equal steps > real", "real+scoremix-dist-emb (=)", "real"),
    ("real at the (=) row's real exposure vs real", "real-12ep", "real"),
    ("ScoreMix at equal steps > real at the same real exposure", "real+scoremix-dist-emb (=)",
     "real-12ep"),
    ("real 2x epochs vs real", "real-2x", "real"),
    ("ScoreMix > real at the same steps (2x epochs)", "real+scoremix-dist-emb", "real-2x"),
    ("oracle > real", "oracle", "real"),
]


def regime_table(rows):
    """The regime's main table (test benchmarks and all-pairs TARs), the claims' seed-paired
    intervals and the synthetic sets' statistics."""
    print("Test benchmarks (toy_*, Toy Avg-H) and the all-pairs 1:1 set; the paper's protocol (24 "
          "epochs over each "
          "row's own set) unless the row says otherwise. +- is the sample std over seeds; [ ] a "
          "95% t-interval of "
          "seed-paired differences (n seeds); oracle share = (row - real) / (oracle - real), each "
          "a mean of "
          "seed-paired differences under the same protocol over the same seeds.\n")
    fars = ("1e-3", "1e-4", "1e-5")
    print("| row | seeds | epochs | steps | Toy Avg-H | vs real | oracle share | "
          + " | ".join(f"all-pairs TAR@FAR={f}" for f in fars) + " | TAR@1e-4 vs real |")
    print("|---" * 11 + "|")
    real, oracle = rows.get("real", []), rows.get("oracle", [])
    for row in (r[0] for r in REGIME_ROWS if r[0] in rows):
        runs = rows[row]
        share = ""
        if row not in ("real", "oracle") and runs[0]["epochs"] == 24 and "(=)" not in row:
            ref = {r["seed"]: r["avg"] for r in real}
            top = {r["seed"]: r["avg"] for r in oracle}
            seeds = [r["seed"] for r in runs if r["seed"] in ref and r["seed"] in top]
            if seeds:
                gain = np.mean([r["avg"] - ref[r["seed"]] for r in runs if r["seed"] in seeds])
                gap = np.mean([top[k] - ref[k] for k in seeds])
                share = f"{gain / gap:+.2f} ({gain:+.2f} / {gap:+.2f}, {len(seeds)})"
        tars = " | ".join(mean_std([allpairs(f)(r) for r in runs], 2) for f in fars)
        print(f"| {row} | {len(runs)} | {runs[0]['epochs']} | {runs[0]['steps']} | "
              f"{mean_std([r['avg'] for r in runs], 2)} | "
              f"{paired_interval(runs, real) if row != 'real' else ''} | "
              f"{share} | {tars} | "
              f"{paired_interval(runs, real, allpairs('1e-4')) if row != 'real' else ''} |")
    machines = {}
    for r in (r for runs in rows.values() for r in runs):
        m = r.get("machine")
        key = f"{m['cpu']}, {m['cpu_capability']}, {m['threads']} threads" if m else "not recorded"
        machines[key] = machines.get(key, 0) + 1
    print("\nMachines (runs): " + "; ".join(f"{k} ({n})" for k, n in machines.items()))
    comparisons_table(rows, REGIME_COMPARISONS,
                      [("Toy Avg-H", "", toy_avg)]
                      + [(f"all-pairs TAR@FAR={far}", "", allpairs(far))
                         for far in ("1e-4", "1e-5")])
    synth = load_synthetic("regime")
    if synth:
        print("\nSynthetic sets under the seed-0 baseline (real in parentheses): consistency = "
              "share whose nearest "
              "class centre is its own (Repro only); parent-pair cosine = mean cosine between a "
              "mix's two parents' "
              "class centres (random real pairs: the real inter-centre cosine); mix to parent = "
              "mean cosine of a "
              "mix's centre to each parent's centre.\n")
        print("| set | mode | pairs | draw | w | identities x images | consistency % | intra / "
              "inter cosine | "
              "parent-pair cosine (real inter) | mix to parent cosine | nearest real RMS | CPU-s / "
              "1000 images |")
        print("|---" * 12 + "|")
        for name, s in sorted(synth.items()):
            sam, real_train = s["samples"], s["real_train"]
            cons = ("" if sam["consistency"] is None
                    else f"{sam['consistency']:.1f} ({s['real_heldout']['consistency']:.1f})")
            parents = (f"{sam['parent_cosine']:.3f} ({real_train['inter_cosine']:.3f})"
                       if "parent_cosine" in sam else "")
            to_parent = f"{sam['mix_parent_cosine']:.3f}" if "mix_parent_cosine" in sam else ""
            print(f"| {name} | {s['mode']} | "
                  f"{'-'.join(map(str, s['selection'])) if s['selection'] else ''} | "
                  f"{s['draw']} | {s['guidance']:g} | {s['identities']} x {s['per_identity']} | "
                  f"{cons} | {sam['intra_cosine']:.2f} / {sam['inter_cosine']:.2f} "
                  f"({real_train['intra_cosine']:.2f} / {real_train['inter_cosine']:.2f}) | "
                  f"{parents} | {to_parent} | {sam['nearest_real_distance']:.1f} "
                  f"({s['real_heldout']['nearest_real_distance']:.1f}) | "
                  f"{s['cpu_seconds_per_1000'] or ''} |")
    cka_table(os.path.join(RESULTS, "regime", "cka.json"))


REPLICATION_COMPARISONS = [  # (claim, row, reference row), each at 24 epochs and at equal steps (=)
    ("ScoreMix (distant) > real", "real+scoremix-dist-emb", "real"),
    ("distant > close pairs", "real+scoremix-dist-emb", "real+scoremix-close-emb"),
    ("ScoreMix > Repro", "real+scoremix-dist-emb", "real+repro"),
    ("ScoreMix > condition mixing", "real+scoremix-dist-emb", "real+condmix-dist-emb"),
    ("a perfect Repro (fresh real renders) > ScoreMix", "real+fresh", "real+scoremix-dist-emb"),
]


def comparisons_table(rows, comparisons, columns):
    """Each claim as a seed-paired difference with its 95% t-interval, one column per (header,
    row-name suffix, measure): suffix "" for the rows as named, " (=)" for their equal-step twins
    (real only is the reference of both)."""
    print("\n| claim | row - reference | " + " | ".join(c[0] for c in columns) + " |")
    print("|---" * (2 + len(columns)) + "|")
    for claim, a, b in comparisons:
        refs = [rows.get(b + sfx) or (rows.get(b) if b == "real" else None)
                for _, sfx, _ in columns]
        cells = [paired_interval(rows[a + sfx], ref, value) if a + sfx in rows and ref else ""
                 for (_, sfx, value), ref in zip(columns, refs)]
        if any(cells):
            print(f"| {claim} | {a} - {b} | " + " | ".join(cells) + " |")


def replication_table(rows):
    """Main table: mean +- std over seeds; the share of the oracle's Toy Avg-H gain under the row's
    own protocol (a (=) row against the oracle at equal steps); synthetic cost."""
    synth = load_synthetic("replication")
    main = [r[0] for r in REPLICATION_ROWS if r[0] in rows]
    avg = {row: np.mean([r["avg"] for r in runs]) for row, runs in rows.items()}
    base = avg.get("real")
    sensitivity = sorted(set(rows) - set(main))
    for title, group in (("", main),
                         ("Sensitivity: the dist-embedding row's sampler settings (one seed "
                          "each), and Repro with guidance and / or churn", sensitivity)):
        if not group:
            continue
        if title:
            print(f"\n{title}\n")
        print("| row | seeds | steps | " + " | ".join(BENCH) + " | Toy Avg-H | vs real, same seeds "
              "| TAR@FAR=1e-3 cplfw | oracle gain share | synthetic CPU-s / 1000 images |")
        print("|---" * (len(BENCH) + 8) + "|")
        for row in group:
            runs = rows[row]
            cells = [mean_std([r["accuracy"][b] for r in runs]) for b in BENCH]
            top = avg.get("oracle (=)" if row.endswith("(=)") else "oracle")
            share = (f"{(avg[row] - base) / (top - base):+.2f}"
                     if base is not None and top not in (None, base) else "")
            syn = [s for s in runs[0]["sources"] if s in synth]
            cost = " + ".join(f"{synth[s]['cpu_seconds_per_1000']:.0f}" for s in syn
                              if synth[s]["cpu_seconds_per_1000"])
            print(f"| {row} | {len(runs)} | {runs[0]['steps']} | " + " | ".join(cells) +
                  f" | {mean_std([r['avg'] for r in runs])} | "
                  f"{paired_interval(runs, rows['real']) if row != 'real' else ''} | "
                  f"{mean_std([r['tar_at_far_1e-3']['toy_cplfw'] for r in runs])} | {share} | "
                  f"{cost} |")
    if synth:
        print("\n| synthetic set | mode | pairs | alpha | w | steps | churn | identities x images "
              "| consistency % | "
              "neighbour ratio (real held-out) | intra / inter cosine (real) | nearest real RMS "
              "(real held-out) | "
              "CPU-s / 1000 images |")
        print("|---" * 13 + "|")
        for name, s in sorted(synth.items()):
            sel = "-".join(map(str, s["selection"])) if s["selection"] else ""
            cons, sam = s["samples"]["consistency"], s["samples"]
            real_train = s.get("real_train", {})
            spread = (f"{sam['intra_cosine']:.2f} / {sam['inter_cosine']:.2f} "
                      f"({real_train['intra_cosine']:.2f} / {real_train['inter_cosine']:.2f})"
                      if "real_train" in s else "")
            near = (f"{sam['nearest_real_distance']:.1f} "
                    f"({s['real_heldout']['nearest_real_distance']:.1f})"
                    if "nearest_real_distance" in sam else "")
            print(f"| {name} | {s['mode']} | {sel} | {s['alpha']:g} | {s['guidance']:g} | "
                  f"{s['steps']} | {s.get('churn', 0):g} | "
                  f"{s['identities']} x {s['per_identity']} | "
                  f"{'' if cons is None else f'{cons:.1f}'} | "
                  f"{sam['neighbour_ratio']:.2f} ({s['real_heldout']['neighbour_ratio']:.2f}) | "
                  f"{spread} | {near} | {s['cpu_seconds_per_1000'] or ''} |")
    print("\nThe paper's claims, Toy Avg-H, seed-paired differences [95% t-interval] (seeds):")
    comparisons_table(rows, REPLICATION_COMPARISONS,
                      [("24 epochs", "", toy_avg), ("equal steps (=)", " (=)", toy_avg)])
    cka_table(os.path.join(RESULTS, "replication", "cka.json"))


REPRO_ROWS = [  # (label, synthetic set or None, row at 24 epochs, its equal-step twin)
    ("real only, 48 epochs", None, "real-48ep", None),
    ("fresh real renders of the same identities (a perfect Repro)", None, "real+fresh",
     "real+fresh (=)"),
    ("deterministic Heun (the paper's sampler)", "repro", "real+repro", "real+repro (=)"),
    ("guided, w 1.3", "repro-w1.3", "real+repro-w1.3", "real+repro-w1.3 (=)"),
    ("churn 10", "repro-churn10", "real+repro-churn10", "real+repro-churn10 (=)"),
    ("churn 40", "repro-churn40", "real+repro-churn40", "real+repro-churn40 (=)"),
    ("guided w 1.3 + churn 40", "repro-w1.3-churn40", "real+repro-w1.3-churn40",
     "real+repro-w1.3-churn40 (=)"),
]


def repro_table(rows):
    """The replication's Repro rows and controls side by side: the set's own-class share,
    cleanliness and spread, then Toy Avg-H at 24 epochs and at equal steps, each vs real only
    (seed-paired)."""
    synth = load_synthetic("replication")
    real = rows["real"]
    held = synth["repro"]["real_heldout"]
    print("| Repro set | own class % | neighbour ratio | intra cosine | 24 epochs | vs real "
          "| equal steps | vs real |")
    print("|---" * 8 + "|")
    print(f"| real only (the baseline) | {held['consistency']:.1f} (held-out renders) | "
          f"{held['neighbour_ratio']:.2f} | {held['intra_cosine']:.2f} (held-out) | "
          f"{mean_std([r['avg'] for r in real])} ({real[0]['steps']} steps) | | "
          f"{mean_std([r['avg'] for r in real])} | |")
    for label, name, row, twin in REPRO_ROWS:
        sam = synth.get(name, {}).get("samples")
        stats = (f"{sam['consistency']:.1f} | {sam['neighbour_ratio']:.2f} | "
                 f"{sam['intra_cosine']:.2f}" if sam else " | | ")
        print(f"| {label} | {stats} | " + " | ".join(both_protocols(rows, row, twin)) + " |")


def both_protocols(rows, row, twin):
    """Toy Avg-H of `row` (24 epochs) and of `twin` (equal steps), each with its seed-paired
    difference to real only: four cells."""
    cells = []
    for r in (row, twin):
        cells += ([mean_std([x["avg"] for x in rows[r]]), paired_interval(rows[r], rows["real"])]
                  if r in rows else ["", ""])
    return cells


BRIEF_ROWS = [  # (label, row at 24 epochs, its equal-step twin)
    ("+ 32 more real identities (the oracle)", "oracle", "oracle (=)"),
    ("+ Repro (samples of the existing classes)", "real+repro", "real+repro (=)"),
    ("+ condition mixing of distant pairs", "real+condmix-dist-emb", "real+condmix-dist-emb (=)"),
    ("+ ScoreMix, distant pairs", "real+scoremix-dist-emb", "real+scoremix-dist-emb (=)"),
    ("+ ScoreMix, close pairs", "real+scoremix-close-emb", "real+scoremix-close-emb (=)"),
]


def brief_table(rows):
    """The README's summary of the replication: the main rows under both protocols."""
    real = mean_std([r["avg"] for r in rows["real"]])
    print("| training set | Toy Avg-H, 24 epochs | vs real only | Toy Avg-H, equal steps "
          "| vs real only |")
    print("|---" * 5 + "|")
    print(f"| real only (32 identities) | {real} | | {real} | |")
    for label, row, twin in BRIEF_ROWS:
        print(f"| {label} | " + " | ".join(both_protocols(rows, row, twin)) + " |")


REGIME_BRIEF_ROWS = [  # (label, row), the 256-identity regime, 24 epochs over each row's own set
    ("+ 256 more real identities (the oracle)", "oracle"),
    ("real only, 48 epochs (as long as the merged rows)", "real-2x"),
    ("+ Repro (samples of the existing classes)", "real+repro"),
    ("+ condition mixing of distant pairs", "real+condmix-dist-emb"),
    ("+ ScoreMix, distant pairs", "real+scoremix-dist-emb"),
    ("+ ScoreMix, close pairs", "real+scoremix-close-emb"),
    ("+ ScoreMix, random pairs", "real+scoremix-random-emb"),
    ("+ ScoreMix, distant pairs in condition space", "real+scoremix-dist-cond"),
    ("+ pixel average of the distant parents (control)", "real+average-dist-emb"),
]


def regime_brief_table(rows):
    """The README's summary of the 256-identity regime: Toy Avg-H and all-pairs TAR at FAR 1e-4,
    each with its seed-paired difference to real only."""
    real = rows["real"]
    tar = allpairs("1e-4")
    print("| training set | Toy Avg-H | vs real only | all-pairs TAR@FAR=1e-4 | vs real only |")
    print("|---" * 5 + "|")
    print(f"| real only (256 identities x 16) | {mean_std([r['avg'] for r in real], 2)} | | "
          f"{mean_std([tar(r) for r in real], 2)} | |")
    for label, row in REGIME_BRIEF_ROWS:
        if row in rows:
            runs = rows[row]
            print(f"| {label} | {mean_std([r['avg'] for r in runs], 2)} | "
                  f"{paired_interval(runs, real)} | {mean_std([tar(r) for r in runs], 2)} | "
                  f"{paired_interval(runs, real, tar)} |")


def cka_table(path):
    """One cka.py output (none yet: nothing): every pair of spaces, each metric next to its
    permutation null."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        cka = json.load(f)
    print("\n| space A | space B | CKA (null) | unbiased CKA (null) | CKNNA (null) | mutual "
          "kNN (null) |")
    print("|---" * 6 + "|")
    for p in cka["pairs"]:
        cells = [f"{p[m]:.3f} ({p['null'][m]['mean']:.3f} +- {p['null'][m]['std']:.3f})"
                 for m in ("cka", "unbiased_cka", "cknna", "mutual_knn")]
        print(f"| {p['a']} | {p['b']} | " + " | ".join(cells) + " |")
    print(f"\n{cka['classes']} classes, k = {cka['k']}, null: {cka['permutations']} row "
          "permutations (+- the null's std)")


def generator_table(rows):
    runs = sorted((r for rs in rows.values() for r in rs), key=lambda r: (r["run"], r["kimg"]))
    sigmas = ("0.002", "0.05", "0.2", "1", "5", "80")
    print("| run | kimg | consistency % (real held-out) | neighbour ratio (real held-out) | Repro "
          "images/s | "
          + " | ".join(f"RMS at {s}" for s in sigmas) + " |")
    print("|---" * (5 + len(sigmas)) + "|")
    for r in runs:
        d = r["denoise_rms"] or {}
        print(f"| {r['run']} | {r['kimg']} | "
              f"{r['consistency']:.1f} ({r['real_consistency']:.1f}) | "
              f"{r['neighbour_ratio']:.2f} ({r['real_neighbour_ratio']:.2f}) | "
              f"{r['sample_images_per_s']:.2f} | "
              + " | ".join(f"{d[s]:.4f}" if s in d else "" for s in sigmas) + " |")
    mean_rms = [r["mean_image_rms"] for r in runs if r.get("mean_image_rms") is not None]
    if mean_rms:
        print(f"\ntrivial denoisers: RMS = sigma (D = noisy input); {mean_rms[-1]:.4f} "
              "(D = mean image)")


BOTH_REGIMES = [  # (claim, row, reference row), named as in the 256-identity regime
    ("ScoreMix (distant) > real", "real+scoremix-dist-emb", "real"),
    ("real trained as long as the merged rows vs real", "real-2x", "real"),
    ("distant > close pairs", "real+scoremix-dist-emb", "real+scoremix-close-emb"),
    ("ScoreMix > Repro", "real+scoremix-dist-emb", "real+repro"),
    ("ScoreMix > condition mixing", "real+scoremix-dist-emb", "real+condmix-dist-emb"),
    ("ScoreMix at equal steps > real", "real+scoremix-dist-emb (=)", "real"),
]
SMALL_REGIME_NAMES = {"real-2x": "real-48ep"}  # the same row as the 32-identity regime names it


def regimes_table():
    """The claims both regimes test, each under the paper's protocol: Toy Avg-H in both, the
    all-pairs TAR at FAR 1e-4 in the 256-identity regime (the small one has no all-pairs set)."""
    small, large = load_results("replication"), load_results("regime")
    print("Seed-paired differences [95% t-interval] (seeds); 24 epochs over each row's own set, "
          "(=) rows the real row's number of steps.\n")
    print("| claim | row - reference | 32 identities, Toy Avg-H | 256 identities, Toy Avg-H "
          "| 256 identities, all-pairs TAR@FAR=1e-4 |")
    print("|---" * 5 + "|")
    for claim, row, reference in BOTH_REGIMES:
        cells = [paired_interval(rows[a], rows[reference], value)
                 if a in rows and reference in rows else ""
                 for rows, a, value in ((small, SMALL_REGIME_NAMES.get(row, row), toy_avg),
                                        (large, row, toy_avg), (large, row, allpairs("1e-4")))]
        print(f"| {claim} | {row} - {reference} | " + " | ".join(cells) + " |")


SUMMARIES = {  # table name -> (the results group it reads, its table)
    "repro": ("replication", repro_table),  # the replication's Repro rows and their controls
    "brief": ("replication", brief_table),  # the README's summary of the replication
    "regime_brief": ("regime", regime_brief_table),  # ... and of the 256-identity regime
}


def table(args):
    if args.group == "regimes":  # the claims both regimes test
        return regimes_table()
    if args.group in SUMMARIES:  # tables assembled from another group's rows, each against real
        group, summary = SUMMARIES[args.group]
        rows = load_results(group)
        if "real" not in rows:
            sys.exit(f"error: no real-only results under results/{group}")
        return summary(rows)
    if args.group == "cka":  # cka.py outputs, one table each
        paths = sorted(glob.glob(os.path.join(RESULTS, "cka", "*.json")))
        if not paths:
            sys.exit("error: no results under results/cka")
        for path in paths:
            print(f"\n{os.path.relpath(path, RESULTS)}:")
            cka_table(path)
        return
    rows = load_results(args.group)
    if not rows:
        sys.exit(f"error: no results under results/{args.group}")
    if args.group in ("generator", "regime_generator"):
        return generator_table(rows)
    if args.group == "regime_recipe":
        return regime_recipe_table(rows)
    if args.group == "replication":
        return replication_table(rows)
    if args.group == "regime":
        return regime_table(rows)
    real = load_results("replication").get("real", []) if args.group == "repro_check" else []
    print("| row | seeds | epochs | steps | train s (loop) | " + " | ".join(BENCH)
          + " | Toy Avg-H |"
          + (" vs replication's real, same seeds |" if real else ""))
    print("|---" * (len(BENCH) + 6 + bool(real)) + "|")
    for row, runs in rows.items():
        cells = [mean_std([r["accuracy"][b] for r in runs]) for b in BENCH]
        print(f"| {row} | {len(runs)} | {runs[0]['epochs']} | {runs[0]['steps']} | "
              f"{np.mean([r.get('train_loop_seconds', np.nan) for r in runs]):.0f} | "
              + " | ".join(cells) + f" | {mean_std([r['avg'] for r in runs])} |"
              + (f" {paired_interval(runs, real)} |" if real else ""))
    if args.group == "calibration":  # the oracle's gain: real-n2N - real-nN, same tag and seeds
        print()
        for row, runs in rows.items():
            n, _, tag = row[len("real-n"):].partition("-")
            base = f"real-n{int(n) // 2}" + (f"-{tag}" if tag else "")
            if base in rows:
                print(f"Oracle gap {row} - {base}: {paired_interval(runs, rows[base])}  ")
    epochs = [c["epoch"] for c in next(iter(rows.values()))[0]["curve"]]
    if len(epochs) < 2:  # validation only at the end: no curve
        return
    print("\nToy Avg-H over epochs (mean over seeds):\n")
    print("| row | " + " | ".join(f"ep {e}" for e in epochs) + " |")
    print("|---" * (len(epochs) + 1) + "|")
    for row, runs in rows.items():
        curves = [[np.mean([c[b] for b in BENCH]) for c in r["curve"]] for r in runs]
        length = min(map(len, curves))
        print(f"| {row} | "
              + " | ".join(f"{np.mean([c[i] for c in curves]):.1f}" for i in range(length)) + " |")


def table_command(args):
    """`table GROUP [--into FILE.md]`: print the tables; with --into, replace the block they own
    (GROUP all: every block FILE.md has)."""
    if not args.into:
        if args.group == "all":
            sys.exit("error: table all needs --into FILE.md (it fills the blocks that page has)")
        return table(args)
    if args.group == "all":
        try:
            with open(args.into) as f:
                groups = re.findall(r"^<!-- report\.py table (\S+) -->$", f.read(), re.M)
        except OSError as e:
            sys.exit(f"error: --into {args.into}: {e.strerror}")
        for group in groups:
            table_command(argparse.Namespace(group=group, into=args.into))
        return
    begin = f"<!-- report.py table {args.group} -->"
    end = f"<!-- end report.py table {args.group} -->"
    try:
        with open(args.into) as f:
            page = f.read()
    except OSError as e:
        sys.exit(f"error: --into {args.into}: {e.strerror}")
    if page.count(begin) != 1 or page.count(end) != 1 or page.index(begin) > page.index(end):
        sys.exit(f"error: --into {args.into} needs one line {begin} and, after it, one line {end}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        table(args)
    head, rest = page.split(begin, 1)
    write_atomic(args.into, head + begin + "\n" + out.getvalue().strip("\n") + "\n" + end
                 + rest.split(end, 1)[1])
    print(f"wrote the {args.group} tables into {args.into}")


def demo_report(args):
    """runs/demo/report.md from the demo's JSON outputs: the results table first."""
    out = args.run
    with open(os.path.join(out, "eval.json")) as f:
        models = json.load(f)["models"]
    lines = ["# ScoreMix demo report", "",
             "| Discriminator | " + " | ".join(BENCH) + " | Toy Avg-H |",
             "|---" * (len(BENCH) + 2) + "|"]
    for name, scores in models.items():
        cells = [f"{scores[b]['accuracy']:.1f} +- {scores[b]['std']:.1f}" for b in BENCH]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {np.mean([scores[b]['accuracy'] for b in BENCH]):.1f} |")
    avgs = [np.mean([s[b]["accuracy"] for b in BENCH]) for s in models.values()]
    if len(avgs) == 2:
        verdict = "beats" if avgs[1] > avgs[0] else "does not beat"
        lines += ["", f"ScoreMix {verdict} the baseline in this run ({avgs[1] - avgs[0]:+.1f} "
                      "points Toy Avg-H, one "
                      "seed each; the replication measures seed spread and the controls)."]
    if args.settings:
        lines += ["", f"Settings: {args.settings}."]
    with open(os.path.join(out, "consistency.json")) as f:
        cons = json.load(f)
    lines += ["", "Generated images under the baseline discriminator (identity consistency: share "
                  "of images whose "
                  "nearest class centre is their own class; neighbour ratio: mean "
                  "neighbouring-pixel difference "
                  "over that of the real training images):", "",
              "| Images | Consistency (%) | Neighbour ratio |", "|---|---|---|"]
    for d, r in cons["samples"].items():
        c = "n/a (new identities)" if r["consistency"] is None else f"{r['consistency']:.1f}"
        lines.append(f"| {os.path.relpath(d, out)} | {c} | {r['neighbour_ratio']:.2f} |")
    with open(os.path.join(out, "cka.json")) as f:
        cka = json.load(f)["pairs"][0]
    lines += ["", f"Condition space vs baseline embedding space ({cka['a']}): CKA {cka['cka']:.3f} "
                  f"(permutation null {cka['null']['cka']['mean']:.3f} +- "
                  f"{cka['null']['cka']['std']:.3f}), "
                  f"CKNNA {cka['cknna']:.3f} (null {cka['null']['cknna']['mean']:.3f} +- "
                  f"{cka['null']['cknna']['std']:.3f}).", "",
              "Figures: `data/preview.png` (toy faces), `data/bench_preview.png` (benchmark "
              "pairs), `generator/samples-*.png` (class-conditional samples, rows = classes), "
              "`alpha_beta.png` (alpha x beta sweep, paper Fig. 2), `alpha_beta-triplets.png` "
              "(Repro A | ScoreMix | Repro B, Fig. 3).",
              "", "| Stage | Wall time (s) |", "|---|---|"]
    with open(os.path.join(out, "stage_times.tsv")) as f:
        times = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    lines += [f"| {name} | {sec} |" for name, sec in times]
    lines.append(f"| total | {sum(int(sec) for _, sec in times)} |")
    text = "\n".join(lines) + "\n"
    write_atomic(os.path.join(out, "report.md"), text)
    print(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("table", help="print the markdown tables of one results group")
    p.add_argument("group", help="results/<group> (or all, with --into: every block of the page)")
    p.add_argument("--into", metavar="FILE.md",
                   help="also write them into FILE.md between the lines "
                        "<!-- report.py table GROUP --> and <!-- end report.py table GROUP --> "
                        "(the generated part of a page)")
    p.set_defaults(func=table_command)
    p = sub.add_parser("demo", help="write RUN/report.md from run_demo.sh's outputs")
    p.add_argument("run", help="the demo's output folder (runs/demo)")
    p.add_argument("--settings", default="",
                   help="one line describing the run's settings, printed under the table")
    p.set_defaults(func=demo_report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
