"""k-reciprocal re-ranking against a direct, loop-by-loop transcription of Zhong et al. (CVPR 2017)."""
import numpy as np
import pytest
import torch

from evaluation import compute_distance
from evaluation import re_ranking


def reference_re_ranking(qf, gf, k1, k2, lam):
    """Dense per-sample implementation written from the paper (float64)."""
    feats = np.concatenate([qf, gf]).astype(np.float64)
    num_query, num = qf.shape[0], feats.shape[0]
    sq = (feats ** 2).sum(1)
    dist = sq[:, None] + sq[None, :] - 2 * feats @ feats.T
    dist = dist / dist.max(axis=1, keepdims=True)  # each row scaled by its maximum
    rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i, k):
        forward = rank[i, :k + 1]
        return [j for j in forward if i in rank[j, :k + 1]]

    encodings = np.zeros((num, num))
    for i in range(num):
        r_set = reciprocal(i, k1)
        expansion = set(r_set)
        for c in r_set:
            h_set = reciprocal(c, int(round(k1 / 2)))
            if len(set(h_set) & set(r_set)) > 2.0 / 3 * len(h_set):
                expansion |= set(h_set)
        members = sorted(expansion)
        weights = np.exp(-dist[i, members])
        encodings[i, members] = weights / weights.sum()
    if k2 != 1:
        encodings = np.stack([encodings[rank[i, :k2]].mean(0) for i in range(num)])
    final = np.zeros((num_query, num - num_query))
    for i in range(num_query):
        for j in range(num_query, num):
            overlap = np.minimum(encodings[i], encodings[j]).sum()
            jaccard = 1 - overlap / (2 - overlap)
            final[i, j - num_query] = jaccard * (1 - lam) + dist[i, j] * lam
    return final


@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (6, 3, 0.5), (4, 1, 0.0)])
def test_re_ranking_matches_paper_reference(k1, k2, lam):
    rng = np.random.default_rng(k1)
    centres = rng.normal(size=(8, 16))
    labels = rng.integers(0, 8, 70)
    feats = (centres[labels] + 0.6 * rng.normal(size=(70, 16))).astype(np.float32)
    qf, gf = feats[:15], feats[15:]
    expected = reference_re_ranking(qf, gf, k1, k2, lam)
    got = re_ranking(torch.from_numpy(qf), torch.from_numpy(gf), k1=k1, k2=k2, lambda_value=lam,
                     block_rows=16, pair_budget=200)
    assert got.shape == (15, 55)
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-5)


def test_re_ranking_lambda_one_is_normalised_original_distance():
    rng = np.random.default_rng(3)
    qf, gf = torch.from_numpy(rng.normal(size=(5, 8))), torch.from_numpy(rng.normal(size=(20, 8)))
    got = re_ranking(qf, gf, k1=4, k2=2, lambda_value=1.0)
    feats = torch.cat([qf, gf]).float()
    full = compute_distance(feats, feats, normalize=False)
    expected = full[:5, 5:] / full[:5].max(1, keepdim=True).values
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_re_ranking_cosine_metric_runs_on_tiny_gallery():
    rng = np.random.default_rng(4)
    got = re_ranking(rng.normal(size=(3, 4)), rng.normal(size=(2, 4)), k1=20, k2=6, metric="cosine")
    assert got.shape == (3, 2) and torch.isfinite(got).all()
