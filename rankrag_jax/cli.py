"""What every command shares: the Gin flags (defined once, so commands can import each other) and Gin parsing.

    from rankrag_jax import cli
    def main(argv):
      cli.parse_gin()      # --gin_file / --gin_bindings / --gin_search_paths
"""

import os
import pathlib
from typing import Sequence

from absl import flags
import gin

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files; later ones override earlier ones.")
GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. \"TRAIN_STEPS = 10\".")
GIN_SEARCH_PATHS = flags.DEFINE_multi_string("gin_search_paths", [], "Extra directories for Gin includes.")


def parse_gin(gin_files: Sequence[str] | None = None, gin_bindings: Sequence[str] | None = None,
              search_paths: Sequence[str] | None = None, finalize: bool = True) -> None:
  """Parses Gin files + bindings (default: the flags). Includes resolve against the current directory, the
  repository root, then `search_paths`, so commands work from anywhere inside a checkout."""
  gin_files = GIN_FILES.value if gin_files is None else gin_files
  gin_bindings = GIN_BINDINGS.value if gin_bindings is None else gin_bindings
  search_paths = GIN_SEARCH_PATHS.value if search_paths is None else search_paths
  for path in (os.getcwd(), str(REPO_ROOT), *search_paths):
    gin.add_config_file_search_path(path)
  resolved = []
  for f in gin_files:  # gin resolves includes through the search path, but not the top-level files themselves.
    if not os.path.exists(f) and (REPO_ROOT / f).exists():
      f = str(REPO_ROOT / f)
    if not os.path.exists(f):
      raise FileNotFoundError(f"--gin_file {f}: no such file (looked in {os.getcwd()} and {REPO_ROOT})")
    resolved.append(f)
  gin.parse_config_files_and_bindings(resolved, gin_bindings, finalize_config=finalize)
