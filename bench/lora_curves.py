"""Ranking learning curves of several runs lined up by training wall time (issue #32: LoRA vs full fine-tuning).

    python bench/lora_curves.py runs/rank_smollm2_cpu runs/lora_smollm2_cpu

Reads each run's metrics.jsonl: the training time to a step is the sum of the train rows'
seconds_per_step up to it (compilation, evaluation and checkpointing excluded, as the loop's clock excludes them);
each evaluation row (held-out loss, rank/auc, rank/recall@k, qa/em) is printed at that time, so curves of runs
whose steps cost differently compare at equal budgets.
"""

import json
import pathlib
import sys

COLUMNS = (("eval/loss", "held-out loss"), ("rank/auc", "AUC"), ("rank/auc_on_topic", "on-topic AUC"),
           ("rank/recall@1", "R@1"), ("rank/recall@5", "R@5"),
           ("qa/em", "EM"))


def curve(model_dir: str) -> list[tuple[int, float, dict]]:
  """[(step, training seconds up to it, its evaluation metrics)] for a run directory.

  Read line by line (not `metrics.read_metrics`, which keeps one row per step and kind, and would let a step's
  ranking row replace its training row): per step, the last training row's seconds_per_step (a resumed run may
  have repeated steps) and every evaluation key written at that step."""
  seconds_per_step, evaluations = {}, {}
  for line in (pathlib.Path(model_dir) / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "loss" in row and "seconds_per_step" in row:
      seconds_per_step[row["step"]] = row["seconds_per_step"]
    found = {key: row[key] for key, _ in COLUMNS if key in row}
    if found:
      evaluations.setdefault(row["step"], {}).update(found)
  out = []
  for step in sorted(evaluations):
    out.append((step, sum(s for k, s in seconds_per_step.items() if k <= step), evaluations[step]))
  return out


def main(model_dirs: list[str]) -> None:
  print("| run | step | train seconds | " + " | ".join(name for _, name in COLUMNS) + " |")
  print("|---|---|---|" + "---|" * len(COLUMNS))
  for model_dir in model_dirs:
    for step, seconds, row in curve(model_dir):
      values = " | ".join(f"{row[key]:.3f}" if key in row else "" for key, _ in COLUMNS)
      print(f"| {pathlib.Path(model_dir).name} | {step} | {seconds:,.0f} | {values} |")


if __name__ == "__main__":
  main(sys.argv[1:])
