"""Prepared shards: a corpus tokenised once into the row store's array_record shards (`colax.rows`).

`prepare` (its command line: `python -m colax.data prepare`, `colax.prepare_cli`)
reads the config's source (`config.data`: stdlib, text, jsonl, tfds, hf; local files one at a time,
line by line), tokenises in `--workers` processes (or, with --runner, in an Apache Beam pipeline:
`colax.prepare_beam`, the same files) and writes DIR in the format of `colax.rows`, the
records of both splits in `data.packing`'s row mode. Train with `--config.data.source=prepared
--config.data.path=DIR` (the same seq_len, packing and tokenizer; see docs/data.md).

Local sources are read twice: a first pass checks every file (unreadable, not UTF-8, a jsonl line
without the text field, no document), counts the documents and keeps the `val_docs` smallest content
hashes (`sources.smallest_digests`, memory: val_docs entries), so that a bad input stops the command
in one line before anything is written; the second pass tokenises. Without `data.tokenizer` the
tokenizer is trained as training would train it (`tokenizer.find_or_train`) and stored in DIR.

Memory stays flat: a bounded number of chunks of documents in flight (`_ordered_map`), one row per
split being packed, one shard open per split. DIR is locked first (`colax.workdir.lock`, DIR/lock):
a second prepare into it is refused in one line naming the first, and changes nothing. The manifest
is written last, atomically, with each shard's size and sha256; a folder without it is not prepared
data, and running again over it starts over (the files of an earlier prepare are deleted first). A
folder with a manifest is replaced only with --overwrite.

`python -m colax.data verify DIR` reads all of DIR's records and checks each shard's sha256
(`rows.verify`).
"""

import collections
import heapq
import itertools
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator

from array_record.python import array_record_module
import numpy as np

from colax import data_config, host, progress, rows, sources, tokenizer
from colax import workdir as workdir_lib
from colax.errors import ConfigError, DataError

CHUNK_BYTES = 1 << 20  # documents are sent to the workers in chunks of about this much text
IN_FLIGHT = 4  # chunks in flight per worker
DATA_KEYS = ("source", "path", "val_path", "val_docs", "doc_split", "text_field", "on_bad_utf8", "tfds_name",
             "tfds_data_dir", "train_split", "val_split", "hf_name", "hf_config", "seq_len", "packing", "tokenizer")


class Plan:
    """What the second pass reads: `docs()` yields (split, document) in corpus order; `total` the
    number of documents (None: unknown, hf), `sample(k)` the tokenizer's training documents (None:
    `sources.train_documents`'s random access), and
    `files` the local files read ([{path, bytes}])."""

    def __init__(self, docs, total, sample, files):
        self.docs, self.total, self.sample, self.files = docs, total, sample, files


def _scan(cfg, paths: list[str], k: int, say) -> tuple[list[str], int, list]:
    """The first pass over local files: (the files to read, skipping non-UTF-8 ones when
    `on_bad_utf8` is "skip", their number of documents, the k smallest (digest, index))."""
    good, bad, count, smallest = [], [], 0, []
    checking = progress.Progress("prepare: checking the files", say, total=len(paths))
    for path in paths:
        try:
            local, n = sources.smallest_digests(sources.file_documents(cfg, path), k, count)
        except sources.NotUtf8 as e:
            if cfg.on_bad_utf8 == "fail":
                raise DataError(str(e)) from None
            bad.append(path)
            checking.add(files=1)
            continue
        good.append(path)
        count, smallest = count + n, heapq.nsmallest(k, smallest + local)
        checking.add(files=1, documents=n)
    sources.warn_skipped(bad, len(paths))
    if not count:
        raise sources.no_documents(cfg, paths)
    return good, count, smallest


def _local_docs(cfg, paths: list[str], split_of) -> Iterator[tuple[str, str]]:
    """(split_of(index), document) for the documents of `paths`, in order."""
    docs = itertools.chain.from_iterable(sources.file_documents(cfg, path) for path in paths)
    return ((split_of(i), doc) for i, doc in enumerate(docs))


def _train_sample(docs, count: int, k: int) -> Iterator[str]:
    """The tokenizer's training documents of (split, document) pairs: `sources.train_documents`' choice."""
    return itertools.islice((doc for split, doc in docs if split == "train"), 0, None, sources.sample_step(count, k))


def plan(cfg, say=print) -> Plan:
    """Checks the inputs of `cfg` (config.data) and returns what the second pass reads (`Plan`)."""
    if cfg.source in ("tfds", "hf"):
        return _streamed_plan(cfg)
    train_paths = sources.source_paths(cfg, "train")
    if cfg.val_path:
        train_paths, n_train, _ = _scan(cfg, train_paths, 0, say)
        val_paths, n_val, _ = _scan(cfg, sources.source_paths(cfg, "val"), 0, say)
        docs = lambda: itertools.chain(_local_docs(cfg, train_paths, lambda i: "train"),
                                       _local_docs(cfg, val_paths, lambda i: "val"))
        paths = train_paths + val_paths
    else:
        paths, n_docs, smallest = _scan(cfg, train_paths, cfg.val_docs, say)
        sources.check_held_out(cfg.val_docs, n_docs)
        held = {i for _, i in smallest}
        n_train, n_val = n_docs - len(held), len(held)
        docs = lambda: _local_docs(cfg, paths, lambda i: "val" if i in held else "train")
    files = [{"path": path, "bytes": os.path.getsize(path)} for path in paths]
    sample = lambda k: _train_sample(docs(), n_train, k)
    return Plan(docs, n_train + n_val, sample, files)


def _streamed_plan(cfg) -> Plan:
    """tfds (random access, counted) or hf (streamed) splits, train then val."""
    if cfg.source == "tfds":
        splits = {split: sources.document_dataset(cfg, split) for split in ("train", "val")}
        total = sum(map(len, splits.values()))
    else:
        field = cfg.text_field
        splits = {split: (ex[field] for ex in sources.hf_documents(cfg, split, 0, 1, shuffle=False))
                  for split in ("train", "val")}
        total = None
    docs = lambda: ((split, doc) for split in ("train", "val") for doc in splits[split])
    return Plan(docs, total, lambda k: None, [])  # find_or_train samples them (sources.train_documents)


_WORKER_TOKENIZER = None


def _load_tokenizer(path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer.load_tokenizer(path)


_QUIET_TRACKER = "ignore::UserWarning:multiprocessing.resource_tracker"


def _init_worker(path: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops, the pool ends with it
    host.die_with_parent()  # kill -9 of prepare: the workers end with it, without BrokenPipe tracebacks
    _load_tokenizer(path)


def _encode(item) -> tuple[list[str], list[np.ndarray]]:
    """(splits, the ids of each document: int32, the first `limit` in paper mode) of an item
    ((splits, documents), limit), by the process's tokenizer (`_load_tokenizer`)."""
    (splits, docs), limit = item
    return splits, [np.asarray(_WORKER_TOKENIZER.encode(doc)[:limit], np.int32) for doc in docs]


def _chunks(pairs: Iterator[tuple[str, str]]) -> Iterator[tuple[list[str], list[str]]]:
    """(splits, documents) of about CHUNK_BYTES of text each, in order."""
    splits, docs, size = [], [], 0
    for split, doc in pairs:
        splits.append(split)
        docs.append(doc)
        size += len(doc)
        if size >= CHUNK_BYTES:
            yield splits, docs
            splits, docs, size = [], [], 0
    if docs:
        yield splits, docs


def _ordered_map(fn, items, workers: int, initargs) -> Iterator:
    """fn(item) for each item, in order, after `_load_tokenizer(*initargs)`; with `workers` > 1
    computed in that many processes (spawned), at most IN_FLIGHT x workers items at a time."""
    if workers <= 1:
        _load_tokenizer(*initargs)
        yield from map(fn, items)
        return
    # kill -9 of prepare leaves the pool's semaphores to multiprocessing's resource tracker (a process
    # started with this one's -W options), which unlinks them: without its "leaked semaphore" warning
    if _QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(_QUIET_TRACKER)
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, initargs) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= IN_FLIGHT * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _SplitWriter:
    """Writes one split's records into shards of `per_shard` records (opened on the first record)."""

    def __init__(self, out: str, split: str, per_shard: int):
        self.out, self.split, self.per_shard = out, split, per_shard
        self.writer, self.shards, self.documents, self.records, self.tokens = None, [], 0, 0, 0

    def write(self, record: np.ndarray) -> None:
        if self.records % self.per_shard == 0:
            self._close_shard()
            self.writer = array_record_module.ArrayRecordWriter(
                os.path.join(self.out, rows.shard_name(self.split, len(self.shards))), rows.WRITER_OPTIONS)
        self.writer.write(rows.encode(record))
        self.records, self.tokens = self.records + 1, self.tokens + len(record)

    def _close_shard(self) -> None:
        """Closes the open shard and adds its manifest entry (`rows.shard_entry`: its size and sha256)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            done = len(self.shards) * self.per_shard
            self.shards.append(rows.shard_entry(self.out, rows.shard_name(self.split, len(self.shards)),
                                                self.records - done))

    def close(self) -> dict:
        """The split's entry of the manifest."""
        self._close_shard()
        return dict(documents=self.documents, rows=self.records, tokens=self.tokens, shards=self.shards)


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(os.path.join(out, rows.MANIFEST)) and not overwrite:
        raise DataError(f"--out {out} holds prepared data (manifest.json): pass --overwrite to replace it")


def _clear(out: str) -> None:
    """Deletes what a prepare writes into `out` (the manifest first)."""
    for name in [rows.MANIFEST, rows.TOKENIZER] + sorted(os.listdir(out)):
        if name in (rows.MANIFEST, rows.TOKENIZER) or (name.endswith(".array_record") and
                                                       name.startswith(("train-", "val-"))):
            try:
                os.unlink(os.path.join(out, name))
            except FileNotFoundError:
                pass


def prepare(cfg, out: str, workers: int = 0, records_per_shard: int = rows.RECORDS_PER_SHARD,
            overwrite: bool = False, say=print, write=None) -> dict:
    """Writes the prepared data of `cfg` (a colax config: `data`, and `model.vocab_size` for a
    trained tokenizer) into the folder `out`; returns the manifest. `workers` tokenising processes
    (0: os.cpu_count()); `write`: the second pass, `_write`'s signature (None: `_write`;
    `prepare_beam.writer`: a Beam pipeline). `out` is locked first (`colax.workdir.lock`: a live
    prepare into it is named and left alone); ConfigError / DataError (one line) before anything is
    written on a bad config, a bad input, or a finished `out` without `overwrite`."""
    c = cfg.data
    data_config.validate(c)
    if c.source == "prepared":
        raise ConfigError("data.source must be the corpus to prepare, got 'prepared'")
    if records_per_shard < 1:
        raise ConfigError(f"--records_per_shard must be >= 1, got {records_per_shard}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out} is a file, not a folder")
    with workdir_lib.lock(out, command="prepare", flag="--out"):
        _check_out(out, overwrite)
        p = plan(c, say)
        tok, proto = tokenizer.find_or_train(c, out, cfg.model.vocab_size, reuse=False,
                                             sample=p.sample(c.tokenizer_sample_docs))
        _clear(out)
        try:
            workdir_lib.atomic_write(os.path.join(out, rows.TOKENIZER), proto or tok.sp.serialized_model_proto())
            return (write or _write)(c, p, tok, out, workers, records_per_shard, say)
        except (ConfigError, DataError):  # e.g. an empty split of a streamed source: nothing is left
            _clear(out)
            raise


def _write(c, p: Plan, tok, out, workers, records_per_shard, say) -> dict:
    """The second pass of `prepare` (the shards, the manifest last); returns the manifest."""
    writers = {split: _SplitWriter(out, split, records_per_shard) for split in ("train", "val")}
    packers = {split: rows.Packer(c.seq_len + 1) for split in writers} if c.packing else None
    counter = progress.Progress("prepare", say, p.total)
    items = ((docs, None if c.packing else c.seq_len) for docs in _chunks(p.docs()))
    encoded = _ordered_map(_encode, items, workers or os.cpu_count() or 1, (os.path.join(out, rows.TOKENIZER),))
    for splits, ids in encoded:
        for split, doc_ids in zip(splits, ids):
            record = (rows.document_tokens(doc_ids, tok.eos_id) if c.packing
                      else rows.paper_record(doc_ids, c.seq_len, tok.eos_id))
            writers[split].documents += 1
            for r in packers[split].add(record) if packers else [record]:
                writers[split].write(r)
        counter.add(documents=len(ids), tokens=sum(len(i) + 1 for i in ids))
    if packers:  # validation keeps the stream's last, shorter row; training drops it
        for r in packers["val"].tail():
            writers["val"].write(r)
    splits = {split: w.close() for split, w in writers.items()}
    counter.done()
    return write_manifest(c, tok, records_per_shard, p.files, splits, out)


def write_manifest(c, tok, records_per_shard: int, files: list, splits: dict, out: str) -> dict:
    """Writes and returns the manifest of `out` (`colax.rows`) once the shards are written: `files` the
    local files read, `splits` {train, val: {documents, rows, tokens, shards}}; DataError for an empty split."""
    for split, entry in splits.items():
        if not entry["rows"]:
            raise DataError(f"prepare: the {split} split has no documents")
    manifest = dict(format=rows.FORMAT, version=rows.FORMAT_VERSION, rows="packed" if c.packing else "paper",
                    seq_len=c.seq_len, record_tokens=c.seq_len + 1, records_per_shard=records_per_shard,
                    tokenizer=dict(file=rows.TOKENIZER, sha256=tok.sha256, vocab_size=tok.vocab_size,
                                   eos_id=tok.eos_id, pad_id=tok.pad_id),
                    data={k: c[k] for k in DATA_KEYS}, sources=files, splits=splits)
    workdir_lib.atomic_write(os.path.join(out, rows.MANIFEST), rows.manifest_bytes(manifest))
    return manifest
