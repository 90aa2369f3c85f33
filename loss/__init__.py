"""Losses: label-smoothed identity cross-entropy, batch-hard triplet, supervised contrastive (CLIP-ReID
stage 1), center loss, and the criterion that combines them with the config weights.
"""
from loss.center_loss import CenterLoss
from loss.criterion import ReIDCriterion, build_criterion
from loss.softmax_loss import CrossEntropyLabelSmooth
from loss.supcon import SupConLoss
from loss.triplet_loss import TripletLoss, euclidean_dist, hard_example_mining

__all__ = ["CenterLoss", "CrossEntropyLabelSmooth", "ReIDCriterion", "SupConLoss", "TripletLoss",
           "build_criterion", "euclidean_dist", "hard_example_mining"]
