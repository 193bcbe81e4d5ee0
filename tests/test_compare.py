"""``lowbit compare``: the cross-method report (table, Pareto marking, plots, HTML)."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit import models
from lowbit.cli import main
from lowbit.report import NOT_INSTALLED, ReportError, build_report, collect, pareto_front


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """``lowbit compare --run prom,sst``: one tiny FP LeNet-5, two one-epoch compress jobs
    from it, timed with few repeats."""
    out = tmp_path_factory.mktemp("compare") / "report"
    code, stdout, err = _cli(
        "compare", "--run", "prom,sst", "--model", "lenet5", "--data", "sample", "--epochs",
        "1", "--limit-train", "128", "--limit-test", "64", "--batch-size", "64", "--quiet",
        "--repeats", "3", "--out", str(out), "--json",
    )  # fmt: skip
    assert code == 0, err
    return out, json.loads(stdout)


def _have_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def test_table_values_are_the_results(compared):
    out, rep = compared
    assert rep["model"] == "lenet5" and rep["data"] == "sample"
    assert json.loads((out / "report.json").read_text())["rows"] == rep["rows"]
    rows = {r["label"]: r for r in rep["rows"]}
    assert set(rows) == {"fp32", "prom", "sst"}
    md = (out / "report.md").read_text()
    for method in ("prom", "sst"):
        res = json.loads((out / method / "result.json").read_text())
        row = rows[method]
        for key in ("test_accuracy", "fp_test_accuracy", "storage_bytes", "energy_pj", "bops"):
            assert row[key] == res[key], (method, key)
        assert Path(row["packed"]).samefile(res["packed"])
        line = next(x for x in md.splitlines() if x.startswith(f"| {method} |"))
        assert f"| {100 * res['test_accuracy']:.2f} |" in line
        assert f"| {res['storage_bytes']:,.0f} |" in line
        lat = row["latency"]
        assert lat["lowbit_ms"] > 0 and lat["torch_fp32_ms"] > 0
        if not _have_onnxruntime():
            assert lat["onnxruntime_fp32_ms"] == NOT_INSTALLED and NOT_INSTALLED in line
        else:
            assert lat["onnxruntime_fp32_ms"] > 0 and lat["onnxruntime_int8_ms"] > 0
    # the FP row: the FP accuracy the results record, the FP model's fp32 bytes and energy
    # (4 bytes a parameter; fp32 MACs, as the results' own fp32 baselines), its own timing
    fp, res = rows["fp32"], json.loads((out / "sst" / "result.json").read_text())
    assert fp["test_accuracy"] == res["fp_test_accuracy"]
    assert fp["storage_bytes"] == 4 * models.count_params(models.create("lenet5"))
    assert fp["storage_bytes"] == pytest.approx(res["fp32_storage_bytes"], rel=0.01)
    assert fp["energy_pj"] == pytest.approx(res["energy_pj"] * res["energy_vs_fp32"])
    assert fp["latency"]["lowbit_ms"] > 0 and fp["bops"] > rows["sst"]["bops"]
    # both jobs started from the one FP model trained into OUT/fp
    prom = json.loads((out / "prom" / "result.json").read_text())
    assert prom["fp_checkpoint"] == res["fp_checkpoint"]
    assert Path(fp["fp_checkpoint"]).samefile(res["fp_checkpoint"])
    assert Path(res["fp_checkpoint"]).parent == out / "fp"
    # Pareto flags agree with the hand-checked rule
    for metric, key in (("bytes", "storage_bytes"), ("energy", "energy_uj")):
        pts = [(r[key], r["test_accuracy"]) for r in rep["rows"]]
        assert [r["pareto"][metric] for r in rep["rows"]] == pareto_front(pts)
    assert rows["sst"]["pareto"]["bytes"]  # the fewest bytes is always on the front


def test_pareto_front_by_hand():
    # (cost, accuracy): a dominates c; b is cheaper; d equals a; e lacks a value
    pts = [(10, 0.9), (5, 0.8), (12, 0.85), (10, 0.9), (None, 0.99), (20, 0.95), (4, 0.7)]
    assert pareto_front(pts) == [True, True, False, True, False, True, True]
    assert pareto_front([(3, 0.5), (3, 0.6)]) == [False, True]
    assert pareto_front([]) == []


def test_html_is_self_contained(compared):
    out, rep = compared
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "url(" not in page and "@import" not in page
    srcs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert page.count("<tr") == 1 + len(rep["rows"]) and '<table id="results">' in page


def test_plots_have_labelled_axes_units_and_legend(compared):
    from PIL import Image

    out, rep = compared
    assert set(rep["plots"]) == {"bytes", "energy", "latency"}
    units = {"bytes": "bytes", "energy": "µJ", "latency": "ms"}
    for metric, plot in rep["plots"].items():
        path = Path(plot["path"])
        assert path.parent == out and path.is_file()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300
            desc = im.info["Description"]  # written by the plot itself
        assert f"x: {plot['xlabel']}" in desc and "y: test accuracy (%)" in desc
        assert units[metric] in plot["xlabel"] and "log scale" in plot["xlabel"]
        assert {"fp32", "prom", "sst", "Pareto front"} <= set(plot["legend"])
        assert f"![accuracy vs {metric}]({path.name})" in (out / "report.md").read_text()


def test_collect_errors_name_the_folder(compared, tmp_path):
    out, _ = compared
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match=f"{empty} has no result.json"):
        collect([out / "prom", empty])
    with pytest.raises(ReportError, match="does not exist"):
        collect([tmp_path / "nowhere"])
    other = tmp_path / "other"
    shutil.copytree(out / "sst", other, ignore=shutil.ignore_patterns("*.pt", "qat"))
    res = json.loads((other / "result.json").read_text())
    (other / "result.json").write_text(json.dumps({**res, "model": "resnet20"}))
    with pytest.raises(ReportError, match=f"{other} holds a result for model 'resnet20'"):
        collect([out / "prom", other])
    (other / "result.json").write_text(json.dumps({**res, "data": "cifar10"}))
    with pytest.raises(ReportError, match=f"{other} .*data set 'cifar10'"):
        collect([out / "prom", other])
    # the CLI: one JSON error line, no traceback
    code, stdout, err = _cli("compare", str(out / "prom"), str(other), "--out",
                             str(tmp_path / "r"), "--json")  # fmt: skip
    assert code == 1 and "Traceback" not in err
    assert str(other) in json.loads(stdout)["error"]
    code, stdout, err = _cli("compare", "--run", "prom,nosuch", "--model", "lenet5", "--data",
                             "sample", "--out", str(tmp_path / "r"), "--json")  # fmt: skip
    assert code == 1 and "nosuch" in json.loads(stdout)["error"]
    code, stdout, err = _cli("compare", "--run", "prom", "--out", str(tmp_path / "r"), "--json")
    assert code == 1 and "--model" in json.loads(stdout)["error"]


def test_no_latency_report_from_given_folders(compared, tmp_path):
    out, _ = compared
    rep = build_report([out / "prom", out / "sst"], tmp_path / "r", latency=False)
    assert set(rep["plots"]) == {"bytes", "energy"} and rep["timing"] is None
    assert not (tmp_path / "r" / "accuracy_vs_latency.png").exists()
    assert all(not r["pareto"]["latency"] for r in rep["rows"])
    assert {p.name for p in (tmp_path / "r").iterdir()} >= {
        "report.md", "report.html", "report.json", "accuracy_vs_bytes.png"}  # fmt: skip
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.endswith(".tmp")]


def test_python_m_lowbit_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "lowbit", "compare", "--help"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and "--run METHODS" in done.stdout and "--repeats" in done.stdout


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("LOWBIT_REQUIRE_BROWSER") == "1":
            pytest.fail("LOWBIT_REQUIRE_BROWSER=1 but neither chromium nor chromium-browser is "
                        "on PATH")  # fmt: skip
        pytest.skip("no chromium on PATH (set LOWBIT_REQUIRE_BROWSER=1 to make this a failure)")
    return found


def test_report_renders_in_a_headless_browser(compared, tmp_path):
    browser = _chromium()
    out, rep = compared
    flags = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]  # fmt: skip
    url = (out / "report.html").resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=60, check=True).stdout  # fmt: skip
    # the table, with one row per report row and the values of the Markdown table
    body = re.search(r"<tbody>(.*?)</tbody>", dom, re.S).group(1)
    trs = re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)
    assert len(trs) == len(rep["rows"])
    for tr, row in zip(trs, rep["rows"]):
        cells = re.findall(r"<td>(.*?)</td>", tr)
        assert cells[0] == row["label"] and cells[1] == f"{100 * row['test_accuracy']:.2f}"
    # the images: data URIs, decoded by the browser (the page's script writes their sizes)
    imgs = re.findall(r"<img[^>]*>", dom)
    assert len(imgs) == 3
    for img in imgs:
        assert 'src="data:image/png;base64,' in img
        width = int(re.search(r'data-natural-width="(\d+)"', img).group(1))
        assert width > 400
    assert 'data-images-decoded="3/3"' in dom
    # and a screenshot of the page is not blank
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1400,1800", f"--screenshot={shot}", url],
                   capture_output=True, timeout=60, check=True)  # fmt: skip
    from PIL import Image

    with Image.open(shot) as im:
        colors = im.convert("L").getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 20  # text and plots, not one flat colour
