"""Choice of the compute device from ``MODEL.DEVICE`` and the torchrun environment."""
import logging
import os

import torch

logger = logging.getLogger(__name__)


def resolve_device(requested="auto"):
    """Return the ``torch.device`` to use for ``requested`` ("auto", "cpu", "cuda" or "cuda:N").

    Under torchrun each process takes ``cuda:LOCAL_RANK``. CUDA requested on a machine without it falls
    back to the CPU with a warning. CUDA_VISIBLE_DEVICES is respected because torch numbers only the
    visible GPUs.
    """
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if requested != "auto":
            logger.warning("MODEL.DEVICE is %r but CUDA is not available: running on the CPU", requested)
        return torch.device("cpu")
    if requested.startswith("cuda:"):
        return torch.device(requested)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def to_device(batch, device):
    """Move every tensor of a batch dict to ``device`` (non-blocking when pinned)."""
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}
