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
