"""Download the pretrained backbone weights the shipped configs start from, with their SHA-256 checked.

    python tools/download_weights.py ViT-B-16                      # OpenAI CLIP ViT-B/16 -> pretrained/ViT-B-16.pt
    python tools/download_weights.py jx_vit_base_p16_224 --to pretrained/   # ImageNet ViT-B/16 (jx release)
    python tools/download_weights.py ViT-B-16 --url https://my.mirror/ViT-B-16.pt   # same file from a mirror
    python tools/download_weights.py ViT-B-16 --sha256             # check pretrained/ViT-B-16.pt, download nothing
    python tools/download_weights.py ViT-B-16 --sha256 ~/Downloads/ViT-B-16.pt      # check a copy made by hand

The file is written to ``<--to>/<file>.part`` and renamed to ``<--to>/<file>`` only once its SHA-256 is right,
so the target is either absent or complete. An interrupted transfer keeps the ``.part`` file and the same
command resumes it (HTTP Range). A file already at the target is checked, never replaced.
"""
import argparse
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from utils.entrypoint import run_main
from utils.errors import ConfigError, UserError

CHUNK = 1 << 20
TIMEOUT_SECONDS = 60
PART_SUFFIX = ".part"


@dataclass(frozen=True)
class WeightFile:
    """A downloadable weight file: its file name, public address, SHA-256, the configs that read it, where
    the SHA-256 comes from, and what of it the publisher itself states (all 64 digits, or a prefix)."""

    name: str
    filename: str
    url: str
    sha256: str
    used_by: str
    hash_source: str
    published: str


# OpenAI publishes the SHA-256 as the folder of the address; timm's jx file name carries its first 8 digits.
CLIP_VIT_B16_SHA256 = "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
JX_VIT_B16_SHA256 = "80ecf9dd5e3a58895e959af554c5666c4e7b4da4410de4f1f2b0025e93435d8c"

CATALOGUE = {entry.name: entry for entry in (
    WeightFile(
        "ViT-B-16", "ViT-B-16.pt",
        f"https://openaipublic.azureedge.net/clip/models/{CLIP_VIT_B16_SHA256}/ViT-B-16.pt",
        CLIP_VIT_B16_SHA256,
        "the CLIP models (configs/Base-CLIP.yml: CLIP_SVPR_ReID, CLIP_ReID, CLIP_baseline)",
        "OpenAI: the folder of its address, which OpenAI's clip.load checks the same way",
        CLIP_VIT_B16_SHA256),
    WeightFile(
        "jx_vit_base_p16_224", "jx_vit_base_p16_224-80ecf9dd.pth",
        "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/"
        "jx_vit_base_p16_224-80ecf9dd.pth",
        JX_VIT_B16_SHA256,
        "the ImageNet-ViT baselines (configs/Base-ImageNet-ViT.yml: ViT, TransReID, VDT, SeCap)",
        "public records of three unrelated projects that hashed the downloaded file and agree; the publisher "
        "itself gives only the first 8 digits, 80ecf9dd, in the file name (torch.hub's convention)",
        "80ecf9dd"),
)}


class DownloadError(UserError):
    """A download that cannot complete: offline, a bad address, an interrupted transfer or a wrong checksum."""


def entry_of(name):
    """The catalogue entry called ``name`` (or whose file is called ``name``)."""
    for entry in CATALOGUE.values():
        if name in (entry.name, entry.filename):
            return entry
    raise ConfigError(f"unknown weights {name!r}: expected one of {', '.join(CATALOGUE)}")


def file_sha256(path):
    """Hex SHA-256 of the file ``path``, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def mismatch(entry, path, actual):
    """What to say about ``path`` whose SHA-256 ``actual`` is not ``entry``'s."""
    message = f"'{path}' has SHA-256 {actual}, expected {entry.sha256} for {entry.filename}"
    if len(entry.published) < len(entry.sha256) and actual.startswith(entry.published):
        message += (f" (its first digits {entry.published} are those the publisher gives; the full SHA-256 "
                    f"expected here comes from {entry.hash_source}: please report this)")
    return message


def check_file(entry, path):
    """``DownloadError`` unless the file ``path`` exists with ``entry``'s SHA-256."""
    if not os.path.isfile(path):
        raise DownloadError(f"'{path}' not found: download it with python tools/download_weights.py {entry.name}")
    actual = file_sha256(path)
    if actual != entry.sha256:
        raise DownloadError(mismatch(entry, path, actual) + ": the file is damaged or another file; delete it and "
                            f"download it again with python tools/download_weights.py {entry.name}")
    return actual


def check_url(url):
    """``url`` unless it is not an http(s):// or file:// address (``ConfigError``)."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https", "file") or "://" not in url:
        raise ConfigError(f"--url {url!r}: expected an http://, https:// or file:// address")
    return url


def _offline_advice(entry, url, target):
    return (f"download {url} on a machine with internet access, copy it to {target} and check it with "
            f"python tools/download_weights.py {entry.name} --sha256 {target} (or give a mirror with --url)")


def transfer(url, part_path, report=None):
    """Append the bytes of ``url`` that ``part_path`` lacks (HTTP Range from its size; from the start when the
    server ignores the range). Returns the total size when the server told it, else None."""
    have = os.path.getsize(part_path) if os.path.exists(part_path) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the partial file is already whole
            exc.close()
            return have
        raise
    with response:
        if have and response.status != 206:
            have = 0  # the server sends the whole file again
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part_path, "ab" if have else "wb") as handle:
            while True:
                block = response.read(CHUNK)
                if not block:
                    break
                handle.write(block)
                have += len(block)
                if report:
                    report(have, total)
            handle.flush()
            os.fsync(handle.fileno())
    if total is not None and have < total:
        raise http.client.IncompleteRead(b"", total - have)
    return total


def download(entry, folder, url=None, report=None):
    """Download ``entry`` into ``folder`` (from ``url`` when given, e.g. a mirror), resuming a ``.part`` file,
    check its SHA-256 and rename it into place. Returns the path; a file already there is only checked."""
    url = check_url(url or entry.url)
    target = os.path.join(folder, entry.filename)
    if os.path.exists(target):
        check_file(entry, target)
        return target
    part_path = target + PART_SUFFIX
    created = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--to '{folder}': cannot create the folder ({exc.strerror or exc})") from None
    try:
        _transfer_and_check(entry, url, target, part_path, report)
    except DownloadError:
        if created and not os.listdir(folder):
            os.rmdir(folder)  # leave no empty folder behind a download that wrote nothing
        raise
    return target


def _transfer_and_check(entry, url, target, part_path, report):
    """``transfer`` into ``part_path``, then the SHA-256 check and the rename to ``target``; failures become
    one-line ``DownloadError``s that say what to do."""
    try:
        transfer(url, part_path, report)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url} answered {exc.code} {exc.reason}: the address is wrong or the file moved; "
                            f"{_offline_advice(entry, entry.url, target)}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        kept = os.path.getsize(part_path) if os.path.exists(part_path) else 0
        if kept:
            raise DownloadError(f"the transfer from {url} stopped after {kept} bytes ({reason}); run the same "
                                f"command again to resume it") from None
        if os.path.exists(part_path):
            os.remove(part_path)  # empty: nothing to resume
        raise DownloadError(f"cannot reach {url} ({reason}); offline? {_offline_advice(entry, url, target)}") from None
    except http.client.HTTPException as exc:
        kept = os.path.getsize(part_path) if os.path.exists(part_path) else 0
        raise DownloadError(f"the transfer from {url} stopped after {kept} bytes ({type(exc).__name__}); run the "
                            f"same command again to resume it") from None
    actual = file_sha256(part_path)
    if actual != entry.sha256:
        os.remove(part_path)
        raise DownloadError(mismatch(entry, url, actual) + ": the transfer was damaged or the address serves "
                            "another file; the download was deleted: run the command again, or check --url")
    os.replace(part_path, target)


def progress_printer(stream):
    """A ``report(done, total)`` that redraws one progress line on a terminal (nothing elsewhere)."""
    if not stream.isatty():
        return None

    def report(done, total):
        share = f"{100 * done / total:5.1f}% of {total / 1e6:.0f} MB" if total else f"{done / 1e6:.0f} MB"
        stream.write(f"\r{share}")
        stream.flush()
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("name", metavar="NAME", help="; ".join(f"{e.name}: {e.filename}, for {e.used_by}"
                                                               for e in CATALOGUE.values()))
    parser.add_argument("--to", default="pretrained", help="folder to write the file to (default: pretrained/, "
                                                           "where the shipped configs look)")
    parser.add_argument("--url", help="address to download from instead of the public one (a mirror of the same "
                                      "file: its SHA-256 is checked all the same)")
    parser.add_argument("--sha256", nargs="?", const="", metavar="FILE",
                        help="only check the SHA-256 of FILE (default: the file in --to) and download nothing")
    args = parser.parse_args(argv)
    entry = entry_of(args.name)
    target = os.path.join(args.to, entry.filename)
    if args.sha256 is not None:
        path = args.sha256 or target
        digest = check_file(entry, path)
        print(f"ok: '{path}' is {entry.filename} (SHA-256 {digest})")
        return
    existed = os.path.exists(target)
    if not existed:
        print(f"downloading {entry.filename} from {check_url(args.url or entry.url)}", flush=True)
    report = progress_printer(sys.stderr)
    path = download(entry, args.to, args.url, report)
    if report and not existed:
        sys.stderr.write("\n")
    state = "already there" if existed else "written"
    print(f"ok: '{path}' {state}, SHA-256 {entry.sha256} verified (source of the SHA-256: {entry.hash_source})")


if __name__ == "__main__":
    run_main(main)
