"""Tokenizer tests: train/load round trip, T5 id layout, workdir cache, CLI, errors."""

import os
import re
import subprocess
import sys

import pytest

from colax import data, sources
from colax import tokenizer as tk
from colax.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def stdlib_docs():
    return [open(p, encoding="utf-8").read() for p in sources.stdlib_paths()[::20]]


@pytest.fixture(scope="module")
def trained(stdlib_docs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tok") / "small")
    return tk.train_tokenizer(stdlib_docs, out, vocab_size=600, model_type="bpe", sample_docs=40)


def test_train_load_round_trip(trained, stdlib_docs):
    assert (trained.vocab_size, trained.pad_id, trained.eos_id, trained.bos_id) == (600, 0, 1, -1)
    loaded = tk.load_tokenizer(trained.path)
    text = stdlib_docs[-1] + "\n\tnon-ASCII: é ∑ 🚀\n"
    ids = loaded.encode(text)
    assert ids == trained.encode(text) and loaded.decode(ids) == text
    assert 0 not in ids and 1 not in ids  # pad and eos never come out of encode


def test_unigram_trains(stdlib_docs, tmp_path):
    tok = tk.train_tokenizer(stdlib_docs, str(tmp_path / "uni"), 500, "unigram", 20)
    assert tok.vocab_size == 500 and tok.decode(tok.encode("x = 1\n")) == "x = 1\n"


def test_get_or_train_caches_in_workdir(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"line {i} of the corpus, word{i % 13}" for i in range(200)))
    cfg = data.defaults()
    cfg.update(source="text", path=str(corpus))
    assert cfg.tokenizer_vocab_size == 0  # default: the model's vocab size
    with pytest.raises(ConfigError, match=r"^data.tokenizer_vocab_size is 0"):
        tk.get_or_train_tokenizer(cfg, str(tmp_path / "wd"))
    tok = tk.get_or_train_tokenizer(cfg, str(tmp_path / "wd"), 300)
    path = tmp_path / "wd" / "tokenizer.model"
    assert tok.path == str(path) and tok.vocab_size == 300
    path.write_bytes(path.read_bytes())  # same bytes, newer mtime
    mtime = path.stat().st_mtime_ns
    assert tk.get_or_train_tokenizer(cfg, str(tmp_path / "wd"), 300).vocab_size == 300
    assert path.stat().st_mtime_ns == mtime  # reused, not retrained
    cfg.tokenizer = str(path)
    assert tk.get_or_train_tokenizer(cfg, str(tmp_path / "other")).path == str(path)
    cfg.update(tokenizer="", tokenizer_vocab_size=320)  # set: it wins over the model's
    assert tk.get_or_train_tokenizer(cfg, str(tmp_path / "set"), 300).vocab_size == 320


@pytest.fixture
def http_server(tmp_path):
    """(root folder, base URL) of a local HTTP server, shut down after the test."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_tokenizer_downloaded_once_into_workdir(trained, http_server, tmp_path):
    root, url = http_server
    proto = open(trained.path, "rb").read()
    (root / "spiece.model").write_bytes(proto)
    cfg = data.defaults()
    cfg.tokenizer = f"{url}/spiece.model"
    workdir = tmp_path / "wd"
    tok = tk.get_or_train_tokenizer(cfg, str(workdir), 32000)
    assert tok.path == str(workdir / "tokenizer.model") and tok.vocab_size == 600
    assert (workdir / "tokenizer.model").read_bytes() == proto
    (root / "spiece.model").unlink()  # the cached copy is used from now on
    assert tk.get_or_train_tokenizer(cfg, str(workdir), 32000).encode("x = 1") == trained.encode("x = 1")


def test_url_tokenizer_offline_says_what_to_place_where(http_server, tmp_path):
    _, url = http_server
    cfg = data.defaults()
    for missing in (f"{url}/spiece.model", "http://127.0.0.1:9/spiece.model"):  # 404; nothing listening
        cfg.tokenizer = missing
        with pytest.raises(DataError) as e:
            tk.get_or_train_tokenizer(cfg, str(tmp_path / "wd"), 32000)
        assert str(e.value).startswith(f"data.tokenizer: cannot download {missing} (")
        assert str(e.value).endswith(f"place it at {tmp_path / 'wd' / 'tokenizer.model'}") and "\n" not in str(e.value)
    assert not (tmp_path / "wd").exists()


def test_check_vocab(trained):
    tk.check_vocab(trained, 600)
    with pytest.raises(ConfigError, match=r"model.vocab_size=32000 but tokenizer .* has 600 pieces"):
        tk.check_vocab(trained, 32000)


def test_load_errors(tmp_path, capfd):
    with pytest.raises(DataError, match=r"tokenizer .*nope.model: cannot load"):
        tk.load_tokenizer(str(tmp_path / "nope.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"tokenizer .*junk.model: cannot load"):
        tk.load_tokenizer(str(tmp_path / "junk.model"))
    # Issue 33, item 7: a 0-byte file was "has no eos id", after SentencePiece's "Model is not initialized".
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(DataError, match=r"^tokenizer .*empty.model: cannot load \(the file is empty\)$"):
        tk.load_tokenizer(str(tmp_path / "empty.model"))
    assert "not initialized" not in capfd.readouterr().err


def test_cli(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"row {i} with some words w{i % 17}" for i in range(300)))
    out = str(tmp_path / "cli" / "tok")
    assert tk.main(["train", "--source", "text", "--path", str(corpus), "--doc-split", "line",
                    "--vocab-size", "300", "--out", out]) == 0
    assert os.path.exists(out + ".model") and "300 pieces" in capsys.readouterr().out
    assert tk.main(["train", "--source", "text", "--path", str(tmp_path / "none*"), "--out", out]) == 2
    assert "data.path: no file matches" in capsys.readouterr().err


def test_prepare_training_a_tokenizer_prints_no_library_log(tmp_path):
    # Issue 33, item 6: `prepare` printed absl's "I1206 22:45:04.428561 ... tokenizer.py:185] data:
    # training a 2048-piece bpe tokenizer for ..." on stderr; it is colax's own line on stdout now.
    (tmp_path / "c.txt").write_text("\n".join(f"row {i} with some words w{i % 17}" for i in range(300)))
    (tmp_path / "config.py").write_text(
        "from colax import config\n\n\ndef get_config():\n    cfg = config.defaults()\n"
        f"    cfg.data.update(source='text', path={str(tmp_path / 'c.txt')!r}, doc_split='line', seq_len=16,\n"
        "                    packing=True, tokenizer_vocab_size=300, val_docs=5)\n    return cfg\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "colax.data", "prepare", "--config", str(tmp_path / "config.py"),
                           "--out", str(tmp_path / "out"), "--workers=1"], capture_output=True, text=True, cwd=root,
                          env=dict(os.environ, PYTHONPATH=root))
    assert done.returncode == 0, done.stderr
    assert f"data: training a 300-piece bpe tokenizer for {tmp_path / 'out'}" in done.stdout
    assert not re.search(r"^[IWE]\d{4} ", done.stderr, re.MULTILINE), done.stderr
