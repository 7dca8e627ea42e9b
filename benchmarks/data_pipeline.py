"""Tokens/s of the input pipeline alone (no model), on the embedded stdlib corpus by default.

  python benchmarks/data_pipeline.py [--batches 200] [--batch-size 64] [--seq-len 256]
  python benchmarks/data_pipeline.py --source text --path FILE [--doc-split blank_line|line]

Trains (or reuses) a tokenizer in --workdir, then times `make_pipeline` batches for each mode and
thread/worker setting and prints a table. Tokens = batch x seq_len input positions per batch.
"""

import argparse
import itertools
import os
import time

from colax import data
from colax import tokenizer as tk


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
    p.add_argument("--source", default="stdlib", help="data.source: stdlib, text or jsonl")
    p.add_argument("--path", default="", help="data.path for text / jsonl")
    p.add_argument("--doc-split", default="blank_line", help="data.doc_split for text")
    p.add_argument("--workdir", default="/tmp/colax_bench_data")
    args = p.parse_args()
    cfg = data.defaults()
    cfg.update(seq_len=args.seq_len, source=args.source, path=args.path, doc_split=args.doc_split,
               tokenizer_vocab_size=8000)
    tok = tk.get_or_train_tokenizer(cfg, os.path.join(args.workdir, args.source))
    print(f"{args.source} corpus {args.path}, tokenizer {tok.vocab_size} pieces, batch {args.batch_size} x "
          f"{args.seq_len}, {args.batches} batches, {os.cpu_count()} CPUs")
    print(f"{'mode':<8} {'read_threads':>12} {'worker_count':>12} {'tokens/s':>12}")
    for packing, threads, workers in [(False, 1, 0), (False, 4, 0), (False, 4, 2),
                                      (True, 1, 0), (True, 4, 0), (True, 4, 2)]:
        cfg.update(packing=packing, read_threads=threads, worker_count=workers)
        rate = tokens_per_s(cfg, tok, args.batches, args.batch_size)
        print(f"{'packed' if packing else 'paper':<8} {threads:>12} {workers:>12} {rate:>12,.0f}")


if __name__ == "__main__":
    main()
