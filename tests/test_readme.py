"""The README's commands are the ones CI runs and the files it names or links exist."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
  return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.DOTALL)]


def _fresh_machine_blocks() -> list[str]:
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
  return _bash_blocks(section)


def test_ci_runs_the_readme_test_command():
  blocks = _fresh_machine_blocks()
  assert len(blocks) == 2, "the fresh-machine section gives exactly two commands"
  demo, tests = blocks
  ci = (ROOT / ".ci" / "run").read_text()
  assert tests in ci.splitlines(), "the README's test command must be the one .ci/run runs"
  assert "pytest" in tests and '".[test]"' in tests
  script = re.search(r"python (examples/\S+\.py)", demo).group(1)
  assert (ROOT / script).is_file(), f"the demonstration command names {script}"


def test_ci_installs_once_with_the_readme_command():
  """.ci/run makes its environment once, with the README's test command, before every step that
  uses it: no second install that the README's command would merely repeat."""
  tests = _fresh_machine_blocks()[1]
  ci = (ROOT / ".ci" / "run").read_text()
  steps = [line for line in ci.splitlines() if line.strip() and not line.startswith("#")]
  installs = [i for i, line in enumerate(steps) if "-m venv" in line or '".[test]"' in line]
  assert [steps[i] for i in installs] == [tests], "one install, and it is the README's command"
  for step in ("ruff check", "mypy jaxnorm", "-m pytest", "sphinx-build", "compiled.py --check"):
    assert installs[0] <= min(i for i, line in enumerate(steps) if step in line), step


def test_ci_ends_with_the_floor_run_from_the_constraints_file():
  """After every step on the newest releases, .ci/run runs .ci/floor: the pinned floors in an
  environment of their own, on the tests marked `floor` (tests/conftest.py)."""
  ci = (ROOT / ".ci" / "run").read_text()
  steps = [line for line in ci.splitlines() if line.strip() and not line.startswith("#")]
  assert steps[-1] == "bash .ci/floor"
  floor = (ROOT / ".ci" / "floor").read_text()
  assert 'pip install -e ".[test]" -c .ci/constraints-floor.txt' in floor
  assert '-m pytest -q -n 2 -m "floor and not slow"' in floor
  assert "compiled.py" not in floor, "the compiled check runs on the newest JAX only"


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
