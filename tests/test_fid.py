"""FID / IS / precision-recall against closed forms and configurations with known answers."""
import numpy as np
import pytest

from jaxdistill.eval import fid


def test_stats_match_numpy_and_edm_formula():
    f = np.random.default_rng(0).normal(size=(500, 7)) * 3 + 1
    mu, sigma = fid.feature_stats(f)
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-10)
    acc = fid.GaussianStats(7)  # streaming in uneven batches gives the same numbers
    for part in np.array_split(f, 3):
        acc.update(part)
    np.testing.assert_allclose(acc.result()[1], sigma, rtol=1e-10)


def test_fid_of_a_set_against_itself_is_zero():
    f = np.random.default_rng(1).normal(size=(300, 16))
    mu, sigma = fid.feature_stats(f)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fid_between_gaussians_matches_closed_form():
    """Sample statistics of two Gaussians: the formula on the sample (mu, sigma) equals the
    closed form evaluated independently (eigendecomposition instead of sqrtm), and is close
    to the population value."""
    rng = np.random.default_rng(2)
    d = 8
    a1, a2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a1 @ a1.T / d + np.eye(d), a2 @ a2.T / d + 0.5 * np.eye(d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)

    def closed_form(m1, s1, m2, s2):
        # tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), the latter symmetric PSD
        w, v = np.linalg.eigh(s1)
        r1 = v @ np.diag(np.sqrt(w)) @ v.T
        inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
        return np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(inner).sum()

    x = rng.multivariate_normal(m1, s1, size=200_000)
    y = rng.multivariate_normal(m2, s2, size=200_000)
    (mx, sx), (my, sy) = fid.feature_stats(x), fid.feature_stats(y)
    got = fid.frechet_distance(mx, sx, my, sy)
    np.testing.assert_allclose(got, closed_form(mx, sx, my, sy), rtol=1e-9)
    np.testing.assert_allclose(got, closed_form(m1, s1, m2, s2), rtol=2e-2)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s
    assert np.isclose(fid.frechet_distance([0.0], [[4.0]], [1.0], [[1.0]]), 1 + 1)


def test_stats_npz_round_trip_in_edm_layout(tmp_path):
    f = np.random.default_rng(3).normal(size=(50, 4))
    mu, sigma = fid.feature_stats(f)
    path = str(tmp_path / "ref" / "cifar10-32x32")  # no .npz suffix: written as named
    fid.save_stats(path, mu, sigma, features=f)
    loaded = fid.load_stats(path)
    assert loaded["mu"].dtype == np.float64 and loaded["sigma"].shape == (4, 4)
    np.testing.assert_array_equal(loaded["mu"], mu)
    np.testing.assert_array_equal(loaded["sigma"], sigma)
    np.testing.assert_allclose(loaded["features"], f, rtol=1e-6)
    np.savez(tmp_path / "edm.npz", mu=mu, sigma=sigma)  # EDM's files: just mu and sigma
    assert set(fid.load_stats(str(tmp_path / "edm.npz"))) == {"mu", "sigma"}
    with pytest.raises(FileNotFoundError, match="config.eval.ref_stats"):
        fid.load_stats(str(tmp_path / "missing.npz"))


def test_inception_score_closed_forms():
    c, n = 10, 1000
    labels = np.arange(n) % c
    confident = 100.0 * np.eye(c)[labels]       # one-hot predictions, classes balanced
    mean, std = fid.inception_score(confident, splits=10)
    assert np.isclose(mean, c, rtol=1e-9) and std < 1e-9
    assert np.isclose(fid.inception_score(np.zeros((n, c)))[0], 1.0)  # uniform p(y|x)
    # p(y|x) = softmax([a, 0]) for half, softmax([0, a]) for the other half:
    # KL = log 2 - H(p), IS = 2 exp(-H(p)), H(p) = binary entropy of sigmoid(a).
    a = 1.5
    logits = np.where((np.arange(n) % 2)[:, None] == np.array([0, 1])[None], a, 0.0)
    p = 1 / (1 + np.exp(-a))
    h = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    assert np.isclose(fid.inception_score(logits)[0], 2 * np.exp(-h), rtol=1e-9)


def test_precision_recall_known_configurations():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(400, 5))
    p, r = fid.precision_recall(real, real.copy())
    assert p == 1.0 and r == 1.0
    far = real + 100.0
    assert fid.precision_recall(real, far) == (0.0, 0.0)
    # Generated = real plus points far away: precision = share of the copied points, recall 1.
    fake = np.concatenate([real[:300], rng.normal(size=(100, 5)) + 100.0])
    p, r = fid.precision_recall(real, fake)
    assert p == 0.75
    assert r >= 0.9  # the 100 real points not copied are mostly inside the copies' balls
    # Mode dropping: generated covers one of two well separated clusters -> recall about 1/2.
    two = np.concatenate([rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 50.0])
    one = rng.normal(size=(400, 2))
    p, r = fid.precision_recall(two, one)
    assert p > 0.95 and 0.45 < r < 0.55


def test_precision_recall_radii_by_hand():
    """1-D, k=1: real {0, 1, 3} radii {1, 1, 2}; fake {0.5, 5.5, 10}."""
    real = np.array([[0.0], [1.0], [3.0]])
    fake = np.array([[0.5], [5.5], [10.0]])
    # fake radii (k=1): {5, 4.5, 4.5}; real points within: 0 (|0-.5|<=5), 1, 3 -> recall 1
    # 0.5 inside ball(0, 1); 5.5 outside ball(3, 2); 10 outside -> precision 1/3
    p, r = fid.precision_recall(real, fake, k=1)
    assert np.isclose(p, 1 / 3) and r == 1.0
