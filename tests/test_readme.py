"""The README's commands are the ones CI runs and the files they name exist."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
  return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


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


def test_readme_shard_map_example_gives_the_whole_batch_statistics():
  import jax
  import numpy as np

  import jaxnorm as jn
  from tests import refs

  readme = (ROOT / "README.md").read_text()
  (code,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
             if "jax.shard_map(train_step" in b]
  scope: dict = {}
  exec(compile(code, "README.md", "exec"), scope)
  x, mask = np.asarray(scope["x"]), np.asarray(scope["mask"])
  assert len(set(mask.reshape(jax.device_count(), -1).sum(1).tolist())) > 1
  _, expected = jn.batch_norm(x, jn.batch_norm_init(x.shape[-1]), training=True,
                              mask=mask)
  new_state = scope["state"]
  # Both are within the bounds of the exact statistics (momentum 0.99 from the initial state).
  red = tuple(range(x.ndim - 1))
  _, mean, var = refs.ref_moments(x, red, mask)
  mean_err = refs.ema_error(0.99, 0.0, mean, refs.mean_error(x, red, mask))
  var_err = refs.ema_error(0.99, 1.0, var, refs.var_error(x, red, mask))
  refs.assert_within(new_state.mean, expected.mean, 2 * mean_err, "mean")
  refs.assert_within(new_state.var, expected.var, 2 * var_err, "var")
  assert int(new_state.count) == 1
