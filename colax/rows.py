"""Training rows as records: the colax packer and the record format of the row store.

A record is one row's token ids, int32 (`encode`: little-endian bytes, nothing else). Two row modes:

  paper   one record per document: its first seq_len ids, then EOS (`paper_record`); 2..seq_len+1
          tokens. `paper_example` pads it to a row.
  packed  the documents in corpus order (fixed, independent of the seed), each as ids + [EOS],
          concatenated into one stream; record k = stream tokens [k (L+1), (k+1)(L+1)), L = seq_len
          (`pack`; `row_pieces` says where a document at stream offset `start` lands, so a
          distributed job can place documents once it knows each one's offset, the prefix sum of the
          token counts). Every record holds L+1 tokens except possibly the last one (the stream's
          tail): training drops it, validation keeps it (padded, loss_mask 0).

A packed record's segments are read off its EOS tokens (`packed_fields`): segment ids number the
document pieces of the row from 1, each piece starting at the row start or after an EOS; positions
restart at 0 with each piece (a document cut at a row end continues in the next row as a new segment
at position 0). This needs a tokenizer that never emits EOS inside a document (SentencePiece: EOS is
a control piece).

Prepared data (`python -m colax.data prepare`) is a folder:

  manifest.json                  written last, atomically (`manifest_bytes`); without it the folder
                                 is not usable
  tokenizer.model                the tokenizer the records were made with
  {split}-{i:05d}.array_record   split "train" or "val": records [i N, (i+1) N) of the split in
                                 order, N = manifest["records_per_shard"] (`shard_name`), written by
                                 array_record's ArrayRecordWriter with WRITER_OPTIONS, one record per
                                 chunk (group_size 1: a random read decodes only its record)

The manifest (`manifest_bytes`: JSON, sorted keys, indent 2):

  format, version      "colax.prepared", FORMAT_VERSION
  rows, seq_len        "packed" or "paper"; L
  record_tokens        L + 1: the tokens of every packed record (but the validation split's last,
                       which may be shorter); at most that many, at least 2, in a paper record
  records_per_shard    N
  tokenizer            {file, sha256 (of its serialized model), vocab_size, eos_id, pad_id}
  data                 the config.data fields that chose the documents (source, path, val_path, ...)
  sources              [{path, bytes}] of the files read (local sources), in reading order
  splits               {train, val: {documents, rows, tokens (stored, summed over records),
                        shards: [{file, records, bytes (the file's size), sha256 (of the file)}]}}

The same inputs give byte-identical shards and manifest (no times, no host names). Reading checks
the data: `check_shards` when a split opens (cheap: each shard's size, record count and first
record), `verify` all of it (`python -m colax.data verify DIR`: every record and each shard's
sha256). Manifests written before `record_tokens`, `bytes` and `sha256` existed are read as before:
the checks skip what they lack.
"""

import bisect
import hashlib
import json
import os
from collections.abc import Iterable, Iterator

from array_record.python import array_record_data_source, array_record_module
import numpy as np

from colax import errors
from colax.errors import DataError

DTYPE = np.dtype("<i4")  # token ids as stored: int32, little-endian
FORMAT, FORMAT_VERSION = "colax.prepared", 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
WRITER_OPTIONS = "group_size:1,uncompressed"
# A shard's reader that reads its footer and the records asked for, never its whole index.
DISK_OPTIONS = {"index_storage_option": "offloaded", "footer_prefetch_bytes": "0"}
RECORDS_PER_SHARD = 65536  # ~64 MB of packed rows of 257 tokens


def document_tokens(ids, eos_id: int) -> np.ndarray:
    """A document's ids followed by EOS: int32 [len(ids) + 1], the packer's input."""
    return np.asarray(list(ids) + [eos_id], DTYPE)


def paper_record(ids, seq_len: int, eos_id: int) -> np.ndarray:
    """The paper mode's record of a document: int32 [min(len(ids), seq_len) + 1] (ids[:seq_len] + EOS)."""
    return document_tokens(ids[:seq_len], eos_id)


def row_pieces(start: int, length: int, row_len: int) -> list[tuple[int, int, int, int]]:
    """Where a document of `length` tokens at stream offset `start` lands: one (row, column, begin,
    end) per piece, its tokens [begin, end) going to record `row` from `column` on."""
    pieces, pos = [], start
    while pos < start + length:
        row, col = divmod(pos, row_len)
        end = min(pos + row_len - col, start + length)
        pieces.append((row, col, pos - start, end - start))
        pos = end
    return pieces


class Packer:
    """The colax packer, fed one document at a time (`pack`); holds one row."""

    def __init__(self, row_len: int):
        self.row_len, self.row, self.start = row_len, np.zeros(row_len, DTYPE), 0

    def add(self, doc: np.ndarray) -> list[np.ndarray]:
        """Places `doc` (a `document_tokens` array) at the stream's end; returns the records it completed."""
        done = []
        for _, col, begin, end in row_pieces(self.start, len(doc), self.row_len):
            self.row[col:col + end - begin] = doc[begin:end]
            if col + end - begin == self.row_len:
                done.append(self.row.copy())
        self.start += len(doc)
        return done

    def tail(self) -> list[np.ndarray]:
        """The stream's last, shorter record, if there is one."""
        rest = self.start % self.row_len
        return [self.row[:rest].copy()] if rest else []


def pack(docs: Iterable[np.ndarray], row_len: int) -> Iterator[np.ndarray]:
    """The packed records (int32 [row_len], the last one possibly shorter) of `docs`, each a
    `document_tokens` array, in order; holds one row in memory."""
    packer = Packer(row_len)
    for doc in docs:
        yield from packer.add(doc)
    yield from packer.tail()


def encode(record: np.ndarray) -> bytes:
    """A record's bytes as stored in a shard (int32 little-endian, no header)."""
    return np.asarray(record, DTYPE).tobytes()


def decode(raw: bytes) -> np.ndarray:
    """The record (int32 [n]) of `encode`'s bytes."""
    return np.frombuffer(raw, DTYPE).astype(np.int32)


def packed_fields(record: np.ndarray, row_len: int, eos_id: int, pad_id: int) -> dict:
    """A packed record as grain's ConcatThenSplit row: "tokens", "tokens_segment_ids",
    "tokens_positions", each int32 [row_len]; a short record is padded (tokens `pad_id`, segment 0)."""
    n = len(record)
    eos = record[:-1] == eos_id
    segment = np.ones(n, np.int32)
    segment[1:] += np.cumsum(eos, dtype=np.int32)
    starts = np.concatenate([[0], np.flatnonzero(eos) + 1])
    out = dict(tokens=np.full(row_len, max(pad_id, 0), np.int32),
               tokens_segment_ids=np.zeros(row_len, np.int32), tokens_positions=np.zeros(row_len, np.int32))
    out["tokens"][:n] = record
    out["tokens_segment_ids"][:n] = segment
    out["tokens_positions"][:n] = np.arange(n) - starts[segment - 1]
    return out


def paper_example(record: np.ndarray, seq_len: int, pad_id: int) -> dict:
    """The paper mode's row of a record (`paper_record`): int32/float32 arrays [seq_len] (the layout
    of `colax.data`); tokens after the record are `pad_id` and count nowhere."""
    n = len(record)
    row = np.full(seq_len + 1, max(pad_id, 0), np.int32)
    row[:n] = record
    t = np.arange(seq_len)
    return dict(inputs=row[:-1], targets=row[1:],
                loss_mask=(t + 1 < n).astype(np.float32),
                segment_ids=(t < n).astype(np.int32),
                positions=t.astype(np.int32))


def shard_name(split: str, index: int) -> str:
    """The file of shard `index` (records [index N, (index+1) N)) of `split`."""
    return f"{split}-{index:05d}.array_record"


def manifest_bytes(manifest: dict) -> bytes:
    """The bytes of manifest.json for a manifest dict (module docstring)."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def read_manifest(folder: str) -> dict:
    """The manifest of prepared data in `folder`; DataError (one line) if there is none (a missing
    folder, or a prepare that did not finish) or it is of another format or version."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        what = "is not a folder" if not os.path.isdir(folder) else "has no manifest.json (a prepare that did not finish?)"
        raise DataError(f"data.path {folder} {what}: run python -m colax.data prepare --out {folder}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    if (manifest.get("format"), manifest.get("version")) != (FORMAT, FORMAT_VERSION):
        raise DataError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                        f"this colax reads {FORMAT!r} version {FORMAT_VERSION}: prepare again")
    return manifest


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex digest) of the file at `path`, read in blocks of 1 MiB."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def shard_entry(folder: str, file: str, records: int) -> dict:
    """The manifest's entry of a written shard: {file, records, bytes, sha256}."""
    size, sha256 = file_digest(os.path.join(folder, file))
    return dict(file=file, records=records, bytes=size, sha256=sha256)


def _record_tokens(manifest: dict, where: str) -> int:
    """The rows' record length, seq_len + 1; DataError if the manifest's `record_tokens` (older
    manifests have none) says otherwise."""
    want = manifest["seq_len"] + 1
    if manifest.get("record_tokens", want) != want:
        raise DataError(f"{where}: record_tokens {manifest['record_tokens']} disagrees with seq_len "
                        f"{manifest['seq_len']} (rows of seq_len + 1 tokens): prepare again")
    return want


def _check_lengths(path: str, nbytes: np.ndarray, mode: str, row_len: int, last_may_be_short: bool) -> int:
    """The tokens of the records [0, n) of shard `path`, whose sizes in bytes are `nbytes` [n]; DataError
    naming the first record that does not hold whole int32 tokens, as many as a row of `mode` holds:
    packed row_len (fewer: the last one if `last_may_be_short`), paper 2..row_len."""
    tokens, extra = np.divmod(nbytes, DTYPE.itemsize)
    fits = (tokens == row_len) if mode == "packed" else (tokens >= 2) & (tokens <= row_len)
    if last_may_be_short and mode == "packed" and len(tokens):
        fits[-1] |= tokens[-1] < row_len
    bad = np.flatnonzero(~fits | (extra > 0))
    if len(bad):
        k = bad[0]
        want = f"{row_len}" if mode == "packed" else f"2 to {row_len}"
        raise DataError(f"{path}: record {k} holds {nbytes[k] / DTYPE.itemsize:g} tokens, {mode} rows of seq_len "
                        f"{row_len - 1} hold {want} (the manifest disagrees with the records: prepare again)")
    return int(tokens.sum())


def _shards(folder: str, manifest: dict) -> Iterator[tuple[str, str, dict, bool]]:
    """(split, path, manifest entry, whether its last record may be short: the validation split's
    last) of every shard, split by split."""
    for split, entry in sorted(manifest["splits"].items()):
        for i, shard in enumerate(entry["shards"]):
            yield split, os.path.join(folder, shard["file"]), shard, split == "val" and i == len(entry["shards"]) - 1


def _open(path: str, shard: dict, whole: bool = False) -> array_record_module.ArrayRecordReader:
    """A reader of shard `path` (its index in memory if `whole`, to read all records; else only its
    footer); DataError if it is missing, has another size than the manifest's, cannot be opened or
    holds another number of records."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: a shard of the manifest cannot be read ({e.strerror}): prepare again") from None
    if size != shard.get("bytes", size):
        raise DataError(f"{path}: {size:,} bytes, the manifest says {shard['bytes']:,} (truncated or changed): "
                        "prepare again")
    try:
        options = {} if whole else dict(readahead_buffer_size=0, **DISK_OPTIONS)
        reader = array_record_module.ArrayRecordReader(path, ",".join(f"{k}:{v}" for k, v in options.items()))
    except (RuntimeError, ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable shard ({errors.cause(e)}): prepare again") from None
    if reader.num_records() != shard["records"]:
        raise DataError(f"{path}: {reader.num_records():,} records, the manifest says {shard['records']:,}: "
                        "prepare again")
    return reader


def _read(reader, path: str, keys: list[int] | None = None) -> list[bytes]:
    """The records `keys` (None: all) of an open shard; DataError naming the first that cannot be read."""
    try:
        return reader.read(keys) if keys else reader.read_all()
    except RuntimeError as e:
        keys = keys or range(reader.num_records())
        bad = next((k for k in keys if not _readable(reader, k)), keys[0])
        raise DataError(f"{path}: record {bad} cannot be read ({errors.cause(e)}): prepare again") from None


def _readable(reader, k: int) -> bool:
    try:
        reader.read([k])
        return True
    except RuntimeError:
        return False


def check_shards(folder: str, manifest: dict) -> None:
    """The check of prepared data at open (cheap: a stat, the footer and the first record of each
    shard): every shard of the manifest is there with its size (older manifests: any size) and number
    of records, and its first record has the row mode's length for the manifest's seq_len. DataError
    (one line) naming the shard, and the record where known."""
    row_len = _record_tokens(manifest, os.path.join(folder, MANIFEST))
    for _, path, shard, last_may_be_short in _shards(folder, manifest):
        reader = _open(path, shard)
        try:
            if shard["records"]:
                _check_lengths(path, np.array([len(_read(reader, path, [0])[0])]), manifest["rows"], row_len,
                               last_may_be_short and shard["records"] == 1)
        finally:
            reader.close()


def verify(folder: str) -> dict:
    """Reads all of the prepared data in `folder`: `check_shards`, every record (readable, of the row
    mode's length, the splits' row and token counts as the manifest's) and each shard's sha256 against
    the manifest's. DataError (one line) naming the first damage: the shard, and the record where
    known. Returns {shards, records, tokens, checksums: whether the manifest had sha256s to check
    (older ones have none)}."""
    manifest = read_manifest(folder)
    check_shards(folder, manifest)
    row_len, mode = manifest["seq_len"] + 1, manifest["rows"]
    found, checksums = {split: [0, 0] for split in manifest["splits"]}, True  # {split: [records, tokens]}
    for split, path, shard, last_may_be_short in _shards(folder, manifest):
        found[split][0] += shard["records"]
        found[split][1] += _shard_tokens(path, shard, mode, row_len, last_may_be_short)
        if "sha256" in shard and (sha256 := file_digest(path)[1]) != shard["sha256"]:
            raise DataError(f"{path}: sha256 {sha256}, the manifest says {shard['sha256']} (damaged: prepare again)")
        checksums &= "sha256" in shard
    for split, entry in sorted(manifest["splits"].items()):
        if found[split] != [entry["rows"], entry["tokens"]]:
            raise DataError(f"{os.path.join(folder, MANIFEST)}: the {split} split has {entry['rows']:,} rows of "
                            f"{entry['tokens']:,} tokens, its shards {found[split][0]:,} of {found[split][1]:,}: "
                            "prepare again")
    return dict(shards=sum(len(entry["shards"]) for entry in manifest["splits"].values()),
                records=sum(r for r, _ in found.values()), tokens=sum(t for _, t in found.values()),
                checksums=checksums)


def _shard_tokens(path: str, shard: dict, mode: str, row_len: int, last_may_be_short: bool) -> int:
    """The tokens of the records of one shard, each read and checked (`_check_lengths`)."""
    reader = _open(path, shard, whole=True)
    try:
        records = _read(reader, path)
    finally:
        reader.close()
    return _check_lengths(path, np.fromiter(map(len, records), np.int64, len(records)), mode, row_len,
                          last_may_be_short)


class ShardSource:
    """The records (bytes) of one split's shards in order, a random-access source for grain; built
    once `check_shards` passed. A record that cannot be read is a DataError naming its shard and
    record (a checksum error in the middle of a shard, which only `verify` finds beforehand)."""

    def __init__(self, folder: str, manifest: dict, split: str, disk: bool = False):
        shards = manifest["splits"][split]["shards"]
        self.folder, self.paths = folder, [os.path.join(folder, s["file"]) for s in shards]
        self.starts = list(np.cumsum([0] + [s["records"] for s in shards[:-1]]))
        self.source = array_record_data_source.ArrayRecordDataSource(  # read instructions: no file opened here
            [f"{p}[0:{s['records']}]" for p, s in zip(self.paths, shards)], DISK_OPTIONS if disk else None)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key) -> bytes:
        try:
            return self.source[key]
        except RuntimeError as e:
            i = bisect.bisect_right(self.starts, key) - 1
            raise DataError(f"{self.paths[i]}: record {key - self.starts[i]} cannot be read ({errors.cause(e)}); "
                            f"python -m colax.data verify {self.folder} checks all of them") from None
