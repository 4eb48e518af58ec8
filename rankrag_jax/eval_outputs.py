"""What `evaluate.py` writes in its out_dir, and when a re-run may resume there without mixing two runs.

`prepare_out_dir` records the settings that make a prediction what it is (`prediction_settings`) in
`run_settings.json`; a re-run with other (or unknown) settings raises `SettingsMismatch` naming each difference,
unless `overwrite` deletes the old output first. `load_finished` reads the predictions a killed run left.
"""

import inspect
import json
import os
import pathlib
from typing import Sequence

import gin

from rankrag_jax.generate import generate, max_new_tokens_for_task
from rankrag_jax.retrieval import bert, bm25, dense


class EvalError(ValueError):
  """Bad harness input (setting, dataset, corpus); the message names the setting or file:line."""


class SettingsMismatch(EvalError):
  """out_dir holds predictions made with other (or unknown) settings: resuming would mix two runs."""


SETTINGS_FILE = "run_settings.json"
OUTPUT_FILES = ("predictions.jsonl", SETTINGS_FILE, "summary.json", "summary.md", "run.json")
# Gin-configurable settings outside run_evaluation that change a prediction, by the stage that uses them:
# decoding, and the retriever's index and encoder.
_PREDICTION_GIN = {
    "generate": [(generate, ("temperature", "top_p", "seed", "keep_stop_token"))],
    "bm25": [(bm25.build_bm25_index, ("k1", "b", "method", "stopwords"))],
    "dense": [(dense.build_dense_index, ("index_type", "nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search",
                                         "seed")),
              (bert.load_sentence_encoder, ("model_dir", "max_seq_length", "normalize"))],
}


def _gin_settings(fn, names: Sequence[str]) -> dict:
  """`fn`'s effective values of `names` (its Gin binding, else its default), keyed `{fn}.{name}`."""
  bound, params = gin.get_bindings(fn), inspect.signature(fn).parameters
  return {f"{fn.__name__}.{name}": bound.get(name, params[name].default) for name in names}


def prediction_settings(dataset: str, task: str, checkpoint: str, corpus: str | None, retriever: str, n: int,
                        k: int, use_reranker: bool, generate_answers: bool, chat_format: str,
                        max_new_tokens: int | None, recall_ks: Sequence[int]) -> dict:
  """Everything that makes a prediction record what it is, as JSON values (as run_settings.json holds them).

  Not offset / limit / chunk_size / on_error (which examples, how batched) nor system_name (a label). A setting
  that a run does not use is None (the checkpoint of a retriever-only run), so changing it does not refuse.
  """
  uses_model = use_reranker or generate_answers
  settings = {
      "dataset": os.path.abspath(dataset), "task": task, "retriever": retriever,
      "corpus": os.path.abspath(corpus) if retriever != "given" and corpus else None,
      "n": n, "use_reranker": use_reranker, "generate_answers": generate_answers,
      # The tokenizer is the checkpoint's own; a local checkpoint is named by its absolute path.
      "checkpoint": (os.path.abspath(checkpoint) if os.path.exists(checkpoint) else checkpoint) if uses_model
                    else None,
      "chat_format": chat_format if uses_model else None,
      "k": k if generate_answers else None,
      "max_new_tokens": (max_new_tokens or max_new_tokens_for_task(task)) if generate_answers else None,
      "recall_ks": list(recall_ks),  # the records' metrics
  }
  for stage in (["generate"] if generate_answers else []) + [retriever]:
    for fn, names in _PREDICTION_GIN.get(stage, ()):
      settings.update(_gin_settings(fn, names))
  return json.loads(json.dumps(settings, default=str))  # tuples -> lists: compares equal to the file's.


def settings_differences(old: dict, new: dict) -> dict[str, tuple]:
  """{setting: (old value, new value)} for each setting that differs (a missing one reads "<unset>")."""
  return {key: (old.get(key, "<unset>"), new.get(key, "<unset>")) for key in sorted(old.keys() | new.keys())
          if old.get(key, "<unset>") != new.get(key, "<unset>")}


def check_resumable(out: pathlib.Path, settings: dict) -> None:
  """Raises SettingsMismatch unless `out`'s run_settings.json records exactly `settings`."""
  how = (f"use a new out_dir, or pass overwrite=True (--gin_bindings='run_evaluation.overwrite = True') to "
         f"delete {out}'s predictions and summary and start over")
  path = out / SETTINGS_FILE
  try:
    old = json.loads(path.read_text())
  except FileNotFoundError:
    raise SettingsMismatch(f"{out}/predictions.jsonl has no {SETTINGS_FILE} (written by an older version): the "
                           f"settings of those predictions are unknown, so resuming could mix two runs; "
                           f"{how}") from None
  except json.JSONDecodeError as e:
    raise SettingsMismatch(f"{path}: not valid JSON ({e.msg}): the settings of {out}'s predictions are unknown; "
                           f"{how}") from None
  differences = settings_differences(old, settings)
  if differences:
    listed = "; ".join(f"{key}: {a!r} (predictions) != {b!r} (now)" for key, (a, b) in differences.items())
    raise SettingsMismatch(f"{out} holds predictions made with other settings ({listed}); resuming would mix two "
                           f"runs; {how}")


def prepare_out_dir(out: pathlib.Path, settings: dict, overwrite: bool) -> None:
  """Makes `out` hold only predictions made with `settings`, then records them in run_settings.json.
  Existing predictions are kept when their settings match, deleted with `overwrite`, else refused."""
  out.mkdir(parents=True, exist_ok=True)
  predictions = out / "predictions.jsonl"
  if overwrite:
    for name in OUTPUT_FILES:
      (out / name).unlink(missing_ok=True)
  elif predictions.exists() and predictions.stat().st_size:
    check_resumable(out, settings)
  tmp = out / (SETTINGS_FILE + ".tmp")  # a kill mid-write must not leave a torn settings file.
  tmp.write_text(json.dumps(settings, indent=2) + "\n")
  os.replace(tmp, out / SETTINGS_FILE)


def load_finished(path: pathlib.Path) -> dict[str, dict]:
  """Records already in a predictions file, by id. A torn last line (a killed run) is cut off the file."""
  if not path.exists():
    return {}
  data = path.read_bytes()
  if data and not data.endswith(b"\n"):
    data = data[:data.rfind(b"\n") + 1]
    path.write_bytes(data)
  finished = {}
  for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
    if line.strip():
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise EvalError(f"{path}:{number}: not valid JSON ({e.msg}); delete the line or the file") from None
      finished[record["id"]] = record
  return finished
