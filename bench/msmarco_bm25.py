"""MS MARCO-scale BM25 for the paper blend: streamed index build + negative mining, time and peak memory.

    python bench/msmarco_bm25.py --passages 200000 --queries 2000 [--tsv /tmp/msmarco_synth.tsv]

Writes a synthetic `collection.tsv` (pid \\t passage; MS MARCO's shape: ~56 words per passage, Zipf-distributed
words over a 300k vocabulary so that the vocabulary grows as in real text) unless --tsv exists, then times
`paper_sources.build_tsv_bm25_index` and `negatives.retrieve_bm25_contexts` over it and prints throughput, peak
RSS (resource.getrusage) and a linear extrapolation to the real 8,841,823 passages. Not a test: data in /tmp only.
"""

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rankrag_jax.data import negatives, paper_sources  # pylint: disable=wrong-import-position

MSMARCO_PASSAGES = 8_841_823


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def current_rss_gib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def write_collection(path: str, passages: int, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  words = np.array([f"w{i}" for i in range(300_000)])
  with open(path, "w") as f:
    for start in range(0, passages, 10_000):
      n = min(10_000, passages - start)
      lengths = rng.integers(30, 85, n)  # mean ~56 words, as MS MARCO's passages
      ids = np.minimum(rng.zipf(1.3, lengths.sum()) - 1, len(words) - 1)
      text = words[ids]
      for i, (a, b) in enumerate(zip(np.r_[0, np.cumsum(lengths)[:-1]], np.cumsum(lengths))):
        f.write(f"{start + i}\t{' '.join(text[a:b])}\n")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--passages", type=int, default=200_000)
  parser.add_argument("--queries", type=int, default=2_000)
  parser.add_argument("--tsv", default="/tmp/msmarco_synth.tsv")
  args = parser.parse_args()
  if not os.path.exists(args.tsv):
    write_collection(args.tsv, args.passages)
  base = current_rss_gib()
  start = time.time()
  index = paper_sources.build_tsv_bm25_index(args.tsv, "msmarco", limit=args.passages)
  build_s = time.time() - start
  build_peak = peak_rss_gib()
  held = current_rss_gib()
  n = len(index.corpus)
  rng = np.random.default_rng(1)
  queries = [" ".join(index.corpus[int(r)]["text"].split()[:6]) for r in rng.integers(0, n, args.queries)]
  start = time.time()
  negatives.retrieve_bm25_contexts(queries, None, 1, index=index, gold_ids=[[] for _ in queries])
  mine_s = time.time() - start
  scale = MSMARCO_PASSAGES / n
  print(f"passages {n}  file {os.path.getsize(args.tsv) / 2**20:.0f} MiB  nnz {len(index.retriever.scores['data'])}")
  print(f"index build  {build_s:.1f} s = {n / build_s:,.0f} passages/s   peak RSS {build_peak:.2f} GiB "
        f"(process before {base:.2f} GiB; index held after build {held - base:.2f} GiB)")
  print(f"mining       {args.queries / mine_s:,.1f} queries/s (k=1, search depth 24, 1 thread)")
  print(f"extrapolated to {MSMARCO_PASSAGES:,} passages (linear): build {build_s * scale / 3600:.1f} h, "
        f"peak RSS {base + (build_peak - base) * scale:.1f} GiB, held {(held - base) * scale:.1f} GiB, "
        f"mining {args.queries / mine_s / scale:,.1f} queries/s")


if __name__ == "__main__":
  main()
