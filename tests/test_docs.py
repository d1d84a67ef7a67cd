"""The documentation site's pages: their examples run, and the API reference lists every public
module (each module's page then lists its `__all__`, so every public name gets a page)."""

import contextlib
import doctest
import pathlib
import pkgutil
import re

import jax
import pytest

import jaxnorm

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OPTIONS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
PAGES = sorted(p.relative_to(ROOT).as_posix() for p in DOCS.rglob("*.md")
               if "_build" not in p.parts and ">>> " in p.read_text())


def test_the_guides_have_examples():
  assert {"docs/guides/flax.md", "docs/guides/multi_device.md", "docs/guides/running_stats.md",
          "docs/guides/running_stats_tools.md", "docs/guides/small_batch.md",
          "docs/guides/equinox.md", "docs/guides/complex.md",
          "docs/guides/gpu_kernels.md"} <= set(PAGES)


# Pages that run a peer library's own layers, which are written for JAX's standard dtype
# promotion (conftest turns on strict promotion for the suite; jaxnorm's code works under both).
STANDARD_PROMOTION = {"docs/guides/equinox.md"}


@pytest.mark.parametrize("page", PAGES)
def test_page_examples(page):
  promotion = (jax.numpy_dtype_promotion("standard") if page in STANDARD_PROMOTION
               else contextlib.nullcontext())
  with promotion:
    result = doctest.testfile(str(ROOT / page), module_relative=False, optionflags=OPTIONS)
  assert result.attempted > 0
  assert result.failed == 0


def test_api_reference_lists_every_public_module():
  index = (DOCS / "api" / "index.md").read_text()
  block = re.search(r"\.\. autosummary::\n((?:   .*\n|\n)*)", index).group(1)
  listed = {line.strip() for line in block.splitlines()
            if line.strip() and not line.strip().startswith(":")}
  public = {"jaxnorm"} | {f"jaxnorm.{m.name}" for m in pkgutil.iter_modules(jaxnorm.__path__)
                          if not m.name.startswith("_")}
  assert listed == public, "docs/api/index.md must list exactly the public modules"


def test_the_guides_index_picks_up_every_guide():
  index = (DOCS / "guides" / "index.md").read_text()
  toctree = re.search(r"```\{toctree\}\n(.*?)```", index, re.DOTALL).group(1)
  assert ":glob:" in toctree and "\n*\n" in toctree, "a new guide needs no edit of the index"
