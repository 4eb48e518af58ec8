"""Issue #34's EM/F1 with and without reranking on the whole held-out split (EfficientQA test, 1,769 questions).

    python experiments/heldout_qa.py --checkpoint runs/rank_i/hf \
        --ranking runs/heldout/heldout_tuned_runs_rank_i_hf_n20 [--runs_dir runs/heldout_qa_rank_i] [--skip_others]
    python experiments/heldout_qa.py ... --no_run   # the table from the predictions so far (e.g. after a kill)
    python experiments/heldout_qa.py --checkpoint runs/rank_i/hf --others 328:1464   # a slice of the others only
    python experiments/heldout_qa.py --checkpoint runs/rank_i/hf --n 100 --skip_others \
        --ranking runs/heldout/heldout_tuned_runs_rank_i_hf_n100   # reranking BM25's top 100, rerankable only

One model answers every question (greedy, 32 new tokens, the paper's prompt) from five passages:
  without reranking  BM25's own top 5 (the paper's Table 3 "w/o reranking" ablation);
  with reranking     the top 5 of BM25's top N (--n, default 20) reordered by the same model's P("True").
The questions with an answer passage in BM25's top N ("rerankable", the only ones whose answer-Recall reranking
can change) reuse `heldout_ranking.py`'s predictions for that checkpoint (--ranking: the same scores, not computed
twice); the other questions are scored here (~4 s each on this CPU), resumably: a stopped run keeps its answers,
and the table says how many questions each row covers. EM/F1 are compared on the questions both systems answered.
--others START:END answers only that slice of the other questions (run order), both ways, and needs no ranking run
(the rerankable set is BM25's, `heldout_ranking.rerankable_subset`): the others' ~1.6 h split across sessions or
machines, each slice with its own row. Once a checkpoint's rows cover the others from the first one on with no gap,
a '<checkpoint> together' row sums them (question-weighted, from the unrounded means): the whole split when they
reach the last.

Writes experiments/results/heldout_qa.{md,json}.
"""

import argparse
import json
import pathlib
import time

import common
import heldout_ranking

from rankrag_jax import eval_outputs
from rankrag_jax import evaluate
from rankrag_jax.retrieval import corpus as corpus_lib

DEFAULT_N, K = 20, 5


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> str:
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
  return str(path)


def ranked_rows(ranking_dir: pathlib.Path, checkpoint: str, corpus: corpus_lib.Corpus, n: int) -> list[dict]:
  """The rerankable questions with the top K of their reranked top n as `ctxs` (retriever "given"), from a
  ranking run (the generator reads K passages: the rest would only fill the dataset file)."""
  if not (ranking_dir / "run.json").is_file():
    raise SystemExit(f"--ranking: {ranking_dir / 'run.json'} does not exist (an unfinished ranking run?)")
  info = json.loads((ranking_dir / "run.json").read_text())
  if (info["checkpoint"], info["n"], info["retriever"], info["use_reranker"]) != (checkpoint, n, "bm25", True):
    raise SystemExit(f"--ranking {ranking_dir}: made by checkpoint={info['checkpoint']!r} n={info['n']} "
                     f"retriever={info['retriever']!r} reranked={info['use_reranker']}; expected {checkpoint!r}, "
                     f"{n}, 'bm25', True")
  row_of = {passage_id: row for row, passage_id in enumerate(corpus.ids)}
  rows = []
  for line_no, line in enumerate((ranking_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines(), 1):
    try:
      record = json.loads(line)
      unknown = [c["id"] for c in record["ranked"] if c["id"] not in row_of]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise SystemExit(f"{ranking_dir / 'predictions.jsonl'}:{line_no}: not a prediction row with 'ranked' passage "
                       f"ids ({e})") from None
    if unknown:
      raise SystemExit(f"{ranking_dir / 'predictions.jsonl'}:{line_no}: passage ids not in the corpus: {unknown[:3]}")
    ctxs = [{"id": c["id"], "title": corpus.titles[row_of[c["id"]]], "text": corpus.texts[row_of[c["id"]]]}
            for c in record["ranked"][:K]]
    rows.append({"id": record["id"], "question": record["question"], "answers": record["answers"], "ctxs": ctxs})
  return rows


def _parse_slice(text: str) -> slice:
  try:
    start, end = (int(v) for v in text.split(":"))
  except ValueError:
    raise SystemExit(f"--others {text!r}: expected START:END, two integers") from None
  if not 0 <= start < end:
    raise SystemExit(f"--others {text!r}: expected 0 <= START < END")
  return slice(start, end)


def summarise(runs_dir: pathlib.Path, rerankable: set[str], names: dict[str, list[str]]) -> dict:
  """EM/F1 per system over the questions every system answered, split by rerankable or not."""
  records = {system: {r["id"]: r for part in parts for r in common.read_predictions(str(runs_dir), part)}
             for system, parts in names.items()}
  shared = set.intersection(*(set(r) for r in records.values()))
  out = {}
  for system, by_id in records.items():
    entry = {}
    for label, ids in (("all", shared), ("rerankable", shared & rerankable), ("others", shared - rerankable)):
      entry[label] = {"questions": len(ids), "EM": common.mean(by_id[i]["metrics"]["EM"] for i in ids),
                      "F1": common.mean(by_id[i]["metrics"]["F1"] for i in ids)}
    out[system] = entry
  return out


def row_name(checkpoint: str, n: int) -> str:
  """A results row's name: the checkpoint, and the candidate depth where it is not the default top 20."""
  return checkpoint + (f" n{n}" if n != DEFAULT_N else "")


def others_range(result: dict) -> tuple[int, int]:
  """Which of the others (run order) a results row answered both ways: its --others slice, else the first ones."""
  if result.get("others"):
    start, end = (int(v) for v in result["others"].split(":"))
    return start, start + next(iter(result["systems"].values()))["others"]["questions"]
  return 0, next(iter(result["systems"].values()))["others"]["questions"]


def combine_rows(everything: dict) -> dict:
  """Per checkpoint, its rows summed question-weighted (exact: the JSON keeps unrounded means), where their
  slices of the others follow each other with no gap or overlap; one row per checkpoint and depth n, keyed
  '<ckpt>[ n<n>] together'."""
  combined = {}
  by_checkpoint = {}
  for key, result in everything.items():
    if "combined_from" not in result:  # (rows before --n have no "n": they reranked the top 20)
      by_checkpoint.setdefault((result["checkpoint"], result.get("n", DEFAULT_N)), []).append(
          (others_range(result), key, result))
  for (checkpoint, n), parts in by_checkpoint.items():
    parts.sort(key=lambda part: part[0])
    contiguous = all(a[0][1] == b[0][0] for a, b in zip(parts, parts[1:])) and parts[0][0][0] == 0
    if len(parts) < 2 or not contiguous or len({tuple(r["systems"]) for _, _, r in parts}) != 1:
      continue
    systems = {}
    for system in parts[0][2]["systems"]:
      systems[system] = {}
      for label in ("all", "rerankable", "others"):
        counted = [r["systems"][system][label] for _, _, r in parts if r["systems"][system][label]["questions"]]
        answered = sum(c["questions"] for c in counted)
        systems[system][label] = {"questions": answered, **{
            m: sum(c[m] * c["questions"] for c in counted) / answered if answered else None for m in ("EM", "F1")}}
    combined[f"{row_name(checkpoint, n)} together"] = {
        "checkpoint": checkpoint, "n": n, "combined_from": [key for _, key, _ in parts],
        "heldout_questions": parts[0][2]["heldout_questions"], "systems": systems}
  return combined


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="the tuned model (ranker and generator), e.g. an HF dir")
  parser.add_argument("--ranking", default=None, help="heldout_ranking.py's prediction directory for it")
  parser.add_argument("--runs_dir", default=None, help="default: runs/heldout_qa_<checkpoint's run name>"
                      "[_n<N>][_others<START>_<END>]")
  parser.add_argument("--n", type=int, default=DEFAULT_N, help="candidates reranked per question (BM25's top n)")
  parser.add_argument("--skip_others", action="store_true", help="answer only the rerankable questions, both ways "
                      "(the others' scoring is ~1.7 h here at n 20); the table says what was covered")
  parser.add_argument("--others", default=None, metavar="START:END", help="only this slice of the other "
                      "questions (run order), both ways; no --ranking needed")
  parser.add_argument("--limit", type=int, default=None, help="the first questions of each run only (a smoke test)")
  parser.add_argument("--no_run", action="store_true", help="only rebuild the table from the predictions so far")
  args = parser.parse_args()
  others_slice = _parse_slice(args.others) if args.others is not None else None
  if args.n < K:
    raise SystemExit(f"--n {args.n}: the generator reads the top {K}, so n must be at least {K}")
  if args.ranking is None and others_slice is None:
    raise SystemExit("--ranking is required (heldout_ranking.py's prediction directory), unless --others START:END")
  tag = (f"_n{args.n}" if args.n != DEFAULT_N else "") + (
      f"_others{others_slice.start}_{others_slice.stop}" if others_slice else "")
  runs_dir = pathlib.Path(args.runs_dir or f"runs/heldout_qa_{pathlib.Path(args.checkpoint).parent.name}{tag}")
  runs_dir.mkdir(parents=True, exist_ok=True)

  corpus = corpus_lib.read_corpus_jsonl(evaluate.resolve_path(common.CORPUS))
  if others_slice is None:
    ranking_dir = pathlib.Path(args.ranking)
    if not (ranking_dir / "predictions.jsonl").is_file():
      raise SystemExit(f"--ranking: {ranking_dir / 'predictions.jsonl'} does not exist")
    reranked = ranked_rows(ranking_dir, args.checkpoint, corpus, args.n)
    rerankable = {r["id"] for r in reranked}
  else:  # the rerankable set only, to leave it out: BM25's top N and the answers decide it, not the model
    subset = runs_dir / f"heldout_rerankable_n{args.n}.jsonl"
    heldout_ranking.rerankable_subset(args.n, subset)
    reranked, rerankable = [], {json.loads(line)["id"] for line in subset.read_text().splitlines()}
  heldout = evaluate.read_eval_dataset(evaluate.resolve_path(common.HELDOUT))
  as_row = lambda r: {"id": r["id"], "question": r["question"], "answers": r["answers"]}
  others = [as_row(r) for r in heldout if r["id"] not in rerankable]
  if others_slice is not None:
    others = others[others_slice]
  # Rerankable questions first: a run stopped early has answered every question reranking can help.
  # (With --others, the slice alone.)
  ordered = ([as_row(r) for r in heldout if r["id"] in rerankable] if reranked else []) + (
      [] if args.skip_others else others)
  paths = {name: _write_jsonl(runs_dir / f"{name}.jsonl", rows) for name, rows in
           (("rerankable_reranked", reranked), ("others", others), ("all_rerankable_first", ordered))}

  shared = dict(corpus=common.CORPUS, checkpoint=args.checkpoint, k=K, chat_format="chatqa", generate_answers=True,
                recall_ks=(1, 5), show_progress=True)
  runs = [("without", dict(dataset=paths["all_rerankable_first"], retriever="bm25", n=K, use_reranker=False)),
          ("with_rerankable", dict(dataset=paths["rerankable_reranked"], retriever="given", n=args.n,
                                   use_reranker=False)),
          ("with_others", dict(dataset=paths["others"], retriever="bm25", n=args.n, use_reranker=True))]
  if others_slice is not None:  # the slow half first: a slice stopped early has every question with reranking
    runs = runs[::-1]
  walls = {}
  for name, settings in runs:
    if args.no_run or (name == "with_others" and args.skip_others) or (name == "with_rerankable" and not reranked):
      continue
    start = time.time()
    try:
      evaluate.run_evaluation(out_dir=str(runs_dir / name), system_name=name, limit=args.limit, **shared, **settings)
    except eval_outputs.EvalError as e:  # e.g. a runs_dir made by another slice: one line, no traceback
      raise SystemExit(str(e)) from None
    walls[name] = time.time() - start
  table = summarise(runs_dir, rerankable, {"without reranking (BM25 top 5)": ["without"],
                                           f"with reranking (top 5 of BM25 top {args.n} by P(True))":
                                           ["with_rerankable", "with_others"]})
  every = summarise(runs_dir, rerankable, {"without": ["without"], "with": ["with_rerankable", "with_others"]})
  result = {"checkpoint": args.checkpoint, "n": args.n, "ranking": args.ranking, "others": args.others,
            "heldout_questions": len(heldout),
            "rerankable": len(rerankable), "wall_s_this_call": walls, "systems": table,
            "without_reranking_every_answered_question": every["without"]["all"],
            "with_reranking_every_answered_question": every["with"]["all"]}
  if args.limit is not None:  # a smoke test: its numbers are not results.
    print(json.dumps(result, indent=1))
    return
  common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
  results_path = common.RESULTS_DIR / "heldout_qa.json"
  everything = json.loads(results_path.read_text()) if results_path.exists() else {}
  everything = {k: r for k, r in everything.items() if "combined_from" not in r}
  key = row_name(args.checkpoint, args.n) + (f" others[{args.others}]" if args.others else "")
  if args.no_run and key in everything:  # a rebuilt table keeps the wall times of the run that answered
    result["wall_s_this_call"] = everything[key]["wall_s_this_call"]
  everything[key] = result
  everything.update(combine_rows(everything))
  results_path.write_text(json.dumps(everything, indent=1) + "\n")
  lines = ["| generator (and ranker) | system | questions | EM | F1 | rerankable: questions, EM, F1 | "
           "others: questions, EM, F1 |", "|---|---|---|---|---|---|---|"]
  for checkpoint, r in everything.items():
    for system, e in r["systems"].items():
      cells = [f"{e[p]['questions']}, {common.fmt(e[p]['EM'])}, {common.fmt(e[p]['F1'])}"
               for p in ("rerankable", "others")]
      lines.append(f"| {checkpoint} | {system} | {e['all']['questions']} of {r['heldout_questions']} | "
                   f"{common.fmt(e['all']['EM'])} | {common.fmt(e['all']['F1'])} | {cells[0]} | {cells[1]} |")
    for system in ("without", "with"):
      w = r.get(f"{system}_reranking_every_answered_question")
      if w:  # (results of session 24 have only the first)
        lines.append(f"| {checkpoint} | {system} reranking, every question it answered | {w['questions']} of "
                     f"{r['heldout_questions']} | {common.fmt(w['EM'])} | {common.fmt(w['F1'])} | | |")
  (common.RESULTS_DIR / "heldout_qa.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
