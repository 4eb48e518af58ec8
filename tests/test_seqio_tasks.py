"""SeqIO Tasks per blend component, Gin-weighted Mixtures and the packed numpy batches the trainer consumes."""

import collections
import json
import math
import pathlib
import subprocess
import sys

import gin
import numpy as np
import pytest
import seqio

from rankrag_jax import prompts
from rankrag_jax.data import blend
from rankrag_jax.data import build
from rankrag_jax.data import packing
from rankrag_jax.data import tasks

REPO = pathlib.Path(__file__).resolve().parents[1]
SEQUENCE_LENGTH = 128
EXAMPLES_PER_COMPONENT = 40


def _toy_examples(component: str, n: int) -> list[dict]:
  """Small real-format Examples; every answer names its component so tests can tell them apart."""
  examples = []
  for i in range(n):
    if component.endswith("ranking"):
      examples.append(prompts.make_example(
          component=component, example_id=f"{component}/{i}/{'pos' if i % 2 else 'neg0'}", task="context_ranking",
          passages=[f"Passage number {i} about {component}."],
          turns=[{"user": prompts.context_ranking_question(f"what is {i}?"),
                  "assistant": prompts.ranking_answer(bool(i % 2))}], label=bool(i % 2)))
    elif component.endswith("sft"):
      examples.append(prompts.make_example(
          component=component, example_id=f"{component}/{i}", task="sft", system="",
          turns=[{"user": f"Say {i}.", "assistant": f"{component} {i}"}]))
    else:
      examples.append(prompts.make_example(
          component=component, example_id=f"{component}/{i}", task="ra_qa",
          passages=[f"The {component} value is {i}.", "Unrelated text."],
          turns=[{"user": prompts.ra_qa_question(f"what is the {component} value?"),
                  "assistant": f"{component} {i}"}]))
  return examples


COMPONENTS = ("alpha_ra_qa", "beta_ranking", "gamma_sft")


@pytest.fixture(scope="module")
def blend_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("blend")
  for component in COMPONENTS:
    with open(directory / f"{component}.jsonl", "w") as f:
      for example in _toy_examples(component, EXAMPLES_PER_COMPONENT):
        f.write(json.dumps(example) + "\n")
  (directory / "corpus.jsonl").write_text("")  # not a component.
  return directory


@pytest.fixture
def registered(blend_dir):
  names = tasks.register_blend_tasks(str(blend_dir), max_length=SEQUENCE_LENGTH, validation_fraction=0.1,
                                     shuffle_buffer_size=64)
  yield names
  gin.clear_config()


def _sample_components(mixture: str, n: int, seed: int = 0) -> collections.Counter:
  ds = seqio.get_mixture_or_task(mixture).get_dataset(
      packing.task_feature_lengths(SEQUENCE_LENGTH), split="train", seed=seed, num_epochs=None,
      passthrough_features=["component"], trim_output_features=False)
  return collections.Counter(ex["component"].decode() for ex in ds.take(n).as_numpy_iterator())


def test_one_task_per_component_registered_idempotently(registered, blend_dir):
  assert registered == [tasks.task_name(c) for c in COMPONENTS]
  again = tasks.register_blend_tasks(str(blend_dir), max_length=SEQUENCE_LENGTH, validation_fraction=0.1)
  assert again == registered
  for name in registered:
    assert seqio.TaskRegistry.get(name).splits == ("train", "validation")


def test_splits_are_by_question_disjoint_and_complete(registered):
  task = seqio.get_mixture_or_task(tasks.task_name("beta_ranking"))
  seen = {}
  for split in tasks.SPLITS:
    ds = task.get_dataset(packing.task_feature_lengths(SEQUENCE_LENGTH), split=split, shuffle=False)
    seen[split] = {tuple(ex["inputs"]) for ex in ds.as_numpy_iterator()}
  assert not seen["train"] & seen["validation"]
  assert len(seen["train"]) + len(seen["validation"]) == EXAMPLES_PER_COMPONENT
  assert tasks.split_of({"id": "q/7/pos"}, 0.5) == tasks.split_of({"id": "q/7/neg3"}, 0.5)


@pytest.mark.parametrize("rates", [
    {"alpha_ra_qa": 0.5, "beta_ranking": 0.3, "gamma_sft": 0.2},
    {"alpha_ra_qa": 0.05, "beta_ranking": 0.15, "gamma_sft": 0.8},
])
def test_sampled_mixture_proportions_match_gin_rates(registered, rates):
  gin.parse_config(f"rankrag_jax.data.tasks.register_stage2_mixture.rates = {rates!r}")
  tasks.register_stage2_mixture()
  n = 4000
  counts = _sample_components(tasks.STAGE2_MIXTURE, n)
  for component, p in tasks.normalized_rates(rates).items():
    # Tolerance: three binomial standard deviations of a proportion estimated from n samples.
    assert abs(counts[component] / n - p) < 3 * math.sqrt(p * (1 - p) / n), (component, counts, rates)


def test_gin_rates_change_the_mixture(registered):
  shares = []
  for sft_rate in (0.1, 0.9):
    gin.clear_config()
    gin.parse_config("rankrag_jax.data.tasks.register_stage2_mixture.rates = "
                     f"{{'alpha_ra_qa': 0.5, 'gamma_sft': {sft_rate}}}")
    tasks.register_stage2_mixture()
    counts = _sample_components(tasks.STAGE2_MIXTURE, 1000)
    assert set(counts) == {"alpha_ra_qa", "gamma_sft"}  # components without a rate are not sampled.
    shares.append(counts["gamma_sft"] / 1000)
  assert shares[0] < 0.25 < 0.55 < shares[1]


def test_mixture_rates_naming_a_missing_component_fail_loudly(registered):
  with pytest.raises(ValueError, match="no Task for components \\['delta'\\]"):
    tasks.register_stage2_mixture(rates={"alpha_ra_qa": 1.0, "delta": 1.0})
  with pytest.raises(ValueError, match="positive"):
    tasks.register_stage1_mixture(rates={"gamma_sft": 0.0})


def test_get_dataset_packs_deterministic_numpy_batches_and_resumes(registered, tmp_path):
  tasks.register_stage2_mixture(rates={c: 1.0 for c in COMPONENTS})
  kwargs = dict(mixture_name=tasks.STAGE2_MIXTURE, sequence_length=SEQUENCE_LENGTH, batch_size=3, seed=7)
  stream = tasks.get_dataset(**kwargs)
  batches = [next(stream) for _ in range(6)]
  assert stream.position == 6

  def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

  # Same seed, same stream; its iterator checkpoint restores the position into a freshly built stream.
  saved = tasks.get_dataset(**kwargs)
  assert same(next(saved), batches[0]) and same(next(saved), batches[1])
  path = saved.save(str(tmp_path / "data_iterator"))
  restored = tasks.get_dataset(**kwargs)
  restored.restore(path)
  assert restored.position == 2 and same(next(restored), batches[2])
  # Or resume by position: skip the consumed batches.
  resumed = tasks.get_dataset(start_batch=4, **kwargs)
  assert resumed.position == 4 and same(next(resumed), batches[4]) and same(next(resumed), batches[5])

  vocab = seqio.get_mixture_or_task(tasks.STAGE2_MIXTURE).output_features["targets"].vocabulary
  tok = vocab.tokenizer
  answers = {f" {c} {i}" for c in ("alpha_ra_qa", "gamma_sft") for i in range(EXAMPLES_PER_COMPONENT)}
  answers |= {" True", " False"}
  segments = 0
  for batch in batches:
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        k: ((3, SEQUENCE_LENGTH), "int32") for k in ("decoder_target_tokens", "decoder_input_tokens",
                                                     "decoder_loss_weights", "decoder_segment_ids",
                                                     "decoder_positions")}
    for row in range(3):
      seg = batch["decoder_segment_ids"][row]
      for s in np.unique(seg[seg > 0]):
        where = seg == s
        weighted = batch["decoder_target_tokens"][row][where & (batch["decoder_loss_weights"][row] == 1)]
        assert weighted[-1] == tok.eos_id and tok.decode(weighted[:-1]) in answers
        segments += 1
  assert segments > 18  # packing: several examples per row.


def test_example_normalization_makes_each_packed_example_weigh_one(registered):
  tasks.register_stage2_mixture(rates={c: 1.0 for c in COMPONENTS})
  kwargs = dict(mixture_name=tasks.STAGE2_MIXTURE, sequence_length=SEQUENCE_LENGTH, batch_size=3, seed=7)
  per_token, per_example = tasks.get_dataset(**kwargs), tasks.get_dataset(loss_normalization="example", **kwargs)
  answer_lengths = set()
  for _ in range(4):
    tokens, examples = next(per_token), next(per_example)
    assert all(np.array_equal(tokens[k], examples[k]) for k in tokens if k != "decoder_loss_weights")
    weights = examples["decoder_loss_weights"]
    assert weights.dtype == np.float32
    for row in range(3):
      seg, token_weights = tokens["decoder_segment_ids"][row], tokens["decoder_loss_weights"][row]
      for s in np.unique(seg[seg > 0]):
        where = seg == s
        n = token_weights[where].sum()
        answer_lengths.add(int(n))
        # Each example sums to one, spread evenly over exactly its answer tokens (a ranking "True" + stop: 1/2 each).
        np.testing.assert_allclose(weights[row][where].sum(), 1.0, rtol=1e-6)
        np.testing.assert_allclose(weights[row][where & (token_weights == 1)], 1.0 / n, rtol=1e-6)
      assert not weights[row][seg == 0].any() and not weights[row][token_weights == 0].any()
  assert len(answer_lengths) > 1  # examples of different answer lengths were packed together
  with pytest.raises(ValueError, match="loss_normalization"):
    tasks.get_dataset(loss_normalization="sequence", **kwargs)


def test_shards_split_each_task_disjointly(registered):
  rows = {}
  for shard in range(2):
    stream = tasks.get_dataset(tasks.task_name("gamma_sft"), SEQUENCE_LENGTH, batch_size=1, split="train",
                               shard_id=shard, num_shards=2, num_epochs=1, pack=False)
    rows[shard] = {tuple(b["decoder_target_tokens"][0]) for b in stream}
  assert rows[0] and rows[1] and not rows[0] & rows[1]


def test_stage_gin_files_hold_the_paper_rates_for_the_default_blend():
  gin.add_config_file_search_path(str(REPO))
  try:
    gin.parse_config_file(str(REPO / "gin_configs/data/stage2_mixture.gin"))
    stage2 = gin.query_parameter("rankrag_jax.data.tasks.register_stage2_mixture.rates")
    gin.clear_config()
    gin.parse_config_file(str(REPO / "gin_configs/data/stage1_mixture.gin"))
    stage1 = gin.query_parameter("rankrag_jax.data.tasks.register_stage1_mixture.rates")
  finally:
    gin.clear_config()
  # App. B entries mapped onto our components (docs: stage2_mixture.gin), plus the two stated stand-ins.
  assert stage2 == {"nq_ra_qa": 0.09 + 0.09, "nq_ra_ranking": 0.02 + 0.02, "nq_context_ranking": 0.15,
                    "squad2_context_ranking": 0.03, "logiqa_context_qa": 0.069, "reclor_context_qa": 0.026,
                    "nq_squad2_context_qa": 0.09, "evals_sft": 0.2}
  assert set(stage2) == set(blend.COMPONENTS)
  assert math.isclose(sum(stage2.values()), 0.785)
  assert stage1 == {"evals_sft": 1.0}


def test_build_stats_count_lengths_truncation_drops_and_labels(tmp_path):
  question = prompts.context_ranking_question

  def example(i, passage, q, label):
    return prompts.make_example(component="mixed", example_id=f"mixed/{i}", task="context_ranking",
                                passages=[passage], turns=[{"user": question(q), "assistant": prompts.ranking_answer(
                                    label)}], label=label)

  rows = [example(0, "word " * 400, "short?", True),          # fits once its passage is cut
          example(1, "short passage", "word " * 400, False),  # the question alone is too long: dropped
          example(2, "short passage", "short?", False)]
  (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  gin.parse_config("rankrag_jax.data.tasks.register_blend_tasks.max_length = 256")
  try:
    settings = build.blend_settings()
  finally:
    gin.clear_config()
  assert settings["max_length"] == 256 and settings["chat_format"] == "chatqa"
  stats = build.compute_stats(**{**settings, "data_dir": str(tmp_path), "validation_fraction": 0.0})
  mixed = stats["components"]["mixed"]
  assert (mixed["examples"], mixed["train_examples"], mixed["truncated"], mixed["dropped"]) == (3, 3, 1, 1)
  assert mixed["labels"] == {"False": 2, "True": 1}
  assert mixed["untruncated_length"]["max"] > 400 and mixed["untruncated_length"]["p50"] < 400
  table = build.format_stats(stats)
  assert "mixed" in table and "max_length 256" in table


@pytest.mark.slow
def test_build_command_builds_the_default_blend_from_real_data(tmp_path):
  """The documented command end to end (under a minute: real NQ / evals / Wikipedia data, BM25 mining)."""
  command = [sys.executable, "-m", "rankrag_jax.data.build", "--gin_file=gin_configs/data/default_blend.gin",
             f"--gin_bindings=BLEND_DIR = '{tmp_path}'"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
  stats = json.loads((tmp_path / build.STATS_FILE).read_text())
  assert set(stats["components"]) == set(blend.COMPONENTS)
  assert all(s["examples"] > 0 for s in stats["components"].values())
  assert "evals_sft" in result.stdout and "packed rows/epoch" in result.stdout
  assert "BM25 answer-Recall" in result.stdout


def test_blend_paths_build_the_default_blend_on_first_use(tmp_path, monkeypatch):
  """`blend:heldout.jsonl` (evaluate, experiments/) on an empty cache builds the blend as training does, once,
  instead of a FileNotFoundError from a reader; other paths pass through."""
  from rankrag_jax import assets, evaluate
  calls = []

  def fake_build(directory):
    calls.append(directory)
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text("{}")

  monkeypatch.setattr(blend, "build_default_blend", fake_build)
  monkeypatch.setenv(assets.CACHE_ENV_VAR, str(tmp_path))
  assert evaluate.resolve_path("blend:heldout.jsonl") == str(tmp_path / "default_blend" / "heldout.jsonl")
  assert evaluate.resolve_path("blend:corpus.jsonl") == str(tmp_path / "default_blend" / "corpus.jsonl")
  assert calls == [tmp_path / "default_blend"]
  assert evaluate.resolve_path("data/x.jsonl") == "data/x.jsonl" and evaluate.resolve_path(None) is None


def test_concurrent_ensure_blend_builds_the_default_blend_once(tmp_path, monkeypatch):
  """Parallel test workers (or local processes of one run) that need the default blend: one builds, the others
  wait for its manifest instead of writing the same files at the same time."""
  import threading
  import time
  from rankrag_jax.training import data as data_lib
  calls = []

  def slow_build(directory):  # stands in for the real build (~1 min): files first, the manifest last
    calls.append(directory)
    directory.mkdir(parents=True, exist_ok=True)
    time.sleep(0.5)
    (directory / "manifest.json").write_text("{}")

  monkeypatch.setattr(blend, "build_default_blend", slow_build)
  gin.bind_parameter("rankrag_jax.data.tasks.register_blend_tasks.data_dir", str(tmp_path / "blend"))
  try:
    results = []
    threads = [threading.Thread(target=lambda: results.append(data_lib.ensure_blend())) for _ in range(3)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    gin.clear_config()
  assert len(calls) == 1
  assert results == [tmp_path / "blend"] * 3 and (tmp_path / "blend" / "manifest.json").is_file()
