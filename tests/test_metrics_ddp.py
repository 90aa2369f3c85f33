"""ReIDEvaluator under a real two-process gloo group: shares gathered and ordered back by index."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evaluation import ReIDEvaluator, compute_distance, evaluate_rank


def data():
    rng = np.random.default_rng(11)
    pids = rng.integers(0, 6, 50)
    feats = torch.from_numpy(rng.normal(size=(6, 8))[pids] + 0.7 * rng.normal(size=(50, 8))).float()
    return feats, pids, rng.integers(0, 3, 50)


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        feats, pids, cams = data()
        # Rank 0 holds the odd indices, rank 1 the even ones (rank 1 one more batch), reversed.
        share = np.arange(50)[rank::2][::-1].copy()
        evaluator = ReIDEvaluator(10, max_rank=10)
        for batch in np.array_split(share, 3 + rank):
            evaluator.update(feats[batch], pids[batch], cams[batch], paths=[f"{i}.jpg" for i in batch],
                             index=torch.from_numpy(batch))
        result = evaluator.compute()
        torch.save({"mAP": result["mAP"], "cmc": torch.from_numpy(result["cmc"]), "paths": evaluator.paths},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_gather_orders_by_index(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    feats, pids, cams = data()
    expected = evaluate_rank(compute_distance(feats[:10], feats[10:]), pids[:10], pids[10:], cams[:10],
                             cams[10:], max_rank=10)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["paths"] == [f"{i}.jpg" for i in range(50)]
        assert got["mAP"] == pytest.approx(expected["mAP"], abs=1e-7)
        np.testing.assert_allclose(got["cmc"].numpy(), expected["cmc"])
