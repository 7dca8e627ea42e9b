"""Document sources: each returns documents as `str`, in a fixed order.

Local sources (`stdlib`, `text`, `jsonl`) are read into memory once and split
into train/val by a content hash (or `val_path` names the validation files); `tfds` reads an array_record dataset with
random access (no TensorFlow); `hf` streams a Hugging Face dataset (optional
extra, imported lazily).
"""

import functools
import glob
import gzip
import hashlib
import json
import logging
import os
import sysconfig
import zlib
from collections.abc import Iterator

import grain

from colax.errors import DataError

STDLIB_EXCLUDE = ("site-packages", "test", "tests", "idle_test")


@functools.cache
def stdlib_paths() -> tuple[str, ...]:
    """Sorted `*.py` paths of the running interpreter's standard library (listed once per process).

    This is the embedded corpus ("Python standard library sources"): test
    folders and site-packages are excluded, each file is one document.
    """
    root = sysconfig.get_paths()["stdlib"]
    paths = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    keep = lambda p: not set(os.path.relpath(p, root).split(os.sep)) & set(
        STDLIB_EXCLUDE)
    return tuple(sorted(p for p in paths if keep(p)))


def expand_paths(pattern: str, field: str = "data.path") -> list[str]:
    """Sorted files matching a comma-separated list of globs; errors naming `field` if none."""
    globs = [g.strip() for g in pattern.split(",") if g.strip()]
    if not globs:
        raise DataError(f"{field} is empty: set it to a file or glob")
    paths = []
    for g in globs:
        found = sorted(glob.glob(os.path.expanduser(g), recursive=True))
        if not found:
            raise DataError(f"{field}: no file matches {g!r}")
        paths += found
    return paths


def source_paths(cfg, split: str = "train") -> list[str]:
    """The files of a local source in reading order: `data.path` (stdlib: `stdlib_paths`), or for
    the "val" split `data.val_path` when it is set."""
    if split == "val" and cfg.val_path:
        return expand_paths(cfg.val_path, "data.val_path")
    return list(stdlib_paths()) if cfg.source == "stdlib" else expand_paths(cfg.path)


def _read_text(path: str) -> str:
    """The file's text; DataError naming it if it cannot be read or decompressed."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        what = "truncated" if isinstance(e, EOFError) else (getattr(e, "strerror", None) or str(e) or type(e).__name__)
        raise DataError(f"{path}: cannot be read ({what})") from None
    return raw.decode("utf-8")


def _split_text(text: str, doc_split: str) -> list[str]:
    if doc_split == "line":
        blocks = text.split("\n")
    else:  # "blank_line"
        blocks = text.replace("\r\n", "\n").split("\n\n")
    return [b.strip("\n") for b in blocks if b.strip()]


def _jsonl_docs(path: str, text: str, field: str) -> list[str]:
    docs = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(f"{path}:{i}: no string field {field!r} (data.text_field)")
        docs.append(record[field])
    return docs


@functools.cache
def _warn_once(message: str) -> None:
    """Logs a warning once per process (the documents are read for each split and the tokenizer)."""
    logging.warning(message)


def file_documents(cfg, path: str) -> list[str] | None:
    """The documents of one file of a local source, in order; None for a file that is not valid UTF-8
    when `cfg.on_bad_utf8 == "skip"` (else DataError naming it)."""
    try:
        text = _read_text(path)
    except UnicodeDecodeError as e:
        if cfg.on_bad_utf8 == "fail":
            raise DataError(f"{path}: not UTF-8 at byte {e.start}") from None
        return None
    if cfg.source == "stdlib":
        return [text] if text.strip() else []
    if cfg.source == "jsonl":
        return _jsonl_docs(path, text, cfg.text_field)
    return _split_text(text, cfg.doc_split)


def iter_documents(cfg, paths: list[str]) -> Iterator[str]:
    """The documents of the files `paths` of a local source (`stdlib`, `text` or `jsonl`), in order,
    one file in memory at a time. Non-UTF-8 files: see `file_documents` (the skipped ones are counted
    in the log at the end); no document at all is a DataError."""
    bad, count = [], 0
    for path in paths:
        docs = file_documents(cfg, path)
        if docs is None:
            bad.append(path)
            continue
        count += len(docs)
        yield from docs
    if bad:
        _warn_once(f"data: skipped {len(bad)} non-UTF-8 file(s) of {len(paths)}: "
                   f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''} (data.on_bad_utf8='fail' stops instead)")
    if not count:
        raise DataError(f"data: no documents in source {cfg.source!r} "
                        f"({'files ' + ', '.join(paths[:3]) if paths else 'no file'})")


def read_documents(cfg, split: str = "train") -> list[str]:
    """All documents of a local source's files (`source_paths`), in order (`iter_documents`)."""
    return list(iter_documents(cfg, source_paths(cfg, split)))


def split_documents(docs: list[str], val_docs: int):
    """Splits documents into (train, val) lists by a hash of their content.

    The `val_docs` documents with the smallest BLAKE2 hash are held out. The
    split does not depend on the shuffle seed or on file order, and duplicate
    documents always land on the same side. Both lists keep the input order.
    """
    if val_docs >= len(docs):
        raise DataError(f"data.val_docs={val_docs} leaves no training documents "
                        f"(corpus has {len(docs)})")
    digest = lambda d: hashlib.blake2b(d.encode(), digest_size=8).digest()
    held = set(sorted(range(len(docs)), key=lambda i: digest(docs[i]))[:val_docs])
    train = [d for i, d in enumerate(docs) if i not in held]
    val = [d for i, d in enumerate(docs) if i in held]
    return train, val


def _tfds_source(cfg, split: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
        return tfds.data_source(cfg.tfds_name, split=split,
                                data_dir=cfg.tfds_data_dir or None)
    except (ValueError, AssertionError, NotImplementedError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"data.tfds_name {cfg.tfds_name!r} split {split!r} "
            f"(data_dir {cfg.tfds_data_dir or 'default'}): {first} "
            "(needs an array_record-prepared dataset; see docs/data.md)") from None


def document_dataset(cfg, split: str) -> grain.MapDataset:
    """Random-access documents (`str`) of `split` ("train" or "val")."""
    if cfg.source == "tfds":
        name = cfg.train_split if split == "train" else cfg.val_split
        field = cfg.text_field
        decode = lambda ex: ex[field].decode("utf-8", errors="replace")
        return grain.MapDataset.source(_tfds_source(cfg, name)).map(decode)
    if cfg.val_path:  # the user's own validation files; the whole data.path trains
        return grain.MapDataset.source(read_documents(cfg, split))
    train, val = split_documents(read_documents(cfg), cfg.val_docs)
    return grain.MapDataset.source(train if split == "train" else val)


def hf_documents(cfg, split: str, process_index: int, process_count: int,
                 shuffle: bool):
    """This host's share of a streamed Hugging Face dataset (`datasets` extra).

    `cfg.path`, if set, is passed as `data_files` (e.g. `hf_name="json"`).
    Returns a `datasets.IterableDataset` of records; it is split across hosts
    with `split_dataset_by_node` and shuffled with `cfg.seed` and a
    `cfg.hf_shuffle_buffer` buffer.
    """
    try:
        import datasets  # pylint: disable=g-import-not-at-top
        from datasets import distributed  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise DataError("data.source='hf' needs the `datasets` package: "
                        "pip install 'colax[hf]'") from None
    name = cfg.train_split if split == "train" else cfg.val_split
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings: the failure is reported below in one line
    try:
        ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config or None, split=name,
                                   data_files=cfg.path or None, streaming=True)
    except (OSError, ValueError) as e:  # ConnectionError offline, DatasetNotFoundError, a bad split
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"data.hf_name {cfg.hf_name!r} (hf_config {cfg.hf_config!r}, split {name!r}): {first}; "
                        "offline, prepare C4 as TFDS array_record and pass --config.data.source=tfds "
                        "--config.data.tfds_data_dir=DIR (docs/data.md)") from None
    finally:
        hub_log.setLevel(level)
    ds = distributed.split_dataset_by_node(ds, process_index, process_count)
    if shuffle:
        ds = ds.shuffle(seed=cfg.seed, buffer_size=cfg.hf_shuffle_buffer)
    field = cfg.text_field
    return ds.map(lambda ex: {field: ex[field]}).select_columns([field])
