"""Experiment 4: PNG plots from the result JSONs (Recall@k curves; reranking time vs N).

    python experiments/plots.py

Reads experiments/results/{ranking,rerank_time}.json; writes recall_at_k.png and rerank_time.png next to them.
"""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import common  # noqa: E402


def plot_recall(ranking: dict) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for name, scopes in ranking["systems"].items():
    entry = scopes.get("subset")
    if not entry:
      continue
    for ax, key in zip(axes, ("answer_recall", "gold_recall")):
      curve = entry["curve"][key]
      ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=entry["label"])
  for ax, title in zip(axes, ("answer Recall@k (a top-k passage contains an answer)",
                              "gold-passage Recall@k")):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("k")
    ax.set_xticks([1, 5, 10, 15, 20])
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("%")
  axes[0].legend(fontsize=7, loc="lower right")
  n = len(ranking["subset_ids"])
  fig.suptitle(f"Held-out split, {n} questions: reranking BM25's top-20", fontsize=11)
  fig.tight_layout()
  fig.savefig(common.RESULTS_DIR / "recall_at_k.png", dpi=120)


def plot_time(timing: dict) -> None:
  ns = sorted(int(n) for n in timing["per_n"])
  per = [timing["per_n"][str(n)] for n in ns]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  axes[0].plot(ns, [p["rerank_s"] for p in per], marker="o", label="rerank N passages")
  axes[0].axhline(sum(p["generate_s"] for p in per) / len(per), color="gray", ls="--", label="generate (top-5)")
  axes[0].set_xlabel("N (candidates reranked)")
  axes[0].set_ylabel("seconds per question")
  axes[0].legend(fontsize=8)
  axes[0].grid(alpha=0.3)
  axes[1].plot(ns, [p["relative_time"] for p in per], marker="o", label="ours: SmolLM2-135M, CPU")
  axes[1].plot([20, 100], [1.9, 7.0], marker="s", ls=":", label="paper Fig. 5 endpoints: 8B (1+0.9x, 1+6.0x)")
  axes[1].set_xlabel("N")
  axes[1].set_ylabel("time with / without reranking")
  axes[1].legend(fontsize=8)
  axes[1].grid(alpha=0.3)
  fig.suptitle("Reranking time vs N (Fig. 5 analogue)", fontsize=11)
  fig.tight_layout()
  fig.savefig(common.RESULTS_DIR / "rerank_time.png", dpi=120)


def main():
  for name, plot in (("ranking.json", plot_recall), ("rerank_time.json", plot_time)):
    path = common.RESULTS_DIR / name
    if path.exists():
      plot(json.loads(path.read_text()))
      print(f"plotted {name}")
    else:
      print(f"{path} missing: run its experiment first")


if __name__ == "__main__":
  main()
