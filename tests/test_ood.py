"""Out-of-distribution scores (imgrec.infer.ood): each score against its definition, the threshold's accept
rate, AUROC against the pairwise definition, and that the feature scores separate a far cluster."""
import numpy as np
import pytest

from imgrec.infer import ood


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_msp_and_energy_match_their_definitions():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (50, 7))
    for t in (1.0, 0.5, 2.0):
        assert np.allclose(ood.score("msp", z, temperature=t), _softmax(z / t).max(1))
        assert np.allclose(ood.score("energy", z, temperature=t), t * np.log(np.exp(z / t).sum(1)))


def _clusters(rng, n, d=16, k=3):
    centres = rng.normal(0, 1, (k, d)) * 4
    labels = rng.integers(0, k, n)
    return centres[labels] + rng.normal(0, 0.3, (n, d)), labels, centres


def test_knn_is_minus_the_kth_neighbour_distance_of_normalised_features():
    rng = np.random.default_rng(1)
    f, y, _ = _clusters(rng, 300)
    stats = ood.fit_stats(f, y, 3)
    q = rng.normal(0, 1, (20, 16))
    got = ood.score("knn", np.zeros((20, 3)), q, stats, k=5)
    bank = stats.bank.astype(np.float32)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    d = np.linalg.norm(qn[:, None, :] - bank[None], axis=2)
    want = -np.sort(d, axis=1)[:, 4]
    assert np.allclose(got, want, atol=2e-3)  # the bank is float16


def test_feature_scores_separate_a_far_cluster_and_need_statistics():
    rng = np.random.default_rng(2)
    f, y, centres = _clusters(rng, 600)
    stats = ood.fit_stats(f[:500], y[:500], 3)
    ins = f[500:]
    far = rng.normal(0, 1, (100, 16)) * 4  # not near any class centre
    for kind in ood.FEATURE_SCORES:
        a = ood.score(kind, np.zeros((len(ins), 3)), ins, stats)
        b = ood.score(kind, np.zeros((len(far), 3)), far, stats)
        assert ood.auroc(a, b) > 0.95, kind
        with pytest.raises(ValueError):
            ood.score(kind, np.zeros((2, 3)))
    with pytest.raises(ValueError):
        ood.score("nope", np.zeros((2, 3)))


def test_bank_is_float16_and_bounded():
    rng = np.random.default_rng(3)
    f, y, _ = _clusters(rng, 2500)
    stats = ood.fit_stats(f, y, 3, bank_max=1000)
    assert stats.bank.dtype == np.float16 and len(stats.bank) <= 1000
    assert set(stats.arrays()) == {"bank", "means", "precision"}


def test_threshold_accepts_the_stated_share():
    s = np.arange(1000, dtype=float)
    t = ood.threshold_for_accept_rate(s, 0.95)
    assert (s >= t).mean() == pytest.approx(0.95, abs=0.002)
    with pytest.raises(ValueError):
        ood.threshold_for_accept_rate(s, 0.0)


def test_auroc_and_fpr_match_the_pairwise_definition():
    rng = np.random.default_rng(4)
    a = np.round(rng.normal(1, 1, 200), 1)  # rounded: ties between the two sets
    b = np.round(rng.normal(0, 1, 150), 1)
    pair = ((a[:, None] > b[None]).sum() + 0.5 * (a[:, None] == b[None]).sum()) / (len(a) * len(b))
    assert ood.auroc(a, b) == pytest.approx(pair)
    t = ood.threshold_for_accept_rate(a, 0.95)
    assert ood.fpr_at_tpr(a, b) == pytest.approx((b >= t).mean())
