"""Bad input exits non-zero with one clear line and leaves no run directory behind."""

import pytest

from tests.helpers import assert_refused, run_cli


@pytest.mark.parametrize("overrides, needle", [
    (["data.source=/nonexistent/site.csv"], "data file not found: /nonexistent/site.csv"),
    (["cohorts.0.arch=resnet"], "cohorts[0].arch: 'resnet' is neither a built-in"),
    (["cohorts.0.clients=2000"], "fewer than 2006 clients"),
    (["partition.alpha=-1"], "partition.alpha: must be > 0"),
    (["rounds=zero"], "rounds: expected an integer"),
    (["partition.bogus=1"], "partition.bogus: unknown key"),
    (["data.source=breast_cancer"], "cohorts[0].arch: architecture 'cnn' needs image-shaped"),
])
def test_bad_settings_are_refused(scenario, tmp_path, overrides, needle):
    out = tmp_path / "run"
    args = [a for o in overrides for a in ("--set", o)]
    assert_refused(run_cli("simulate", scenario(), "--out", out, *args), out, needle)


def test_missing_label_column(scenario, tmp_path):
    data = tmp_path / "site.csv"
    data.write_text("a,b,target\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(50)))
    out = tmp_path / "run"
    proc = run_cli("simulate", scenario(), "--out", out, "--set", f"data.source={data}",
                   "--set", "cohorts=[{arch='mlp', clients=3}]")
    assert_refused(proc, out, "label column 'label' not found (columns: a, b, target)")


def test_malformed_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n[[cohorts]\narch = 'mlp'\n")
    out = tmp_path / "run"
    assert_refused(run_cli("simulate", bad, "--out", out), out, "malformed TOML")


def test_existing_output_directory_is_not_touched(scenario, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = run_cli("simulate", scenario(), "--out", out)
    assert proc.returncode == 2 and "output directory already exists" in proc.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_report_refuses_a_directory_without_a_summary(tmp_path):
    proc = run_cli("report", tmp_path)
    assert proc.returncode == 2 and "summary.json is missing" in proc.stderr
    (tmp_path / "summary.json").write_text("{not json")
    proc = run_cli("report", tmp_path)
    assert proc.returncode == 2 and "summary.json: not valid JSON" in proc.stderr
