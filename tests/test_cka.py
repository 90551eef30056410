"""Alignment metrics against docs/formulas.md section 7's golden values and their invariances."""
import os

import numpy as np
import pytest

import cka
from conftest import one_error_line


def golden_spaces():
    i = np.arange(32)[:, None]
    A = np.sin(16 * i + np.arange(16)[None])
    j = np.arange(24)[None]
    B = np.cos(0.5 * i + 0.3 * j ** 2) + 0.5 * A[:, np.arange(24) % 16]
    return cka.l2_normalise(A), cka.l2_normalise(B)


def test_golden_values():
    A, B = golden_spaces()
    assert cka.linear_cka(A, B) == pytest.approx(0.236367266365, abs=1e-10)
    assert cka.unbiased_cka(A, B) == pytest.approx(0.173020309122, abs=1e-10)
    assert cka.cknna(A, B, 5) == pytest.approx(0.305857493264, abs=1e-10)
    assert cka.cknna(A, B, 10) == pytest.approx(0.702275895691, abs=1e-10)
    assert cka.mutual_knn(A, B, 5) == pytest.approx(0.29375, abs=1e-12)


def test_cknna_with_all_neighbours_is_unbiased_cka():
    A, B = golden_spaces()
    assert cka.cknna(A, B, len(A) - 1) == pytest.approx(cka.unbiased_cka(A, B), abs=1e-12)


def test_cka_invariant_to_rotation_and_isotropic_scaling():
    A, B = golden_spaces()
    Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((24, 24)))
    for metric in (cka.linear_cka, cka.unbiased_cka):
        base = metric(A, B)
        assert metric(A, 3.0 * B @ Q) == pytest.approx(base, abs=1e-6)  # 1e-6: the eps in the ratio
        assert metric(A, A) == pytest.approx(1.0, abs=1e-5)


def test_self_alignment_is_perfect_and_torch_tensors_work():
    torch = pytest.importorskip("torch")
    A, _ = golden_spaces()
    assert cka.mutual_knn(A, A, 5) == 1.0
    assert cka.cknna(torch.tensor(A), torch.tensor(A), 5) == pytest.approx(1.0, abs=1e-5)

# ----------------------------------------------------------------------------- the command line


def cka_main(argv):
    from cka import main
    main([*map(str, argv)])


def test_cli_writes_finite_metrics_for_the_generator_and_the_discriminator(tiny_models, tiny_toy,
                                                                           tmp_path):
    import json
    import shutil
    fr, snapshot = tiny_models
    (tmp_path / "twin").mkdir()
    twin = shutil.copy(fr, tmp_path / "twin" / "model.pt")
    cka_main(["--generator", snapshot, "--fr", fr, twin, "--data", tiny_toy / "train",
              "--permutations", 3, "--out", tmp_path / "cka.json"])
    result = json.loads((tmp_path / "cka.json").read_text())
    # --k 10 lowered to the 5 neighbours a row has
    assert result["k"] == 5 and result["classes"] == 6
    kinds = [p["kind"] for p in result["pairs"]]
    assert kinds == ["condition vs embedding"] * 2 + ["embedding vs embedding"]
    assert result["pairs"][2]["cka"] == pytest.approx(1.0, abs=1e-5)  # a model against its copy
    assert sorted(os.listdir(tmp_path)) == ["cka.json", "twin"]


@pytest.mark.parametrize("which", ["fr", "generator"])
def test_a_model_with_a_nan_weight_writes_nothing(tiny_models, tiny_toy, tmp_path, capsys, which):
    from conftest import poisoned_copy
    fr, snapshot = tiny_models
    bad, key = poisoned_copy(fr if which == "fr" else snapshot, tmp_path / "bad.pt")
    (tmp_path / "cka.json").write_text("{}")
    argv = ["--fr", bad] if which == "fr" else ["--fr", fr, "--generator", bad]
    line = one_error_line(cka.main, [*argv, "--data", tiny_toy / "train", "--out",
                                     tmp_path / "cka.json"], capsys)
    assert f"{bad}: 1 non-finite value(s) in {key}" in line
    assert ((tmp_path / "cka.json").read_text() == "{}"
            and sorted(os.listdir(tmp_path)) == ["bad.pt", "cka.json"])


@pytest.mark.parametrize("argv,needle", [
    (["--k", 0], "argument --k: must be a positive integer, got 0"),
    (["--permutations", 0], "argument --permutations: must be a positive integer"),
    (["--batch-size", -4], "argument --batch-size: must be a positive integer"),
    (["--fr", "SNAP"], "is not a train_arcface.py model.pt"),
    (["--generator", "FR"], "is not a train_diffusion.py network snapshot"),
    (["--out", "DIR"], "is a folder, not a file"),
    (["--data", "missing"], "not found: missing"),
])
def test_bad_input_gives_one_error_line(tiny_models, tiny_toy, tmp_path, capsys, argv, needle):
    fr, snapshot = tiny_models
    (tmp_path / "dir").mkdir()
    subst = {"SNAP": snapshot, "FR": fr, "DIR": tmp_path / "dir"}
    base = {"--fr": [fr], "--data": [tiny_toy / "train"], "--out": [tmp_path / "cka.json"]}
    base[argv[0]] = [subst.get(a, a) for a in argv[1:]]
    line = one_error_line(cka.main, [a for flag, values in base.items() for a in (flag, *values)],
                          capsys)
    assert needle in line
    assert os.listdir(tmp_path) == ["dir"]
