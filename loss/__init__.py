"""Losses: label-smoothed identity cross-entropy, batch-hard triplet, supervised contrastive (CLIP-ReID
stage 1), center loss, and the criterion that combines them with the config weights.
"""
