"""Runs the snippets of docs/guides/small_batch.md (doctest sessions) as written."""

import doctest
import pathlib

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides" / "small_batch.md"


def test_small_batch_guide_snippets_run():
  result = doctest.testfile(str(PAGE), module_relative=False,
                            optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0
