"""The documentation site's pages: their examples run, and the API reference lists every public
module (each module's page then lists its `__all__`, so every public name gets a page)."""

import contextlib
import doctest
import fnmatch
import pathlib
import pkgutil
import re
import subprocess
import sys

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
          "docs/guides/gpu_kernels.md", "docs/guides/transformers.md"} <= set(PAGES)


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


# The guides in reading order (the site's sidebar, docs/guides/index.md, and the README's list);
# a guide listed here that does not exist yet is skipped. The toctree's `multi_*` takes
# multi_device and then multi_host.
READING_ORDER = ["bn_vs_ln", "flax", "training_loop", "running_stats", "small_batch",
                 "running_stats_tools", "multi_device", "multi_host", "equinox", "complex",
                 "transformers", "gpu_kernels", "performance", "internals"]


def _toctree_order() -> list[str]:
  """The guides in the order Sphinx lists them: each entry or glob pattern in turn (a glob
  adds its matches, sorted, that no earlier entry took)."""
  index = (DOCS / "guides" / "index.md").read_text()
  toctree = re.search(r"```\{toctree\}\n(.*?)```", index, re.DOTALL).group(1)
  remaining = sorted(p.stem for p in (DOCS / "guides").glob("*.md") if p.stem != "index")
  order = []
  for entry in toctree.splitlines():
    if not entry.strip() or entry.startswith(":"):
      continue
    matches = [d for d in remaining if fnmatch.fnmatchcase(d, entry.strip())]
    order += matches
    remaining = [d for d in remaining if d not in matches]
  return order


def test_the_guides_are_in_reading_order():
  order = _toctree_order()
  existing = [g for g in READING_ORDER if (DOCS / "guides" / f"{g}.md").is_file()]
  assert order == existing, (order, "add a new guide to READING_ORDER and the toctree")


def test_the_readme_lists_the_guides_in_reading_order():
  readme = (ROOT / "README.md").read_text().split("\n## Documentation", 1)[1]
  linked = re.findall(r"\]\(docs/guides/(\w+)\.md\)", readme)
  listed = [g for g in dict.fromkeys(linked) if g != "index"]
  assert listed == [g for g in _toctree_order() if g in listed], listed
  assert set(_toctree_order()) - {"multi_host"} <= set(listed), "a guide missing in the README"


def test_api_reference_parameter_types_read_as_written(tmp_path):
  """An alias inside a union renders as its name (`jax.typing.ArrayLike | None`), not as the
  repr of Sphinx's placeholder (`TypeAliasForwardRef('jax.typing.ArrayLike') | None`)."""
  for module in ("sphinx", "myst_parser", "furo", "sphinx_copybutton"):
    pytest.importorskip(module)
  src = tmp_path / "src"
  src.mkdir()
  (src / "index.rst").write_text(".. autofunction:: jaxnorm.layer_norm\n")
  proc = subprocess.run([sys.executable, "-m", "sphinx", "-q", "-b", "text", "-c", str(DOCS),
                         str(src), str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  text = (tmp_path / "out" / "index.txt").read_text()
  assert "TypeAliasForwardRef" not in text
  assert "**scale** (*jax.typing.ArrayLike** | **None*)" in text, text[:2000]


def test_the_performance_guide_holds_its_own_figures():
  text = (DOCS / "guides" / "performance.md").read_text()
  assert "issue" not in text.lower(), "the figures belong in the page"
  gpu = text.split("## GPU", 1)[1].split("\n## ", 1)[0]
  for must in ("2026-11-27", "jax 0.11.2", "flax 0.12.10", "benchmarks/gpu.py",
               "benchmarks/gpu_check.sh"):
    assert must in gpu, must
  for table in re.findall(r"((?:^\|.*\|\n)+)", text, re.MULTILINE):  # no ragged rows
    widths = {row.count("|") for row in table.splitlines()}
    assert len(widths) == 1, table.splitlines()[0]
