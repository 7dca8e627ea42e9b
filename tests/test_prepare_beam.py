"""The Beam prepare (colax.prepare_beam on the DirectRunner) writes the local prepare's files byte for byte."""

import gzip
import importlib
import json
import os
import subprocess
import sys

import pytest

from conftest import extra_package
from colax import config, prepare, tokenizer
from colax.errors import ConfigError

extra_package("apache_beam", "beam")
from colax import prepare_beam  # noqa: E402  (imports apache_beam)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARALLEL = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A config over three jsonl files (the second gzipped) of 25 documents of 1 to 60 words, with a
    280-piece tokenizer trained on them; 9 documents held out."""
    root = tmp_path_factory.mktemp("corpus")
    docs = [f"doc {i}: " + " ".join(f"w{i * j % 31}" for j in range(1 + i * 13 % 60)) for i in range(75)]
    for k in range(3):
        lines = "".join(json.dumps({"text": doc}) + "\n" for doc in docs[25 * k:25 * (k + 1)])
        with (gzip.open if k == 1 else open)(root / f"part-{k}.jsonl{'.gz' if k == 1 else ''}", "wt") as f:
            f.write(lines)
    cfg = config.defaults()
    cfg.data.update(source="jsonl", path=str(root / "part-*"), val_docs=9, seq_len=16,
                    tokenizer=tokenizer.train_tokenizer(docs, str(root / "tok"), 280, sample_docs=75).path)
    return cfg


def _files(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _both(cfg, tmp_path, beam_args=()) -> tuple[dict, dict]:
    """The files of the local prepare and of the Beam prepare of `cfg` (7 records a shard)."""
    local, beam = tmp_path / "local", tmp_path / "beam"
    prepare.prepare(cfg, str(local), workers=1, records_per_shard=7, say=lambda line: None)
    prepare.prepare(cfg, str(beam), records_per_shard=7, say=lambda line: None,
                    write=prepare_beam.writer("DirectRunner", list(beam_args)))
    return _files(local), _files(beam)


@pytest.mark.parametrize("packing, val_path, beam_args", [
    (False, False, ()), (True, False, ()), (True, True, ()), (True, False, PARALLEL)])
def test_beam_writes_the_local_prepares_files(corpus, tmp_path, packing, val_path, beam_args):
    cfg = corpus.copy_and_resolve_references()
    cfg.data.packing = packing
    if val_path:  # the last file validates
        cfg.data.update(path=cfg.data.path.replace("*", "[01]*"), val_path=cfg.data.path.replace("*", "2*"))
    local, beam = _both(cfg, tmp_path, beam_args)
    manifest = json.loads(local["manifest.json"])
    shards = {split: len(s["shards"]) for split, s in manifest["splits"].items()}
    assert shards["train"] > 3 and shards["val"] > 1 and len(manifest["sources"]) == 3, manifest
    assert sorted(beam) == sorted(local)
    assert [name for name in local if beam[name] != local[name]] == []


CONFIG = '''
from colax import config


def get_config():
    return config.defaults()
'''


def test_command_line_with_a_runner(corpus, tmp_path):
    """`prepare --runner=DirectRunner -- BEAM_OPTIONS` writes the local prepare's files; Beam's options
    without --runner are a usage error."""
    (tmp_path / "config.py").write_text(CONFIG)
    overrides = [f"--config.data.{key}={corpus.data[key]}" for key in ("source", "path", "val_docs", "seq_len", "tokenizer")]
    command = [sys.executable, "-m", "colax.data", "prepare", "--config", str(tmp_path / "config.py"), *overrides,
               "--config.data.packing=True", "--records_per_shard=7", "--out", str(tmp_path / "beam")]
    run = lambda *args: subprocess.run(command + list(args), capture_output=True, text=True, cwd=ROOT,
                                       env=dict(os.environ, PYTHONPATH=ROOT))
    done = run("--runner=DirectRunner", "--", "--direct_num_workers=1")
    assert done.returncode == 0, done.stderr
    assert "prepare: DirectRunner: 75 documents (" in done.stdout and f"wrote {tmp_path / 'beam'}: packed" in done.stdout
    cfg = corpus.copy_and_resolve_references()
    cfg.data.packing = True
    prepare.prepare(cfg, str(tmp_path / "local"), workers=1, records_per_shard=7, say=lambda line: None)
    assert _files(tmp_path / "beam") == _files(tmp_path / "local")
    wrong = run("--overwrite", "--", "--direct_num_workers=1")
    assert wrong.returncode != 0 and "usage: python -m colax.data prepare" in wrong.stderr, wrong.stderr


def test_one_line_without_apache_beam_or_for_a_streamed_source(corpus, monkeypatch):
    write = prepare_beam.writer("DirectRunner", [])
    cfg = corpus.copy_and_resolve_references()
    cfg.data.source = "hf"
    with pytest.raises(ConfigError, match=r"^data.source: --runner prepares stdlib, text or jsonl, not 'hf'$"):
        write(cfg.data, None, None, "unused", 1, 7, print)
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "colax.prepare_beam")
    with pytest.raises(ConfigError, match=r"^--runner needs apache-beam: pip install 'colax\[beam\]'$"):
        importlib.import_module("colax.prepare_beam")
