"""The benchmark runner keeps working without a GPU: every suite runs on tiny shapes (``--smoke``) and
writes rows with every schema column, RESULTS.md regenerates from them, the committed RESULTS.md is
exactly what the committed CSVs give, and resume / budget / bad input behave."""
import csv
import glob
import os
import shutil
import subprocess
import sys

import pytest

from benchmarks import gpu_report, report, run, schema

ROOT = schema.ROOT


def _run(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def _rows(folder):
    return schema.read_rows(sorted(glob.glob(os.path.join(folder, "*.csv"))))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    proc = _run("benchmarks.run", "--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    return out, _rows(out)


def test_smoke_rows_have_every_column_and_every_suite(smoke):
    _, rows = smoke
    assert {r["suite"] for r in rows} == set(run.SUITES)
    for r in rows:
        assert list(r) == schema.COLUMNS
        assert all(r[c] for c in schema.REQUIRED), r
        assert r["value"] not in ("", "nan") or r["note"].startswith("skipped"), r
    by = {(r["suite"], r["kind"], r["metric"]) for r in rows}
    assert ("layers", "spu_lora_triton", "time_ms") in by            # the interpreter case ran
    assert ("host", "spu_lora_triton", "launches") in by               # the stand-in driver counted launches
    assert ("models", "spu_lora_qv+compile", "graph_breaks") in by
    # every ratio divides by the case's reference measured in the same run
    refs = {(r["case"], r["metric"]): float(r["value"]) for r in rows if r["kind"] == r["reference"] and r["value"]}
    for r in rows:
        if r["ratio"]:
            assert float(r["ratio"]) == pytest.approx(float(r["value"]) / refs[(r["case"], r["metric"])], rel=1e-4)
    assert len({r["run_id"] for r in rows}) == 1


def test_results_md_regenerates_from_smoke_rows(smoke, tmp_path):
    out, rows = smoke
    md = tmp_path / "RESULTS.md"
    shutil.copy(report.MARKDOWN, md)
    assert report.main(["--results", str(out), "--markdown", str(md), "--plots", str(tmp_path / "plots")]) == 0
    text = md.read_text()
    for suite in ("layers", "models", "mezo", "ladder", "host"):
        block = text.split(f"<!-- generated: {suite} -->")[1].split(f"<!-- /generated: {suite} -->")[0]
        assert "Pending" not in block and rows[0]["gpu"] in block, suite
    assert "spu_lora_triton" in text and "launches" in text
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "plots").glob("*.png")) == ["layers", "models"]
    # the prose outside the generated blocks is kept
    assert report.BLOCK.sub("", text) == report.BLOCK.sub("", open(report.MARKDOWN).read())


def test_committed_results_md_is_generated_from_committed_csvs():
    assert report.main(["--check"]) == 0, "run `python -m benchmarks.report` and commit RESULTS.md"


def test_resume_skips_what_the_run_has_and_budget_stops(tmp_path):
    proc = _run("benchmarks.run", "mezo", "--smoke", "--out", str(tmp_path), "--budget-s", "1e-9")
    assert proc.returncode == run.BUDGET_REACHED and "budget" in proc.stdout
    assert not glob.glob(str(tmp_path / "*.csv"))
    proc = _run("benchmarks.run", "mezo", "--smoke", "--out", str(tmp_path), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = _rows(tmp_path)
    assert {r["kind"] for r in first} == {"two_forwards", "mezo_step"}
    proc = _run("benchmarks.run", "mezo", "--smoke", "--out", str(tmp_path), "--resume")
    assert proc.returncode == 0
    assert _rows(tmp_path) == first                                     # nothing measured twice
    # a run measured on other sources is not continued: a new run starts
    path = glob.glob(str(tmp_path / "*.csv"))[0]
    text = open(path).read().replace(first[0]["commit"], "0000000 src:0000000000")
    open(path, "w").write(text)
    proc = _run("benchmarks.run", "mezo", "--smoke", "--out", str(tmp_path), "--resume")
    assert proc.returncode == 0 and "starting a new run" in proc.stdout
    assert len({r["run_id"] for r in _rows(tmp_path)}) == 2


def test_bad_input_is_a_clear_error(tmp_path):
    proc = _run("benchmarks.run", "layrs", "--smoke")
    assert proc.returncode == 2 and "unknown suite(s) layrs" in proc.stderr
    proc = _run("benchmarks.run", "--cases", "([", "--smoke")
    assert proc.returncode == 2 and "not a regular expression" in proc.stderr
    with pytest.raises(ValueError, match="missing \\['metric'\\]"):
        schema.append_rows(str(tmp_path / "x.csv"), [dict(run_id="r", suite="s", case="c", kind="k", config="c",
                                                          dtype="bf16", unit="ms", device="cpu", gpu="g", torch="t",
                                                          spu_kernels="v", commit="c", date="d")])
    assert not (tmp_path / "x.csv").exists()                             # nothing half-written
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        csv.writer(f).writerow(["suite", "case"])
    with pytest.raises(ValueError, match="not the schema's"):
        schema.read_rows([str(bad)])
    with pytest.raises(ValueError, match="no generated block for gpu-tests, models"):
        report.render([], "<!-- generated: layers -->\n<!-- /generated: layers -->\n")


def test_gpu_test_counts_come_from_the_junit_report(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text('<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="10">'
                   '<testcase classname="tests.test_a" name="test_ok"/>'
                   '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
                   '<testcase classname="tests.test_b" name="test_err"><error message="y"/></testcase>'
                   '</testsuite></testsuites>')
    counts, failing = gpu_report.junit_counts(str(xml))
    assert counts == {"passed": 6.0, "failed": 2.0, "skipped": 2.0}
    assert failing == ["tests.test_a::test_bad", "tests.test_b::test_err"]
