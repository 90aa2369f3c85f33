"""The embedding picture of a protocol: its query and gallery features projected to 2-D and coloured by view,
so that a gap between aerial and ground images (or its absence) shows at a glance.

The projection is scikit-learn's PCA of the features as they are ranked (L2-normalised with TEST.FEAT_NORM):
linear, deterministic and fast on any gallery size, so distances along its axes are distances the ranking
sees (a t-SNE picture would invent clusters of its own and takes minutes on large galleries).
"""
import logging
import os

import numpy as np

from utils.io import atomic_write

logger = logging.getLogger(__name__)

#: At most this many points are drawn (a seeded random subset, queries and gallery in proportion).
MAX_POINTS = 4000


def embedding_file(protocol):
    """``embedding_<protocol>.png``: the file name of a protocol's embedding picture."""
    return f"embedding_{protocol}.png"


def project(features, seed=0):
    """(N, 2) PCA projection of ``features`` (N, E) and the fraction of the variance its two axes keep."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=seed)
    points = pca.fit_transform(np.asarray(features, dtype=np.float64))
    return points, float(pca.explained_variance_ratio_.sum())


def plot_embedding(path, features, viewids, num_query, title="", max_points=MAX_POINTS, seed=0):
    """Write the embedding picture of ``features`` (N, E; the first ``num_query`` rows are queries) with
    their ``viewids`` (N,) to ``path``: circles for queries, crosses for gallery images, one colour per view.

    Returns ``path``, or None (with one log line) when matplotlib or scikit-learn is not installed.
    """
    try:
        from matplotlib.figure import Figure
        import sklearn  # noqa: F401  (checked here so that a missing package is one log line, not a traceback)
    except ImportError as exc:
        logger.info("no %s: the embedding picture needs matplotlib and scikit-learn (%s; pip install "
                    "matplotlib scikit-learn)", os.path.basename(path), exc)
        return None
    features = np.asarray(features)
    viewids = np.asarray(viewids).reshape(-1)
    is_query = np.arange(features.shape[0]) < num_query
    keep = np.arange(features.shape[0])
    if keep.size > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=max_points, replace=False))
    points, kept_variance = project(features[keep], seed)
    figure = Figure(figsize=(7, 6), dpi=80)
    axis = figure.subplots()
    colours = {view: f"C{k}" for k, view in enumerate(np.unique(viewids[keep]))}
    for view, colour in colours.items():
        for side, marker, rows in (("query", "o", is_query[keep]), ("gallery", "x", ~is_query[keep])):
            rows = rows & (viewids[keep] == view)
            if rows.any():
                axis.scatter(points[rows, 0], points[rows, 1], c=colour, marker=marker, s=14, alpha=0.7,
                             label=f"view {view} {side} ({int(rows.sum())})")
    shown = f"{keep.size} of {features.shape[0]} images" if keep.size < features.shape[0] else \
        f"{keep.size} images"
    axis.set_title(f"{title}: PCA of the features ({shown}, {100 * kept_variance:.0f}% of the variance)")
    axis.set_xlabel("principal component 1")
    axis.set_ylabel("principal component 2")
    axis.legend(fontsize="small")
    figure.tight_layout()
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png"))
