"""kvasir-shard download: resumable fetch from a local server, checks, safe unpacking."""

from __future__ import annotations

import functools
import hashlib
import http.server
import re
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from shard_tools.download import DownloadError, download, safe_extract


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support; counts the bytes it serves."""

    served = 0

    def log_message(self, *a):  # keep test output clean
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        m = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(m.group(1)) if m else 0
        if start >= len(data) and m:
            self.send_error(416)
            return
        self.send_response(206 if m else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])
        type(self).served += len(data) - start


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    RangeHandler.served = 0
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def make_zip(path: Path) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("kvasir-dataset-v2/polyps/a.jpg", b"\xff\xd8" + b"x" * 50_000)
        zf.writestr("kvasir-dataset-v2/normal-cecum/b.jpg", b"\xff\xd8" + b"y" * 50_000)
    return path.read_bytes()


def test_download_checks_and_unpacks(server, tmp_path):
    root, url = server
    data = make_zip(root / "kvasir-dataset-v2.zip")
    dest = tmp_path / "data"
    z = download(dest, f"{url}/kvasir-dataset-v2.zip", hashlib.sha256(data).hexdigest())
    assert z.read_bytes() == data
    assert (dest / "kvasir-dataset-v2" / "polyps" / "a.jpg").read_bytes().startswith(b"\xff\xd8")


def test_download_resumes_a_partial_file(server, tmp_path):
    root, url = server
    data = make_zip(root / "kvasir-dataset-v2.zip")
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "kvasir-dataset-v2.zip.part").write_bytes(data[:1000])
    download(dest, f"{url}/kvasir-dataset-v2.zip", extract=False)
    assert (dest / "kvasir-dataset-v2.zip").read_bytes() == data
    assert RangeHandler.served == len(data) - 1000  # only the missing tail travelled


def test_wrong_checksum_is_an_error(server, tmp_path):
    root, url = server
    make_zip(root / "kvasir-dataset-v2.zip")
    with pytest.raises(DownloadError, match="SHA-256"):
        download(tmp_path / "d", f"{url}/kvasir-dataset-v2.zip", "0" * 64)


def test_no_network_fails_fast_and_says_what_to_do(tmp_path):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as info:
        download(tmp_path, f"http://127.0.0.1:{port}/kvasir-dataset-v2.zip", timeout=5)
    msg = str(info.value)
    assert "by hand" in msg and "kvasir-shard build" in msg


def test_zip_member_escaping_the_folder_is_refused(tmp_path):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("kvasir/ok.jpg", b"fine")
        zf.writestr("../../escaped.txt", b"gotcha")
    with pytest.raises(DownloadError, match="escape"):
        safe_extract(z, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out" / "kvasir").exists()
