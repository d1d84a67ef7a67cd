"""The README's commands are the ones CI runs and the files it names or links exist."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
  return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.DOTALL)]


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
  blocks = _bash_blocks(section)
  assert len(blocks) == 2, "the fresh-machine section gives exactly two commands"
  demo, tests = blocks
  ci = (ROOT / ".ci" / "run").read_text()
  assert tests in ci.splitlines(), "the README's test command must be the one .ci/run runs"
  assert "pytest" in tests and '".[test]"' in tests
  script = re.search(r"python (examples/\S+\.py)", demo).group(1)
  assert (ROOT / script).is_file(), f"the demonstration command names {script}"


def test_readme_links_into_the_site_exist():
  readme = (ROOT / "README.md").read_text()
  links = re.findall(r"\]\(([^)#]+)\)", readme)
  assert any(link.startswith("docs/guides/") for link in links)
  for link in links:
    if "://" not in link:
      assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"


def test_readme_accuracy_table_has_flax_with_exact_variance():
  """flax with use_fast_variance=False is exact on one device: the table shows it, and the text
  names what jaxnorm still adds."""
  readme = (ROOT / "README.md").read_text()
  header = next(line for line in readme.splitlines() if line.startswith("| case (float64"))
  assert "flax (default)" in header and "flax (`use_fast_variance=False`)" in header
  for gain in ("Masks across devices", "Empty shards", "bfloat16 state", "NaN-safe", "The tools"):
    assert f"**{gain}" in readme, gain


def test_readme_says_how_long_the_commands_take():
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
  assert len(re.findall(r"about\s+\d+\s+minutes", section)) >= 2, "demonstration and tests"
  assert "-n 2" in section and re.search(r"about\s+\d+\s+GB", section)
