"""The `config.data` section and the grain input pipeline.

A batch is one host's share of the global batch: a dict of numpy arrays, all
of shape [batch, seq_len]:

  inputs      int32    token ids
  targets     int32    inputs shifted left by one (next-token labels)
  loss_mask   float32  1.0 where the target counts in the loss
  segment_ids int32    document index within the row, from 1; 0 = padding
  positions   int32    position within the document (packing) or 0..T-1

Paper mode (`packing=False`, as in CoLA/GaLore): one document per row; its
first seq_len tokens plus EOS, padded to seq_len + 1. Packing mode: documents
joined with EOS and cut into rows of seq_len + 1 tokens by grain's
ConcatThenSplitIterDataset; predictions across a document boundary are masked.
Packed training rows then go through a window shuffle of `row_shuffle_window`
rows, so that a batch mixes rows of many documents.
"""

import functools
import itertools
from collections.abc import Iterator

from absl import flags
import grain
import jax
import ml_collections
import numpy as np

from colax import sources
from colax.errors import ConfigError

SOURCES = ("stdlib", "text", "jsonl", "tfds", "hf")


def defaults() -> ml_collections.ConfigDict:
    """The `config.data` section; every key is described in docs/data.md."""
    return ml_collections.ConfigDict(dict(
        source="stdlib",  # stdlib (embedded corpus) | text | jsonl | tfds | hf
        path="",  # text/jsonl: file or glob, comma-separated list; .gz ok
        doc_split="blank_line",  # text: blank_line | line
        text_field="text",  # jsonl / tfds / hf record field holding the text
        on_bad_utf8="skip",  # skip (count logged) | fail
        tfds_name="c4/en:3.1.0",
        tfds_data_dir="",  # empty: TFDS default (~/tensorflow_datasets)
        train_split="train",  # tfds / hf split names
        val_split="validation",
        hf_name="allenai/c4",
        hf_config="en",
        hf_shuffle_buffer=10_000,
        val_docs=64,  # local sources: documents held out by content hash
        seq_len=256,
        packing=False,  # False: the paper's truncate/pad, one doc per row
        row_shuffle_window=4096,  # packing, train: rows shuffled in windows of this many; 0 = consecutive
        seed=0,
        shuffle=True,
        worker_count=0,  # grain worker processes; 0 = threads in-process
        read_threads=4,
        prefetch=8,  # batches buffered ahead per host
        tokenizer="",  # .model path or http(s) URL (fetched into the workdir); empty: train once, cache in workdir
        tokenizer_vocab_size=0,  # a trained tokenizer's pieces; 0: model.vocab_size
        tokenizer_model_type="bpe",  # bpe | unigram
        tokenizer_sample_docs=1000,
    ))


def _check(ok: bool, field: str, want: str, got) -> None:
    if not ok:
        raise ConfigError(f"data.{field} must be {want}, got {got!r}")


def validate(cfg_data, global_batch_size: int | None = None,
             process_count: int = 1) -> None:
    """Raises ConfigError naming the first bad field of `cfg_data`."""
    c = cfg_data
    _check(c.source in SOURCES, "source", f"one of {SOURCES}", c.source)
    _check(c.source not in ("text", "jsonl") or bool(c.path.strip()), "path",
           f"a file or glob for source {c.source!r}", c.path)
    _check(c.doc_split in ("blank_line", "line"), "doc_split",
           "'blank_line' or 'line'", c.doc_split)
    _check(c.on_bad_utf8 in ("skip", "fail"), "on_bad_utf8", "'skip' or 'fail'",
           c.on_bad_utf8)
    _check(c.seq_len >= 2, "seq_len", ">= 2", c.seq_len)
    _check(c.row_shuffle_window >= 0, "row_shuffle_window", ">= 0 (0: no row shuffle)",
           c.row_shuffle_window)
    _check(c.val_docs >= 1, "val_docs", ">= 1", c.val_docs)
    _check(0 <= c.seed < 2**32, "seed", "in [0, 2**32)", c.seed)
    _check(c.worker_count >= 0, "worker_count", ">= 0", c.worker_count)
    _check(c.read_threads >= 1, "read_threads", ">= 1", c.read_threads)
    _check(c.prefetch >= 1, "prefetch", ">= 1", c.prefetch)
    _check(c.tokenizer_model_type in ("unigram", "bpe"), "tokenizer_model_type",
           "'unigram' or 'bpe'", c.tokenizer_model_type)
    _check(c.tokenizer_vocab_size == 0 or c.tokenizer_vocab_size >= 300, "tokenizer_vocab_size",
           "0 (model.vocab_size) or >= 300", c.tokenizer_vocab_size)
    if global_batch_size is not None and global_batch_size % process_count:
        raise ConfigError(f"global batch size {global_batch_size} must be "
                          f"divisible by the process count {process_count}")


def train_documents(cfg_data, max_docs: int) -> Iterator[str]:
    """Up to `max_docs` training documents, spread evenly over the train split.

    Used to train the tokenizer; the order is fixed (no dependence on the seed).
    """
    if cfg_data.source == "hf":
        docs = sources.hf_documents(cfg_data, "train", 0, 1, shuffle=False)
        return itertools.islice((ex[cfg_data.text_field] for ex in docs), max_docs)
    docs = sources.document_dataset(cfg_data, "train")
    return iter(docs[::max(1, -(-len(docs) // max_docs))])


def paper_example(doc: str, tokenizer, seq_len: int) -> dict:
    """One row of the paper's mode: the first seq_len tokens + EOS, padded.

    Returns arrays of shape [seq_len] (see the module docstring).
    """
    ids = tokenizer.encode(doc)[:seq_len] + [tokenizer.eos_id]
    n = len(ids)
    row = np.full(seq_len + 1, max(tokenizer.pad_id, 0), np.int32)
    row[:n] = ids
    t = np.arange(seq_len)
    return dict(inputs=row[:-1], targets=row[1:],
                loss_mask=(t + 1 < n).astype(np.float32),
                segment_ids=(t < n).astype(np.int32),
                positions=t.astype(np.int32))


def empty_example(seq_len: int) -> dict:
    """An all-zero row (loss_mask 0, segment_ids 0) that pads the last val batch."""
    zeros = np.zeros(seq_len, np.int32)
    return dict(inputs=zeros, targets=zeros, loss_mask=zeros.astype(np.float32),
                segment_ids=zeros, positions=zeros)


def _tokens(doc: str, tokenizer) -> dict:
    """`{"tokens": int32[len + 1]}`: a document's ids followed by EOS."""
    return {"tokens": np.asarray(tokenizer.encode(doc) + [tokenizer.eos_id],
                                 np.int32)}


def packed_example(row: dict) -> dict:
    """Shifts a packed row of seq_len + 1 tokens into [seq_len] arrays.

    The target of position t counts iff tokens t and t+1 belong to the same
    document: predicting the next document's first token from EOS is masked.
    """
    tok, seg = row["tokens"], row["tokens_segment_ids"]
    same_doc = (seg[1:] == seg[:-1]) & (seg[:-1] > 0)
    return dict(inputs=tok[:-1], targets=tok[1:],
                loss_mask=same_doc.astype(np.float32), segment_ids=seg[:-1],
                positions=row["tokens_positions"][:-1])


def _paper_dataset(docs, cfg, tokenizer, train, batch, p, n_proc):
    """Rows of global batch k, host p: docs [k*B + p*b, k*B + (p+1)*b)."""
    global_batch = batch * n_proc
    rows = docs.map(functools.partial(paper_example, tokenizer=tokenizer,
                                      seq_len=cfg.seq_len))
    if not train:  # pad the one pass to whole global batches with empty rows
        pad = [empty_example(cfg.seq_len)] * (-len(rows) % global_batch)
        rows = grain.MapDataset.concatenate([rows, grain.MapDataset.source(pad)])
    rows = rows[:len(rows) // global_batch * global_batch]
    return rows.batch(batch, drop_remainder=True)[p::n_proc].to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads,
                          prefetch_buffer_size=cfg.prefetch))


def _packed_dataset(docs, cfg, tokenizer, train, batch):
    """Rows packed from this host's documents (docs[p::P]) only.

    Shuffled training rows (`cfg.shuffle`, `cfg.row_shuffle_window` > 1) are
    read in windows of that many consecutive packed rows, each window permuted
    with seed `cfg.seed` + its index (grain's WindowShuffleIterDataset: every
    row once, resumable by re-reading the window from its start state).
    """
    docs = docs.map(functools.partial(_tokens, tokenizer=tokenizer))
    if isinstance(docs, grain.MapDataset):
        docs = docs.to_iter_dataset(grain.ReadOptions(
            num_threads=cfg.read_threads, prefetch_buffer_size=batch * cfg.prefetch))
    rows = grain.experimental.ConcatThenSplitIterDataset(
        docs, length_struct={"tokens": cfg.seq_len + 1})
    if train and cfg.shuffle and cfg.row_shuffle_window > 1:
        rows = grain.experimental.WindowShuffleIterDataset(
            rows, window_size=cfg.row_shuffle_window, seed=cfg.seed)
    rows = rows.map(packed_example)
    if train:
        return rows.batch(batch, drop_remainder=True)
    pad = functools.partial(grain.experimental.batch_and_pad, batch_size=batch)
    return rows.batch(batch, batch_fn=pad)


def make_dataset(cfg_data, tokenizer, *, split: str, global_batch_size: int,
                 process_index: int | None = None,
                 process_count: int | None = None,
                 num_epochs: int | None = None) -> grain.IterDataset:
    """The batch dataset of one host (see `make_pipeline`)."""
    p = jax.process_index() if process_index is None else process_index
    n_proc = jax.process_count() if process_count is None else process_count
    validate(cfg_data, global_batch_size, n_proc)
    batch = global_batch_size // n_proc
    train = split == "train"
    if split not in ("train", "val"):
        raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
    shuffle = cfg_data.shuffle and train
    if cfg_data.source == "hf":  # streamed: split by node, buffer-shuffled
        docs = _HFDocuments(cfg_data, split, p, n_proc, shuffle)
        if cfg_data.packing:
            ds = _packed_dataset(docs, cfg_data, tokenizer, train, batch)
        else:
            ds = docs.map(functools.partial(paper_example, tokenizer=tokenizer,
                                            seq_len=cfg_data.seq_len))
            ds = ds.batch(batch, drop_remainder=True)
        return _with_workers(ds, cfg_data)
    docs = sources.document_dataset(cfg_data, split)
    if shuffle:
        docs = docs.shuffle(seed=cfg_data.seed)
    docs = docs.repeat(num_epochs if train else 1)
    if cfg_data.packing:
        ds = _packed_dataset(docs[p::n_proc], cfg_data, tokenizer, train, batch)
    else:
        ds = _paper_dataset(docs, cfg_data, tokenizer, train, batch, p, n_proc)
    return _with_workers(ds, cfg_data)


def _with_workers(ds: grain.IterDataset, cfg) -> grain.IterDataset:
    if not cfg.worker_count:
        return ds
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=cfg.worker_count, per_worker_buffer_size=cfg.prefetch))


def make_pipeline(cfg_data, tokenizer, *, split: str, global_batch_size: int,
                  process_index: int | None = None,
                  process_count: int | None = None,
                  num_epochs: int | None = None) -> grain.DatasetIterator:
    """An iterator over this host's batches (dicts of [b, seq_len] arrays).

    b = global_batch_size // process_count. "train" repeats `num_epochs` times
    (None: forever), reshuffling each epoch with `cfg_data.seed`; "val" is one
    unshuffled pass whose last batch is padded with all-zero rows (loss_mask 0),
    so every host yields the same number of batches in paper mode.

    The iterator is checkpointable: `it.get_state()` / `it.set_state(state)`,
    or with orbax `grain.checkpoint.CheckpointSave(it)` /
    `grain.checkpoint.CheckpointRestore(it)`.
    """
    return iter(make_dataset(cfg_data, tokenizer, split=split,
                             global_batch_size=global_batch_size,
                             process_index=process_index,
                             process_count=process_count, num_epochs=num_epochs))


class _HFDocuments(grain.IterDataset):
    """Streams this host's documents of a Hugging Face dataset, resumably."""

    def __init__(self, cfg, split, process_index, process_count, shuffle):
        super().__init__()
        self._docs = sources.hf_documents(cfg, split, process_index, process_count,
                                          shuffle)
        self._field = cfg.text_field

    def __iter__(self) -> grain.DatasetIterator:
        return _HFIterator(self._docs, self._field)


class _HFIterator(grain.DatasetIterator):
    """State = the `datasets.IterableDataset.state_dict()` of the stream."""

    def __init__(self, docs, field):
        super().__init__()
        self._docs, self._field, self._it = docs, field, None

    def __next__(self) -> str:
        if self._it is None:
            self._it = iter(self._docs)
        return next(self._it)[self._field]

    def get_state(self) -> dict:
        return self._docs.state_dict()

    def set_state(self, state: dict) -> None:
        self._docs.load_state_dict(state)
        self._it = None

