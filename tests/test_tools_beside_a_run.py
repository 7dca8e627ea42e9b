"""Tools beside a run (issue 33, items 1-4): every command that writes into a workdir or a data folder
takes its lock, checks everything, then writes; a refused command changes no byte. Prepared data
records each shard's size and sha256: opening checks sizes and record lengths, `colax.data verify`
the checksums, and damage is one line naming the shard (docs/training.md, "Bad inputs: tools beside
a run").
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

from array_record.python import array_record_module
import pytest

from colax import convert, data, loop, prepare, rows, tokenizer
from colax.errors import ConfigError, DataError
from test_convert import MICRO, micro, random_params  # noqa: F401
from test_faults import one_line
from test_prepare import ROOT, corpus  # noqa: F401

ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")

HOLD_LOCK = '''
import sys, time
from colax import workdir
with workdir.lock(sys.argv[1]):  # as train.py holds its workdir
    print("locked", flush=True)
    time.sleep(120)
'''

# A prepare that waits, until it is killed, once a split has 2 records in its first shard (closed: on disk).
SLOW_PREPARE = '''
import sys, time
from colax import config, prepare
real = prepare._SplitWriter.write
def write(self, record):
    real(self, record)
    if self.records == 2:
        self.writer.close()
        self.writer = None
        print("writing", flush=True)
        time.sleep(120)
prepare._SplitWriter.write = write
cfg = config.defaults()
cfg.data.update(source="text", path=sys.argv[2], tokenizer=sys.argv[3], seq_len=32, val_docs=7)
prepare.prepare(cfg, sys.argv[1], workers=1, records_per_shard=1000)
'''


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def holding(script, *args):
    """A process running `script` with `args`, once it printed its first line (it holds its lock then)."""
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env=ENV)
    proc.stdout.readline()
    return proc


@pytest.fixture
def imported(micro, tmp_path):  # noqa: F811
    """(source, workdir): an export of the micro model, and a workdir it was imported into (checkpoint 0)."""
    convert.export(micro, random_params(micro.model, seed=5), tmp_path / "exported")
    convert.import_run(str(tmp_path / "exported"), str(tmp_path / "run"), micro)
    return tmp_path / "exported", tmp_path / "run"


def test_convert_import_over_a_live_run_is_refused_and_changes_nothing(micro, imported):  # noqa: F811
    # Item 1: --overwrite on a workdir whose run holds the lock deleted its config and checkpoints.
    source, workdir = imported
    holder = holding(HOLD_LOCK, workdir)
    before = snapshot(workdir)
    try:
        with pytest.raises(ConfigError) as e:
            convert.import_run(str(source), str(workdir), micro, overwrite=True)
        assert one_line(e).startswith(f"workdir {workdir} is in use by another run (pid {holder.pid} on ")
        assert one_line(e).endswith("; stop it or use another --workdir")
        done = subprocess.run([sys.executable, "-m", "colax.convert", "import", str(source), f"--workdir={workdir}",
                               "--overwrite"], capture_output=True, text=True, env=ENV, cwd=ROOT)
        assert done.returncode == 2 and done.stderr.startswith(f"error: workdir {workdir} is in use by another run")
        assert done.stderr.count("\n") == 1, done.stderr
        assert snapshot(workdir) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_refused_convert_import_leaves_config_json_as_it_was(micro, imported):  # noqa: F811
    # Item 2: the refusal ("already holds checkpoints") came after config.json was rewritten.
    source, workdir = imported
    before = snapshot(workdir)
    changed = micro.copy_and_resolve_references()
    changed.optim.lr = 0.5  # a recovery setting: check_workdir lets it through
    with pytest.raises(ConfigError, match=r"already holds checkpoints; pass --overwrite to replace them"):
        convert.import_run(str(source), str(workdir), changed)
    assert snapshot(workdir) == before
    convert.import_run(str(source), str(workdir), changed, overwrite=True)  # --overwrite replaces the run
    assert '"lr": 0.5' in (workdir / "config.json").read_text()


def test_a_second_prepare_into_a_live_prepares_out_is_refused_and_changes_nothing(corpus, tmp_path):  # noqa: F811
    # Item 3: the second prepare's clean-up deleted the first one's shards while it wrote them.
    cfg, tok = corpus
    out = tmp_path / "out"
    first = holding(SLOW_PREPARE, out, cfg.data.path, tok.path)
    try:
        before = snapshot(out)
        assert "train-00000.array_record" in before
        for overwrite in (False, True):
            with pytest.raises(ConfigError) as e:
                prepare.prepare(cfg, str(out), workers=1, overwrite=overwrite)
            assert one_line(e).startswith(f"--out {out} is in use by another prepare (pid {first.pid} on ")
            assert one_line(e).endswith("; stop it or use another --out")
            assert snapshot(out) == before
    finally:
        first.kill()
        first.wait()
    manifest = prepare.prepare(cfg, str(out), workers=1)  # the dead prepare's lock is taken over
    assert manifest["splits"]["train"]["documents"] == 53 and "lock" not in os.listdir(out)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):  # noqa: F811
    """(config, folder): packed rows of the corpus in shards of 7 records, and a micro model config for them."""
    cfg, tok = corpus
    cfg = cfg.copy_and_resolve_references()
    cfg.data.packing = True
    out = tmp_path_factory.mktemp("prepared") / "good"
    prepare.prepare(cfg, str(out), workers=1, records_per_shard=7)
    cfg.model.update(MICRO, vocab_size=tok.vocab_size)
    cfg.optim.update(warmup_steps=0)
    cfg.train.update(steps=1, batch_size=8, micro_batch_size=8, eval_every=0, eval_batches=1, baseline_batches=0,
                     sample_tokens=0)
    cfg.data.update(source="prepared", path=str(out))
    return cfg, out


def _damaged(prepared, tmp_path, damage):  # noqa: F811
    """(config, folder): a copy of the prepared folder with `damage(folder, manifest)` done to it."""
    cfg, good = prepared
    folder = tmp_path / "damaged"
    shutil.copytree(good, folder)
    manifest = json.loads((folder / rows.MANIFEST).read_text())
    damage(folder, manifest)
    (folder / rows.MANIFEST).write_bytes(rows.manifest_bytes(manifest))
    cfg = cfg.copy_and_resolve_references()
    cfg.data.path = str(folder)
    return cfg, folder


def flip_record(folder, manifest, shard=1, record=3):
    """Flips a byte in the middle of a record's tokens (stored verbatim: uncompressed)."""
    path = folder / manifest["splits"]["train"]["shards"][shard]["file"]
    reader = array_record_module.ArrayRecordReader(str(path))
    raw = reader.read([record])[0]
    reader.close()
    content = bytearray(path.read_bytes())
    at = content.index(raw) + len(raw) // 2
    content[at] ^= 0xFF
    path.write_bytes(bytes(content))


def flip_padding(folder, manifest):
    """Flips a byte of a shard's padding (after its records, before its footer): only its sha256 shows it."""
    path = folder / manifest["splits"]["train"]["shards"][1]["file"]
    content = bytearray(path.read_bytes())
    content[content.find(bytes(256)) + 100] ^= 0xFF
    path.write_bytes(bytes(content))


def truncate(folder, manifest):
    path = folder / manifest["splits"]["train"]["shards"][2]["file"]
    path.write_bytes(path.read_bytes()[:-100])


def delete(folder, manifest):
    (folder / manifest["splits"]["val"]["shards"][0]["file"]).unlink()


def edit_seq_len(folder, manifest):
    manifest["seq_len"] = manifest["data"]["seq_len"] = 64


def edit_seq_len_and_record_tokens(folder, manifest):
    edit_seq_len(folder, manifest)
    manifest["record_tokens"] = 65


def test_the_manifest_records_each_shards_size_and_sha256_and_verify_checks_them(prepared, tmp_path):
    cfg, good = prepared
    manifest = rows.read_manifest(str(good))
    assert manifest["record_tokens"] == 33 and len(manifest["splits"]["train"]["shards"]) > 3
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            data = (good / shard["file"]).read_bytes()
            assert (shard["bytes"], shard["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    summary = rows.verify(str(good))
    assert summary == dict(shards=sum(len(manifest["splits"][s]["shards"]) for s in ("train", "val")),
                           records=sum(manifest["splits"][s]["rows"] for s in ("train", "val")),
                           tokens=sum(manifest["splits"][s]["tokens"] for s in ("train", "val")), checksums=True)
    done = subprocess.run([sys.executable, "-m", "colax.data", "verify", str(good)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.startswith(f"verified {good}: {summary['shards']} shards, ")
    assert done.stdout.strip().endswith("sizes, sha256 checksums and records match the manifest")
    # A manifest of an earlier colax (no sizes, checksums, record_tokens): verify says what it could not check.
    cfg, old = _damaged(prepared, tmp_path, lambda folder, m: [
        s.pop(key) for split in m["splits"].values() for s in split["shards"] for key in ("bytes", "sha256")]
        and m.pop("record_tokens"))
    assert rows.verify(str(old)) == dict(summary, checksums=False)
    done = subprocess.run([sys.executable, "-m", "colax.data", "verify", str(old)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT)
    assert done.returncode == 0 and "the sha256 checksums were not checked: this manifest, of an earlier colax, " \
        "has none (prepare again to record them)" in done.stdout


@pytest.mark.parametrize("damage, found_by, message", [
    (flip_record, "read", r"train-00001.array_record: record 3 cannot be read \(RuntimeError: .*hash mismatch"),
    (flip_padding, "verify", r"train-00001.array_record: sha256 [0-9a-f]{64}, the manifest says [0-9a-f]{64} "
     r"\(damaged: prepare again\)"),
    (truncate, "open", r"train-00002.array_record: [\d,]+ bytes, the manifest says [\d,]+ \(truncated or changed\)"),
    (delete, "open", r"val-00000.array_record: a shard of the manifest cannot be read \(No such file or directory\)"),
    (edit_seq_len, "open", r"manifest.json: record_tokens 33 disagrees with seq_len 64"),
    (edit_seq_len_and_record_tokens, "open",
     r"train-00000.array_record: record 0 holds 33 tokens, packed rows of seq_len 64 hold 65 \(the manifest "
     "disagrees with the records: prepare again\\)")])
def test_damaged_prepared_data_is_one_line_naming_the_shard_before_train_writes(prepared, tmp_path, damage, found_by,
                                                                                message):
    # Item 4: flipped bytes, a truncated or deleted shard: 37-49-line tracebacks; a manifest whose
    # seq_len disagrees with its records trained on short rows, padded.
    cfg, folder = _damaged(prepared, tmp_path, damage)
    cfg.data.seq_len = rows.read_manifest(str(folder))["seq_len"]
    with pytest.raises(DataError, match=message) as e:
        rows.verify(str(folder))
    one_line(e)
    done = subprocess.run([sys.executable, "-m", "colax.data", "verify", str(folder)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and re.search(message, done.stderr), done.stderr
    workdir = tmp_path / "run"
    if found_by == "open":  # the cheap checks when the data opens: before the workdir is written
        with pytest.raises(DataError, match=message) as e:
            loop.run(cfg, str(workdir))
        one_line(e)
        assert not workdir.exists()
    else:  # "read": one line naming the record when it is read; "verify": harmless to training
        tok = tokenizer.load_tokenizer(str(folder / rows.TOKENIZER))
        batches = data.make_pipeline(cfg.data, tok, split="train", global_batch_size=4, num_epochs=1)
        if found_by == "verify":
            assert len(list(batches)) == rows.read_manifest(str(folder))["splits"]["train"]["rows"] // 4
            return
        with pytest.raises(DataError, match=message) as e:
            list(batches)
        assert one_line(e).endswith(f"python -m colax.data verify {folder} checks all of them")


def test_an_unwritable_out_is_one_line(corpus, tmp_path):  # noqa: F811
    # Item 4: a read-only --out was a 22-line OSError.
    cfg, _ = corpus
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as e:
        prepare.prepare(cfg, str(tmp_path / "file" / "out"), workers=1)
    assert one_line(e).startswith(f"--out {tmp_path / 'file' / 'out'} cannot be written (")
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(ConfigError, match=r"--out .*/ro cannot be written \(Permission denied\)"):
            prepare.prepare(cfg, str(tmp_path / "ro"), workers=1)
