"""SVPR-ReID (AAAI 2026): semantic-driven visual progressive refinement for aerial-ground person ReID.

Importing this package registers ``CLIP_SVPR_ReID`` in the model registry.
"""
from model.svpr.model import CLIPSVPRReID

__all__ = ["CLIPSVPRReID"]
