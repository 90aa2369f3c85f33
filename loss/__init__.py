"""Losses: the loss-term registry and its terms (identity, triplet, view, attribute, image-to-text,
center), the criterion that weights them, and the loss functions themselves (label-smoothed
cross-entropy, batch-hard triplet, supervised contrastive for CLIP-ReID's prompt learning, center).
"""
from loss.base import LossTerm
from loss.center_loss import CenterLoss
from loss.criterion import Criterion, build_criterion
from loss.registry import LOSSES, register_loss
from loss.softmax_loss import CrossEntropyLabelSmooth
from loss.supcon import SupConLoss
from loss.triplet_loss import TripletLoss, euclidean_dist, hard_example_mining

__all__ = ["CenterLoss", "LossTerm", "Criterion", "CrossEntropyLabelSmooth", "LOSSES", "SupConLoss", "TripletLoss",
           "build_criterion", "euclidean_dist", "hard_example_mining", "register_loss"]
