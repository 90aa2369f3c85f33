"""Side-information embedding (SIE): a learned vector per camera, per view, or per (camera, view) pair."""
import torch
from torch import nn


class SideInfoEmbedding(nn.Module):
    """Looks up ``coefficient * table[index]`` with index ``camera * num_views + view`` when both cameras and
    views are embedded, else the camera or the view id. A count of 0 or 1 means "not embedded"."""

    def __init__(self, num_cameras, num_views, width, coefficient=3.0):
        super().__init__()
        self.num_cameras = num_cameras if num_cameras > 1 else 0
        self.num_views = num_views if num_views > 1 else 0
        self.coefficient = coefficient
        rows = max(self.num_cameras, 1) * max(self.num_views, 1)
        self.enabled = bool(self.num_cameras or self.num_views)
        self.table = nn.Parameter(torch.zeros(rows if self.enabled else 0, width))
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, camids=None, viewids=None):
        """(B, C) side embedding for the given ids, or None when neither cameras nor views are embedded."""
        if not self.enabled:
            return None
        if (self.num_cameras and camids is None) or (self.num_views and viewids is None):
            raise ValueError(f"SideInfoEmbedding over {self.num_cameras} cameras and {self.num_views} views "
                             f"needs camera ids and view ids accordingly, got camids={camids is not None}, "
                             f"viewids={viewids is not None}")
        if self.num_cameras and self.num_views:
            index = camids * self.num_views + viewids
        else:
            index = camids if self.num_cameras else viewids
        return self.coefficient * self.table[index]
