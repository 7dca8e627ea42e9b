"""`colax.prepare` as an Apache Beam pipeline: the same shards and manifest, byte for byte.

  python -m colax.data prepare --config C --out DIR --runner=DirectRunner \\
      [-- --direct_num_workers=2 --direct_running_mode=multi_processing]

`prepare.prepare` does all but the second pass as without Beam (the checks, the first pass over the
files with its one-line errors, the tokenizer, the manifest last, `prepare.write_manifest`); the
second pass is this pipeline (`writer`; the `beam` extra), for local sources (stdlib, text, jsonl).
A document is keyed by (split, file index, index in its file), which orders documents as the corpus:

  Read      each file the first pass kept (`sources.file_documents`): ((split, file, doc), text);
            split None (the hold-out decides) unless `data.val_path` names the validation files
  Hold out  the `val_docs` smallest (digest, key), a global Top-N combine: `sources.smallest_digests`'
            choice (its (digest, corpus index) orders as (digest, key))
  Tokenise  a DoFn with the tokenizer loaded once per worker (`setup`); a document's record: ids +
            EOS (packed) or `rows.paper_record` (paper)
  Place     a document's span (packed: its tokens; paper: one record) starts in its split at the
            prefix sum of the spans before it: its file's start (prefix sums of the files' totals, a
            side input) + its offset in its file (prefix sums over the file's documents, grouped by
            file); `rows.row_pieces` cuts it into (record, column) pieces; training drops the
            stream's last, shorter record (as `rows.Packer` without its tail)
  Write     the pieces grouped by shard (record // records_per_shard), sorted, records assembled and
            written in order with ArrayRecordWriter and `rows.WRITER_OPTIONS`; each shard goes to a
            temporary name first (a retried bundle rewrites it whole)
  Splits    the shards' record and token counts and the splits' document counts, for the manifest

Memory per worker: one shard's records, one file's (doc, span) pairs, `val_docs` digests. The files
and --out must be paths that every worker sees (a shared file system); the shards and the manifest
do not depend on the runner or on the number of workers.
"""

import json
import os

from array_record.python import array_record_module
import numpy as np

from colax import prepare, progress, rows, sources, tokenizer
from colax.errors import ConfigError

try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
except ImportError:
    raise ConfigError("--runner needs apache-beam: pip install 'colax[beam]'") from None

SPLITS = ".beam-splits.json"  # the pipeline's counts for the manifest; removed once it is written


def _read(file: tuple, cfg):
    """((split, file index, document index), text) of one input file (split, index, path)."""
    split, index, path = file
    for doc_index, doc in enumerate(sources.file_documents(cfg, path)):
        yield (split, index, doc_index), doc


class _Tokenise(beam.DoFn):
    """((split, file, doc), text) -> ((split, file, doc), record: int32 [n]); a document of the
    hold-out (`held`: keys with split None) goes to "val", the others of split None to "train"."""

    def __init__(self, tokenizer_path: str, seq_len: int, packing: bool):
        self.path, self.seq_len, self.packing = tokenizer_path, seq_len, packing

    def setup(self):
        self.tok = tokenizer.load_tokenizer(self.path)

    def process(self, element, held):
        key, doc = element
        split = key[0] or ("val" if key in held else "train")
        ids = self.tok.encode(doc)
        record = (rows.document_tokens(ids, self.tok.eos_id) if self.packing
                  else rows.paper_record(ids, self.seq_len, self.tok.eos_id))
        yield (split,) + key[1:], record


def _offsets_in_file(element):
    """((split, file), [(doc, span)]) -> ((split, file, doc), the spans of the file's documents before it)."""
    (split, index), spans = element
    offset = 0
    for doc_index, span in sorted(spans):
        yield (split, index, doc_index), offset
        offset += span


def _file_starts(totals: list) -> dict:
    """{(split, file): the spans of the split's files before it} and {split: its total span}, from
    [((split, file), the file's total span)]."""
    starts, ends = {}, {}
    for (split, index), total in sorted(totals):
        starts[split, index] = ends.get(split, 0)
        ends[split] = starts[split, index] + total
    return dict(starts=starts, ends=ends)


def _pieces(element, table: dict, row_len: int, packing: bool, per_shard: int):
    """((split, file, doc), {record, offset}) -> ((split, shard), (record index, column, tokens))."""
    (split, index, _), joined = element
    (record,), (offset,) = joined["record"], joined["offset"]
    start = table["starts"][split, index] + offset
    if not packing:
        yield (split, start // per_shard), (start, 0, record)
        return
    kept = table["ends"][split] // row_len * row_len if split == "train" else table["ends"][split]
    for row, col, begin, end in rows.row_pieces(start, len(record), row_len):
        if start + begin < kept:
            yield (split, row // per_shard), (row, col, record[begin:end])


def _records(pieces) -> list[np.ndarray]:
    """The records of (record index, column, tokens) pieces, in record order."""
    records, current = [], None
    for row, _, tokens in sorted(pieces, key=lambda piece: piece[:2]):
        if row != current:
            records.append([])
            current = row
        records[-1].append(tokens)
    return [np.concatenate(parts) for parts in records]


def _write_shard(element, out: str) -> tuple:
    """Writes shard ((split, shard index), pieces); (split, shard index, tokens, its manifest entry)."""
    (split, index), pieces = element
    records = _records(pieces)
    path = os.path.join(out, rows.shard_name(split, index))
    root, ext = os.path.splitext(path)
    writer = array_record_module.ArrayRecordWriter(root + ".tmp" + ext, rows.WRITER_OPTIONS)
    for record in records:
        writer.write(rows.encode(record))
    writer.close()
    os.replace(root + ".tmp" + ext, path)
    return split, index, int(sum(map(len, records))), rows.shard_entry(out, os.path.basename(path), len(records))


def _write_splits(shards: list, documents: dict, out: str) -> None:
    """Writes SPLITS: {split: {documents, rows, tokens, shards: [{file, records, bytes, sha256}]}}."""
    splits = {split: dict(documents=documents.get(split, 0), rows=0, tokens=0, shards=[])
              for split in ("train", "val")}
    for split, index, tokens, entry in sorted(shards, key=lambda shard: shard[:2]):
        s = splits[split]
        s["rows"], s["tokens"] = s["rows"] + entry["records"], s["tokens"] + tokens
        s["shards"].append(entry)
    with open(os.path.join(out, SPLITS), "w") as f:
        json.dump(splits, f)


def _inputs(c, plan) -> list[tuple]:
    """The input files as (split, index, path): split None (the hold-out decides) unless
    `val_path` names the validation files; the files that the first pass kept (`plan.files`)."""
    kept = {f["path"] for f in plan.files}
    named = (("train", "val") if c.val_path else (None,))
    return [(split, index, path) for split in named
            for index, path in enumerate(p for p in sources.source_paths(c, split or "train") if p in kept)]


def build(p: beam.Pipeline, c, inputs: list[tuple], out: str, per_shard: int) -> None:
    """The pipeline's transforms on `p` (module docstring)."""
    row_len, packing = c.seq_len + 1, c.packing
    docs = p | "Files" >> beam.Create(inputs) | "Read" >> beam.FlatMap(_read, c)
    held = (docs | "Digest" >> beam.Map(lambda kv: (sources.digest(kv[1]), kv[0]))
            | "Smallest" >> beam.combiners.Top.Smallest(0 if c.val_path else c.val_docs)
            | "Held" >> beam.Map(lambda smallest: frozenset(key for _, key in smallest)))
    records = (docs | "Spread" >> beam.Reshuffle()
               | "Tokenise" >> beam.ParDo(_Tokenise(os.path.join(out, rows.TOKENIZER), c.seq_len, packing),
                                          held=beam.pvalue.AsSingleton(held)))
    spans = records | "Spans" >> beam.Map(lambda kv: (kv[0][:2], (kv[0][2], len(kv[1]) if packing else 1)))
    offsets = spans | "ByFile" >> beam.GroupByKey() | "InFile" >> beam.FlatMap(_offsets_in_file)
    table = (spans | "FileSpan" >> beam.Map(lambda kv: (kv[0], kv[1][1])) | "FileTotal" >> beam.CombinePerKey(sum)
             | "Totals" >> beam.combiners.ToList() | "Starts" >> beam.Map(_file_starts))
    shards = ({"record": records, "offset": offsets} | "Join" >> beam.CoGroupByKey()
              | "Pieces" >> beam.FlatMap(_pieces, beam.pvalue.AsSingleton(table), row_len, packing, per_shard)
              | "ByShard" >> beam.GroupByKey() | "Write" >> beam.Map(_write_shard, out))
    documents = records | "Split" >> beam.Map(lambda kv: kv[0][0]) | "Documents" >> beam.combiners.Count.PerElement()
    _ = (shards | "Shards" >> beam.combiners.ToList()
         | "Counts" >> beam.Map(_write_splits, beam.pvalue.AsDict(documents), out))


def writer(runner: str, beam_args: list[str]):
    """The second pass of `prepare.prepare` on Beam's `runner` with Beam's pipeline options `beam_args`."""

    def write(c, plan, tok, out, workers, records_per_shard, say) -> dict:
        if c.source in ("tfds", "hf"):
            raise ConfigError(f"data.source: --runner prepares stdlib, text or jsonl, not {c.source!r}")
        counter = progress.Progress(f"prepare: {runner}", say)
        with beam.Pipeline(options=PipelineOptions([f"--runner={runner}", *beam_args])) as p:
            build(p, c, _inputs(c, plan), out, records_per_shard)
        path = os.path.join(out, SPLITS)
        with open(path) as f:
            splits = json.load(f)
        os.unlink(path)
        counter.done(**{k: sum(s[k] for s in splits.values()) for k in ("documents", "tokens")})
        return prepare.write_manifest(c, tok, records_per_shard, plan.files, splits, out)

    return write

