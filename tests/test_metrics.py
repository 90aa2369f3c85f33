"""evaluate_rank, compute_distance and ReIDEvaluator against fast-reid's evaluator and a per-query
definition of the Market-1501 protocol."""
import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch

from utils.errors import DataError
from evaluation import NoValidQueryError, ReIDEvaluator, compute_distance, evaluate_rank


def load_fastreid_rank():
    """fast-reid's rank.py by file path (its package __init__ needs libraries we do not install)."""
    spec = importlib.util.find_spec("fastreid")
    path = os.path.join(spec.submodule_search_locations[0], "evaluation", "rank.py")
    module_spec = importlib.util.spec_from_file_location("fastreid_rank", path)
    module = importlib.util.module_from_spec(module_spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Cython evaluation unavailable": we want the python one
        module_spec.loader.exec_module(module)
    return module


FASTREID = load_fastreid_rank()


def definition(distmat, q_pids, g_pids, q_cams, g_cams, q_views, g_views, q_times, g_times, view_mode,
               time_mode, max_rank):
    """Per-query CMC/AP/INP straight from the definition, stable order on ties."""
    cmcs, aps, inps = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i]))
        for mode, q_ids, g_ids in ((view_mode, q_views, g_views), (time_mode, q_times, g_times)):
            if mode == "cross":
                keep &= g_ids[order] != q_ids[i]
            elif mode == "same":
                keep &= g_ids[order] == q_ids[i]
        hits = g_pids[order][keep] == q_pids[i]
        if not hits.any():
            continue
        hit_ranks = np.flatnonzero(hits) + 1
        aps.append(np.mean(np.arange(1, len(hit_ranks) + 1) / hit_ranks))
        inps.append(len(hit_ranks) / hit_ranks[-1])
        cmcs.append([1.0 if r >= hit_ranks[0] else 0.0 for r in range(1, max_rank + 1)])
    return np.mean(cmcs, 0), np.mean(aps), np.mean(inps), len(aps)


def random_case(rng, num_q, num_g, num_ids, num_cams, ties=False):
    if ties:
        distmat = rng.integers(0, 4, (num_q, num_g)).astype(np.float32)
    else:
        distmat = rng.random((num_q, num_g))
    return (distmat, rng.integers(0, num_ids, num_q), rng.integers(0, num_ids, num_g),
            rng.integers(0, num_cams, num_q), rng.integers(0, num_cams, num_g))


@pytest.mark.parametrize("seed", range(12))
def test_matches_fastreid_python_evaluator(seed):
    rng = np.random.default_rng(seed)
    num_g = int(rng.integers(60, 400))
    case = random_case(rng, int(rng.integers(1, 80)), num_g, int(rng.integers(2, 40)), int(rng.integers(1, 6)))
    try:
        cmc, all_ap, all_inp = FASTREID.eval_market1501(*case, max_rank=50)
    except AssertionError:
        with pytest.raises(NoValidQueryError):
            evaluate_rank(*case)
        return
    ours = evaluate_rank(*case, max_rank=50, chunk_elements=int(rng.integers(1, 5000)))
    np.testing.assert_allclose(ours["cmc"], cmc, atol=1e-6)
    assert ours["mAP"] == pytest.approx(np.mean(all_ap), abs=1e-6)
    assert ours["mINP"] == pytest.approx(np.mean(all_inp), abs=1e-6)
    assert ours["num_valid_queries"] == len(all_ap)


def test_ties_resolve_by_gallery_index_like_fastreid_with_explicit_tiebreak():
    rng = np.random.default_rng(100)
    distmat, *labels = random_case(rng, 40, 200, 6, 3, ties=True)
    # fast-reid sorts with numpy's unstable quicksort; give it the stable order as tie-free distances.
    stable_rank = np.argsort(np.argsort(distmat, axis=1, kind="stable"), axis=1).astype(np.float64)
    cmc, all_ap, all_inp = FASTREID.eval_market1501(stable_rank, *labels, max_rank=50)
    ours = evaluate_rank(distmat, *labels, chunk_elements=999)
    np.testing.assert_allclose(ours["cmc"], cmc, atol=1e-6)
    assert ours["mAP"] == pytest.approx(np.mean(all_ap), abs=1e-6)
    assert ours["mINP"] == pytest.approx(np.mean(all_inp), abs=1e-6)


@pytest.mark.parametrize("view_mode", ["mix", "cross", "same"])
@pytest.mark.parametrize("time_mode", ["mix", "cross", "same"])
@pytest.mark.parametrize("ties", [False, True])
def test_view_and_time_modes_match_definition(view_mode, time_mode, ties):
    rng = np.random.default_rng(7)
    distmat, q_pids, g_pids, q_cams, g_cams = random_case(rng, 50, 180, 8, 4, ties=ties)
    views = rng.integers(0, 2, 50), rng.integers(0, 2, 180)
    times = rng.integers(0, 2, 50), rng.integers(0, 2, 180)
    expected = definition(distmat, q_pids, g_pids, q_cams, g_cams, *views, *times, view_mode, time_mode, 20)
    ours = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, q_viewids=views[0], g_viewids=views[1],
                         q_timeids=times[0], g_timeids=times[1], view_mode=view_mode, time_mode=time_mode,
                         max_rank=20, chunk_elements=1000)
    np.testing.assert_allclose(ours["cmc"], expected[0], atol=1e-6)
    assert ours["mAP"] == pytest.approx(expected[1], abs=1e-9)
    assert ours["mINP"] == pytest.approx(expected[2], abs=1e-9)
    assert ours["num_valid_queries"] == expected[3]


def test_no_valid_query_is_a_clear_value_error():
    distmat = np.random.default_rng(0).random((3, 5))
    with pytest.raises(ValueError, match="no valid query") as info:
        evaluate_rank(distmat, [1, 2, 3], [1, 1, 2, 2, 9], [0, 0, 0], [0, 0, 0, 0, 1])
    assert isinstance(info.value, DataError) and "\n" not in str(info.value)


def test_short_gallery_pads_cmc_with_last_value():
    # Query 0 keeps only 3 gallery samples (view "same"); the gallery has 6 < max_rank.
    distmat = np.array([[0.1, 0.5, 0.2, 0.3, 0.9, 0.4], [0.6, 0.2, 0.1, 0.5, 0.3, 0.8]])
    g_pids, g_views = np.array([1, 1, 2, 3, 2, 2]), np.array([0, 1, 1, 0, 1, 0])
    ours = evaluate_rank(distmat, [2, 1], g_pids, [0, 0], [1, 1, 1, 1, 1, 1], q_viewids=[1, 0],
                         g_viewids=g_views, view_mode="same", max_rank=10)
    expected = definition(distmat, np.array([2, 1]), g_pids, np.array([0, 0]), np.ones(6, int),
                          np.array([1, 0]), g_views, None, None, "same", "mix", 10)
    assert ours["cmc"].shape == (10,)
    np.testing.assert_allclose(ours["cmc"], expected[0])
    assert ours["cmc"][-1] == 1.0 and ours["mAP"] == pytest.approx(expected[1])


def test_single_identity_everything_matches():
    rng = np.random.default_rng(1)
    distmat = rng.random((4, 30))
    ours = evaluate_rank(distmat, np.zeros(4), np.zeros(30), np.zeros(4), np.ones(30))
    assert ours["mAP"] == pytest.approx(1.0) and ours["mINP"] == pytest.approx(1.0)
    np.testing.assert_allclose(ours["cmc"], 1.0)


def test_torch_tensors_and_modes_errors():
    rng = np.random.default_rng(2)
    case = random_case(rng, 20, 100, 5, 3)
    expected = evaluate_rank(*case)
    ours = evaluate_rank(*(torch.from_numpy(np.asarray(a)) for a in case))
    np.testing.assert_allclose(ours["cmc"], expected["cmc"])
    assert ours["mAP"] == pytest.approx(expected["mAP"], abs=1e-12)
    with pytest.raises(ValueError, match="view_mode='cross' needs q_viewids"):
        evaluate_rank(*case, view_mode="cross")
    with pytest.raises(ValueError, match="time_mode='sideways'"):
        evaluate_rank(*case, time_mode="sideways")
    with pytest.raises(ValueError, match="g_pids has 99 entries"):
        evaluate_rank(case[0], case[1], case[2][:99], case[3], case[4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_cuda_inputs():
    rng = np.random.default_rng(5)
    qf, gf = torch.randn(30, 16), torch.randn(120, 16)
    labels = [torch.from_numpy(rng.integers(0, 6, n)) for n in (30, 120, 30, 120)]
    on_cpu = evaluate_rank(compute_distance(qf, gf), *labels)
    on_gpu = evaluate_rank(compute_distance(qf.cuda(), gf.cuda()), *(t.cuda() for t in labels))
    assert on_gpu["mAP"] == pytest.approx(on_cpu["mAP"], abs=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_distances_against_direct_formula(normalize):
    rng = np.random.default_rng(6)
    qf, gf = rng.normal(size=(7, 12)), rng.normal(size=(11, 12))
    q = qf / np.linalg.norm(qf, axis=1, keepdims=True) if normalize else qf
    g = gf / np.linalg.norm(gf, axis=1, keepdims=True) if normalize else gf
    euclid = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    got = compute_distance(torch.from_numpy(qf), torch.from_numpy(gf), normalize=normalize, block_rows=3)
    np.testing.assert_allclose(got.numpy(), euclid, atol=1e-5)
    cos = 1 - (qf @ gf.T) / np.outer(np.linalg.norm(qf, axis=1), np.linalg.norm(gf, axis=1))
    got = compute_distance(qf, gf, metric="cosine", normalize=normalize, block_rows=4)
    np.testing.assert_allclose(got.numpy(), cos, atol=1e-5)


def make_batches(rng, num_query=12, num_gallery=40, dim=8):
    pids = np.concatenate([rng.integers(0, 5, num_query), rng.integers(0, 5, num_gallery)])
    centres = rng.normal(size=(5, dim))
    feats = centres[pids] + 0.8 * rng.normal(size=(len(pids), dim))
    cams = rng.integers(0, 3, len(pids))
    views = rng.integers(0, 2, len(pids))
    times = rng.integers(0, 2, len(pids))
    return torch.from_numpy(feats).float(), pids, cams, views, times


def test_evaluator_orders_shares_by_index_and_matches_direct_evaluation():
    rng = np.random.default_rng(8)
    feats, pids, cams, views, times = make_batches(rng)
    evaluator = ReIDEvaluator(12, feat_norm="yes", metric="euclidean", max_rank=10)
    permutation = rng.permutation(len(pids))
    # Batches arrive out of order, with one duplicated sample (sampler padding).
    for chunk in np.array_split(np.concatenate([permutation, permutation[:1]]), 5):
        evaluator.update(feats[chunk], pids[chunk], cams[chunk], views[chunk], times[chunk],
                         paths=[f"img_{i}.jpg" for i in chunk], index=torch.from_numpy(chunk))
    result = evaluator.compute(view_mode="cross", time_mode="same")
    distmat = compute_distance(feats[:12], feats[12:], normalize=True)
    expected = evaluate_rank(distmat, pids[:12], pids[12:], cams[:12], cams[12:], q_viewids=views[:12],
                             g_viewids=views[12:], q_timeids=times[:12], g_timeids=times[12:],
                             view_mode="cross", time_mode="same", max_rank=10)
    assert result["mAP"] == pytest.approx(expected["mAP"]) and result["num_query"] == 12
    np.testing.assert_allclose(result["cmc"], expected["cmc"])
    assert result["num_gallery"] == 40
    ranked, query, gallery = evaluator.ranking_inputs()
    np.testing.assert_allclose(ranked, distmat.numpy(), rtol=1e-6)
    assert query["paths"] == [f"img_{i}.jpg" for i in range(12)] and len(gallery["paths"]) == 40
    np.testing.assert_array_equal(query["pids"], pids[:12])
    np.testing.assert_array_equal(gallery["viewids"], views[12:])


def test_evaluator_config_errors_and_reranking_path():
    from configs import load_config
    from utils.errors import ConfigError
    cfg = load_config(None, ["TEST.RE_RANKING", "True", "TEST.RR_K1", "5", "TEST.RR_K2", "2"])
    rng = np.random.default_rng(9)
    feats, pids, cams, views, times = make_batches(rng)
    evaluator = ReIDEvaluator(12, cfg)
    evaluator.update(feats, pids, cams, views, times)
    result = evaluator.compute()
    assert 0 < result["mAP"] <= 1 and evaluator.distmat.shape == (12, 40)
    with pytest.raises(ConfigError, match="TEST.FEAT_NORM"):
        ReIDEvaluator(12, feat_norm="maybe")
    with pytest.raises(ConfigError, match="TEST.TIME_MODE"):
        ReIDEvaluator(12, time_mode="night")


@pytest.mark.parametrize("seed", range(4))
def test_per_query_ap_and_first_match_rank_are_fastreids(seed):
    rng = np.random.default_rng(seed)
    case = random_case(rng, 40, 150, 8, 3)
    _, all_ap, _ = FASTREID.eval_market1501(*case, max_rank=50)
    ours = evaluate_rank(*case, chunk_elements=997)["query_results"]
    np.testing.assert_allclose(ours["ap"], all_ap, rtol=1e-12)
    distmat, q_pids, g_pids, q_cams, g_cams = case
    for row, query in enumerate(ours["query"]):
        order = np.argsort(distmat[query], kind="stable")
        kept = order[~((g_pids[order] == q_pids[query]) & (g_cams[order] == q_cams[query]))]
        assert ours["first_match_rank"][row] == np.flatnonzero(g_pids[kept] == q_pids[query])[0] + 1
