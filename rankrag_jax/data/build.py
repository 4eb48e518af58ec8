"""Builds a blend (the embedded default one, or the paper's: gin_configs/data/paper_blend.gin) and prints its statistics.

    python -m rankrag_jax.data.build --gin_file=gin_configs/data/default_blend.gin \
        [--gin_bindings="MAX_LENGTH = 4096"] [--gin_bindings="build_default_blend.sizes = {'nq_context_ranking': 2000}"]
    python -m rankrag_jax.data.build --gin_file=gin_configs/data/paper_blend.gin --gin_bindings="DROP_PATH = '...'" ...

Which blend: `blend.build_blend.builder` (Gin; default `blend.build_default_blend`).

Writes the blend (`blend.build_default_blend`: `{component}.jsonl`, corpus.jsonl, heldout.jsonl, manifest.json)
into `register_blend_tasks.data_dir` (default: $RANKRAG_JAX_CACHE/default_blend), then tokenises every example
exactly as the SeqIO Tasks will (same tokenizer, chat format, max_length and split, all read from the
`register_blend_tasks` Gin bindings) and prints, per component: examples per split, token-length percentiles before
truncation (p50/p90/p99/max), how many examples had passages truncated or were dropped at `max_length`, and the
label balance of ranking components; then the corpus, the NQ question counts and the BM25 answer-Recall@1/5/20/100
of the training and held-out questions over the corpus (from manifest.json). The statistics are also written to
`{data_dir}/stats.json`.
"""

import collections
import inspect
import json
import pathlib
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
import gin
import numpy as np
import tqdm

from rankrag_jax import cli
from rankrag_jax import tokenizer as tokenizer_lib
from rankrag_jax.data import blend
from rankrag_jax.data import packing
from rankrag_jax.data import tasks

STATS_FILE = "stats.json"
PERCENTILES = (50, 90, 99)

_STATS_ONLY = flags.DEFINE_bool("stats_only", False, "Do not rebuild; only recompute statistics of data_dir.")


def blend_settings() -> dict[str, Any]:
  """The arguments `register_blend_tasks` will run with: its defaults overridden by the Gin bindings."""
  signature = inspect.signature(tasks.register_blend_tasks)
  settings = {name: p.default for name, p in signature.parameters.items()}
  settings.update(gin.get_bindings(tasks.register_blend_tasks))
  settings["data_dir"] = str(settings["data_dir"] or tasks.default_blend_dir())
  settings["tokenizer_path"] = str(settings["tokenizer_path"] or tasks.default_tokenizer_path())
  return settings


def _label_name(label) -> str | None:
  if isinstance(label, bool):
    return str(label)
  if isinstance(label, list):
    return f"{len(label)} relevant"
  return None


def component_stats(examples: Sequence[Mapping[str, Any]], tokenizer, max_length: int, chat_format: str,
                    validation_fraction: float, progress: tqdm.tqdm) -> dict[str, Any]:
  """Per-component counts, token-length percentiles, truncation/drop counts and label balance."""
  lengths, splits, labels = [], collections.Counter(), collections.Counter()
  truncated = dropped = kept_tokens = 0
  for example in examples:
    splits[tasks.split_of(example, validation_fraction)] += 1
    label = _label_name(example.get("label"))
    if label is not None:
      labels[label] += 1
    try:
      tokenized = packing.tokenize_example(example, tokenizer, max_length, chat_format)
    except packing.ExampleTooLongError as e:
      dropped += 1
      logging.warning("dropped: %s", e)
    else:
      lengths.append(tokenized["num_untruncated_tokens"])
      truncated += int(tokenized["truncated"])
      kept_tokens += len(tokenized["targets"])
    progress.update(1)
  stats = {"examples": len(examples), **{f"{split}_examples": splits[split] for split in tasks.SPLITS},
           "truncated": truncated, "dropped": dropped, "tokens": kept_tokens}
  if lengths:
    stats["untruncated_length"] = {**{f"p{q}": int(np.percentile(lengths, q)) for q in PERCENTILES},
                                   "max": int(max(lengths))}
  if labels:
    stats["labels"] = dict(sorted(labels.items()))
  return stats


def compute_stats(data_dir: str, tokenizer_path: str, chat_format: str, max_length: int,
                  validation_fraction: float, **unused_settings) -> dict[str, Any]:
  """Tokenises every component of `data_dir` as the SeqIO Tasks do; returns the statistics."""
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
  data_dir = pathlib.Path(data_dir)
  components = {c: tasks.read_component(data_dir, c) for c in tasks.blend_components(str(data_dir))}
  with tqdm.tqdm(total=sum(map(len, components.values())), desc="tokenising", unit="ex") as progress:
    per_component = {c: component_stats(examples, tokenizer, max_length, chat_format, validation_fraction, progress)
                     for c, examples in components.items()}
  totals = {key: sum(s[key] for s in per_component.values())
            for key in ("examples", "train_examples", "validation_examples", "truncated", "dropped", "tokens")}
  return {"data_dir": str(data_dir), "tokenizer_path": tokenizer_path, "chat_format": chat_format,
          "max_length": max_length, "validation_fraction": validation_fraction, "components": per_component,
          "total": totals,
          # A lower bound on packed rows per epoch (packing is greedy, so real rows are somewhat more).
          "min_packed_rows_per_epoch": -(-totals["tokens"] // max_length)}


def format_stats(stats: Mapping[str, Any]) -> str:
  """A table: one line per component, then the totals."""
  header = (f"{'component':28s} {'train':>6s} {'valid':>6s} {'p50':>6s} {'p90':>6s} {'p99':>6s} {'max':>6s} "
            f"{'trunc':>6s} {'drop':>5s}  labels")
  lines = [f"blend {stats['data_dir']}  tokenizer {pathlib.Path(stats['tokenizer_path']).name}  "
           f"chat_format {stats['chat_format']}  max_length {stats['max_length']}", header, "-" * len(header)]
  for component, s in stats["components"].items():
    length = s.get("untruncated_length", {})
    cells = [f"{length.get(k, '-'):>6}" for k in ("p50", "p90", "p99", "max")]
    labels = " ".join(f"{k}:{v}" for k, v in s.get("labels", {}).items())
    lines.append(f"{component:28s} {s['train_examples']:6d} {s['validation_examples']:6d} {' '.join(cells)} "
                 f"{s['truncated']:6d} {s['dropped']:5d}  {labels}")
  total = stats["total"]
  lines.append("-" * len(header))
  lines.append(f"{'total':28s} {total['train_examples']:6d} {total['validation_examples']:6d} "
               f"{'':27s} {total['truncated']:6d} {total['dropped']:5d}  "
               f"{total['tokens']} tokens, >= {stats['min_packed_rows_per_epoch']} packed rows/epoch")
  lines.append("(p50..max: tokens per example before passage truncation; trunc: passages cut to fit max_length; "
               "drop: could not fit, skipped)")
  return "\n".join(lines)


def format_sources(manifest: Mapping[str, Any]) -> str:
  """The corpus, the NQ question counts and the BM25 answer-Recall@k of the QA sets (the retrieval ceiling)."""
  corpus = manifest["corpus"]
  lines = ["corpus: " + ", ".join(f"{k} {v}" for k, v in corpus.items() if k != "count") +
           f" = {corpus['count']} passages"]
  nq = manifest.get("nq_open", {})
  if nq:
    lines.append(f"NQ-open: {nq['train_questions']} training questions, {nq['with_positive_in_bm25_top']} with an "
                 f"answer passage in the BM25 top {manifest['positive_depth']} (the training questions); "
                 f"{nq['heldout_questions']} held out (EfficientQA test)")
  coverage = manifest.get("bm25_answer_recall", {})
  if coverage:
    depths = [k for k in next(iter(coverage.values())) if k.startswith("recall@")]
    lines.append(f"BM25 answer-Recall over the corpus  {'questions':>9s} " + " ".join(f"{d:>10s}" for d in depths))
    for split, row in coverage.items():
      lines.append(f"  {split:33s} {row['questions']:9d} " + " ".join(f"{100 * row[d]:9.1f}%" for d in depths))
  skipped = manifest.get("skipped_malformed_rows", {})
  if skipped:
    lines.append("skipped malformed source rows: " + "; ".join(f"{k}: {v['count']}" for k, v in skipped.items()))
  return "\n".join(lines)


def build_and_report(stats_only: bool = False) -> dict[str, Any]:
  """Builds the blend (unless `stats_only`), computes, prints and writes its statistics."""
  settings = blend_settings()
  data_dir = pathlib.Path(settings["data_dir"])
  if not stats_only:
    manifest = blend.build_blend(data_dir)  # which blend, sizes, seed, paths: Gin (build_blend.*, build_*_blend.*).
    print(f"built {len(manifest['components'])} components into {data_dir}")
  stats = compute_stats(**settings)
  print(format_stats(stats))
  manifest_path = data_dir / "manifest.json"
  if manifest_path.is_file():
    print(format_sources(json.loads(manifest_path.read_text())))
  (data_dir / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
  print(f"statistics written to {data_dir / STATS_FILE}")
  return stats


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cli.parse_gin(finalize=False)  # includes resolve from the repository root too, from any directory.
  build_and_report(_STATS_ONLY.value)


if __name__ == "__main__":
  app.run(main)
