"""Identity-balanced P x K samplers (single process and distributed) and the contiguous evaluation sharder."""
from collections import defaultdict

import torch
from torch.utils.data import Sampler

from utils import distributed
from utils.errors import ConfigError, DataError


def identity_batches(pids, num_identities, num_instances, generator):
    """One epoch of P x K batches: lists of dataset indices, identities grouped, K images each.

    Each identity's images are shuffled (drawn with replacement up to K when it has fewer) and cut into
    chunks of K (the remainder is dropped). While at least P identities still have chunks, P distinct
    ones are drawn at random and one chunk of each forms a batch.
    """
    index_by_pid = defaultdict(list)
    for index, pid in enumerate(pids):
        index_by_pid[pid].append(index)
    chunks = {}
    for pid in sorted(index_by_pid):
        indices = torch.tensor(index_by_pid[pid])
        if len(indices) < num_instances:
            indices = indices[torch.randint(len(indices), (num_instances,), generator=generator)]
        else:
            indices = indices[torch.randperm(len(indices), generator=generator)]
        usable = len(indices) - len(indices) % num_instances
        chunks[pid] = indices[:usable].view(-1, num_instances).tolist()
    batches = []
    available = sorted(chunks)
    while len(available) >= num_identities:
        picked = [available[i] for i in torch.randperm(len(available), generator=generator)[:num_identities].tolist()]
        batches.append([index for pid in picked for index in chunks[pid].pop()])
        available = [pid for pid in available if chunks[pid]]
    return batches


class RandomIdentitySampler(Sampler):
    """P x K identity sampler: every ``batch_size`` consecutive indices are P identities x K images.

    The epoch plan depends only on (``seed``, epoch), so ``len()`` is exact. The epoch advances by itself
    after each pass; :meth:`set_epoch` fixes it (needed to resume or to keep ranks in step).
    ``rank``/``world_size`` give each process a disjoint contiguous share of every global P x K batch.
    """

    def __init__(self, pids, batch_size, num_instances, seed=0, rank=0, world_size=1):
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ConfigError(f"SOLVER.IMS_PER_BATCH = {batch_size} must be a positive multiple of "
                              f"DATALOADER.NUM_INSTANCE = {num_instances}")
        if batch_size % world_size or (batch_size // world_size) % num_instances:
            raise ConfigError(f"SOLVER.IMS_PER_BATCH = {batch_size} must split into {world_size} processes with "
                              f"whole identities of DATALOADER.NUM_INSTANCE = {num_instances} images each")
        self.pids = list(pids)
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_identities = batch_size // num_instances
        num_pids = len(set(self.pids))
        if num_pids < self.num_identities:
            raise DataError(f"the training split has {num_pids} identities, fewer than the "
                            f"{self.num_identities} identities of one batch (IMS_PER_BATCH / NUM_INSTANCE)")
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._plan = None

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def _batches(self):
        if self._plan is None or self._plan[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._plan = (self.epoch, identity_batches(self.pids, self.num_identities, self.num_instances, generator))
        return self._plan[1]

    def __len__(self):
        return len(self._batches()) * (self.batch_size // self.world_size)

    def __iter__(self):
        share = self.batch_size // self.world_size
        batches = self._batches()
        self.epoch += 1
        for batch in batches:
            yield from batch[self.rank * share:(self.rank + 1) * share]


class ContiguousShardSampler(Sampler):
    """Indices ``0..n-1`` split into ``world_size`` contiguous, in-order shares (no padding duplicates)."""

    def __init__(self, num_samples, rank=0, world_size=1):
        base, extra = divmod(num_samples, world_size)
        self.start = rank * base + min(rank, extra)
        self.stop = self.start + base + (1 if rank < extra else 0)

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        return iter(range(self.start, self.stop))


class DistributedRandomIdentitySampler(RandomIdentitySampler):
    """:class:`RandomIdentitySampler` whose rank and world size default to the torchrun process group.

    Every rank builds the same plan from the shared seed and takes its own share of each global batch.
    """

    def __init__(self, pids, batch_size, num_instances, seed=0, rank=None, world_size=None):
        super().__init__(pids, batch_size, num_instances, seed=seed,
                         rank=distributed.get_rank() if rank is None else rank,
                         world_size=distributed.get_world_size() if world_size is None else world_size)
