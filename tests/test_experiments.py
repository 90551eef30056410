"""experiments.py's bookkeeping (which sensitivity rows run) and report.py's table arithmetic."""
import argparse
import json
import os

import numpy as np

import experiments
import report
from experiments import BENCH


def test_sensitivity_rows_skip_the_main_setting():
    rows = [r[0] for r in experiments.sensitivity_rows(argparse.Namespace(guidance=1.0, steps=32))]
    assert "real+scoremix-dist-emb-w1" not in rows and "real+scoremix-dist-emb-steps32" not in rows
    assert {"real+scoremix-dist-emb-w1.3", "real+scoremix-dist-emb-w2",
            "real+scoremix-dist-emb-steps16", "real+scoremix-dist-emb-alpha0.3"} <= set(rows)
    assert "real+scoremix-dist-emb-alpha0.3 (=)" in rows and "real+repro-w1.3 (=)" in rows
    for row, sources, flags, all_seeds in experiments.sensitivity_rows(
        argparse.Namespace(guidance=1.3, steps=16)):
        assert sources == ["real", row[5:].replace(" (=)", "")]
        assert ("=" in flags) == row.endswith("(=)")
        # Repro joins real classes
        assert ("--merge-by-name" in flags) == all_seeds == row.startswith("real+repro")


def result(tmp_path, row, seed, avg, sources):
    acc = {b: avg for b in BENCH}
    (tmp_path / "replication").mkdir(exist_ok=True)
    path = tmp_path / "replication" / f"{experiments.row_file(row)}-seed{seed}.json"
    path.write_text(json.dumps({"row": row, "seed": seed, "steps": 192, "accuracy": acc, "avg": avg,
                                "sources": sources, "tar_at_far_1e-3": {b: 10.0 for b in BENCH}}))


def test_replication_table_gives_the_share_of_the_oracle_gain(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    for seed, (real, oracle, mix) in enumerate([(78.0, 81.0, 79.0), (78.0, 81.0, 80.0)]):
        result(tmp_path, "real", seed, real, ["real"])
        result(tmp_path, "oracle", seed, oracle, ["oracle"])
        result(tmp_path, "real+scoremix-dist-emb", seed, mix, ["real", "scoremix-dist-emb"])
    result(tmp_path, "real+scoremix-dist-emb-alpha0.3 (=)", 0, 77.0,
           ["real", "scoremix-dist-emb-alpha0.3"])
    result(tmp_path, "oracle (=)", 0, 80.0, ["oracle"])  # a (=) row's share: of the (=) oracle's
    (tmp_path / "replication" / "synthetic").mkdir()
    spread = {"neighbour_ratio": 0.9, "intra_cosine": 0.9, "inter_cosine": 0.0, "consistency": 95.0}
    # a record from before churn / copy measurement
    for name, extra in (("old", {}), ("new", {"churn": 40})):
        near = {"nearest_real_distance": 36.5} if extra else {}
        (tmp_path / "replication" / "synthetic" / f"{name}.json").write_text(json.dumps(
            {"name": name, "mode": "repro", "selection": None, "alpha": 0.5, "guidance": 1,
             "steps": 32, "identities": 32, "per_identity": 32, "cpu_seconds_per_1000": 500,
             **extra, "samples": {**spread, **near},
             "real_heldout": {**spread, "nearest_real_distance": 39.2},
             "real_train": {"intra_cosine": 0.9, "inter_cosine": 0.0}}))
    report.table(argparse.Namespace(group="replication"))
    out = capsys.readouterr().out
    assert ("| new | repro |  | 0.5 | 1 | 32 | 40 | 32 x 32 | 95.0 |" in out
            and "| 36.5 (39.2) | 500 |" in out)
    assert "| old | repro |  | 0.5 | 1 | 32 | 0 | 32 x 32 |" in out
    main, sensitivity = out.split("Sensitivity")  # sensitivity rows print in a table of their own
    assert "alpha0.3" in sensitivity and "alpha0.3" not in main and "| real |" in main
    lines = {line.split(" | ")[0][2:]: line for line in out.splitlines() if line.startswith("| ")}
    assert lines["real+scoremix-dist-emb"].split(" | ")[-2] == "+0.50"  # 1.5 of 3
    # claims: seed-paired differences +1, +2 -> +1.50, t(1) 12.706 x 0.5
    assert ("| ScoreMix (distant) > real | real+scoremix-dist-emb - real "
            "| +1.50 [-4.85, +7.85] (2) |  |") in out
    assert lines["real+scoremix-dist-emb-alpha0.3 (=)"].split(" | ")[-2] == "-0.50"  # -1 of 2
    # vs real's seed 0
    assert lines["real+scoremix-dist-emb-alpha0.3 (=)"].split(" | ")[-4] == "-1.00 (1 seed)"
    assert "| 79.5 +- 0.7 |" in lines["real+scoremix-dist-emb"]  # sample std of 79, 80
    assert lines["real+scoremix-dist-emb"].split(" | ")[-4] == "+1.50 [-4.85, +7.85] (2)"
    assert lines["real"].split(" | ")[-4] == ""  # no difference of real only to itself
    assert lines["real+scoremix-dist-emb"].split(" | ")[-2] == "+0.50"  # (79.5 - 78) / (81 - 78)
    assert lines["oracle"].split(" | ")[-2] == "+1.00" and lines["real"].split(" | ")[-2] == "+0.00"


def test_figure_shows_one_row_per_set_and_rejects_a_missing_set(tmp_path, monkeypatch):
    import numpy as np
    import pytest
    from PIL import Image
    for folder in ("real/train", "runs/replication/synthetic/mix"):
        for ident in ("a", "b"):
            (tmp_path / folder / ident).mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(
                tmp_path / folder / ident / "0.png")
    (tmp_path / "runs/replication/synthetic/mix/manifest.csv").write_text("not a folder\n")
    monkeypatch.setattr(experiments, "toy_data", lambda n: str(tmp_path / "real"))
    monkeypatch.setattr(experiments, "RUNS", str(tmp_path / "runs"))
    out = tmp_path / "grid.png"
    experiments.figure(argparse.Namespace(sets=["mix"], identities=32, columns=4, out=str(out)))
    assert Image.open(out).size[1] > 2 * 16  # two rows of 8-px cells at zoom 2
    with pytest.raises(SystemExit, match="does not exist"):
        experiments.figure(
            argparse.Namespace(sets=["absent"], identities=32, columns=4, out=str(out)))


def test_paired_interval_is_a_t_interval_of_seed_paired_differences():
    ref = [{"seed": s, "avg": a} for s, a in enumerate([70.0, 71.0, 72.0])]
    runs = ([{"seed": s, "avg": a} for s, a in enumerate([71.0, 73.0, 72.0])]
            + [{"seed": 9, "avg": 0.0}])
    # differences 1, 2, 0: mean 1, sample std 1, t(0.975, 2) = 4.303 -> half width 4.303 / sqrt(3) =
    # 2.484
    assert report.paired_interval(runs, ref) == "+1.00 [-1.48, +3.48] (3)"
    assert report.paired_interval(runs[:1], ref) == "+1.00 (1 seed)"


def test_regime_recipe_table_flags_recipes_whose_2x_run_moves_by_more_than_a_std(tmp_path,
                                                                                 monkeypatch,
                                                                                 capsys):
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    (tmp_path / "regime_recipe").mkdir()
    values = {"e24": (80.0, 81.0, 82.0), "e24-2x": (80.5, 81.5, 82.5), "e12": (75.0, 75.5, 76.0),
              "e12-2x": (78.0, 78.5, 79.0), "e12-oracle": (77.0, 77.0, 77.0)}
    for row, avgs in values.items():
        for seed, avg in enumerate(avgs):
            (tmp_path / "regime_recipe" / f"{row}-seed{seed}.json").write_text(json.dumps(
                {"row": row, "seed": seed, "epochs": 24, "avg": avg, "accuracy": {"val_lfw": avg}}))
    report.table(argparse.Namespace(group="regime_recipe"))
    lines = {line.split(" | ")[0][2:]: line.split(" | ")
             for line in capsys.readouterr().out.splitlines() if line.startswith("| e")}
    assert lines["e24"][3:7] == ["81.00 +- 1.00", "81.50 +- 1.00", "+0.50 [+0.50, +0.50] (3)",
                                 "yes"]
    assert lines["e12"][6] == "no" and lines["e12"][7].startswith("+1.50 [")  # 3.0 apart, std 0.5


def test_pixel_average_set_is_the_mean_of_the_parents_images(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    real = {}
    for c in ("a", "b", "c"):
        real[c] = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
        (tmp_path / "real" / c).mkdir(parents=True)
        for n, x in enumerate(real[c]):
            Image.fromarray(x).save(tmp_path / "real" / c / f"{n}.png")
    (tmp_path / "pairs.csv").write_text("class_a,class_b,distance,rank\na,c,1.5,1\nb,a,1.2,2\n")
    out = tmp_path / "avg"
    experiments.pixel_average_set(str(tmp_path / "pairs.csv"), str(tmp_path / "real"), str(out), 2)
    assert sorted(p.name for p in out.iterdir()) == ["avg_a_c", "avg_b_a", "manifest.csv"]
    for n in range(2):
        got = np.asarray(Image.open(out / "avg_a_c" / f"{n}.png"))
        assert np.array_equal(got,
                              np.round((real["a"][n] / 1.0 + real["c"][n]) / 2).astype(np.uint8))
    assert not (out / "avg_a_c" / "2.png").exists()
    assert (out / "manifest.csv").read_text().splitlines()[1:] == ["avg_a_c,average,a;c",
                                                                   "avg_b_a,average,b;a"]


def test_regime_gives_odd_seeds_the_second_draw_and_the_equal_steps_row_the_real_steps(tmp_path,
                                                                                       monkeypatch):
    calls, sets = [], []
    monkeypatch.setattr(experiments, "RESULTS", str(tmp_path))
    monkeypatch.setattr(experiments, "regime_data", lambda n, p: f"data{n}")
    monkeypatch.setattr(experiments, "recipe_run", lambda *a, **k: "baseline.pt")
    monkeypatch.setattr(experiments, "sample_set", lambda group, name, mode, sel, data, net, base,
                        **k:
                        sets.append((name, mode, k["draw"], net, base)) or f"synthetic/{name}")

    def run(group, row, seed, dirs, bench, extra, **k):
        calls.append((row, seed, dirs, extra, k["draw"]))
        if row == "real":
            (tmp_path / "regime").mkdir(exist_ok=True)
            (tmp_path / "regime" / f"real-seed{seed}.json").write_text(json.dumps({"steps": 768}))
    monkeypatch.setattr(experiments, "discriminator_run", run)
    aligned = []
    monkeypatch.setattr(experiments, "alignment", lambda *a: aligned.append(a))
    args = argparse.Namespace(identities=256, per_identity=16, kimg=700, guide_kimg=200,
                              guidance=1.0, steps=32,
                              seeds=[0, 1], rows=["real", "real+repro",
                                                  "real+scoremix-dist-emb (=)", "real-2x",
                                                  "real+average-dist-emb"])
    experiments.regime(args)
    got = {(row, seed): (dirs, extra, draw) for row, seed, dirs, extra, draw in calls}
    assert got["real+repro", 0] == (["data256/train", "synthetic/repro"],
                                    ["--epochs", 24, "--val-every", 24, "--merge-by-name"], 1)
    assert got["real+repro", 1][0] == ["data256/train",
                                       "synthetic/repro-draw2"] and got["real+repro", 1][2] == 2
    assert got["real+scoremix-dist-emb (=)", 1][1][-2:] == ["--steps", "768"]
    assert got["real-2x", 0][1][:2] == ["--epochs", 48]
    # one draw: deterministic
    assert got["real+average-dist-emb", 1][0][1] == "synthetic/average-dist-emb"
    order = ["real", "real-2x", "real+repro", "real+average-dist-emb", "real+scoremix-dist-emb (=)"]
    # seed-major, table order
    assert [c[:2] for c in calls] == [(r, 0) for r in order] + [(r, 1) for r in order]
    assert ("repro-draw2", "repro", 2) in [s[:3] for s in sets]
    # CKA after the rows: both kept snapshots vs two real-only seeds and the oracle, real classes
    (group, snapshots, runs, data), = aligned
    assert group == "regime" and [os.path.basename(p) for p in snapshots] == [
        "network-snapshot-000200.pt", "network-snapshot-000700.pt"]
    assert runs == [("real", 0), ("real", 1), ("oracle", 0)] and data == "data256/train"
    assert all(s[3].endswith("network-snapshot-000700.pt") and s[4] == "baseline.pt" for s in sets)


def test_regime_skips_a_recorded_row_before_sampling_its_sets(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "RESULTS", str(tmp_path))
    monkeypatch.setattr(experiments, "regime_data", lambda n, p: f"data{n}")
    monkeypatch.setattr(experiments, "recipe_run", lambda *a, **k: "baseline.pt")
    sampled, trained = [], []
    monkeypatch.setattr(experiments, "sample_set", lambda group, name, *a, **k:
                        sampled.append(name) or f"synthetic/{name}")
    monkeypatch.setattr(experiments, "discriminator_run", lambda g, row, seed, *a, **k:
                        trained.append((row, seed)))
    monkeypatch.setattr(experiments, "alignment", lambda *a: None)
    (tmp_path / "regime").mkdir()
    (tmp_path / "regime" / "real+repro-seed0.json").write_text("{}")
    experiments.regime(argparse.Namespace(identities=256, per_identity=16, kimg=700, guide_kimg=200,
                                          guidance=1.0, steps=32, seeds=[0, 1],
                                          rows=["real+repro"]))
    assert trained == [("real+repro", 1)] and sampled == ["repro-draw2"]


def test_regime_table_shares_and_claims_are_seed_paired(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    (tmp_path / "regime" / "synthetic").mkdir(parents=True)
    values = {"real": (80.0, 81.0, 82.0), "oracle": (82.0, 84.0, 84.0),
              "real+scoremix-dist-emb": (81.0, 82.0, 83.5)}
    for row, avgs in values.items():
        for seed, avg in enumerate(avgs):
            (tmp_path / "regime" / f"{row}-seed{seed}.json").write_text(json.dumps(
                {"row": row, "seed": seed, "epochs": 24, "steps": 768, "avg": avg,
                 "allpairs": {"tar_at_far_1e-3": avg - 10, "tar_at_far_1e-4": avg - 20 - seed,
                              "tar_at_far_1e-5": avg - 40}}))
    sam = {"consistency": None, "intra_cosine": 0.8, "inter_cosine": 0.1,
           "nearest_real_distance": 30.0, "parent_cosine": -0.2, "mix_parent_cosine": 0.4}
    (tmp_path / "regime" / "synthetic" / "scoremix-dist-emb.json").write_text(json.dumps(
        {"name": "scoremix-dist-emb", "mode": "scoremix", "selection": ["embedding", "dist", 2],
         "draw": 1, "guidance": 1, "identities": 256, "per_identity": 16,
         "cpu_seconds_per_1000": 470.0, "samples": sam,
         "real_heldout": {"consistency": 92.6, "nearest_real_distance": 35.0},
         "real_train": {"intra_cosine": 0.85, "inter_cosine": 0.01}}))
    report.table(argparse.Namespace(group="regime"))
    out = capsys.readouterr().out
    mix = next(line for line in out.splitlines() if line.startswith("| real+scoremix-dist-emb |"))
    # gains 1, 1, 1.5 (mean 1.1667); oracle gaps 2, 3, 2 (mean 2.3333): share 0.50
    assert "+1.17 [" in mix and "+0.50 (+1.17 / +2.33, 3)" in mix
    claim = next(line for line in out.splitlines() if line.startswith("| ScoreMix (distant, "
                                                                      "embedding) > real"))
    assert "+1.17 [+0.45, +1.88] (3)" in claim  # t(2) 4.303 x sample std 0.2887 / sqrt 3
    assert "| -0.200 (0.010) | 0.400 |" in out
    assert "Machines (runs): not recorded (9)" in out


def test_table_regimes_pairs_each_claim_within_each_regime(tmp_path, monkeypatch, capsys):
    """Both regimes' claims side by side; the small regime's real-48ep stands for real-2x."""
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    rows = {"replication": {"real": (78.0, 79.0), "real-48ep": (77.0, 77.5)},
            "regime": {"real": (84.0, 83.0), "real-2x": (83.0, 83.5),
                       "real+scoremix-dist-emb": (82.0, 82.0)}}
    for group, values in rows.items():
        (tmp_path / group).mkdir()
        for row, avgs in values.items():
            for seed, avg in enumerate(avgs):
                (tmp_path / group / f"{row}-seed{seed}.json").write_text(json.dumps(
                    {"row": row, "seed": seed, "avg": avg,
                     "allpairs": {"tar_at_far_1e-4": avg - 60 - seed}}))
    report.table(argparse.Namespace(group="regimes"))
    lines = capsys.readouterr().out.splitlines()
    longer = next(line for line in lines if line.startswith("| real trained as long"))
    # 32: -1.0, -1.5 (mean -1.25); 256: -1.0, +0.5 (mean -0.25), TAR the same differences;
    # ScoreMix -2, -1: -1.5 +- t(1) 12.706 x 0.7071 / sqrt 2, no small-regime row
    assert "| -1.25 [" in longer and longer.count("| -0.25 [") == 2
    scoremix = next(line for line in lines if line.startswith("| ScoreMix (distant) > real"))
    assert scoremix.endswith("|  | -1.50 [-7.85, +4.85] (2) | -1.50 [-7.85, +4.85] (2) |")


def test_table_regime_brief_pairs_both_measures_by_seed(tmp_path, monkeypatch, capsys):
    import pytest
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    (tmp_path / "regime").mkdir()
    for group in ("regime_brief", "brief", "repro"):  # one error line, not a KeyError
        with pytest.raises(SystemExit, match="^error: no real-only results under results/"):
            report.table(argparse.Namespace(group=group))
    for row, avgs in {"real": (84.0, 83.0), "oracle": (86.0, 86.0),
                      "real+scoremix-dist-emb": (83.0, 82.5)}.items():
        for seed, avg in enumerate(avgs):
            (tmp_path / "regime" / f"{row}-seed{seed}.json").write_text(json.dumps(
                {"row": row, "seed": seed, "avg": avg,
                 "allpairs": {"tar_at_far_1e-4": 2 * avg - 150}}))
    report.table(argparse.Namespace(group="regime_brief"))
    lines = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines()}
    # oracle - real: +2, +3; its TAR differences twice those; rows without runs are left out
    assert lines["+ 256 more real identities (the oracle)"] == (
        "| + 256 more real identities (the oracle) | 86.00 +- 0.00 | +2.50 [-3.85, +8.85] (2) | "
        "22.00 +- 0.00 | +5.00 [-7.71, +17.71] (2) |")
    assert lines["+ ScoreMix, distant pairs"].startswith(
        "| + ScoreMix, distant pairs | 82.75 +- 0.35 | -0.75 [-3.93, +2.43] (2) |")
    assert "+ ScoreMix, close pairs" not in lines


def test_table_cka_prints_every_cka_output_and_refuses_none(tmp_path, monkeypatch, capsys):
    import pytest
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    with pytest.raises(SystemExit, match="no results under results/cka"):
        report.table(argparse.Namespace(group="cka"))
    null = {"mean": 0.1, "std": 0.02}
    pair = {"a": "gen.pt", "b": "fr-seed0", "cka": 0.5, "unbiased_cka": 0.25, "cknna": 0.3,
            "mutual_knn": 0.2,
            "null": {m: null for m in ("cka", "unbiased_cka", "cknna", "mutual_knn")}}
    (tmp_path / "cka").mkdir()
    (tmp_path / "cka" / "run.json").write_text(
        json.dumps({"k": 10, "permutations": 20, "classes": 32, "pairs": [pair]}))
    report.table(argparse.Namespace(group="cka"))
    out = capsys.readouterr().out
    assert ("| gen.pt | fr-seed0 | 0.500 (0.100 +- 0.020) | 0.250 (0.100 +- 0.020) |" in out
            and "32 classes" in out)


def test_table_repro_puts_each_repro_set_beside_its_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    for seed, (real, repro, repro_eq) in enumerate([(78.0, 76.0, 77.5), (79.0, 76.5, 78.5)]):
        result(tmp_path, "real", seed, real, ["real"])
        result(tmp_path, "real+repro", seed, repro, ["real", "repro"])
        result(tmp_path, "real+repro (=)", seed, repro_eq, ["real", "repro"])
    (tmp_path / "replication" / "synthetic").mkdir()
    stats = {"consistency": 95.7, "neighbour_ratio": 0.93, "intra_cosine": 0.87}
    (tmp_path / "replication" / "synthetic" / "repro.json").write_text(json.dumps(
        {"name": "repro", "samples": stats, "real_heldout": {**stats, "consistency": 96.9}}))
    report.table(argparse.Namespace(group="repro"))
    out = capsys.readouterr().out
    # sample std of (76, 76.5) 0.354; seed-paired -2.0, -2.5: -2.25, t(1) 12.706 x 0.354 / sqrt 2
    assert ("| deterministic Heun (the paper's sampler) | 95.7 | 0.93 | 0.87 | 76.2 +- 0.4 | "
            "-2.25 [-5.43, +0.93] (2) | 78.0 +- 0.7 | -0.50 [-0.50, -0.50] (2) |") in out
    assert "| real only, 48 epochs |  | |  |  |  |  |  |" in out  # a row not run yet stays empty


def test_regime_equal_steps_row_without_the_real_row_is_refused(tmp_path, monkeypatch):
    import pytest
    monkeypatch.setattr(experiments, "RESULTS", str(tmp_path))
    monkeypatch.setattr(experiments, "regime_data", lambda n, p: f"data{n}")
    monkeypatch.setattr(experiments, "recipe_run", lambda *a, **k: "baseline.pt")
    monkeypatch.setattr(experiments, "sample_set", lambda *a, **k: "synthetic")
    monkeypatch.setattr(experiments, "discriminator_run", lambda *a, **k: pytest.fail("trained"))
    args = argparse.Namespace(identities=256, per_identity=16, kimg=700, guide_kimg=200,
                              guidance=1.0, steps=32, seeds=[0],
                              rows=["real+scoremix-dist-emb (=)"])
    with pytest.raises(SystemExit, match="run the real row first"):
        experiments.regime(args)


def test_table_into_replaces_only_the_block_it_owns_and_refuses_a_page_without_one(tmp_path,
                                                                                   monkeypatch,
                                                                                   capsys):
    import pytest
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    (tmp_path / "cka").mkdir()
    (tmp_path / "cka" / "a.json").write_text(json.dumps({"k": 1, "permutations": 2, "classes": 3,
                                                          "pairs": []}))
    page = tmp_path / "page.md"
    page.write_text(
        "intro\n<!-- report.py table cka -->\nold table\n<!-- end report.py table cka -->\nend\n")
    report.table_command(argparse.Namespace(group="cka", into=str(page)))
    text = page.read_text()
    assert text.startswith("intro\n<!-- report.py table cka -->\ncka/a.json:") and text.endswith(
        "3 classes, k = 1, null: 2 row permutations (+- the null's std)\n<!-- end report.py table "
        "cka -->\nend\n")
    assert "old table" not in text
    page.write_text("a\n<!-- report.py table cka -->\nold\n<!-- end report.py table cka -->\nb\n")
    report.table_command(argparse.Namespace(group="all", into=str(page)))  # every block
    assert page.read_text() == text.replace("intro", "a").replace("\nend\n", "\nb\n")
    page.write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs one line <!-- report.py table cka -->"):
        report.table_command(argparse.Namespace(group="cka", into=str(page)))
    assert page.read_text() == "no markers\n"


def test_mean_std_is_the_sample_std():
    assert report.mean_std([1.0, 2.0, 3.0]) == "2.0 +- 1.0"  # ddof 1 (population std: 0.8)
    assert report.mean_std([1.0, 2.0], 2) == "1.50 +- 0.71" and report.mean_std([4.0]) == "4.0"


def test_table_brief_and_the_calibration_gap_are_seed_paired(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    for seed, (real, oracle, mix) in enumerate([(78.0, 81.0, 79.0), (79.0, 81.0, 81.0)]):
        result(tmp_path, "real", seed, real, ["real"])
        result(tmp_path, "oracle", seed, oracle, ["oracle"])
        result(tmp_path, "real+scoremix-dist-emb (=)", seed, mix, ["real", "scoremix-dist-emb"])
    report.table(argparse.Namespace(group="brief"))
    lines = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines()}
    # oracle - real: 3, 2; (=) mix - real: 1, 2; no (=) oracle run: empty cells
    assert lines["+ 32 more real identities (the oracle)"] == (
        "| + 32 more real identities (the oracle) | 81.0 +- 0.0 | +2.50 [-3.85, +8.85] (2) |  |  |")
    assert lines["+ ScoreMix, distant pairs"].endswith("| 80.0 +- 1.4 | +1.50 [-4.85, +7.85] (2) |")
    assert lines["real only (32 identities)"] == ("| real only (32 identities) | 78.5 +- 0.7 | | "
                                                  "78.5 +- 0.7 | |")
    for seed, (base, oracle) in enumerate([(78.0, 81.0), (78.0, 82.0)]):
        for row, avg in (("real-n32-straight", base), ("real-n64-straight", oracle)):
            path = tmp_path / "calibration" / f"{row}-seed{seed}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps({"row": row, "seed": seed, "avg": avg, "epochs": 24,
                                        "steps": 192, "accuracy": {b: avg for b in BENCH},
                                        "curve": [{"epoch": 24, **{b: avg for b in BENCH}}]}))
    report.table(argparse.Namespace(group="calibration"))
    assert ("Oracle gap real-n64-straight - real-n32-straight: +3.50 [-2.85, +9.85] (2)"
            in capsys.readouterr().out)


def test_the_small_regime_pins_the_arcface_gradient_it_was_trained_with(tmp_path, monkeypatch):
    """Its committed results were trained with the 2022 gradient: its commands must reproduce
    them under today's default; --train-args comes after the pin, so it can override it."""
    extras = []
    monkeypatch.setattr(experiments, "toy_data", lambda n: str(tmp_path / f"toy{n}"))
    monkeypatch.setattr(experiments, "discriminator_run",
                        lambda group, row, seed, dirs, bench, extra, **k: extras.append(extra))
    experiments.calibration(argparse.Namespace(identities=32, tag="", seeds=[0],
                                               train_args="--margin-grad straight"))
    assert extras and all(e[:2] == ["--margin-grad", "textbook"] for e in extras)
    assert all(e[-2:] == ["--margin-grad", "straight"] for e in extras)


def test_alignment_waits_for_every_model_and_runs_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(experiments, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(experiments, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(experiments, "sh", lambda *cmd: calls.append(cmd))
    runs = [("real", 0), ("oracle", 0)]
    experiments.alignment("regime", ["g.pt"], runs, "train")
    assert calls == []  # no model yet
    for row, seed in runs:
        (tmp_path / "runs" / "regime" / f"{row}-seed{seed}").mkdir(parents=True)
        (tmp_path / "runs" / "regime" / f"{row}-seed{seed}" / "model.pt").write_text("")
    experiments.alignment("regime", ["g.pt"], runs, "train")
    (cmd,) = calls
    assert cmd[:2] == ("cka.py", "--generator") and cmd[-2:] == ("--out", str(
        tmp_path / "results" / "regime" / "cka.json"))
    (tmp_path / "results" / "regime").mkdir(parents=True)
    (tmp_path / "results" / "regime" / "cka.json").write_text("{}")
    experiments.alignment("regime", ["g.pt"], runs, "train")
    assert len(calls) == 1  # recorded: skipped
