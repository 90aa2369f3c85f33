"""Generate the synthetic aerial-ground benchmark (SynthAG) in CP2108's on-disk format.

    python tools/make_synthetic.py --out ./data                  # writes ./data/SynthAG (defaults: 200 ids)
    python tools/make_synthetic.py --out /tmp/d --num-ids 20 --images-per-id 10 --seed 3
"""
import argparse
import time


from configs.defaults import get_cfg_defaults
from datasets.synthetic import SynthConfig, generate_synthag
from utils.entrypoint import run_main


def main():
    synth = get_cfg_defaults().DATASETS.SYNTH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="root folder; the benchmark goes to OUT/SynthAG")
    parser.add_argument("--num-ids", type=int, default=synth.NUM_IDS, help="identities (half train, half test)")
    parser.add_argument("--images-per-id", type=int, default=synth.IMAGES_PER_ID, help="images per identity")
    parser.add_argument("--height", type=int, default=synth.HEIGHT, help="image height in pixels")
    parser.add_argument("--width", type=int, default=synth.WIDTH, help="image width in pixels")
    parser.add_argument("--ground-cameras", type=int, default=6, help="ground cameras (numbered 1..)")
    parser.add_argument("--aerial-cameras", type=int, default=4, help="aerial cameras (numbered 23..)")
    parser.add_argument("--seed", type=int, default=synth.SEED, help="same seed gives identical files")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/SynthAG")
    args = parser.parse_args()
    config = SynthConfig(num_ids=args.num_ids, images_per_id=args.images_per_id, height=args.height,
                         width=args.width, seed=args.seed, ground_cameras=args.ground_cameras,
                         aerial_cameras=args.aerial_cameras)
    start = time.perf_counter()
    target = generate_synthag(args.out, config, num_workers=args.workers, overwrite=args.overwrite)
    print(f"wrote {config.num_ids * config.images_per_id} images of {config.num_ids} identities to {target} "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_main(main)
