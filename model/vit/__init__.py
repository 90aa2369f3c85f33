"""The ImageNet-ViT comparison baselines ViT, TransReID, VDT and SeCap on a timm ViT backbone
(docs/baselines.md); importing the package registers them."""
from model.vit import secap, transreid, vdt  # noqa: F401  (registration)
from model.vit.backbone import ReIDVisionTransformer, build_vit_backbone

__all__ = ["ReIDVisionTransformer", "build_vit_backbone"]
