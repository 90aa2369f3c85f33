"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), vectorised and memory-bounded.

Same algorithm as the authors' code (row-normalised original distances, k-reciprocal sets expanded by
the half-size sets of their members, Gaussian-weighted encodings V, local query expansion over the k2
nearest neighbours, Jaccard distance, blend with lambda), but no (N x N) matrix is ever built for the
N = Q + G samples: only the k-nearest-neighbour lists, a sparse V and the (Q x G) result.
"""
import torch

from evaluation.distance import compute_distance

# Rows of an (rows x N) distance block, and (query, gallery) pairs per Jaccard step.
DEFAULT_BLOCK_ROWS = 1024
DEFAULT_PAIR_BUDGET = 1 << 24


def _sparse(rows, cols, vals, num):
    """Coalesced (num, num) COO tensor; duplicate entries are summed."""
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (num, num), check_invariants=True).coalesce()


def _reciprocal(neighbours):
    """(N, k) mask: neighbour j of row i is reciprocal when i is among j's own k neighbours."""
    rows = torch.arange(neighbours.shape[0], device=neighbours.device)
    return (neighbours[neighbours] == rows[:, None, None]).any(-1)


def _encodings(feats, metric, k1, block_rows):
    """Sparse V (N, N) of Gaussian-weighted k-reciprocal expansion sets, the neighbour ranking and the
    per-row maxima of the original distances."""
    num = feats.shape[0]
    depth = min(k1 + 1, num)
    ranking, row_max = [], []
    for start in range(0, num, block_rows):
        dist = compute_distance(feats[start:start + block_rows], feats, metric=metric, normalize=False)
        row_max.append(dist.max(1).values)
        ranking.append(dist.topk(depth, dim=1, largest=False, sorted=True).indices)
    ranking, row_max = torch.cat(ranking), torch.cat(row_max)  # (N, depth), (N,)
    half = min(int(round(k1 / 2)) + 1, num)
    full_set, half_set = ranking, ranking[:, :half]
    full_ok, half_ok = _reciprocal(full_set), _reciprocal(half_set)

    entries_rows, entries_cols, entries_vals = [], [], []
    for start in range(0, num, block_rows):
        stop = min(start + block_rows, num)
        members, members_ok = full_set[start:stop], full_ok[start:stop]  # (B, depth)
        cand, cand_ok = half_set[members], half_ok[members] & members_ok[..., None]  # (B, depth, half)
        # |H(c) & R(i)| > 2/3 |H(c)| for each reciprocal candidate c of row i.
        shared = ((cand[..., None] == members[:, None, None, :]) & members_ok[:, None, None, :]).any(-1)
        shared = (shared & cand_ok).sum(-1)
        accepted = members_ok & (shared > 2.0 / 3 * cand_ok.sum(-1))
        index = torch.cat([members.masked_fill(~members_ok, num),
                           cand.masked_fill(~(cand_ok & accepted[..., None]), num).flatten(1)], dim=1)
        index = index.sort(dim=1).values
        unique = index < num
        unique[:, 1:] &= index[:, 1:] != index[:, :-1]
        rows_local, slots = unique.nonzero(as_tuple=True)
        cols = index[rows_local, slots]
        dist = compute_distance(feats[start:stop], feats, metric=metric, normalize=False)
        dist /= row_max[start:stop, None]
        weight = torch.exp(-dist[rows_local, cols])
        norm = torch.zeros(stop - start, dtype=weight.dtype, device=weight.device).index_add_(0, rows_local, weight)
        entries_rows.append(rows_local + start)
        entries_cols.append(cols)
        entries_vals.append(weight / norm[rows_local])
    encodings = _sparse(torch.cat(entries_rows), torch.cat(entries_cols), torch.cat(entries_vals), num)
    return encodings, ranking, row_max


def re_ranking(qf, gf, k1=20, k2=6, lambda_value=0.3, metric="euclidean", block_rows=DEFAULT_BLOCK_ROWS,
               pair_budget=DEFAULT_PAIR_BUDGET):
    """Re-ranked (Q, G) float32 distances of query features ``qf`` (Q, D) to gallery features ``gf`` (G, D).

    Original distances are ``compute_distance(..., metric)`` on the features as given (normalise them
    first if wanted). Work and memory scale with N*k1^2 plus the (Q, G) output.
    """
    qf = torch.as_tensor(qf).float()
    gf = torch.as_tensor(gf).float().to(qf.device)
    num_query, num_gallery = qf.shape[0], gf.shape[0]
    feats = torch.cat([qf, gf])  # (N, D)
    num = feats.shape[0]
    encodings, ranking, row_max = _encodings(feats, metric, int(k1), block_rows)

    if k2 != 1:
        # Local query expansion: each row becomes the mean of its k2 nearest rows' encodings.
        k2 = min(int(k2), ranking.shape[1])
        (rows, cols), vals = encodings.indices(), encodings.values()
        row_count = torch.bincount(rows, minlength=num)
        row_start = torch.cumsum(row_count, 0) - row_count
        sources = ranking[:, :k2].reshape(-1)  # (N * k2,) rows averaged into row i = position // k2
        owner = torch.repeat_interleave(torch.arange(sources.numel(), device=feats.device), row_count[sources])
        offset = torch.arange(owner.numel(), device=feats.device) - (torch.cumsum(row_count[sources], 0)
                                                                     - row_count[sources])[owner]
        picked = row_start[sources][owner] + offset
        encodings = _sparse(owner // k2, cols[picked], vals[picked] / k2, num)

    (rows, cols), vals = encodings.indices(), encodings.values()
    # Gallery rows' entries grouped by column: the inverted index of the paper.
    in_gallery = rows >= num_query
    g_rows, g_cols, g_vals = rows[in_gallery] - num_query, cols[in_gallery], vals[in_gallery]
    order = torch.argsort(g_cols, stable=True)
    g_rows, g_cols, g_vals = g_rows[order], g_cols[order], g_vals[order]
    col_count = torch.bincount(g_cols, minlength=num)
    col_start = torch.cumsum(col_count, 0) - col_count
    in_query = rows < num_query
    q_rows, q_cols, q_vals = rows[in_query], cols[in_query], vals[in_query]
    pairs_per_entry = col_count[q_cols]

    result = torch.empty((num_query, num_gallery), dtype=torch.float32, device=feats.device)
    rows_per_block = max(1, min(block_rows, pair_budget // max(num_gallery, 1)))
    for start in range(0, num_query, rows_per_block):
        stop = min(start + rows_per_block, num_query)
        take = (q_rows >= start) & (q_rows < stop)
        e_rows, e_cols, e_vals, e_pairs = q_rows[take], q_cols[take], q_vals[take], pairs_per_entry[take]
        # Every (query entry, gallery entry) pair sharing a column adds min(V_q, V_g) to their overlap.
        owner = torch.repeat_interleave(torch.arange(e_rows.numel(), device=feats.device), e_pairs)
        offset = torch.arange(owner.numel(), device=feats.device) - (torch.cumsum(e_pairs, 0) - e_pairs)[owner]
        partner = col_start[e_cols][owner] + offset
        overlap = torch.zeros((stop - start) * num_gallery, dtype=torch.float32, device=feats.device)
        overlap.index_add_(0, (e_rows[owner] - start) * num_gallery + g_rows[partner],
                           torch.minimum(e_vals[owner], g_vals[partner]))
        overlap = overlap.view(stop - start, num_gallery)
        jaccard = 1 - overlap / (2 - overlap)
        original = compute_distance(qf[start:stop], gf, metric=metric, normalize=False) / row_max[start:stop, None]
        result[start:stop] = jaccard * (1 - lambda_value) + original * lambda_value
    return result
