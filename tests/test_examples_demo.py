"""The demonstration scripts run (quick mode) and write what they promise.

`examples/bn_vs_ln.py --quick` trains the CNN sweep and, in the same process, the recurrent
experiment of `examples/rnn_ln.py` (its `main`), so one run covers both; the scripts run as a
user runs them, in a subprocess from the repository root.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NORMS = {"none", "batch", "layer", "group"}
RUN_KEYS = {"norm", "batch_size", "seed", "test_accuracy", "final_train_loss", "train_seconds"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[pathlib.Path, str]:
  out = tmp_path_factory.mktemp("bn_vs_ln")
  proc = _run("examples/bn_vs_ln.py", "--quick", "--out", str(out), timeout=600)
  return out, proc.stdout


def _assert_png(path: pathlib.Path) -> None:
  data = path.read_bytes()
  assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
  assert data[12:16] == b"IHDR"
  width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
  assert width >= 200 and height >= 150, (path.name, width, height)
  import matplotlib.image

  img = matplotlib.image.imread(path)
  assert img.shape[:2] == (height, width)
  assert float(np.ptp(img)) > 0, f"{path.name} is blank"


def _assert_claims(claims: list, numbers: list[int]) -> None:
  assert [c["claim"].split(".")[0] for c in claims] == [str(n) for n in numbers]
  for c in claims:
    assert set(c) == {"claim", "holds", "evidence"}
    assert isinstance(c["holds"], bool)
    assert isinstance(c["evidence"], str) and len(c["evidence"]) > 40


def test_results_json_schema(quick_run):
  out, _ = quick_run
  text = (out / "results.json").read_text()
  assert "NaN" not in text and "Infinity" not in text  # strict JSON
  res = json.loads(text)
  assert set(res) == {"dataset", "config", "runs", "claims"}
  assert isinstance(res["dataset"], str) and "digits" in res["dataset"]
  assert isinstance(res["config"], dict)
  sizes, seeds = res["config"]["batch_sizes"], res["config"]["seeds"]
  assert len(res["runs"]) == len(NORMS) * len(sizes) * seeds
  for run in res["runs"]:
    assert set(run) == RUN_KEYS
    assert run["norm"] in NORMS
    assert isinstance(run["batch_size"], int) and run["batch_size"] in sizes
    assert isinstance(run["seed"], int) and 0 <= run["seed"] < seeds
    assert 0.0 <= run["test_accuracy"] <= 1.0
    loss = run["final_train_loss"]  # null only where training diverged
    assert loss is None or (np.isfinite(loss) and loss >= 0)
    assert run["train_seconds"] > 0
  keys = {(r["norm"], r["batch_size"], r["seed"]) for r in res["runs"]}
  assert len(keys) == len(res["runs"]), "duplicate runs"


def test_every_claim_has_a_verdict_with_evidence(quick_run):
  out, stdout = quick_run
  res = json.loads((out / "results.json").read_text())
  _assert_claims(res["claims"], [1, 2, 3, 4, 5, 6])
  rnn = json.loads((out / "rnn_results.json").read_text())
  _assert_claims(rnn["claims"], [5])
  assert res["claims"][4] == rnn["claims"][0]
  for c in res["claims"]:
    assert c["claim"] in stdout  # the verdicts are printed


def test_output_reads_top_to_bottom(quick_run):
  """Progress, each experiment's table, then the six verdicts once each, in order."""
  _, stdout = quick_run
  marks = ["1. CNN on digits", "CNN test accuracy (%)", "2. GRU on digits",
           "RNN test accuracy (%)", "The six claims"]
  marks += [f"] {n}. " for n in range(1, 7)]
  at = [stdout.find(m) for m in marks]
  assert -1 not in at, [m for m, i in zip(marks, at, strict=True) if i < 0]
  assert at == sorted(at), f"out of order: {sorted(zip(at, marks, strict=True))}"
  for n in range(1, 7):
    assert stdout.count(f"] {n}. ") == 1, f"claim {n} printed {stdout.count(f'] {n}. ')} times"


def test_plots_are_valid_pngs(quick_run):
  out, _ = quick_run
  for name in ("accuracy_vs_batch_size.png", "loss_curves.png", "inference.png",
               "rnn_accuracy.png"):
    _assert_png(out / name)


def test_training_works_at_the_reference_batch_size(quick_run):
  out, _ = quick_run
  res = json.loads((out / "results.json").read_text())
  ref = res["config"]["ref_batch_size"]
  for norm in NORMS:
    accs = [r["test_accuracy"] for r in res["runs"]
            if r["norm"] == norm and r["batch_size"] == ref]
    assert np.mean(accs) > 0.8, (norm, accs)


def test_inference_batch_size_one(quick_run):
  """Per-example normalizers and BN's running statistics do not see the test batch; BN with the
  batch's own statistics at batch size 1 maps every example to the same output."""
  out, _ = quick_run
  inf = json.loads((out / "details.json").read_text())["inference"]
  acc, full = inf["accuracy"], 512
  assert acc["batch_running_bs1"] == acc[f"batch_running_bs{full}"]
  assert acc["layer_bs1"] == acc[f"layer_bs{full}"]
  assert acc["group_bs1"] == acc[f"group_bs{full}"]
  assert inf["layer_max_abs_logit_diff_bs1_vs_full"] < 1e-4
  assert inf["group_max_abs_logit_diff_bs1_vs_full"] < 1e-4
  assert inf["batch_running_max_abs_logit_diff_bs1_vs_full"] < 1e-4
  # Zero variance in the dense BN layer: a constant prediction, about one class in ten.
  assert max(acc["batch_stats_bs1"]) < 0.25
  assert min(acc[f"batch_stats_bs{full}"]) > 0.8


def test_rnn_results(quick_run):
  out, _ = quick_run
  rnn = json.loads((out / "rnn_results.json").read_text())
  assert set(rnn) == {"dataset", "config", "runs", "claims"}
  norms = {r["norm"] for r in rnn["runs"]}
  assert norms == {"none", "layer", "batch_shared", "batch_per_step"}
  for r in rnn["runs"]:
    assert set(r) >= RUN_KEYS
    # Running statistics and LN are per example: batch size 1 changes nothing.
    assert r["test_accuracy_bs1"] == r["test_accuracy"], r
    if r["norm"] == "batch_per_step":
      assert r["test_accuracy_bs1_batch_stats"] < 0.25, r


def test_rnn_script_cli():
  proc = _run("examples/rnn_ln.py", "--help", timeout=120)
  assert "--quick" in proc.stdout and "--out" in proc.stdout


def _demo_module():
  import importlib.util
  import os

  spec = importlib.util.spec_from_file_location("bn_vs_ln_demo",
                                                ROOT / "examples" / "bn_vs_ln.py")
  module = importlib.util.module_from_spec(spec)
  flags = os.environ.get("XLA_FLAGS")
  try:  # the script sets its own XLA flags when imported: not for this process's children
    spec.loader.exec_module(module)
  finally:
    if flags is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = flags
  return module


def _claim3(demo, layer: list[float], group: list[float], none: list[float]) -> dict:
  """Claim 3's verdict on synthetic accuracies at batch sizes 2, 32, 128 (5 seeds each, seed
  noise of 0.2 points), with every other input of `decide_claims` held fixed."""
  sizes, seeds = (2, 32, 128), 5
  noise = np.array([-0.002, -0.001, 0.0, 0.001, 0.002])
  acc = {}
  for norm, means in {"layer": layer, "group": group, "none": none,
                      "batch": [0.7, 0.98, 0.98]}.items():
    for b, m in zip(sizes, means, strict=True):
      acc[(norm, b)] = m + noise
  losses = {k: np.ones((seeds, 4)) for k in acc}
  n = demo.N_TEST
  inf = {"layer_max_abs_logit_diff_bs1_vs_full": 0.0,
         "accuracy": {"batch_running_bs1": 0.98 + noise, "batch_stats_bs1": 0.1 + noise,
                      "batch_stats_bs8": 0.9 + noise,
                      f"batch_running_bs{n}": 0.98 + noise, f"batch_stats_bs{n}": 0.98 + noise,
                      "layer_bs1": 0.97 + noise, f"layer_bs{n}": 0.97 + noise}}
  cfg = {"batch_sizes": sizes, "ref_batch_size": 32, "seeds": seeds, "epochs": 4}
  claims = demo.decide_claims(acc, losses, inf, cfg)
  return next(c for c in claims if c["claim"].startswith("3."))


def test_claim_3_is_not_carried_by_a_baseline_that_diverged():
  """LN drifts by 2 points across batch sizes, beyond the noise, while GroupNorm (the
  per-example baseline) holds still: the claim does not hold, although the unnormalized
  network, which diverged at batch 128 (10%), has a far larger range."""
  demo = _demo_module()
  drift = _claim3(demo, layer=[0.98, 0.97, 0.96], group=[0.98, 0.98, 0.98],
                  none=[0.98, 0.98, 0.10])
  assert drift["holds"] is False
  assert "GroupNorm" in drift["evidence"]
  steady = _claim3(demo, layer=[0.98, 0.98, 0.98], group=[0.98, 0.98, 0.97],
                   none=[0.98, 0.98, 0.10])
  assert steady["holds"] is True
  untrained = _claim3(demo, layer=[0.98, 0.98, 0.98], group=[0.98, 0.98, 0.20],
                      none=[0.98, 0.98, 0.98])
  assert untrained["holds"] is False and "Not tested" in untrained["evidence"]


# --- the side-by-side comparison (examples/why_jaxnorm.py, run at the end of bn_vs_ln.py) ------

WHY_ROWS = ["offset_layernorm", "offset_batchnorm", "uneven_mean", "uneven_var", "empty_mean",
            "empty_var", "nan_mean", "nan_var"]
WHY_ROW_KEYS = {"id", "case", "quantity", "data", "truth", "flax", "jaxnorm", "tolerance",
                "flax_ok", "jaxnorm_ok", "verdict", "flax_use_fast_variance_false",
                "flax_use_fast_variance_false_ok"}


def _why_module():
  """examples/why_jaxnorm.py as a module (imported, it sets no flags: this process has the 8 CPU
  devices of conftest.py)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("why_jaxnorm_demo",
                                                ROOT / "examples" / "why_jaxnorm.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _why_rows(out: pathlib.Path) -> dict[str, dict]:
  return {r["id"]: r for r in json.loads((out / "why_jaxnorm.json").read_text())["rows"]}


def _within(value, truth, bound) -> bool:
  return bool(value is not None and abs(value - truth) <= bound)


def test_why_jaxnorm_json_schema_and_computed_verdicts(quick_run):
  out, _ = quick_run

  def no_constant(name):
    raise AssertionError(f"why_jaxnorm.json holds {name}: not strict JSON (NaN is null)")

  res = json.loads((out / "why_jaxnorm.json").read_text(), parse_constant=no_constant)
  assert set(res) == {"title", "config", "rows", "seconds"}
  assert res["seconds"] > 0 and isinstance(res["config"], dict)
  assert [r["id"] for r in res["rows"]] == WHY_ROWS
  for r in res["rows"]:
    assert set(r) == WHY_ROW_KEYS, r["id"]
    assert all(isinstance(r[k], str) and r[k] for k in ("case", "quantity", "data", "verdict"))
    assert isinstance(r["truth"], float) and np.isfinite(r["truth"])
    assert r["tolerance"] > 0
    for lib in ("flax", "jaxnorm", "flax_use_fast_variance_false"):
      assert r[lib] is None or isinstance(r[lib], float)
      # The verdict follows from the numbers written beside it.
      assert r[f"{lib}_ok"] is _within(r[lib], r["truth"], r["tolerance"]), (r["id"], lib)
    assert r["verdict"].startswith("jaxnorm right" if r["jaxnorm_ok"] else "jaxnorm ")
  assert "synthetic" in res["rows"][0]["data"]
  assert all("digits" in r["data"] for r in res["rows"][2:])


def test_why_jaxnorm_against_the_error_bounds(quick_run):
  """jaxnorm lies within the float32 error bound of tests/refs.py on each row's own input, and
  flax outside it (or NaN): the demonstration's verdicts hold by the test suite's bounds too."""
  from tests import refs

  out, _ = quick_run
  rows, why = _why_rows(out), _why_module()
  bounds = {}
  x = why.offset_data()
  bounds["offset_layernorm"] = refs.norm_bound(x, refs.ref_layer_norm(x)).max()
  bounds["offset_batchnorm"] = refs.norm_bound(
      x, refs.ref_batch_norm_train(x)[0], reduction_axes=0, feature_axes=-1,
      epsilon=1e-5).max()
  pixels = why.digits_pixels()
  p = why.most_variable_pixel(pixels)
  for rid, counts in (("uneven", why.COUNTS_UNEVEN), ("empty", why.COUNTS_EMPTY)):
    xs, mask = why.device_batch(pixels, counts)
    _, mean, var = refs.ref_moments(xs, 0, mask)
    assert rows[f"{rid}_mean"]["truth"] == pytest.approx(mean[p], rel=1e-12)
    assert rows[f"{rid}_var"]["truth"] == pytest.approx(var[p], rel=1e-12)
    # momentum 0: batch_stats = 0 * old + 1 * batch.
    bounds[f"{rid}_mean"] = refs.ema_error(0.0, 0.0, mean[p], refs.mean_error(xs, 0, mask)[p])
    bounds[f"{rid}_var"] = refs.ema_error(0.0, 1.0, var[p], refs.var_error(xs, 0, mask)[p])
  clean = [b[:, p] for i, b in enumerate(why.nan_batches(pixels, p)) if i != 1]
  for what, values, errors in (
      ("mean", [b.mean() for b in refs.f64(clean)], [refs.mean_error(b, 0) for b in clean]),
      ("var", [b.var() for b in refs.f64(clean)], [refs.var_error(b, 0) for b in clean])):
    bounds[f"nan_{what}"] = refs.ema_chain_error(why.NAN_MOMENTUM, values, errors)
  assert set(bounds) == set(WHY_ROWS)
  for rid, bound in bounds.items():
    r = rows[rid]
    assert _within(r["jaxnorm"], r["truth"], bound), (rid, r["jaxnorm"], r["truth"], bound)
    assert not _within(r["flax"], r["truth"], bound), (rid, r["flax"], r["truth"], bound)
    # flax's opt-in exact variance, reported beside the table, fixes the offset case only.
    exact = r["flax_use_fast_variance_false"]
    assert _within(exact, r["truth"], bound) is rid.startswith("offset"), (rid, exact, bound)
  for rid in ("empty_mean", "empty_var", "nan_mean", "nan_var"):
    assert rows[rid]["flax"] is None, rid  # NaN (google/flax#2417; NaN for good)


def test_why_jaxnorm_plot_is_a_valid_png(quick_run):
  out, _ = quick_run
  _assert_png(out / "why_jaxnorm.png")


def test_bn_vs_ln_prints_the_why_jaxnorm_table_last(quick_run):
  out, stdout = quick_run
  at = [stdout.find(m) for m in ("The six claims", "3. Why jaxnorm", "jaxnorm.linen  verdict")]
  assert -1 not in at and at == sorted(at), at
  table = stdout[at[2]:]
  for r in _why_rows(out).values():
    assert f"{r['quantity']}" in table and r["verdict"] in table, r["id"]
  assert "why_jaxnorm.json" in table
  assert "use_fast_variance=False: right in 2 of the 8 rows" in table


def test_why_jaxnorm_verdict_is_computed():
  """The verdict of a row comes from its numbers: a jaxnorm value outside the tolerance, or a
  NaN, is reported as such, whatever the case."""
  why = _why_module()
  tol = why.TOL_FACTOR * why.U32 * 1.0
  exact = why.FLAX_EXACT

  def row(flax, jaxnorm, flax_exact=1.0):
    return why.row("r", "case", "q", "d", 1.0,
                   {"flax": flax, "jaxnorm": jaxnorm, exact: flax_exact}, 1.0)

  both = row(1.0, 1.0 + tol / 2)
  assert both["flax_ok"] and both["jaxnorm_ok"] and both["verdict"] == "both right"
  bad = row(float("nan"), 1.5, flax_exact=1.0 + 2 * tol)
  assert not bad["flax_ok"] and not bad["jaxnorm_ok"] and not bad[f"{exact}_ok"]
  assert bad["verdict"] == "jaxnorm OFF BY 0.5, flax NaN"
  good = row(1.25, 1.0)
  assert good["verdict"] == "jaxnorm right, flax off by 0.25" and good[f"{exact}_ok"]
  note = why.exact_variance_note([dict(good, case="1. a: x"), dict(bad, case="2. b: y")])
  assert note.startswith("flax with its opt-in use_fast_variance=False: right in 1 of the 2 "
                         "rows its default gets wrong (1. a: x); still wrong in 1 (2. b)")
