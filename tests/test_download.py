"""data.download: resumable, checked downloads against a local HTTP server (offline).

Every test builds its files in tmp_path in the real formats (or copies data/sample there): offline.
"""

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

import data.download as download
from conftest import CE, HN, SAMPLE
from data import fetch
from data.mining import mine_max_examples
from errors import UserError, main_exits_2_on_user_error
from local_servers import FileServer


@pytest.fixture
def server():
    s = FileServer({})
    yield s
    s.close()


@pytest.fixture
def hub(server, monkeypatch):
    """The server stands in for the Hugging Face Hub, as HF_ENDPOINT=server.url would make it (the variable
    is read when huggingface_hub is imported, hence the patch). Returns the path prefix of the dataset's files."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    return f"/datasets/{download.HF_DATASET}/resolve/main/"


def test_download_resumes_an_interrupted_transfer(server, tmp_path):
    body = gzip.compress(os.urandom(300_000))  # incompressible: the file stays ~300 kB
    server.files["/f.gz"] = body
    server.cut_after = 100_000
    dest = tmp_path / "f.gz"
    md5 = hashlib.md5(body).hexdigest()
    with pytest.raises(RuntimeError, match="run the same command again to resume"):
        fetch.download_file(server.url + "/f.gz", dest, len(body), md5)
    assert not dest.exists() and (tmp_path / "f.gz.part").stat().st_size == 100_000
    fetch.download_file(server.url + "/f.gz", dest, len(body), md5)
    assert server.ranges == ["bytes=100000-"] and dest.read_bytes() == body
    assert not (tmp_path / "f.gz.part").exists()


def test_download_checks_size_md5_and_gzip(server, tmp_path):
    body = gzip.compress(b"x" * 1000)
    server.files["/a.gz"] = body
    with pytest.raises(RuntimeError, match="announces"):
        fetch.download_file(server.url + "/a.gz", tmp_path / "a.gz", len(body) + 1)
    with pytest.raises(RuntimeError, match="md5"):
        fetch.download_file(server.url + "/a.gz", tmp_path / "a.gz", len(body), "0" * 32)
    assert not (tmp_path / "a.gz.part").exists()  # a wrong complete file is deleted, not resumed
    server.files["/b.gz"] = body[:-10]  # truncated gzip, size unknown upstream
    with pytest.raises(RuntimeError, match="not a complete gzip file"):
        fetch.download_file(server.url + "/b.gz", tmp_path / "b.gz")
    assert not (tmp_path / "b.gz").exists()
    with pytest.raises(RuntimeError, match="HTTP 404"):
        fetch.download_file(server.url + "/nothing", tmp_path / "c")


def tar_gz(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_download_train_then_mine(server, hub, tmp_path, monkeypatch):
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
            hub + HN: (src / HN).read_bytes(),
            hub + CE: (src / CE).read_bytes(),
        }
    )
    sources = {path[1:]: download.Source(server.url + path, None, None) for path in server.files if "/" not in path[1:]}
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
    assert (data_dir / HN).read_bytes() == (src / HN).read_bytes() and (data_dir / CE).read_bytes() == (
        src / CE
    ).read_bytes()
    # huggingface_hub keeps its metadata in data_dir/.cache; .npz and .lock files are mining's cache and locks
    names = [
        p.name
        for p in data_dir.iterdir()
        if not p.name.endswith((".npz", ".lock")) and p.name not in (".cache", "mined-cache")
    ]
    assert sorted(names) == sorted(
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


def test_file_lock_where_no_lock_file_can_be_made_still_makes_a_second_process_wait(tmp_path):
    """A read-only data folder (here: a lock path under a plain file, which fails for root too): the lock moves to
    the temporary folder instead of vanishing."""
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "x.lock"
    code = (
        "import sys, time\nfrom data.download import file_lock\n"
        "with file_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(1.0)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SAMPLE.parents[1]))
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, env=env, text=True)
    assert child.stdout.readline().strip() == "held"
    start = time.monotonic()
    with download.file_lock(path):
        waited = time.monotonic() - start
    child.wait()
    assert waited > 0.5


def test_hub_files_come_through_huggingface_hub_and_a_hub_error_is_a_download_error(server, hub, tmp_path):
    body = gzip.compress(b'{"qid": 1, "pos": [2], "neg": {"bm25": [3]}}\n')
    server.files[hub + HN] = body
    path = download.download_hard_negatives(tmp_path)
    assert path == tmp_path / HN and path.read_bytes() == body
    assert ("HEAD", hub + HN) in server.requests and ("GET", hub + HN) in server.requests
    server.requests.clear()
    assert download.download_hard_negatives(tmp_path) == path and not server.requests  # there: no request
    with pytest.raises(download.DownloadError, match=rf"download of {CE} from the Hugging Face dataset .* failed"):
        download.download_ce_scores(tmp_path)  # the server answers 404
    assert not (tmp_path / CE).exists()


def test_beir_zip_download_is_unpacked_and_a_missing_set_is_a_download_error(server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("toy/corpus.jsonl", '{"_id": "d1", "text": "x"}\n')
        z.writestr("toy/queries.jsonl", '{"_id": "q1", "text": "y"}\n')
        z.writestr("toy/qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    server.files["/toy.zip"] = buf.getvalue()
    target = download.download_beir("toy", tmp_path / "beir", url_template=server.url + "/{name}.zip")
    assert target == tmp_path / "beir" / "toy" and (target / "qrels" / "test.tsv").is_file()
    assert sorted(p.name for p in (tmp_path / "beir").iterdir()) == [".download.lock", "toy"]  # the zip is gone
    with pytest.raises(download.DownloadError, match=r"BEIR set 'missing': .*HTTP 404.*local folder in BEIR layout"):
        download.download_beir("missing", tmp_path / "beir", url_template=server.url + "/{name}.zip")


def test_command_line_exits_2_on_a_failed_download_and_a_bug_keeps_its_traceback(
    server, hub, tmp_path, monkeypatch, capsys
):
    server.status = 500
    monkeypatch.setattr(
        download, "SOURCES", {n: download.Source(f"{server.url}/{n}", None, None) for n in download.SOURCES}
    )
    for what in ("eval", "train"):
        with pytest.raises(SystemExit) as exit_status:
            main_exits_2_on_user_error(download.main, [what, "--data_dir", str(tmp_path)])
        assert exit_status.value.code == 2
        message = capsys.readouterr().err
        assert message.startswith("error: ") and "Traceback" not in message
        assert "HTTP 500" in message

    def bug(data_dir):
        raise KeyError("a bug")

    monkeypatch.setattr(download, "download_eval", bug)
    with pytest.raises(KeyError, match="a bug"):
        main_exits_2_on_user_error(download.main, ["eval", "--data_dir", str(tmp_path)])


def test_missing_training_files_without_download_are_a_user_error(tmp_path):
    with pytest.raises(download.MissingDataError, match=r"missing in .*python -m data.download train") as err:
        download.train_file_paths(tmp_path, download=False)
    assert isinstance(err.value, UserError) and isinstance(err.value, FileNotFoundError)


def test_msmarco_requests_name_the_azure_api_version_resumes_included(server, tmp_path, monkeypatch):
    """Azure honours `Range: bytes=N-` only from API version 2011-08-18 on: every MS MARCO request names one."""
    body = b"1\t0\t2\t1\n" * 1000
    server.files.update({"/msmarcoranking/qrels.dev.small.tsv": body, "/deep/2019qrels-pass.txt": b"19 Q0 5 3\n"})
    monkeypatch.setattr(download, "MSMARCO", server.url + "/msmarcoranking/")
    monkeypatch.setattr(download, "SOURCES", {
        "qrels.dev.small.tsv": download.Source(server.url + "/msmarcoranking/qrels.dev.small.tsv", len(body), None),
        "2019qrels-pass.txt": download.Source(server.url + "/deep/2019qrels-pass.txt", None, None),  # TREC's site
    })  # fmt: skip
    server.cut_after = 1000
    with pytest.raises(download.DownloadError, match="resume"):
        download.fetch("qrels.dev.small.tsv", tmp_path)
    download.fetch("qrels.dev.small.tsv", tmp_path)
    download.fetch("2019qrels-pass.txt", tmp_path)
    assert server.ranges == ["bytes=1000-"] and (tmp_path / "qrels.dev.small.tsv").read_bytes() == body
    versions = [{name.lower(): v for name, v in headers.items()}.get("x-ms-version") for headers in server.headers]
    assert versions == ["2019-12-12", "2019-12-12", None]
