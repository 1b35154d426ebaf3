"""The seeded torch k-means: exact k = n, empty clusters, determinism, quality against sklearn."""

import pytest
import torch

from src.methods.kmeans import kmeans


def points(n=200, dim=12, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def check_consistent(x, r, k):
    """Centroids are the means of their labels, counts their sizes, inertia their sum of squares."""
    assert r.centroids.shape == (k, x.shape[1]) and r.labels.shape == (x.shape[0],)
    assert torch.equal(r.counts, torch.bincount(r.labels, minlength=k)) and (r.counts >= 1).all()
    means = torch.stack([x[r.labels == j].mean(0) for j in range(k)])
    torch.testing.assert_close(r.centroids, means)
    assert r.inertia == pytest.approx(((x - r.centroids[r.labels]) ** 2).sum().item(), rel=1e-4)


def test_k_equals_n_is_exact():
    x = points(30)
    r = kmeans(x, 30, seed=0)
    assert torch.equal(r.centroids, x) and torch.equal(r.labels, torch.arange(30))
    assert torch.equal(r.counts, torch.ones(30, dtype=torch.long)) and r.inertia == 0.0


def test_consistent_and_deterministic():
    x = points()
    a, b, c = kmeans(x, 10, seed=0), kmeans(x, 10, seed=0), kmeans(x, 10, seed=1, n_init=1)
    check_consistent(x, a, 10)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.centroids, c.centroids)


def test_finds_separated_clusters():
    centers = points(8, seed=1) * 20
    x = centers.repeat_interleave(25, 0) + 0.1 * points(200, seed=2)
    r = kmeans(x, 8, seed=0)
    assert sorted(r.counts.tolist()) == [25] * 8
    assert all(len(set(r.labels[i * 25 : (i + 1) * 25].tolist())) == 1 for i in range(8))


def test_empty_clusters_are_reseeded():
    # 6 distinct points, 4 copies each, 9 clusters: the 3 extra clusters must take copies
    x = points(6).repeat(4, 1)
    r = kmeans(x, 9, seed=0, n_init=2)
    check_consistent(x, r, 9)
    assert r.inertia < 1e-6 and r.empty_fixed >= 3
    # every point identical: all clusters but one start empty
    same = torch.ones(10, 3)
    r = kmeans(same, 4, seed=0)
    assert r.counts.sum() == 10 and (r.counts >= 1).all() and r.inertia < 1e-6


def test_half_input_and_bad_k():
    r = kmeans(points().half(), 5, seed=0)
    assert r.centroids.dtype == torch.float32
    for k in (0, 201):
        with pytest.raises(ValueError, match="k must be"):
            kmeans(points(), k, seed=0)


def test_inertia_close_to_sklearn():
    # the regime of transformer sub-MLPs: many dimensions, few points per cluster
    sklearn = pytest.importorskip("sklearn.cluster")
    x = points(384, 65) * 0.02
    ref = sklearn.KMeans(96, n_init=10, algorithm="lloyd", random_state=0).fit(x.numpy())
    assert kmeans(x, 96, seed=0).inertia <= 1.01 * ref.inertia_
