"""The BNNeck identity head shared by every ReID model."""
from torch import nn


class BNNeckHead(nn.Module):
    """BatchNorm (frozen zero bias) followed by a bias-free linear classifier (Luo et al., BNNeck).

    ``forward(features (B, C)) -> (logits (B, num_classes), bn_features (B, C))``.
    """

    def __init__(self, in_dim, num_classes):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim)
        self.bn.bias.requires_grad_(False)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.classifier = nn.Linear(in_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, features):
        bn_features = self.bn(features)
        return self.classifier(bn_features), bn_features
