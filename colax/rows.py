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
  records_per_shard    N
  tokenizer            {file, sha256 (of its serialized model), vocab_size, eos_id, pad_id}
  data                 the config.data fields that chose the documents (source, path, val_path, ...)
  sources              [{path, bytes}] of the files read (local sources), in reading order
  splits               {train, val: {documents, rows, tokens (stored, summed over records),
                        shards: [{file, records}]}}

The same inputs give byte-identical shards and manifest (no times, no host names).
"""

import json
import os
from collections.abc import Iterable, Iterator

import numpy as np

from colax.errors import DataError

DTYPE = np.dtype("<i4")  # token ids as stored: int32, little-endian
FORMAT, FORMAT_VERSION = "colax.prepared", 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
WRITER_OPTIONS = "group_size:1,uncompressed"
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
