"""Alignment metrics against PROTOCOLS.md section 7's golden values and their invariances."""
import numpy as np
import pytest

import cka


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
