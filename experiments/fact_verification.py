"""Experiment 3a: fact verification on VitaminC claims (accuracy), zero-shot vs our Stage-II model.

The blend's `vitaminc_claim_ranking` component trained on 400 VitaminC rows (as claim-evidence *relevance*, never
verification); this script samples claims from the other rows of BIG-bench's vitaminc_fact_verification task
whose label is True (SUPPORTS) or False (REFUTES), seeded, and gives each claim its own evidence sentence as the
one passage (`retriever="given"`), so the number measures verification, not retrieval. The prompt is the paper's
FEVER prompt (App. D): "Answer the following question with True or False. Is the claim '{claim}' correct?",
greedy, max 8 new tokens; accuracy counts the first word of the answer (anything but True/False is wrong).

    python experiments/fact_verification.py --claims 100 --seed 0 [--tuned /tmp/ev/stage2_smollm2_12steps/hf]

Writes experiments/results/fact_verification.{md,json}; the claims file goes to RUNS_DIR/vitaminc_heldout.jsonl.
"""

import argparse
import json
import pathlib
import random

import common
from rankrag_jax import assets
from rankrag_jax.data import blend, readers, sources


def build_claims(path: pathlib.Path, count: int, seed: int) -> dict:
  """Writes `count` balanced True/False VitaminC claims not used by the blend; returns statistics."""
  used = {json.loads(line)["id"] for line in
          (assets.cache_root() / "default_blend" / "vitaminc_claim_ranking.jsonl").read_text().splitlines()}
  task = pathlib.Path(assets.asset_file("bigbench")) / blend.SOURCE_FILES["vitaminc"]
  by_label = {True: [], False: []}
  for row in readers.read_bigbench_task(task, on_error="skip"):
    label = max(row["target_scores"], key=row["target_scores"].get)
    if row["id"] in used or label == "Neither":
      continue
    record = sources.detokenize_vitaminc(sources.parse_vitaminc(row))
    by_label[label == "True"].append({"id": row["id"], "claim": record["claim"].strip(),
                                      "label": label == "True",
                                      "ctxs": [{"id": row["id"] + "/evidence", "title": "",
                                                "text": record["evidence"].strip()}]})
  rng = random.Random(f"{seed}/vitaminc_heldout")
  chosen = rng.sample(by_label[True], count // 2) + rng.sample(by_label[False], count - count // 2)
  rng.shuffle(chosen)
  readers.write_jsonl(path, chosen)
  return {"claims": len(chosen), "true": sum(c["label"] for c in chosen), "excluded_training_rows": len(used),
          "pool_true": len(by_label[True]), "pool_false": len(by_label[False]), "seed": seed}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs_dir", default=common.DEFAULT_RUNS_DIR)
  parser.add_argument("--claims", type=int, default=100)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tuned", default=None)
  parser.add_argument("--no_run", action="store_true")
  args = parser.parse_args()

  dataset = pathlib.Path(args.runs_dir) / "vitaminc_heldout.jsonl"
  dataset.parent.mkdir(parents=True, exist_ok=True)
  stats = build_claims(dataset, args.claims, args.seed)
  models = {"vitaminc_zs": (common.ZERO_SHOT, "SmolLM2-135M-Instruct zero-shot", "chatqa"),
            "vitaminc_zsct": (common.ZERO_SHOT, "SmolLM2-135M-Instruct zero-shot, its chat template",
                              "chat_template")}
  if args.tuned:
    models["vitaminc_tuned"] = (args.tuned, "SmolLM2-135M + our Stage-II", "chatqa")
  results, rows = {"data": stats, "systems": {}}, []
  for name, (checkpoint, label, chat_format) in models.items():
    if not args.no_run:
      common.run_system(args.runs_dir, name, dict(checkpoint=checkpoint, retriever="given", n=1, k=1,
                                                  use_reranker=False, task="fever", chat_format=chat_format),
                        None, dataset=str(dataset), corpus=None)
    records = common.read_predictions(args.runs_dir, name)
    if not records:
      continue
    first_words = [(r["answer"].split() or [""])[0].strip(".,!").lower() for r in records]
    entry = {"label": label, "examples": len(records), "accuracy": common.mean(r["metrics"]["Acc"] for r in records),
             "answered_true": sum(w == "true" for w in first_words),
             "answered_false": sum(w == "false" for w in first_words),
             "answered_other": sum(w not in ("true", "false") for w in first_words),
             "mean_generate_s": sum(r["generate_s"] for r in records) / len(records)}
    results["systems"][name] = entry
    rows.append([label, entry["examples"], common.fmt(entry["accuracy"]), entry["answered_true"],
                 entry["answered_false"], entry["answered_other"]])
  text = ("# Fact verification on held-out VitaminC claims\n\n"
          f"{stats['claims']} claims ({stats['true']} True / {stats['claims'] - stats['true']} False; seed "
          f"{stats['seed']}), none of the {stats['excluded_training_rows']} rows the blend trained on; each with its "
          "own evidence sentence as the only passage. Chance = 50%.\n\n"
          + common.markdown_table(["system", "claims", "accuracy", "said True", "said False", "said other"], rows))
  (common.RESULTS_DIR / "fact_verification.md").write_text(text)
  (common.RESULTS_DIR / "fact_verification.json").write_text(json.dumps(results, indent=1) + "\n")
  print(text)


if __name__ == "__main__":
  main()
