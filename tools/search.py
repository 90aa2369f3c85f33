"""Search a gallery folder for the people in query images with a trained checkpoint.

    python tools/search.py --weights outputs/x/model_final.pth \
        --query drone.jpg --gallery cctv_frames/ --query-view 1 --gallery-view 0 --topk 10

Prints the ranked gallery for every query and writes one rank-list picture per query (query + top-k, drawn
as evaluation's ranked lists are, with grey frames since the identities are unknown).
"""
import argparse
import os
import sys

import numpy as np

from configs import config_from_checkpoint
from datasets.bases import list_images
from evaluation import compute_distance
from evaluation.visualize import draw_strip, kept_order
from processor.inference import FeatureExtractor
from utils.checkpoint import load_checkpoint
from utils.device import resolve_device
from utils.entrypoint import run_main
from utils.errors import DataError
from utils.logger import setup_logger


def image_paths(path, what):
    """One image file, or every image under a folder (sorted)."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        paths = sorted(list_images(path))
        if paths:
            return paths
        raise DataError(f"{what} folder {path} holds no .jpg/.jpeg/.png images")
    raise DataError(f"{what} not found: {path} (expected an image file or a folder of images)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="checkpoint (model_final.pth, model_best.pth, ...)")
    parser.add_argument("--weight", dest="old_weight", help=argparse.SUPPRESS)  # the spelling before --weights
    parser.add_argument("--config_file", "--config-file", default=None,
                        help="the config the checkpoint was trained with (default: the one it stores)")
    parser.add_argument("--query", required=True, help="query image or folder")
    parser.add_argument("--gallery", required=True, help="gallery folder (searched recursively)")
    parser.add_argument("--topk", type=int, default=10, help="gallery images to list per query")
    parser.add_argument("--query-view", type=int, default=0, help="view id of the queries (0 ground, 1 aerial)")
    parser.add_argument("--gallery-view", type=int, default=0, help="view id of the gallery images")
    parser.add_argument("--out", default="search_results", help="folder for the rank-list pictures")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides as KEY VALUE pairs")
    args = parser.parse_args(argv)
    if args.old_weight:
        print("note: --weight is now spelled --weights", file=sys.stderr)
        args.weights = args.weights or args.old_weight
    if not args.weights:
        parser.error("the following arguments are required: --weights")
    state = load_checkpoint(args.weights, map_location="cpu")
    cfg, _ = config_from_checkpoint(args.weights, args.config_file, args.opts, state=state)
    setup_logger()
    queries, gallery = image_paths(args.query, "query"), image_paths(args.gallery, "gallery")
    extract = FeatureExtractor(cfg, args.weights, resolve_device(cfg.MODEL.DEVICE), state=state)
    query_features = extract(queries, viewids=args.query_view)
    gallery_features = extract(gallery, viewids=args.gallery_view)
    distances = compute_distance(query_features, gallery_features, metric=cfg.TEST.DIST_METRIC,
                                 normalize=cfg.TEST.FEAT_NORM == "yes")
    distances = distances.cpu().numpy()
    keep_all = np.zeros(len(gallery), dtype=bool)
    os.makedirs(args.out, exist_ok=True)
    for row, query in enumerate(queries):
        order = kept_order(distances[row], keep_all)[:args.topk].tolist()
        print(f"query {query}")
        for rank, index in enumerate(order, start=1):
            print(f"  {rank:3d}  {float(distances[row, index]):.4f}  {gallery[index]}")
        items = [(gallery[i], "unknown", f"{float(distances[row, i]):.3f}\nview {args.gallery_view}") for i in order]
        strip = draw_strip(query, items, title=os.path.basename(query), query_caption=f"query\nview {args.query_view}")
        picture = os.path.join(args.out, f"{row:04d}_{os.path.splitext(os.path.basename(query))[0]}.png")
        strip.save(picture)
        print(f"  rank list: {picture}")


if __name__ == "__main__":
    run_main(main)
