"""SeqIO Tasks (one per blend component) and Gin-weighted Stage-I / Stage-II Mixtures, registered here only.

    register_blend_tasks(data_dir, tokenizer_path, chat_format, max_length)   # Task "rankrag_<component>"
    register_stage2_mixture(rates)                                             # Mixture "rankrag_stage2"
    batches = get_dataset("rankrag_stage2", sequence_length=2048, batch_size=8, seed=0)
    batch = next(batches)            # numpy: decoder_{target_tokens,input_tokens,loss_weights,segment_ids,positions}
    resume_at = batches.position     # get_dataset(..., start_batch=resume_at) resumes exactly there, or
    batches.save(prefix)             # ... a fresh get_dataset(same args).restore(path) does, in seconds

Each Task reads `{data_dir}/{component}.jsonl` (Examples, docs/DESIGN.md), splits it by a hash of the example's
question id (train / validation; all examples of one question land in the same split), and tokenises it in Python
when the dataset is built (`packing.tokenize_example`: passage-side truncation to `max_length`, examples that cannot
fit are logged and counted, never silently dropped). Task features are `inputs` (prompt ids) and `targets` (answer
ids + stop token) over a `RankRAGVocabulary`; `packing.AnswerLossLMFeatureConverter` packs them with loss on the
answer only. Everything after tokenisation is plain tf.data, so a stream is deterministic given its seed, and a
position is restored either by skipping `start_batch` batches or from a tf.data iterator checkpoint.
"""

import functools
import hashlib
import json
import pathlib
import re
from typing import Any, Iterator, Mapping, Optional, Sequence

from absl import logging
import gin
import numpy as np
import seqio
import tensorflow as tf

from rankrag_jax import assets
from rankrag_jax.data import packing
from rankrag_jax.data import vocabulary as vocabulary_lib

TASK_PREFIX = "rankrag_"
STAGE1_MIXTURE = "rankrag_stage1"
STAGE2_MIXTURE = "rankrag_stage2"
SPLITS = ("train", "validation")
# Files in a blend directory that are not training components.
NON_COMPONENT_FILES = frozenset({"corpus.jsonl", "heldout.jsonl"})
DEFAULT_TOKENIZER_ASSET = "smollm2_135m_instruct"
DEFAULT_BLEND_SUBDIR = "default_blend"
# A component larger than one file is `{component}.shard-00000.jsonl`, `...-00001.jsonl`, ... (read in order).
SHARD_NAME = "{component}.shard-{index:05d}.jsonl"
_SHARD_SUFFIX_RE = re.compile(r"\.shard-\d{5}$")
_EXAMPLE_SUFFIX_RE = re.compile(r"(/(pos|neg\d+|turn\d+|chunk\d+))+$")


def task_name(component: str) -> str:
  return TASK_PREFIX + component


def default_tokenizer_path() -> str:
  """The SmolLM2-135M-Instruct GGUF, whose embedded vocabulary is the default tokenizer."""
  return str(assets.asset_file(DEFAULT_TOKENIZER_ASSET))


def default_blend_dir() -> pathlib.Path:
  """Where the build command writes the default blend when no directory is given."""
  return assets.cache_root() / DEFAULT_BLEND_SUBDIR


def read_examples(path: pathlib.Path) -> list[dict[str, Any]]:
  """Reads an Example JSONL file; a malformed line fails with file:line."""
  examples = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        example = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number}: bad JSON: {e}") from e
      for field in ("id", "turns"):
        if field not in example:
          raise ValueError(f"{path}:{line_number}: missing field {field!r}")
      examples.append(example)
  return examples


def question_key(example_id: str) -> str:
  """The question (or dialogue) an example comes from: its id without the builders' per-example suffixes
  ("/pos", "/neg2", "/turn3", "/chunk1"), so ranking pairs of one question never straddle train/validation."""
  return _EXAMPLE_SUFFIX_RE.sub("", example_id)


def split_of(example: Mapping[str, Any], validation_fraction: float) -> str:
  """"validation" for a stable `validation_fraction` of questions (sha256 of the question key), else "train"."""
  digest = hashlib.sha256(question_key(str(example["id"])).encode("utf-8")).digest()
  return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction else "train"


def tokenize_component(examples: Sequence[Mapping[str, Any]], tokenizer, max_length: int, chat_format: str,
                       component: str = "") -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Tokenises Examples; returns the kept ones and counts {examples, truncated, dropped}."""
  kept, counts = [], {"examples": len(examples), "truncated": 0, "dropped": 0}
  for example in examples:
    try:
      tokenized = packing.tokenize_example(example, tokenizer, max_length, chat_format)
    except packing.ExampleTooLongError as e:
      counts["dropped"] += 1
      logging.warning("%s: dropped (does not fit %d tokens): %s", component, max_length, e)
      continue
    counts["truncated"] += int(tokenized["truncated"])
    kept.append(tokenized)
  if counts["dropped"] or counts["truncated"]:
    logging.warning("%s: %d of %d examples had passages truncated, %d dropped, at max_length=%d", component,
                    counts["truncated"], counts["examples"], counts["dropped"], max_length)
  return kept, counts


def _packed_rows(rows: Sequence[np.ndarray]) -> tuple[tf.Tensor, tf.Tensor]:
  """Concatenated values and row offsets (so each example is a slice of one constant)."""
  lengths = np.asarray([len(r) for r in rows], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  values = np.concatenate([np.zeros(0, np.int32)] + [np.asarray(r, np.int32) for r in rows])
  return tf.constant(values), tf.constant(offsets)


def component_files(data_dir, component: str, missing_ok: bool = False) -> list[pathlib.Path]:
  """A component's files: `{component}.jsonl`, else its shards (SHARD_NAME) in order."""
  data_dir = pathlib.Path(data_dir)
  single = data_dir / f"{component}.jsonl"
  files = [single] if single.is_file() else sorted(data_dir.glob(f"{component}.shard-[0-9][0-9][0-9][0-9][0-9].jsonl"))
  if not files and not missing_ok:
    raise FileNotFoundError(f"{data_dir}: no {component}.jsonl or {component}.shard-NNNNN.jsonl")
  return files


def read_component(data_dir, component: str) -> list[dict[str, Any]]:
  """Every Example of a component, over its shards."""
  return [ex for path in component_files(data_dir, component) for ex in read_examples(path)]


def component_dataset(split: str, shuffle_files: bool, seed: Optional[int] = None, *, data_dir: str, component: str,
                      vocabulary: vocabulary_lib.RankRAGVocabulary, chat_format: str, max_length: int,
                      validation_fraction: float) -> tf.data.Dataset:
  """`seqio.FunctionDataSource` dataset_fn: one component's split, tokenised, as {inputs, targets, component}."""
  examples = [ex for ex in read_component(data_dir, component) if split_of(ex, validation_fraction) == split]
  tokenized, _ = tokenize_component(examples, vocabulary.tokenizer, max_length, chat_format, component)
  if shuffle_files:  # a full permutation here; the Task's shuffle buffer then mixes across epochs.
    order = np.random.default_rng(seed).permutation(len(tokenized))
    tokenized = [tokenized[i] for i in order]
  inputs = [t["targets"][:t["num_prompt_tokens"]] for t in tokenized]
  targets = [t["targets"][t["num_prompt_tokens"]:] for t in tokenized]
  (input_values, input_offsets), (target_values, target_offsets) = _packed_rows(inputs), _packed_rows(targets)

  def example_at(i):
    return {"inputs": input_values[input_offsets[i]:input_offsets[i + 1]],
            "targets": target_values[target_offsets[i]:target_offsets[i + 1]],
            "component": tf.constant(component)}

  return tf.data.Dataset.range(len(tokenized)).map(example_at)


def blend_components(data_dir: str) -> list[str]:
  """Component names in a blend directory: manifest.json's list when present, else every other *.jsonl."""
  data_dir = pathlib.Path(data_dir)
  manifest = data_dir / "manifest.json"
  if manifest.exists():
    listed = json.loads(manifest.read_text()).get("components")
    if listed:
      return sorted(listed)
  return sorted({_SHARD_SUFFIX_RE.sub("", p.stem) for p in data_dir.glob("*.jsonl") if p.name not in NON_COMPONENT_FILES})


@gin.configurable
def register_blend_tasks(data_dir: Optional[str] = None, tokenizer_path: Optional[str] = None,
                         chat_format: str = "chatqa", max_length: int = 2048, validation_fraction: float = 0.02,
                         components: Optional[Sequence[str]] = None,
                         shuffle_buffer_size: int = 1000) -> list[str]:
  """Registers Task `rankrag_<component>` for each blend component; returns the task names.

  Idempotent: re-registering replaces the Tasks (register Mixtures afterwards, they hold the Task objects).

  Args:
    data_dir: the blend directory (`python -m rankrag_jax.data.build` output); None -> `default_blend_dir()`.
    tokenizer_path: tokenizer.json / SentencePiece .model / .gguf; None -> the SmolLM2-135M-Instruct GGUF.
    chat_format: how turns are rendered (`prompts.render_segments`).
    max_length: the token budget per example; must not exceed the packed sequence length used for training.
    validation_fraction: share of questions held out as the "validation" split.
    components: a subset of components; None -> all in `data_dir`.
    shuffle_buffer_size: the Task's shuffle buffer (examples).
  """
  data_dir = pathlib.Path(data_dir or default_blend_dir())
  vocabulary = vocabulary_lib.RankRAGVocabulary(tokenizer_path or default_tokenizer_path())
  output_features = {name: seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32) for name in ("inputs", "targets")}
  available = blend_components(data_dir)
  missing = sorted(set(components or ()) - set(available))
  if missing:
    raise ValueError(f"components {missing} not in {data_dir} (has {available})")
  names = []
  for component in components or available:
    name = task_name(component)
    seqio.TaskRegistry.remove(name)
    dataset_fn = functools.partial(
        component_dataset, data_dir=str(data_dir), component=component, vocabulary=vocabulary,
        chat_format=chat_format, max_length=max_length, validation_fraction=validation_fraction)
    seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(dataset_fn, splits=SPLITS),
                           output_features=output_features, preprocessors=[],
                           shuffle_buffer_size=shuffle_buffer_size)
    names.append(name)
  return names


def register_mixture(name: str, rates: Mapping[str, float]) -> seqio.Mixture:
  """(Re-)registers Mixture `name` over components with the given (unnormalised) rates."""
  if not rates:
    raise ValueError(f"mixture {name}: no rates")
  bad = {c: r for c, r in rates.items() if not (np.isfinite(r) and r > 0)}
  if bad:
    raise ValueError(f"mixture {name}: rates must be positive, got {bad}")
  unregistered = sorted(c for c in rates if task_name(c) not in seqio.TaskRegistry.names())
  if unregistered:
    registered = sorted(n[len(TASK_PREFIX):] for n in seqio.TaskRegistry.names() if n.startswith(TASK_PREFIX))
    raise ValueError(f"mixture {name}: no Task for components {unregistered}; registered: {registered} "
                     "(call register_blend_tasks first)")
  seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, [(task_name(c), float(r)) for c, r in rates.items()])


def normalized_rates(rates: Mapping[str, float]) -> dict[str, float]:
  total = sum(rates.values())
  return {c: r / total for c, r in rates.items()}


@gin.configurable
def register_stage2_mixture(rates: Mapping[str, float] = gin.REQUIRED, name: str = STAGE2_MIXTURE) -> seqio.Mixture:
  """The Stage-II RankRAG blend (rates: gin_configs/data/stage2_mixture.gin, paper App. B; SeqIO normalises)."""
  return register_mixture(name, rates)


@gin.configurable
def register_stage1_mixture(rates: Mapping[str, float] = gin.REQUIRED, name: str = STAGE1_MIXTURE) -> seqio.Mixture:
  """The Stage-I (instruction SFT only) mixture (gin_configs/data/stage1_mixture.gin)."""
  return register_mixture(name, rates)


LOSS_NORMALIZATIONS = ("token", "example")


def example_mean_weights(weights: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
  """Loss weights [B, L] rescaled so that each packed example's answer tokens sum to 1 (float32).

  With the step's mean over the weight sum, every example then counts once, whatever its answer length: a
  ranking example's one-token "True"/"False" weighs as much as a 200-token SFT answer (with per-token weights, it
  is a few percent of a packed batch's loss).
  """
  weights = weights.astype(np.float32)
  rows, length = weights.shape
  # One bin per (row, segment id): segment ids are < L + 1 (at most one example per token).
  bins = segment_ids.astype(np.int64) + (length + 1) * np.arange(rows)[:, None]
  totals = np.bincount(bins.ravel(), weights=weights.ravel(), minlength=rows * (length + 1))
  per_token_total = totals[bins]
  return np.where(per_token_total > 0, weights / np.where(per_token_total > 0, per_token_total, 1),
                  0).astype(np.float32)


class PackedBatches:
  """Iterator of packed numpy batches that knows its position in the stream, for resumable training.

  Two ways to resume, both exact for a stream built with the same `get_dataset` arguments (and seed):
    * `position` (batches consumed since the stream's start): save it with the model checkpoint and pass it back as
      `get_dataset(..., start_batch=position)`; the skipped batches are recomputed (~600 packed rows/s per core).
    * `save(prefix)` / `restore(prefix)`: the tf.data iterator's own state (shuffle buffers, sampler, packer) via
      `tf.train.Checkpoint`, tens of MB, restored in seconds whatever the position.
  """

  def __init__(self, dataset: tf.data.Dataset, start_batch: int = 0, loss_normalization: str = "token"):
    if loss_normalization not in LOSS_NORMALIZATIONS:
      raise ValueError(f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, got {loss_normalization!r}")
    self.dataset = dataset  # the whole stream from batch 0, for callers that want tf.data itself.
    self.position = 0
    self._per_example = loss_normalization == "example"
    self._iterator = iter(dataset.prefetch(tf.data.AUTOTUNE))
    # Skipping by consuming (rather than dataset.skip) keeps one iterator graph, so save/restore always match.
    for _ in range(start_batch):
      next(self)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self.position += 1
    batch = {name: value.numpy() for name, value in batch.items()}
    if self._per_example:
      batch["decoder_loss_weights"] = example_mean_weights(batch["decoder_loss_weights"],
                                                           batch["decoder_segment_ids"])
    return batch

  def _checkpoint(self, position: tf.Variable) -> tf.train.Checkpoint:
    return tf.train.Checkpoint(iterator=self._iterator, position=position)

  def save(self, prefix: str) -> str:
    """Writes the iterator state and position under `prefix`; returns the checkpoint path."""
    return self._checkpoint(tf.Variable(self.position, dtype=tf.int64)).write(prefix)

  def restore(self, path: str) -> None:
    """Restores a state written by `save` (the stream must come from the same get_dataset arguments)."""
    position = tf.Variable(0, dtype=tf.int64)
    self._checkpoint(position).read(path).assert_consumed()
    self.position = int(position.numpy())


@gin.configurable
def get_dataset(mixture_name: str, sequence_length: int, batch_size: int, split: str = "train", shard_id: int = 0,
                num_shards: int = 1, seed: int = 0, start_batch: int = 0, shuffle: Optional[bool] = None,
                num_epochs: Optional[int] = None, pack: bool = True, loss_normalization: str = "token") -> PackedBatches:
  """Packed decoder-only numpy batches from a registered Mixture or Task; deterministic given `seed`.

  Args:
    mixture_name: e.g. "rankrag_stage2" or a Task name.
    sequence_length: the packed row length L (>= the tasks' `max_length`).
    batch_size: rows per batch for this shard (global batch / num_shards).
    split: "train" or "validation".
    shard_id, num_shards: this host's shard of every task (examples are sharded before packing).
    seed: shuffling and mixture-sampling seed.
    start_batch: batches to skip (resume point; see `PackedBatches.position`).
    shuffle: default True for "train", False otherwise.
    num_epochs: None repeats forever (training); 1 for a single pass (evaluation).
    pack: False gives one example per row (padded), for evaluation.
    loss_normalization: "token" (every answer token weighs 1) or "example" (each example's answer tokens sum to 1:
      `example_mean_weights`; float32 weights).

  Returns:
    a `PackedBatches` yielding dicts of int32 [batch_size, L]: decoder_target_tokens, decoder_input_tokens,
    decoder_loss_weights, and when packing decoder_segment_ids (0 = padding) and decoder_positions.
  """
  dataset = seqio.get_dataset(
      mixture_name, task_feature_lengths=packing.task_feature_lengths(sequence_length),
      feature_converter=packing.AnswerLossLMFeatureConverter(pack=pack), dataset_split=split,
      shuffle=(split == "train") if shuffle is None else shuffle, num_epochs=num_epochs,
      shard_info=seqio.ShardInfo(index=shard_id, num_shards=num_shards) if num_shards > 1 else None,
      seed=seed, batch_size=batch_size, verbose=False,
      trim_output_features=False)  # never trim: an over-long example must fail in the converter, not lose its end.
  return PackedBatches(dataset, start_batch, loss_normalization)
