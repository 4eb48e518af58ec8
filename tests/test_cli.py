"""Gin parsing shared by every command: works from any directory, and a bad include names the file and line."""

import gin
import pytest

from rankrag_jax import cli


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_repository_gin_files_and_their_includes_parse_outside_the_checkout(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # stage2.gin includes gin_configs/data/... and cpu.gin gin_configs/meshes/cpu.gin
  cli.parse_gin(["gin_configs/stage2.gin", "gin_configs/cpu.gin"], ["TRAIN_STEPS = 3"], [], finalize=False)
  assert gin.query_parameter("%TRAIN_STEPS") == 3
  assert gin.query_parameter("sharding.make_mesh.fsdp") == -1  # from the included meshes/cpu.gin


def test_missing_include_names_the_including_file_and_line(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "bad.gin").write_text("TRAIN_STEPS = 3\ninclude 'gin_configs/nope.gin'\n")
  with pytest.raises(IOError, match=r"(?s)bad\.gin\", line 2.*gin_configs/nope\.gin"):
    cli.parse_gin(["bad.gin"], [], [], finalize=False)


def test_missing_top_level_file_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match="--gin_file nope.gin: no such file"):
    cli.parse_gin(["nope.gin"], [], [], finalize=False)


def test_the_documented_ranking_and_lora_recipes_parse():
  """The README's and experiments/README.md's recipe commands: rank_smollm2_cpu.gin, then LoRA's two gins on top."""
  files = ["gin_configs/stage2.gin", "gin_configs/cpu.gin", "gin_configs/rank_smollm2_cpu.gin"]
  cli.parse_gin(files, [], [], finalize=False)
  assert gin.query_parameter("%MODEL_DIR") == "runs/rank_smollm2_cpu"
  assert gin.query_parameter("rankrag_jax.data.blend.build_default_blend.positive_rule") == "answer_and_title"
  gin.clear_config()
  cli.parse_gin(files + ["gin_configs/lora.gin", "gin_configs/lora_smollm2_cpu.gin"], [], [], finalize=False)
  assert gin.query_parameter("%MODEL_DIR") == "runs/lora_smollm2_cpu"
  assert gin.query_parameter("%BATCH_SIZE") == 8  # the full fine-tuning recipe's batches, so the curves compare.
  assert gin.query_parameter("%LORA_DROPOUT") == 0.0 and gin.query_parameter("%LEARNING_RATE") == 5e-4
