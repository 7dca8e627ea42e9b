"""Tokens/s of the input pipeline alone (no model), on the embedded stdlib corpus by default.

  python benchmarks/data_pipeline.py [--batches 200] [--batch-size 64] [--seq-len 256]
  python benchmarks/data_pipeline.py --source text --path FILE [--doc-split blank_line|line]
  python benchmarks/data_pipeline.py --source prepared --path DIR [--prepared-index disk]  # `colax.data prepare`'s

Trains (or reuses) a tokenizer in --workdir, then times `make_pipeline` batches for each mode and
thread/worker setting and prints a table (prepared shards: their row mode and tokenizer) and the
process's peak RSS. Tokens = batch x seq_len input positions per batch.
Then prints how many distinct documents a packed batch of --mix-batch rows spans: the training
pipeline's (a global permutation of the packed rows), consecutive rows (data.shuffle=False), and
uniform sampling of the epoch's rows.
"""

import argparse
import hashlib
import itertools
import os
import resource
import time

import numpy as np

from colax import data, rows
from colax import tokenizer as tk


class DocIdTokenizer:
    """Wraps a tokenizer: a document becomes its id repeated once per token it encodes to.

    Rows keep the packing layout of `tok` while every token names its document (an int >= 2
    from a 31-bit hash of the text, so identical documents share one id); EOS stays `tok.eos_id`.
    """

    def __init__(self, tok):
        self._tok = tok
        self.vocab_size, self.pad_id, self.eos_id, self.bos_id = tok.vocab_size, tok.pad_id, tok.eos_id, -1

    def encode(self, text: str) -> list[int]:
        doc = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest()) % (2**31 - 2) + 2
        return [doc] * len(self._tok.encode(text))


def _row_documents(batch) -> list[set]:
    """The set of document ids (tokens >= 2 of a DocIdTokenizer) in each row of a batch."""
    return [set(row[row >= 2].tolist()) for row in batch["inputs"]]


def _batch_documents(cfg, tok, batches: int, batch_size: int) -> list[set]:
    """The set of document ids in each of the first `batches` packed training batches.

    `cfg` is a `config.data` with packing on; `tok` any tokenizer (wrapped in DocIdTokenizer).
    """
    it = data.make_pipeline(cfg, DocIdTokenizer(tok), split="train", global_batch_size=batch_size,
                            process_index=0, process_count=1)
    return [set().union(*_row_documents(b)) for b in itertools.islice(it, batches)]


def documents_per_batch(cfg, tok, batches: int, batch_size: int) -> float:
    """Mean number of distinct documents in the first `batches` packed training batches."""
    return float(np.mean([len(d) for d in _batch_documents(cfg, tok, batches, batch_size)]))


def documents_seen(cfg, tok, steps: list[int], batch_size: int) -> dict[int, int]:
    """{k: distinct documents in the first k packed training batches} for each k in `steps`."""
    seen, counts = set(), {}
    for k, docs in enumerate(_batch_documents(cfg, tok, max(steps), batch_size), start=1):
        seen |= docs
        if k in steps:
            counts[k] = len(seen)
    return counts


def uniform_documents_per_batch(cfg, tok, batch_size: int, draws: int = 2000, seed: int = 0) -> float:
    """Mean distinct documents in `batch_size` rows drawn uniformly without replacement from one
    epoch of packed training rows (`draws` Monte Carlo batches)."""
    one_epoch = cfg.copy_and_resolve_references()
    one_epoch.update(shuffle=False)
    rows = [r for b in data.make_pipeline(one_epoch, DocIdTokenizer(tok), split="train", global_batch_size=1,
                                          process_index=0, process_count=1, num_epochs=1)
            for r in _row_documents(b)]
    rng = np.random.default_rng(seed)
    return float(np.mean([len(set().union(*(rows[i] for i in rng.choice(len(rows), batch_size, replace=False))))
                          for _ in range(draws)]))


def tokens_per_s(cfg, tok, batches, batch_size):
    it = data.make_pipeline(cfg, tok, split="train", global_batch_size=batch_size,
                            process_index=0, process_count=1)
    next(it)  # start-up (threads, first reads) is not timed
    start = time.perf_counter()
    for _ in itertools.islice(it, batches):
        pass
    return batches * batch_size * cfg.seq_len / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--source", default="stdlib", help="data.source: stdlib, text, jsonl or prepared")
    p.add_argument("--path", default="", help="data.path for text / jsonl / prepared")
    p.add_argument("--doc-split", default="blank_line", help="data.doc_split for text")
    p.add_argument("--prepared-index", default="memory", help="data.prepared_index for prepared: memory or disk")
    p.add_argument("--workdir", default="/tmp/colax_bench_data")
    p.add_argument("--mix-batch", type=int, default=16, help="rows per batch for the documents-per-batch table")
    p.add_argument("--mix-batches", type=int, default=50, help="batches averaged for it")
    args = p.parse_args()
    cfg = data.defaults()
    cfg.update(seq_len=args.seq_len, source=args.source, path=args.path, doc_split=args.doc_split,
               prepared_index=args.prepared_index, tokenizer_vocab_size=8000)
    modes = [(False, 1, 0), (False, 4, 0), (False, 4, 2), (True, 1, 0), (True, 4, 0), (True, 4, 2)]
    if args.source == "prepared":  # the shards' row mode and tokenizer
        manifest = rows.read_manifest(args.path)
        cfg.update(seq_len=manifest["seq_len"], packing=manifest["rows"] == "packed")
        modes = [m for m in modes if m[0] == cfg.packing]
    tok = tk.get_or_train_tokenizer(cfg, os.path.join(args.workdir, args.source))
    print(f"{args.source} corpus {args.path}, tokenizer {tok.vocab_size} pieces, batch {args.batch_size} x "
          f"{args.seq_len}, {args.batches} batches, {os.cpu_count()} CPUs")
    print(f"{'mode':<8} {'read_threads':>12} {'worker_count':>12} {'tokens/s':>12}")
    for packing, threads, workers in modes:
        cfg.update(packing=packing, read_threads=threads, worker_count=workers)
        rate = tokens_per_s(cfg, tok, args.batches, args.batch_size)
        print(f"{'packed' if packing else 'paper':<8} {threads:>12} {workers:>12} {rate:>12,.0f}")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")
    if args.source == "prepared":  # records hold token ids: documents cannot be told apart
        return
    cfg.update(packing=True, read_threads=4, worker_count=0)
    print(f"distinct documents per packed batch of {args.mix_batch} rows (mean of {args.mix_batches} batches)")
    print(f"{'rows':>18} {'documents':>10}")
    print(f"{'pipeline':>18} {documents_per_batch(cfg, tok, args.mix_batches, args.mix_batch):>10.1f}")
    print(f"{'uniform':>18} {uniform_documents_per_batch(cfg, tok, args.mix_batch):>10.1f}")
    cfg.update(shuffle=False)
    print(f"{'consecutive':>18} {documents_per_batch(cfg, tok, args.mix_batches, args.mix_batch):>10.1f}")


if __name__ == "__main__":
    main()
