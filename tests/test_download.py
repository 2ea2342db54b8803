"""data.download: resumable, checked downloads against a local HTTP server (offline).

Every test builds its files in tmp_path in the real formats (or copies data/sample there): offline.
"""

import gzip
import hashlib
import http.server
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time

import pytest

import data.download as download
from conftest import CE, HN, SAMPLE
from data.mining import mine_max_examples


class FileServer:
    """Serves {path: bytes} on 127.0.0.1 with HTTP Range; can cut the first response after N bytes."""

    def __init__(self, files):
        self.files, self.cut_after, self.ranges = files, None, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng := self.headers.get("Range"):
                    server.ranges.append(rng)
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if server.cut_after is not None:  # announce everything, send part, hang up
                    self.wfile.write(body[start : start + server.cut_after])
                    server.cut_after = None
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer({})
    yield s
    s.close()


def test_download_resumes_an_interrupted_transfer(server, tmp_path):
    body = gzip.compress(os.urandom(300_000))  # incompressible: the file stays ~300 kB
    server.files["/f.gz"] = body
    server.cut_after = 100_000
    dest = tmp_path / "f.gz"
    md5 = hashlib.md5(body).hexdigest()
    with pytest.raises(RuntimeError, match="run the same command again to resume"):
        download.download_file(server.url + "/f.gz", dest, len(body), md5)
    assert not dest.exists() and (tmp_path / "f.gz.part").stat().st_size == 100_000
    download.download_file(server.url + "/f.gz", dest, len(body), md5)
    assert server.ranges == ["bytes=100000-"] and dest.read_bytes() == body
    assert not (tmp_path / "f.gz.part").exists()


def test_download_checks_size_md5_and_gzip(server, tmp_path):
    body = gzip.compress(b"x" * 1000)
    server.files["/a.gz"] = body
    with pytest.raises(RuntimeError, match="announces"):
        download.download_file(server.url + "/a.gz", tmp_path / "a.gz", len(body) + 1)
    with pytest.raises(RuntimeError, match="md5"):
        download.download_file(server.url + "/a.gz", tmp_path / "a.gz", len(body), "0" * 32)
    assert not (tmp_path / "a.gz.part").exists()  # a wrong complete file is deleted, not resumed
    server.files["/b.gz"] = body[:-10]  # truncated gzip, size unknown upstream
    with pytest.raises(RuntimeError, match="not a complete gzip file"):
        download.download_file(server.url + "/b.gz", tmp_path / "b.gz")
    assert not (tmp_path / "b.gz").exists()
    with pytest.raises(RuntimeError, match="HTTP 404"):
        download.download_file(server.url + "/nothing", tmp_path / "c")


def tar_gz(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_download_train_then_mine(server, tmp_path, monkeypatch):
    """download=True fetches the four files (tarballs extracted, sizes and line counts checked), then mines."""
    src = shutil.copytree(SAMPLE, tmp_path / "src")
    collection = (src / "collection.tsv").read_bytes()
    queries = (src / "queries.train.tsv").read_bytes()
    server.files.update(
        {
            "/collection.tar.gz": tar_gz({"collection.tsv": collection}),
            "/queries.tar.gz": tar_gz(
                {
                    "queries.train.tsv": queries,
                    "queries.dev.tsv": b"1\tq\n",
                    "queries.eval.tsv": b"2\tq\n",
                    "../../evil.tsv": b"x",
                }
            ),
            f"/{HN}": (src / HN).read_bytes(),
            f"/{CE}": (src / CE).read_bytes(),
        }
    )
    sources = {path[1:]: download.Source(server.url + path, None, None) for path in server.files}
    sources["queries.tar.gz"] = download.Source(
        server.url + "/queries.tar.gz", len(server.files["/queries.tar.gz"]), None
    )  # a known size
    monkeypatch.setattr(download, "SOURCES", sources)
    monkeypatch.setattr(
        download, "LINE_COUNTS", {"collection.tsv": collection.count(b"\n"), "queries.train.tsv": queries.count(b"\n")}
    )
    data_dir = tmp_path / "msmarco-data"
    ts = mine_max_examples(data_dir, download=True)
    assert len(ts) == 1200
    assert sorted(p.name for p in data_dir.iterdir() if not p.name.endswith((".npz", ".lock"))) == sorted(
        [
            "collection.tar.gz",
            "collection.tsv",
            "queries.tar.gz",
            "queries.train.tsv",
            "queries.dev.tsv",
            "queries.eval.tsv",
            HN,
            CE,
        ]
    )
    assert not (tmp_path / "evil.tsv").exists()

    monkeypatch.setattr(download, "LINE_COUNTS", {"collection.tsv": 5})
    (data_dir / "collection.tsv").unlink()
    with pytest.raises(RuntimeError, match="lines, expected 5"):
        download.download_collection(data_dir)
    assert not (data_dir / "collection.tsv").exists()


def test_download_eval_files(server, tmp_path, monkeypatch):
    qrels = b"2\t0\t20\t1\n3\t0\t30\t1\n"
    server.files.update(
        {
            "/qrels.dev.small.tsv": qrels,
            "/queries.tar.gz": tar_gz(
                {
                    "queries.train.tsv": b"9\tq\n",
                    "queries.dev.tsv": b"1\ta\n2\tb\n3\tc\n",
                    "queries.eval.tsv": b"4\td\n",
                }
            ),
            "/msmarco-test2019-queries.tsv.gz": gzip.compress(b"19\tdl19 query\n"),
            "/2019qrels-pass.txt": b"19 Q0 5 3\n",
            "/msmarco-test2020-queries.tsv.gz": gzip.compress(b"20\tdl20 query\n"),
            "/2020qrels-pass.txt": b"20 0 6 2\n",
        }
    )
    monkeypatch.setattr(
        download,
        "SOURCES",
        {
            name.lstrip("/"): download.Source(server.url + name, len(body), hashlib.md5(body).hexdigest())
            for name, body in server.files.items()
        },
    )
    monkeypatch.setattr(download, "LINE_COUNTS", {"queries.dev.small.tsv": 2, "qrels.dev.small.tsv": 2})
    download.main(["eval", "--data_dir", str(tmp_path)])
    assert (tmp_path / "queries.dev.small.tsv").read_bytes() == b"2\tb\n3\tc\n"
    assert (tmp_path / "msmarco-test2019-queries.tsv").read_bytes() == b"19\tdl19 query\n"
    assert (tmp_path / "2020qrels-pass.txt").read_bytes() == b"20 0 6 2\n"
    assert all((tmp_path / name).exists() for name in download.EVAL_FILES)


def test_file_lock_makes_a_second_process_wait(tmp_path):
    """Under torchrun every rank mines: one downloads / unpickles, the others wait for it."""
    code = (
        "import sys, time\nfrom data.download import file_lock\n"
        "with file_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(1.0)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SAMPLE.parents[1]))
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "x.lock")], stdout=subprocess.PIPE, env=env, text=True
    )
    assert child.stdout.readline().strip() == "held"
    start = time.monotonic()
    with download.file_lock(tmp_path / "x.lock"):
        waited = time.monotonic() - start
    child.wait()
    assert waited > 0.5
