"""What every command shares: the Gin flags (defined once, so commands can import each other) and Gin parsing.

    from rankrag_jax import cli
    def main(argv):
      cli.keep_freed_host_memory()  # before any JAX computation
      cli.parse_gin()      # --gin_file / --gin_bindings / --gin_search_paths
"""

import contextlib
import logging
import os
import pathlib
from typing import Sequence

from absl import flags
import gin

from rankrag_jax import host_memory

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files; later ones override earlier ones.")
GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. \"TRAIN_STEPS = 10\".")
GIN_SEARCH_PATHS = flags.DEFINE_multi_string("gin_search_paths", [], "Extra directories for Gin includes.")
KEEP_FREED_HOST_MEMORY = flags.DEFINE_bool(
    "keep_freed_host_memory", True, "Keep freed host memory mapped (glibc malloc), so XLA:CPU programs do not "
    "page-fault their buffers in at every step (rankrag_jax/host_memory.py).")


def keep_freed_host_memory() -> bool:
  """`host_memory.keep_freed_host_memory` as --keep_freed_host_memory says; commands call it first in `main`."""
  return host_memory.keep_freed_host_memory(KEEP_FREED_HOST_MEMORY.value)


def parse_gin(gin_files: Sequence[str] | None = None, gin_bindings: Sequence[str] | None = None,
              search_paths: Sequence[str] | None = None, finalize: bool = True) -> None:
  """Parses Gin files + bindings (default: the flags), so commands work from any directory: a --gin_file is
  looked up from the current directory, then the repository root; an include from the repository root, the
  current directory, then `search_paths`."""
  gin_files = GIN_FILES.value if gin_files is None else gin_files
  gin_bindings = GIN_BINDINGS.value if gin_bindings is None else gin_bindings
  search_paths = GIN_SEARCH_PATHS.value if search_paths is None else search_paths
  cwd = os.getcwd()
  resolved = []
  for f in gin_files:
    if not os.path.exists(f) and (REPO_ROOT / f).exists():
      f = str(REPO_ROOT / f)
    if not os.path.exists(f):
      raise FileNotFoundError(f"--gin_file {f}: no such file (looked in {cwd} and {REPO_ROOT})")
    resolved.append(os.path.abspath(f))
  for path in (cwd, *search_paths):
    gin.add_config_file_search_path(os.path.abspath(path))
  # Includes are parsed from the repository root: gin tries each include as given before its search path, and
  # its package-resource fallback crashes (TypeError) on a directory that imports as a namespace package, as
  # `gin_configs` does whenever the checkout is on sys.path. From the root the first try finds it.
  with _quiet_include_probes(), contextlib.chdir(REPO_ROOT):
    try:
      gin.parse_config_files_and_bindings(resolved, gin_bindings, finalize_config=finalize)
    except TypeError as e:  # the same fallback, for an include that exists nowhere: say so.
      if "NoneType" not in str(e):
        raise
      searched = [cwd, str(REPO_ROOT), *search_paths]
      raise FileNotFoundError(f"Gin include not found in {searched}:{str(e).split(chr(10), 1)[-1]}") from None


@contextlib.contextmanager
def _quiet_include_probes():
  """gin logs an ERROR for every search-path entry an include is not under, even when a later one has it; an
  include found nowhere still raises, naming the file."""
  drop = lambda record: not record.getMessage().startswith("Path not found: ")
  root = logging.getLogger()
  root.addFilter(drop)
  try:
    yield
  finally:
    root.removeFilter(drop)
