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
import heapq
import itertools
import json
import logging
import os
import sysconfig
import types
import zlib
from collections.abc import Iterable, Iterator

import grain

from colax.errors import DataError

STDLIB_EXCLUDE = ("site-packages", "test", "tests", "idle_test")


@functools.cache
def stdlib_paths() -> tuple[str, ...]:
    """Sorted `*.py` paths of the running interpreter's standard library (listed once per process).

    This is the embedded corpus ("Python standard library sources"): test
    folders and site-packages are excluded (not entered), as are hidden files and folders; each
    file is one document.
    """
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_EXCLUDE and not d.startswith(".")]
        paths += [os.path.join(folder, f) for f in files if f.endswith(".py") and not f.startswith(".")]
    return tuple(sorted(paths))


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


class NotUtf8(ValueError):
    """A file of a local source is not valid UTF-8; `offset`: the first bad byte."""

    def __init__(self, path: str, offset: int):
        super().__init__(f"{path}: not UTF-8 at byte {offset}")
        self.path, self.offset = path, offset


_UNREADABLE = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError


def _unreadable(path: str, e: Exception) -> DataError:
    """The DataError naming `path` for `e`, one of _UNREADABLE."""
    what = "truncated" if isinstance(e, EOFError) else (getattr(e, "strerror", None) or str(e) or type(e).__name__)
    return DataError(f"{path}: cannot be read ({what})")


def _check_intact(path: str) -> None:
    """DataError naming `path` (`_lines`'s) if it is a `.gz` that does not decompress to its end.
    Damaged compressed bytes often decompress into garbage, which reads as bad content (not UTF-8,
    invalid JSON) before the CRC check at the end of the file names the real cause: bad content in
    a `.gz` is checked with this first."""
    if path.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                while f.read(1 << 20):
                    pass
        except _UNREADABLE as e:
            raise _unreadable(path, e) from None


def _lines(path: str) -> Iterator[str]:
    """The file's lines (decoded, each with its "\n"), read one at a time (`.gz`: decompressed);
    NotUtf8 at the first bad byte, DataError naming the file if it cannot be read or decompressed."""
    opener = gzip.open if path.endswith(".gz") else open
    offset = 0
    try:
        with opener(path, "rb") as f:
            for raw in f:  # a UTF-8 sequence never holds the byte "\n": decoding line by line is exact
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    _check_intact(path)
                    raise NotUtf8(path, offset + e.start) from None
                offset += len(raw)
                yield line
    except _UNREADABLE as e:
        raise _unreadable(path, e) from None


def _blocks(lines: Iterator[str]) -> Iterator[str]:
    """Blank-line-separated blocks ("\r\n" read as "\n"), blank ones dropped."""
    block = []
    for line in itertools.chain(lines, [""]):
        line = line[:-2] if line.endswith("\r\n") else line.removesuffix("\n")
        if line:
            block.append(line)
        elif block:
            text, block = "\n".join(block), []
            if text.strip():
                yield text


def _jsonl_docs(path: str, lines: Iterator[str], field: str) -> Iterator[str]:
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            _check_intact(path)
            raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            _check_intact(path)
            raise DataError(f"{path}:{i}: no string field {field!r} (data.text_field)")
        yield record[field]


def file_documents(cfg, path: str) -> Iterator[str]:
    """The documents of one file of a local source, in order, read as they are needed (stdlib: the
    whole file is one document). NotUtf8 where the file stops being UTF-8."""
    lines = _lines(path)
    if cfg.source == "stdlib":
        text = "".join(lines)
        return iter([text] if text.strip() else [])
    if cfg.source == "jsonl":
        return _jsonl_docs(path, lines, cfg.text_field)
    if cfg.doc_split == "line":
        return (line.removesuffix("\n") for line in lines if line.strip())
    return _blocks(lines)


@functools.cache
def _warn_once(message: str) -> None:
    """Logs a warning once per process (the documents are read for each split and the tokenizer)."""
    logging.warning(message)


def warn_skipped(bad: list[str], files: int) -> None:
    """Logs (once) the non-UTF-8 files that were skipped, of `files`."""
    if bad:
        _warn_once(f"data: skipped {len(bad)} non-UTF-8 file(s) of {files}: "
                   f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''} (data.on_bad_utf8='fail' stops instead)")


def no_documents(cfg, paths: list[str]) -> DataError:
    return DataError(f"data: no documents in source {cfg.source!r} "
                     f"({'files ' + ', '.join(paths[:3]) if paths else 'no file'})")


def read_documents(cfg, split: str = "train") -> list[str]:
    """All documents of a local source's files (`source_paths`), in order. A file that is not
    UTF-8 is skipped (and counted in the log) when `cfg.on_bad_utf8 == "skip"`, else a DataError
    names it; no document at all is a DataError. The embedded corpus is read once per process."""
    if cfg.source == "stdlib" and not (split == "val" and cfg.val_path):
        return list(_stdlib_documents(cfg.on_bad_utf8))
    return _read_files(cfg, source_paths(cfg, split))


@functools.cache
def _stdlib_documents(on_bad_utf8: str) -> tuple[str, ...]:
    """The embedded corpus's documents (`stdlib_paths`, one a file; ~12 MB on CPython 3.11)."""
    return tuple(_read_files(types.SimpleNamespace(source="stdlib", on_bad_utf8=on_bad_utf8), stdlib_paths()))


def _read_files(cfg, paths) -> list[str]:
    """`read_documents` of the files `paths`."""
    docs, bad = [], []
    for path in paths:
        try:
            docs += list(file_documents(cfg, path))
        except NotUtf8 as e:
            if cfg.on_bad_utf8 == "fail":
                raise DataError(str(e)) from None
            bad.append(path)
    warn_skipped(bad, len(paths))
    if not docs:
        raise no_documents(cfg, list(paths))
    return docs


def digest(doc: str) -> bytes:
    """The hash that splits train from validation (BLAKE2b, 8 bytes)."""
    return hashlib.blake2b(doc.encode(), digest_size=8).digest()


def smallest_digests(docs: Iterable[str], k: int, first_index: int = 0) -> tuple[list[tuple[bytes, int]], int]:
    """(the k smallest (digest, index) of `docs`, indices from `first_index`, in order; the number of
    documents). Memory: k entries; merge two such lists with `heapq.nsmallest(k, a + b)`."""
    count = 0

    def keyed():
        nonlocal count
        for count, doc in enumerate(docs, 1):
            yield digest(doc), first_index + count - 1

    smallest = heapq.nsmallest(k, keyed()) if k else []
    count = count if k else sum(1 for _ in docs)
    return smallest, count


def check_held_out(val_docs: int, documents: int) -> None:
    if val_docs >= documents:
        raise DataError(f"data.val_docs={val_docs} leaves no training documents "
                        f"(corpus has {documents})")


def split_documents(docs: list[str], val_docs: int):
    """Splits documents into (train, val) lists by a hash of their content.

    The `val_docs` documents with the smallest BLAKE2 hash are held out (equal hashes: the first
    ones). The split does not depend on the shuffle seed or on file order, and duplicate
    documents land on the same side (unless they straddle the cut). Both lists keep the input order.
    """
    check_held_out(val_docs, len(docs))
    held = {i for _, i in smallest_digests(docs, val_docs)[0]}
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


def train_documents(cfg_data, max_docs: int) -> Iterator[str]:
    """Up to `max_docs` training documents, spread evenly over the train split.

    Used to train the tokenizer; the order is fixed (no dependence on the seed).
    """
    if cfg_data.source == "hf":
        docs = hf_documents(cfg_data, "train", 0, 1, shuffle=False)
        return itertools.islice((ex[cfg_data.text_field] for ex in docs), max_docs)
    docs = document_dataset(cfg_data, "train")
    return iter(docs[::sample_step(len(docs), max_docs)])


def sample_step(count: int, max_docs: int) -> int:
    """Every how many of `count` documents one is taken to train the tokenizer on at most `max_docs`."""
    return max(1, -(-count // max_docs))
