"""Clusterings shared by the programs and the benchmarks: k-means (faiss or
scikit-learn), a Gaussian mixture, UMAP, and N2D's UMAP + Gaussian mixture.

Every function takes an array of samples (any shape: flattened) and a seed,
and returns labels 0..k-1 with a confidence per sample, so that a program
can pick the most confident share of each cluster.
"""

from __future__ import annotations

import numpy as np

from common.errors import UsageError

CLUSTERERS = ("gmm", "kmeans")
KMEANS = ("auto", "sklearn", "faiss")  # auto: faiss when installed


def kmeans_backend(name: str = "auto") -> str:
    """The k-means implementation ``name`` stands for: ``auto`` is faiss when
    the faiss-cpu package is installed, scikit-learn otherwise."""
    if name not in KMEANS:
        raise UsageError(f"unknown k-means '{name}'; choose {', '.join(KMEANS)}")
    if name == "sklearn":
        return name
    try:
        import faiss  # noqa: F401
    except ImportError as e:
        if name == "faiss":
            raise UsageError("--kmeans faiss needs the faiss-cpu package: pip install faiss-cpu, or use "
                             "--kmeans sklearn") from e
        return "sklearn"
    return "faiss"


def kmeans_labels(z, n_clusters: int, seed: int = 0, init_labels=None, starts: int = 10,
                  backend: str = "auto"):
    """k-means labels and margins (1 - nearest / second-nearest distance).

    ``init_labels``: start from the centres of these clusters (one run), so
    the new ids follow the old ones; otherwise ``starts`` k-means++ starts,
    the one with the lowest inertia kept. ``backend``: see
    :func:`kmeans_backend`; with faiss, its Lloyd iterations (100, on every
    sample rather than its default subsample of 256 a centre) run from
    scikit-learn's k-means++ starts.
    """
    z = np.asarray(z, np.float64).reshape(len(z), -1)
    centres = None
    if init_labels is not None:
        rng = np.random.default_rng(seed)
        centres = np.stack([z[init_labels == k].mean(axis=0) if np.any(init_labels == k)
                            else z[rng.integers(len(z))] for k in range(n_clusters)])
    if kmeans_backend(backend) == "faiss":
        import faiss
        from sklearn.cluster import kmeans_plusplus

        z32 = np.ascontiguousarray(z, np.float32)
        rng = np.random.default_rng(seed)
        # k-means++ starts, as scikit-learn's (faiss' own are random samples)
        inits = [centres] if centres is not None else (
            kmeans_plusplus(z32, int(n_clusters), random_state=int(rng.integers(2**31)))[0]
            for _ in range(int(starts)))
        best = None
        for init in inits:
            km = faiss.Kmeans(z32.shape[1], int(n_clusters), niter=100, verbose=False,
                              max_points_per_centroid=len(z32))
            km.train(z32, init_centroids=np.ascontiguousarray(init, np.float32))
            if best is None or km.obj[-1] < best.obj[-1]:
                best = km
        two, nearest = best.index.search(z32, 2)
        labels, two = nearest[:, 0].astype(np.int64), np.sqrt(np.maximum(two, 0.0))
    else:
        from sklearn.cluster import KMeans

        km = (KMeans(n_clusters, n_init=int(starts), random_state=seed) if centres is None
              else KMeans(n_clusters, init=centres, n_init=1, random_state=seed))
        d = km.fit_transform(z)
        labels = d.argmin(axis=1)
        two = np.sort(d, axis=1)[:, :2]
    return labels, 1.0 - two[:, 0] / np.maximum(two[:, 1], 1e-12)


def cluster_features(z, n_clusters: int, method: str = "gmm", seed: int = 0, starts: int = 10,
                     kmeans: str = "auto"):
    """(labels, confidence) of a Gaussian mixture (full covariances; the
    posterior of the chosen component) or of k-means (the margin).

    Of ``starts`` fits from different initialisations the one kept has the
    highest likelihood (the lowest inertia for k-means): no label is used.
    ``kmeans``: the k-means backend (:func:`kmeans_backend`).
    """
    z = np.asarray(z).reshape(len(z), -1)
    if method == "kmeans":
        return kmeans_labels(z, n_clusters, seed, starts=starts, backend=kmeans)
    if method != "gmm":
        raise UsageError(f"unknown clusterer '{method}'; choose {' or '.join(CLUSTERERS)}")
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(n_clusters, covariance_type="full", n_init=int(starts), random_state=seed).fit(z)
    p = gmm.predict_proba(z)
    return p.argmax(axis=1), p.max(axis=1)


def umap_embedding(z, n_components: int, n_neighbors: int = 10, seed: int = 0) -> np.ndarray:
    """UMAP of the codes (min_dist 0, as N2D), fixed by ``seed``."""
    try:
        import umap
    except ImportError as e:
        raise UsageError("--manifold umap needs the umap-learn package: pip install umap-learn, "
                         "or use --manifold none") from e
    z = np.asarray(z, np.float32).reshape(len(z), -1)
    reducer = umap.UMAP(n_components=int(n_components), n_neighbors=int(min(n_neighbors, len(z) - 1)),
                        min_dist=0.0, random_state=seed, n_jobs=1)  # a seed makes UMAP serial anyway
    return reducer.fit_transform(z)


def umap_gmm(x, n_clusters: int, seed: int = 0, n_neighbors: int = 10, starts: int = 10, new=None):
    """N2D's clustering (McConville et al. 2020) without its autoencoder when
    ``x`` is raw: UMAP of ``x`` to ``n_clusters`` dimensions (min_dist 0),
    then a Gaussian mixture, the best of ``starts`` by likelihood. Returns
    (labels, posterior of the chosen component); with ``new`` samples, their
    labels (UMAP's transform, then the mixture's prediction) instead."""
    if new is None:
        return cluster_features(umap_embedding(x, n_clusters, n_neighbors, seed), n_clusters, "gmm", seed,
                                starts)
    import umap
    from sklearn.mixture import GaussianMixture

    x = np.asarray(x, np.float32).reshape(len(x), -1)
    reducer = umap.UMAP(n_components=int(n_clusters), n_neighbors=int(min(n_neighbors, len(x) - 1)),
                        min_dist=0.0, random_state=seed, n_jobs=1).fit(x)
    gmm = GaussianMixture(n_clusters, covariance_type="full", n_init=int(starts), random_state=seed)
    gmm.fit(reducer.embedding_)
    p = gmm.predict_proba(reducer.transform(np.asarray(new, np.float32).reshape(len(new), -1)))
    return p.argmax(axis=1), p.max(axis=1)
