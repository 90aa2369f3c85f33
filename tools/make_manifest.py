"""Write the CSV manifest of the Custom datasets from a folder of images, reading labels from the file names.

    python tools/make_manifest.py crops/ --pattern '(?P<pid>\\d+)_c(?P<camid>\\d+)' --out crops/data.csv
    python tools/make_manifest.py crops/ --out crops/data.csv \\
        --pattern '(?P<viewid>drone|cctv)/id(?P<pid>\\d+)_cam(?P<camid>\\d+)_(?P<timeid>day|night)' \\
        --view-word drone=aerial --view-word cctv=ground --test-fraction 0.5 --seed 0

The pattern is searched in each image's path relative to ROOT (with / between folders); its named groups
give the labels: ``pid`` and ``camid`` (integers), optionally ``viewid`` (0/1, ground/aerial or a word given
with --view-word) and ``timeid`` (0/1, day/night or a word given with --time-word). Identities are split into
training and test identities at random (--test-fraction, --seed). Of each test identity, one image per camera
becomes a query (the Market-1501 convention) as long as the identity keeps a gallery image from another
camera; the other images form the gallery.
"""
import argparse
import csv
import io
import os
import random
import re
from collections import defaultdict

from datasets.bases import list_images
from datasets.custom import REQUIRED_COLUMNS, TIME_WORDS, VIEW_WORDS, label_number, parse_manifest
from utils.entrypoint import run_main
from utils.errors import ConfigError, DataError
from utils.io import atomic_write

LABEL_GROUPS = ("pid", "camid", "viewid", "timeid")


def compile_pattern(text):
    """The compiled ``--pattern``; ``ConfigError`` when it is not a regular expression with the named groups
    pid and camid (and no other names than viewid and timeid)."""
    try:
        pattern = re.compile(text)
    except re.error as exc:
        raise ConfigError(f"--pattern {text!r} is not a regular expression: {exc}") from None
    names = set(pattern.groupindex)
    missing = [name for name in ("pid", "camid") if name not in names]
    if missing:
        raise ConfigError(f"--pattern {text!r} has no named group '{missing[0]}': write (?P<pid>...) and "
                          "(?P<camid>...) around the identity and camera in the file names")
    unknown = sorted(names - set(LABEL_GROUPS))
    if unknown:
        raise ConfigError(f"--pattern {text!r}: unknown named group '{unknown[0]}' (expected "
                          f"{', '.join(LABEL_GROUPS)})")
    return pattern


def word_map(entries, option, targets):
    """``{word: id}`` of ``--view-word``/``--time-word`` entries ``WORD=TARGET`` (TARGET a key of ``targets``)."""
    mapping = dict(targets)
    for entry in entries or ():
        word, _, target = entry.partition("=")
        if not word or target.lower() not in targets:
            raise ConfigError(f"{option} {entry!r}: expected WORD={'|'.join(targets)}")
        mapping[word.lower()] = targets[target.lower()]
    return mapping


def label_value(value, group, relative, words=None):
    """The integer label of a matched group (a word of ``words`` too); ``DataError`` naming the file."""
    number = label_number(value, words)
    if number is not None:
        return number
    expected = "digits" if words is None else (
        f"0, 1 or one of the words {', '.join(sorted(words))} (add others with "
        f"--{'view' if group == 'viewid' else 'time'}-word WORD=...)")
    raise DataError(f"image '{relative}': the group {group} matched {value!r}, expected {expected}")


def read_folder(root, pattern, view_words, time_words, skip_unmatched):
    """``(images, unmatched)``: a dict of labels per matched image (path relative to ``root``, sorted) and
    the relative paths the pattern does not match."""
    images, unmatched = [], []
    for path in list_images(root):
        relative = os.path.relpath(path, root).replace(os.sep, "/")
        match = pattern.search(relative)
        if match is None:
            unmatched.append(relative)
            continue
        labels = {"path": path, "relative": relative}
        for group in LABEL_GROUPS:
            value = match.groupdict().get(group)
            if group in pattern.groupindex and value is None:
                raise DataError(f"image '{relative}': the pattern matched without its group {group}")
            if value is not None:
                words = {"viewid": view_words, "timeid": time_words}.get(group)
                labels[group] = label_value(value, group, relative, words)
        images.append(labels)
    if unmatched and not skip_unmatched:
        raise DataError(f"{len(unmatched)} of {len(unmatched) + len(images)} images under '{root}' do not match "
                        f"--pattern (first: '{unmatched[0]}'); fix the pattern or pass --skip-unmatched")
    if not images:
        raise DataError(f"no image under '{root}' matches --pattern")
    return images, unmatched


def split_identities(pids, test_fraction, seed):
    """The test identities: ``round(test_fraction * N)`` of the ``N`` identities (at least one, and one left
    for training), drawn with ``random.Random(seed)``."""
    pids = sorted(pids)
    if len(pids) < 2:
        raise DataError(f"found {len(pids)} identity: a training and a test split need at least two")
    count = min(max(round(test_fraction * len(pids)), 1), len(pids) - 1)
    return set(random.Random(seed).sample(pids, count))


def choose_queries(images, rng):
    """The query images of one test identity: per camera (in order) one image drawn by ``rng``, made a query
    when the gallery keeps an image of the identity from another camera, so that every query can be matched."""
    by_camera = defaultdict(list)
    for image in images:
        by_camera[image["camid"]].append(image)
    gallery = list(images)
    queries = []
    for camid in sorted(by_camera):
        candidate = rng.choice(by_camera[camid])
        if any(other["camid"] != camid for other in gallery):
            gallery.remove(candidate)
            queries.append(candidate)
    return queries


def build_rows(images, test_fraction, seed):
    """Manifest rows (dicts with a ``split``) of ``images`` and the test identities."""
    test_pids = split_identities({image["pid"] for image in images}, test_fraction, seed)
    rng = random.Random(seed)
    by_pid = defaultdict(list)
    for image in images:
        image["split"] = "train" if image["pid"] not in test_pids else "gallery"
        by_pid[image["pid"]].append(image)
    for pid in sorted(test_pids):
        for image in choose_queries(by_pid[pid], rng):
            image["split"] = "query"
    return images, test_pids


def manifest_text(rows, out, columns):
    """The CSV text of ``rows`` with paths relative to the folder of ``out`` (absolute where impossible)."""
    folder = os.path.dirname(os.path.abspath(out))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        try:
            path = os.path.relpath(row["path"], folder).replace(os.sep, "/")
        except ValueError:  # another drive (Windows)
            path = row["path"]
        writer.writerow([path if name == "path" else row[name] for name in columns])
    return buffer.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("root", help="folder of images (searched recursively)")
    parser.add_argument("--pattern", required=True,
                        help="regular expression with named groups pid, camid and optionally viewid, timeid, "
                             "searched in each path relative to ROOT")
    parser.add_argument("--out", required=True, help="CSV file to write (paths in it are relative to its folder)")
    parser.add_argument("--test-fraction", type=float, default=0.5,
                        help="fraction of the identities that become test identities (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the identity split and the query draw")
    parser.add_argument("--view-word", action="append", metavar="WORD=ground|aerial",
                        help="a word the viewid group may match, and the view it means (repeatable)")
    parser.add_argument("--time-word", action="append", metavar="WORD=day|night",
                        help="a word the timeid group may match, and the time it means (repeatable)")
    parser.add_argument("--skip-unmatched", action="store_true",
                        help="leave out the images the pattern does not match (default: an error)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        raise ConfigError(f"ROOT '{args.root}' is not a folder")
    if not 0 < args.test_fraction < 1:
        raise ConfigError(f"--test-fraction {args.test_fraction}: expected a number between 0 and 1")
    if os.path.exists(args.out) and not args.overwrite:
        raise ConfigError(f"--out '{args.out}' exists; pass --overwrite to replace it")
    pattern = compile_pattern(args.pattern)
    images, unmatched = read_folder(os.path.abspath(args.root), pattern,
                                    word_map(args.view_word, "--view-word", VIEW_WORDS),
                                    word_map(args.time_word, "--time-word", TIME_WORDS), args.skip_unmatched)
    rows, test_pids = build_rows(images, args.test_fraction, args.seed)
    if not any(row["split"] == "query" for row in rows):
        raise DataError("no test identity has images from two cameras, so no query can be drawn (a query needs a "
                        "gallery image of its identity from another camera)")
    columns = list(REQUIRED_COLUMNS) + [name for name in ("viewid", "timeid") if name in pattern.groupindex]
    atomic_write(args.out, manifest_text(rows, args.out, columns))

    count = defaultdict(int)
    for row in rows:
        count[row["split"]] += 1
    skipped = f" ({len(unmatched)} not matching --pattern left out)" if unmatched else ""
    print(f"{len(rows)} images of {len({r['pid'] for r in rows})} identities and "
          f"{len({r['camid'] for r in rows})} cameras{skipped}")
    print(f"train: {count['train']} images of {len({r['pid'] for r in rows}) - len(test_pids)} identities; "
          f"test: {len(test_pids)} identities, {count['query']} query and {count['gallery']} gallery images")
    # Read back as training will read it: the same checks, and the warnings about the result.
    for warning in parse_manifest(args.out).warnings():
        print(f"warning: {warning}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
