"""The ImageNet-ViT comparison baselines on a timm ViT backbone (docs/baselines.md).

Importing this package registers ``ViT``, ``TransReID``, ``VDT`` and ``SeCap`` in the model registry.
"""
from model.vit.backbone import ReIDVisionTransformer, build_vit_backbone
from model.vit.secap import SeCap
from model.vit.transreid import TransReID, ViT
from model.vit.vdt import VDT

__all__ = ["ReIDVisionTransformer", "SeCap", "TransReID", "VDT", "ViT", "build_vit_backbone"]
