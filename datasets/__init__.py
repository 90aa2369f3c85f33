"""Datasets and data pipeline: the aerial-ground benchmarks (CP2108, CARGO, AG-ReID, AG-ReID.v2) with
their evaluation protocols, the synthetic SynthAG benchmark, transforms, identity samplers and loaders.
"""
