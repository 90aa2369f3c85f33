"""tools/download_weights.py against an HTTP server started here on 127.0.0.1 (it honours Range requests):
a good file, a wrong checksum, an interrupted transfer resumed, a 404 and a refused connection. Nothing leaves
the machine: the real addresses are only checked as constants."""
import dataclasses
import hashlib
import http.server
import os
import re
import socket
import threading

import pytest

from model.clip.loader import read_state_dict
from model.vit.weights import read_vit_weights
from tests.fixtures import run_entry_point
from tools import download_weights
from tools.download_weights import CATALOGUE, WeightFile
from utils.errors import CheckpointError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class Server(http.server.ThreadingHTTPServer):
    """Serves ``files`` ({path: bytes}); ``cut_after`` {path: n} sends only n bytes of the next full
    response (announcing them all) and closes the connection; ``requests`` records (path, Range header)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.cut_after, self.requests = {}, {}, []

    def url(self, path):
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        requested = self.headers.get("Range")
        server.requests.append((self.path, requested))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if requested:
            match = re.fullmatch(r"bytes=(\d+)-", requested)
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = server.cut_after.pop(self.path, None)
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = Server()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture
def entry(monkeypatch):
    """A catalogue entry for PAYLOAD, in place of the real ones, so that main() runs unchanged."""
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    weights = WeightFile("tiny", "tiny-weights.pt", "http://127.0.0.1:9/never-used", digest, "tests", "this test",
                         digest)
    monkeypatch.setattr(download_weights, "CATALOGUE", {"tiny": weights})
    return weights


def run(argv, capsys):
    """``(exit code, stdout, stderr lines)`` of download_weights.main(argv) under the entry points' contract."""
    return run_entry_point(download_weights.main, argv, capsys)


def test_downloads_checks_and_renames_a_good_file(server, entry, tmp_path, capsys):
    server.files["/w.pt"] = PAYLOAD
    code, out, err = run(["tiny", "--to", str(tmp_path), "--url", server.url("/w.pt")], capsys)
    target = tmp_path / "tiny-weights.pt"
    assert code == 0 and target.read_bytes() == PAYLOAD, (out, err)
    assert sorted(os.listdir(tmp_path)) == ["tiny-weights.pt"] and "verified" in out
    # Again: the file is checked, not fetched again; --sha256 checks it (or any copy) without the network.
    requests = len(server.requests)
    assert run(["tiny", "--to", str(tmp_path), "--url", server.url("/w.pt")], capsys)[0] == 0
    assert run(["tiny", "--to", str(tmp_path), "--sha256"], capsys)[:2] == (
        0, f"ok: '{target}' is tiny-weights.pt (SHA-256 {entry.sha256})\n")
    assert len(server.requests) == requests


def test_a_wrong_checksum_is_one_error_line_and_leaves_nothing(server, entry, tmp_path, capsys):
    server.files["/w.pt"] = PAYLOAD[:-1] + b"x"
    code, _, err = run(["tiny", "--to", str(tmp_path), "--url", server.url("/w.pt")], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert f"expected {entry.sha256}" in err[0] and "the download was deleted" in err[0]
    assert os.listdir(tmp_path) == []
    # A damaged file already in place is reported, never replaced.
    (tmp_path / "tiny-weights.pt").write_bytes(b"damaged")
    for argv in (["tiny", "--to", str(tmp_path), "--sha256"], ["tiny", "--to", str(tmp_path), "--url",
                                                                server.url("/w.pt")]):
        code, _, err = run(argv, capsys)
        assert code == 2 and len(err) == 1 and "delete it and download it again" in err[0], err
    assert (tmp_path / "tiny-weights.pt").read_bytes() == b"damaged"


def test_a_mismatch_that_keeps_the_publishers_prefix_says_where_the_full_hash_comes_from(tmp_path):
    """Only the first digits of the jx file's SHA-256 are the publisher's; a file that has them but not the
    recorded rest is reported as a doubt about the record, not as a damaged download."""
    path = tmp_path / "w.pth"
    path.write_bytes(PAYLOAD)
    actual = hashlib.sha256(PAYLOAD).hexdigest()
    recorded = WeightFile("w", "w.pth", "http://127.0.0.1:9/w.pth", actual[:8] + "0" * 56, "tests", "a record",
                          actual[:8])
    with pytest.raises(download_weights.DownloadError, match="are those the publisher gives; the full SHA-256 "
                                                             "expected here comes from a record: please report"):
        download_weights.check_file(recorded, str(path))
    with pytest.raises(download_weights.DownloadError) as caught:
        download_weights.check_file(dataclasses.replace(recorded, published=recorded.sha256), str(path))
    assert "publisher" not in str(caught.value)


def test_an_interrupted_transfer_resumes_with_a_range_request(server, entry, tmp_path, capsys):
    server.files["/w.pt"] = PAYLOAD
    server.cut_after["/w.pt"] = 300_000
    code, _, err = run(["tiny", "--to", str(tmp_path), "--url", server.url("/w.pt")], capsys)
    assert code == 2 and len(err) == 1 and "stopped after 300000 bytes" in err[0] and "again to resume" in err[0]
    assert not (tmp_path / "tiny-weights.pt").exists()
    assert (tmp_path / "tiny-weights.pt.part").read_bytes() == PAYLOAD[:300_000]
    code, out, err = run(["tiny", "--to", str(tmp_path), "--url", server.url("/w.pt")], capsys)
    assert code == 0, err
    assert server.requests[-1] == ("/w.pt", "bytes=300000-")
    assert (tmp_path / "tiny-weights.pt").read_bytes() == PAYLOAD and os.listdir(tmp_path) == ["tiny-weights.pt"]


def test_a_partial_file_that_is_already_whole_is_finished_without_a_transfer(server, entry, tmp_path, capsys):
    server.files["/w.pt"] = PAYLOAD
    (tmp_path / "tiny-weights.pt.part").write_bytes(PAYLOAD)
    assert run(["tiny", "--to", str(tmp_path), "--url", server.url("/w.pt")], capsys)[0] == 0
    assert server.requests == [("/w.pt", f"bytes={len(PAYLOAD)}-")]  # answered 416: nothing left to send
    assert (tmp_path / "tiny-weights.pt").read_bytes() == PAYLOAD


def test_a_missing_file_and_a_refused_connection_say_what_to_do(server, entry, tmp_path, capsys):
    code, _, err = run(["tiny", "--to", str(tmp_path), "--url", server.url("/absent.pt")], capsys)
    assert code == 2 and len(err) == 1 and "answered 404 Not Found" in err[0], err
    assert "--sha256" in err[0] and "--url" in err[0]
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tmp_path / "new"
    code, _, err = run(["tiny", "--to", str(folder), "--url", f"http://127.0.0.1:{port}/w.pt"], capsys)
    assert code == 2 and len(err) == 1 and "cannot reach" in err[0] and "offline?" in err[0], err
    assert "Connection refused" in err[0] and "--sha256" in err[0]
    assert os.listdir(tmp_path) == []  # neither a partial file nor the folder made for it


def test_the_catalogue_holds_the_public_files():
    clip, jx = CATALOGUE["ViT-B-16"], CATALOGUE["jx_vit_base_p16_224"]
    # OpenAI's address carries the SHA-256 as its folder (as OpenAI's clip.load checks it).
    assert clip.url.split("/")[-2] == clip.sha256 == clip.published and clip.url.endswith("/ViT-B-16.pt")
    # torch.hub's convention: the hex digits after the last '-' of the file name start the SHA-256.
    prefix = jx.filename.rsplit("-", 1)[1].split(".")[0]
    assert prefix == jx.published == "80ecf9dd" and jx.sha256.startswith(prefix) and len(jx.sha256) == 64
    assert jx.url.endswith("/v0.1-vitjx/" + jx.filename)


def test_missing_backbone_weights_name_the_download_command(tmp_path):
    with pytest.raises(CheckpointError, match=r"python tools/download_weights.py ViT-B-16 "):
        read_state_dict(str(tmp_path / "ViT-B-16.pt"))
    with pytest.raises(CheckpointError, match=r"python tools/download_weights.py jx_vit_base_p16_224 "):
        read_vit_weights(str(tmp_path / "jx.pth"))
