"""The guide docs/guides/running_stats_tools.md runs as written (its snippets are doctests)."""

from __future__ import annotations

import doctest
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_running_stats_guide_snippets():
  result = doctest.testfile(str(ROOT / "docs" / "guides" / "running_stats_tools.md"),
                            module_relative=False,
                            optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0
