"""Prepared shards (colax.rows format, colax.prepare): the records, the manifest, and the pipeline reading them."""

import itertools
import json
import os
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from colax import config, data, prepare, rows, tokenizer
from colax.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_records_round_trip_as_int32_little_endian():
    record = np.array([5, 1, 70000, 0], np.int32)
    raw = rows.encode(record)
    assert raw == b"\x05\x00\x00\x00\x01\x00\x00\x00\x70\x11\x01\x00\x00\x00\x00\x00"
    np.testing.assert_array_equal(rows.decode(raw), record)
    assert rows.decode(raw).dtype == np.int32


def test_a_folder_without_a_finished_manifest_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"data.path .*nowhere is not a folder: run python -m colax.data prepare"):
        rows.read_manifest(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"has no manifest.json \(a prepare that did not finish\?\)"):
        rows.read_manifest(str(tmp_path))
    (tmp_path / rows.MANIFEST).write_bytes(rows.manifest_bytes({"format": rows.FORMAT, "version": 0}))
    with pytest.raises(DataError, match=r"version 0, this colax reads 'colax.prepared' version 1: prepare again"):
        rows.read_manifest(str(tmp_path))
    manifest = {"format": rows.FORMAT, "version": rows.FORMAT_VERSION, "splits": {}}
    (tmp_path / rows.MANIFEST).write_bytes(rows.manifest_bytes(manifest))
    assert rows.read_manifest(str(tmp_path)) == manifest == json.loads((tmp_path / rows.MANIFEST).read_text())


def _corpus_config(tmp_path, **data_kw):
    """A colax config over a text file of 60 documents of 1-40 lines (several rows of 32 each)."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    docs = [f"doc {i}\n" + "\n".join(" ".join(rng.choice(words, 6)) for _ in range(n))
            for i, n in enumerate(rng.integers(1, 40, 60))]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs))
    cfg = config.defaults()
    cfg.data.update(source="text", path=str(path), val_docs=7, seq_len=32, tokenizer_vocab_size=300,
                    tokenizer_sample_docs=30, **data_kw)
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(config, tokenizer): the corpus config with a 300-piece BPE trained on it (as training would)."""
    tmp = tmp_path_factory.mktemp("corpus")
    cfg = _corpus_config(tmp)
    tok = tokenizer.get_or_train_tokenizer(cfg.data, str(tmp / "tok"))
    cfg.data.tokenizer = tok.path
    return cfg, tok


def _batches(cfg_data, tok, n, split="train", p=0, count=1):
    it = data.make_pipeline(cfg_data, tok, split=split, global_batch_size=4, process_index=p, process_count=count)
    return list(itertools.islice(it, n))


def _prepared(cfg, out):
    prepared = cfg.data.copy_and_resolve_references()
    prepared.update(source="prepared", path=str(out))
    return prepared


@pytest.mark.parametrize("packing", [False, True])
def test_prepared_shards_give_the_on_the_fly_batches(corpus, tmp_path, packing):
    cfg, tok = corpus
    cfg = cfg.copy_and_resolve_references()
    cfg.data.packing = packing
    manifest = prepare.prepare(cfg, str(tmp_path / "out"), workers=1, records_per_shard=7)
    train = manifest["splits"]["train"]
    assert train["documents"] == 53 and len(train["shards"]) == -(-train["rows"] // 7) > 1
    steps = train["rows"] // 4 + 3  # across the epoch boundary
    prepared = _prepared(cfg, tmp_path / "out")
    for p, count, index in [(0, 1, "memory"), (0, 2, "memory"), (1, 2, "disk")]:
        prepared.prepared_index = index
        chex.assert_trees_all_equal(_batches(prepared, tok, steps, p=p, count=count),
                                    _batches(cfg.data, tok, steps, p=p, count=count))
        chex.assert_trees_all_equal(_batches(prepared, tok, 100, "val", p, count),
                                    _batches(cfg.data, tok, 100, "val", p, count))


def test_a_validation_file_of_ones_own(corpus, tmp_path):
    cfg, tok = corpus
    cfg = cfg.copy_and_resolve_references()
    (tmp_path / "val.txt").write_text("first held out\n\nsecond held out\n\nthird")
    cfg.data.update(packing=True, val_path=str(tmp_path / "val.txt"))
    manifest = prepare.prepare(cfg, str(tmp_path / "out"), workers=1)
    assert [manifest["splits"][s]["documents"] for s in ("train", "val")] == [60, 3]
    for split in ("train", "val"):
        chex.assert_trees_all_equal(_batches(_prepared(cfg, tmp_path / "out"), tok, 5, split),
                                    _batches(cfg.data, tok, 5, split))


def _files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_two_workers_and_a_rerun_write_the_same_bytes(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 500)  # ~25 chunks, so that the workers share them
    cfg, _ = corpus
    cfg = cfg.copy_and_resolve_references()
    cfg.data.packing = True
    prepare.prepare(cfg, str(tmp_path / "one"), workers=1, records_per_shard=50)
    prepare.prepare(cfg, str(tmp_path / "two"), workers=2, records_per_shard=50)
    one = _files(tmp_path / "one")
    assert one == _files(tmp_path / "two") and len(one) > 4
    prepare.prepare(cfg, str(tmp_path / "one"), workers=1, records_per_shard=50, overwrite=True)
    assert _files(tmp_path / "one") == one


def test_an_interrupted_prepare_leaves_no_manifest_and_a_rerun_starts_over(corpus, tmp_path, monkeypatch):
    cfg, tok = corpus
    prepare.prepare(cfg, str(tmp_path / "clean"), workers=1, records_per_shard=20)
    real = prepare._SplitWriter.write

    def write_then_die(self, record):
        if self.records == 30:
            raise KeyboardInterrupt
        real(self, record)

    monkeypatch.setattr(prepare._SplitWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(cfg, str(tmp_path / "out"), workers=1, records_per_shard=20)
    assert "train-00000.array_record" in os.listdir(tmp_path / "out") and rows.MANIFEST not in os.listdir(tmp_path / "out")
    with pytest.raises(DataError, match=r"out has no manifest.json \(a prepare that did not finish\?\)"):
        _batches(_prepared(cfg, tmp_path / "out"), tok, 1)
    monkeypatch.setattr(prepare._SplitWriter, "write", real)
    prepare.prepare(cfg, str(tmp_path / "out"), workers=1, records_per_shard=20)
    assert _files(tmp_path / "out") == _files(tmp_path / "clean")
    with pytest.raises(DataError, match=r"out holds prepared data \(manifest.json\): pass --overwrite to replace it"):
        prepare.prepare(cfg, str(tmp_path / "out"), workers=1)


def test_the_tokenizer_is_trained_as_training_would_and_used_by_default(corpus, tmp_path):
    cfg, tok = corpus
    cfg = cfg.copy_and_resolve_references()
    cfg.data.tokenizer = ""
    manifest = prepare.prepare(cfg, str(tmp_path / "out"), workers=1)
    assert manifest["tokenizer"]["sha256"] == tok.sha256  # the fixture's, trained by get_or_train_tokenizer
    found, proto = tokenizer.find_or_train(_prepared(cfg, tmp_path / "out"), str(tmp_path / "run"))
    assert found.sha256 == tok.sha256 and found.path == str(tmp_path / "run" / "tokenizer.model") and proto


def test_mismatches_with_the_manifest_are_one_line(corpus, tmp_path):
    cfg, tok = corpus
    prepare.prepare(cfg, str(tmp_path / "out"), workers=1)
    prepared = _prepared(cfg, tmp_path / "out")
    for key, value, message in [("seq_len", 16, r"data.seq_len: the prepared data in .*out has seq_len 32, this run 16"),
                                ("packing", True, r"data.packing: .* has rows 'paper', this run 'packed'")]:
        changed = prepared.copy_and_resolve_references()
        changed[key] = value
        with pytest.raises(ConfigError, match=message):
            _batches(changed, tok, 1)
    other = tokenizer.train_tokenizer(list(data.train_documents(cfg.data, 60))[::-1], str(tmp_path / "other"), 300, "bpe", 20)
    with pytest.raises(ConfigError, match=r"data.tokenizer: .* has tokenizer sha256 '[0-9a-f]{64}', this run"):
        _batches(prepared, other, 1)


def test_bad_inputs_are_one_line_and_write_nothing(corpus, tmp_path):
    cfg, _ = corpus
    out = tmp_path / "out"
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    (tmp_path / "blank.txt").write_text("\n\n \n")
    for data_kw, message in [
            (dict(path=str(tmp_path / "missing.txt")), r"data.path: no file matches '.*missing.txt'"),
            (dict(path=str(tmp_path / "blank.txt")), r"data: no documents in source 'text' \(files .*blank.txt\)"),
            (dict(source="jsonl", path=str(bad_jsonl)), r"bad.jsonl:2: no string field 'text' \(data.text_field\)"),
            (dict(val_path=str(tmp_path / "nothing*.txt")), r"data.val_path: no file matches"),
            (dict(source="prepared", path=str(tmp_path)), r"data.source must be the corpus to prepare")]:
        bad = cfg.copy_and_resolve_references()
        bad.data.update(**data_kw)
        with pytest.raises((ConfigError, DataError), match=message) as e:
            prepare.prepare(bad, str(out), workers=1)
        assert "\n" not in str(e.value) and not out.exists()


CONFIG = '''
from colax import config


def get_config():
    cfg = config.defaults()
    cfg.data.update(source="text", seq_len=32, packing=True, tokenizer_vocab_size=300, tokenizer_sample_docs=30,
                    val_docs=5)
    return cfg
'''


def test_command_line(corpus, tmp_path):
    cfg, tok = corpus
    (tmp_path / "config.py").write_text(CONFIG)
    command = [sys.executable, "-m", "colax.data", "prepare", "--config", str(tmp_path / "config.py"),
               f"--config.data.path={cfg.data.path}", f"--config.data.tokenizer={tok.path}", "--workers=1"]
    done = subprocess.run(command + ["--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'out'}: packed rows of 32 tokens, train 55 documents" in done.stdout
    assert "prepare: 60 documents" in done.stdout
    again = subprocess.run(command + ["--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=ROOT))
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: --out {tmp_path / 'out'} holds prepared data (manifest.json): pass --overwrite to replace it"]


def test_streamed_sources_prepare(corpus, tmp_path):
    # tfds (paper rows: the on-the-fly pipeline's batches) and hf (a local json file through `datasets`).
    from test_data import ColaxTinyText  # pylint: disable=import-outside-toplevel
    cfg, tok = corpus
    cfg = cfg.copy_and_resolve_references()
    ColaxTinyText(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    cfg.data.update(source="tfds", tfds_name="colax_tiny_text:1.0.0", tfds_data_dir=str(tmp_path / "tfds"))
    manifest = prepare.prepare(cfg, str(tmp_path / "from_tfds"), workers=1)
    assert [manifest["splits"][s]["documents"] for s in ("train", "val")] == [12, 3]
    for split in ("train", "val"):
        chex.assert_trees_all_equal(_batches(_prepared(cfg, tmp_path / "from_tfds"), tok, 5, split),
                                    _batches(cfg.data, tok, 5, split))
    pytest.importorskip("datasets")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"alpha beta {i} " * i}) for i in range(1, 9)))
    cfg.data.update(source="hf", hf_name="json", hf_config="", path=str(tmp_path / "d.jsonl"), val_split="train",
                    packing=True)
    manifest = prepare.prepare(cfg, str(tmp_path / "from_hf"), workers=1)
    assert [manifest["splits"][s]["documents"] for s in ("train", "val")] == [8, 8]
    assert len(_batches(_prepared(cfg, tmp_path / "from_hf"), tok, 3)) == 3


def test_a_killed_prepare_takes_its_workers_with_it_quietly(tmp_path):
    """Issue 33, item 6: kill -9 of `prepare --workers 2` as its first shard appears (its workers
    busy with the chunks in flight). main's workers each printed a BrokenPipeError traceback (their
    results had nowhere to go) and multiprocessing's resource tracker a "leaked semaphore" warning;
    now the workers end with it and nothing is printed."""
    out, err = (open(tmp_path / name, "w+") for name in ("stdout", "stderr"))
    proc = subprocess.Popen([sys.executable, "-m", "colax.data", "prepare", "--config", "configs/tiny.py", "--out",
                             str(tmp_path / "out"), "--workers", "2", "--records_per_shard", "20"],
                            stdout=out, stderr=err, cwd=ROOT)
    deadline, workers = time.monotonic() + 300, []
    shards = lambda: [n for _, _, names in os.walk(tmp_path / "out") for n in names if ".array_record" in n]
    while time.monotonic() < deadline and proc.poll() is None and not shards():
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            workers = [int(pid) for pid in f.read().split()]
        time.sleep(0.05)
    assert proc.poll() is None, f"prepare ended before it was killed: {(tmp_path / 'stdout').read_text()}"
    proc.kill()
    proc.wait()
    time.sleep(5)
    assert len(workers) >= 2 and not [pid for pid in workers if os.path.exists(f"/proc/{pid}") and
                                      open(f"/proc/{pid}/stat").read().split()[2] != "Z"], workers
    err.seek(0)
    assert err.read() == ""
