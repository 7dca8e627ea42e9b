"""The grain input pipeline: one host's batches of a data section (`colax.data_config`).

A batch is one host's share of the global batch: a dict of numpy arrays, all
of shape [batch, seq_len]:

  inputs      int32    token ids
  targets     int32    inputs shifted left by one (next-token labels)
  loss_mask   float32  1.0 where the target counts in the loss
  segment_ids int32    document index within the row, from 1; 0 = padding
  positions   int32    position within the document (packing) or 0..T-1

Paper mode (`packing=False`, as in CoLA/GaLore): one document per row; its
first seq_len tokens plus EOS, padded to seq_len + 1. Packing mode: documents
joined with EOS and cut into rows of seq_len + 1 tokens (`colax.rows`);
predictions across a document boundary are masked.

Rows come from a row store, a random-access grain MapDataset of records
(`colax.rows`): prepared shards (`source="prepared"`, `colax.prepare`), or
built on the fly: paper mode lazily, one record per document; packed rows of a
local source (stdlib, text, jsonl) packed in memory at start. Training reads a
fresh global permutation of the store every epoch. Streamed sources (hf, and
tfds with packing) cannot be permuted globally: their documents are shuffled
(hf: in a buffer), packed by grain's ConcatThenSplitIterDataset (the same rows
as the colax packer for the same document order) and their rows shuffled in
windows of `row_shuffle_window` rows.
"""

from colax import errors

if __name__ == "__main__":  # Ctrl-C while the imports below load: one line, exit 130
    errors.exit_on_signal("interrupted")

import functools  # noqa: E402
import json  # noqa: E402

from absl import flags  # noqa: E402
import grain  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from colax import progress  # noqa: E402
from colax import rows as rows_lib  # noqa: E402
from colax import sources  # noqa: E402
from colax.data_config import SOURCES, defaults, validate  # noqa: E402,F401  (colax.data's names for the section)
from colax.errors import ConfigError  # noqa: E402
from colax.sources import train_documents  # noqa: E402,F401  (colax.data's name for it)

def paper_example(doc: str, tokenizer, seq_len: int) -> dict:
    """One row of the paper's mode: the first seq_len tokens + EOS, padded.

    Returns arrays of shape [seq_len] (see the module docstring).
    """
    record = rows_lib.paper_record(tokenizer.encode(doc), seq_len, tokenizer.eos_id)
    return rows_lib.paper_example(record, seq_len, tokenizer.pad_id)


def empty_example(seq_len: int) -> dict:
    """An all-zero row (loss_mask 0, segment_ids 0) that pads the last val batch."""
    zeros = np.zeros(seq_len, np.int32)
    return dict(inputs=zeros, targets=zeros, loss_mask=zeros.astype(np.float32),
                segment_ids=zeros, positions=zeros)


def _tokens(doc: str, tokenizer) -> dict:
    """`{"tokens": int32[len + 1]}`: a document's ids followed by EOS."""
    return {"tokens": rows_lib.document_tokens(tokenizer.encode(doc), tokenizer.eos_id)}


def packed_example(row: dict) -> dict:
    """Shifts a packed row of seq_len + 1 tokens into [seq_len] arrays.

    `row`: "tokens", "tokens_segment_ids", "tokens_positions", int32 [seq_len + 1] (grain's
    ConcatThenSplit layout, `rows.packed_fields`). The target of position t counts iff tokens t
    and t+1 belong to the same document: predicting the next document's first token from EOS is
    masked.
    """
    tok, seg = row["tokens"], row["tokens_segment_ids"]
    same_doc = (seg[1:] == seg[:-1]) & (seg[:-1] > 0)
    return dict(inputs=tok[:-1], targets=tok[1:],
                loss_mask=same_doc.astype(np.float32), segment_ids=seg[:-1],
                positions=row["tokens_positions"][:-1])


def record_example(record: np.ndarray, cfg, tokenizer) -> dict:
    """The [seq_len] row (module docstring) of a row store's record (`colax.rows`) in `cfg.packing`'s mode."""
    if cfg.packing:
        return packed_example(rows_lib.packed_fields(record, cfg.seq_len + 1, tokenizer.eos_id,
                                                     tokenizer.pad_id))
    return rows_lib.paper_example(record, cfg.seq_len, tokenizer.pad_id)


def _say(process_index: int, message: str) -> None:
    if process_index == 0:
        print(message, flush=True)


def packed_records(docs, tokenizer, seq_len: int, train: bool, say=lambda message: None) -> list:
    """The packed records (int32 [seq_len + 1], `colax.rows.pack`) of `docs` (str, in corpus order),
    tokenised here; training drops a last, shorter record. `say` gets the progress lines
    (`colax.progress`: every 10 s and a last one)."""
    counter = progress.Progress("data: packing", say)

    def tokenised():
        for doc in docs:
            ids = rows_lib.document_tokens(tokenizer.encode(doc), tokenizer.eos_id)
            counter.add(documents=1, tokens=len(ids))
            yield ids

    records = list(rows_lib.pack(tokenised(), seq_len + 1))
    if train and records and len(records[-1]) <= seq_len:
        records.pop()
    counter.done(f"{len(records):,} rows of {seq_len + 1}")
    return records


def check_manifest(manifest: dict, cfg, tokenizer) -> None:
    """Raises ConfigError naming the first field where prepared data (`manifest`) and the config
    (`cfg`: config.data) or its tokenizer disagree."""
    tok, mode = manifest["tokenizer"], "packed" if cfg.packing else "paper"
    for key, field, want, got in (("packing", "rows", manifest["rows"], mode),
                                  ("seq_len", "seq_len", manifest["seq_len"], cfg.seq_len),
                                  ("tokenizer", "tokenizer vocab_size", tok["vocab_size"], tokenizer.vocab_size),
                                  ("tokenizer", "tokenizer sha256", tok["sha256"], tokenizer.sha256)):
        if want != got:
            raise ConfigError(f"data.{key}: the prepared data in {cfg.path} has {field} {want!r}, this run "
                              f"{got!r} (prepare again, or change the config)")


def record_store(cfg, tokenizer, split: str, process_index: int = 0) -> grain.MapDataset:
    """The row store of `split`: a MapDataset of records (`colax.rows`) in corpus order, for the
    sources that have one (all but hf; tfds only in paper mode)."""
    if cfg.source == "prepared":
        manifest = rows_lib.read_manifest(cfg.path)
        check_manifest(manifest, cfg, tokenizer)
        rows_lib.check_shards(cfg.path, manifest)  # sizes and record lengths, before anything is written
        source = rows_lib.ShardSource(cfg.path, manifest, split, disk=cfg.prepared_index == "disk")
        return grain.MapDataset.source(source).map(rows_lib.decode)
    if not cfg.packing:
        docs = sources.document_dataset(cfg, split)
        return docs.map(lambda doc: rows_lib.paper_record(tokenizer.encode(doc), cfg.seq_len, tokenizer.eos_id))
    return grain.MapDataset.source(_packed_split(cfg.to_json(sort_keys=True), tokenizer, split, process_index))


@functools.lru_cache(maxsize=2)
def _packed_split(cfg_json: str, tokenizer, split: str, process_index: int) -> list:
    """`packed_records` of a local source's split, kept for the next pipeline of the same config,
    tokenizer (object) and split in this process: the final evaluation and the unigram baseline
    reuse the rows packed at start."""
    cfg = ml_collections.ConfigDict(json.loads(cfg_json))
    say = functools.partial(_say, process_index)
    return packed_records(sources.document_dataset(cfg, split), tokenizer, cfg.seq_len, split == "train", say)


def _host_batches(rows, cfg, train, batch, p, n_proc, start_batch=0):
    """Rows of global batch k, host p: rows [k*B + p*b, k*B + (p+1)*b), from global batch `start_batch` on."""
    global_batch = batch * n_proc
    if not train:  # pad the one pass to whole global batches with empty rows
        pad = [empty_example(cfg.seq_len)] * (-len(rows) % global_batch)
        rows = grain.MapDataset.concatenate([rows, grain.MapDataset.source(pad)])
    rows = rows[:len(rows) // global_batch * global_batch]
    return rows.batch(batch, drop_remainder=True)[p::n_proc][start_batch:].to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads,
                          prefetch_buffer_size=cfg.prefetch))


def _packed_stream(docs, cfg, tokenizer, train, batch):
    """Rows packed from this host's stream of documents.

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


def _stream_dataset(cfg, tokenizer, split, train, batch, p, n_proc, num_epochs):
    """The batches of a streamed source: hf, or tfds with packing (module docstring)."""
    shuffle = cfg.shuffle and train
    if cfg.source == "hf":  # streamed: split by node, buffer-shuffled
        docs = _HFDocuments(cfg, split, p, n_proc, shuffle)
    else:
        docs = sources.document_dataset(cfg, split)
        docs = (docs.shuffle(seed=cfg.seed) if shuffle else docs).repeat(num_epochs if train else 1)[p::n_proc]
    if cfg.packing:
        return _packed_stream(docs, cfg, tokenizer, train, batch)
    rows = docs.map(functools.partial(paper_example, tokenizer=tokenizer, seq_len=cfg.seq_len))
    return rows.batch(batch, drop_remainder=True)


def is_streamed(cfg_data) -> bool:
    """Whether the source is streamed (hf, tfds with packing): each host reads its own stream, so
    a position in it is per host (grain's iterator state), not a global batch index."""
    return cfg_data.source == "hf" or (cfg_data.source == "tfds" and cfg_data.packing)


def make_dataset(cfg_data, tokenizer, *, split: str, global_batch_size: int,
                 process_index: int | None = None,
                 process_count: int | None = None,
                 num_epochs: int | None = None, start_batch: int = 0) -> grain.IterDataset:
    """The batch dataset of one host (see `make_pipeline`)."""
    p = jax.process_index() if process_index is None else process_index
    n_proc = jax.process_count() if process_count is None else process_count
    validate(cfg_data, global_batch_size, n_proc)
    batch = global_batch_size // n_proc
    train = split == "train"
    if split not in ("train", "val"):
        raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
    if start_batch and (not train or is_streamed(cfg_data)):
        raise ConfigError(f"start_batch: only the train split of a source with a row store starts at a "
                          f"global batch (data.source={cfg_data.source!r})")
    if is_streamed(cfg_data):
        ds = _stream_dataset(cfg_data, tokenizer, split, train, batch, p, n_proc, num_epochs)
        return _with_workers(ds, cfg_data)
    records = record_store(cfg_data, tokenizer, split, p)
    if cfg_data.shuffle and train:
        records = records.shuffle(seed=cfg_data.seed)
    rows = records.repeat(num_epochs if train else 1).map(
        functools.partial(record_example, cfg=cfg_data, tokenizer=tokenizer))
    return _with_workers(_host_batches(rows, cfg_data, train, batch, p, n_proc, start_batch), cfg_data)


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
                  num_epochs: int | None = None, start_batch: int = 0) -> grain.DatasetIterator:
    """An iterator over this host's batches (dicts of [b, seq_len] arrays).

    b = global_batch_size // process_count. Host p's k-th batch holds rows [k*B + p*b, k*B +
    (p+1)*b) of the split's row order, so global batch k is the same rows for any process count;
    `start_batch` starts at global batch k = start_batch (train, sources with a row store: not
    `is_streamed`), which is how a run resumes on another number of hosts.
    "train" repeats `num_epochs` times
    (None: forever), reshuffling each epoch with `cfg_data.seed`; "val" is one
    unshuffled pass whose last batch is padded with all-zero rows (loss_mask 0),
    so every host yields the same number of batches (not guaranteed for a
    streamed source in packing mode: hf, tfds).

    The iterator is checkpointable: `it.get_state()` / `it.set_state(state)`,
    or with orbax `grain.checkpoint.CheckpointSave(it)` /
    `grain.checkpoint.CheckpointRestore(it)`.
    """
    return iter(make_dataset(cfg_data, tokenizer, split=split,
                             global_batch_size=global_batch_size,
                             process_index=process_index,
                             process_count=process_count, num_epochs=num_epochs,
                             start_batch=start_batch))


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


if __name__ == "__main__":  # python -m colax.data prepare ... | verify DIR: the command of colax.prepare_cli
    from colax import prepare_cli  # noqa: E402  (the layer above; run as a program this module is __main__)
    __doc__ = prepare_cli.__doc__  # --help: the command's usage ...
    flags.adopt_module_key_flags(prepare_cli)  # ... and its flags
    prepare_cli.main()
