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
