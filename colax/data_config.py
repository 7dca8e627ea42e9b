"""The `config.data` section: its defaults and their validation, with one-line errors naming the field.

The bottom of the data path (docs/architecture.md): `colax.config` and every data module read the
section from here, so the schema imports none of the code that reads data.
"""

import ml_collections

from colax.errors import ConfigError

SOURCES = ("stdlib", "text", "jsonl", "tfds", "hf", "prepared")


def defaults() -> ml_collections.ConfigDict:
    """The `config.data` section; every key is described in docs/data.md."""
    return ml_collections.ConfigDict(dict(
        source="stdlib",  # stdlib (embedded corpus) | text | jsonl | tfds | hf | prepared
        path="",  # text/jsonl: file or glob, comma-separated list; .gz ok; prepared: the folder
        prepared_index="memory",  # prepared: the shards' record index in memory (fast reads) | disk (flat memory)
        val_path="",  # text/jsonl: validation file(s), read as path; empty: hold out val_docs by hash
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
        row_shuffle_window=4096,  # packing, train, hf/tfds (streamed) only: rows shuffled in windows of this many
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
    _check(c.source != "prepared" or bool(c.path.strip()), "path",
           "the folder of `python -m colax.data prepare` for source 'prepared'", c.path)
    _check(not c.val_path or c.source in ("text", "jsonl", "prepared"), "val_path",
           f"empty for source {c.source!r} (it is for text and jsonl)", c.val_path)
    _check(c.prepared_index in ("memory", "disk"), "prepared_index", "'memory' or 'disk'", c.prepared_index)
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
