"""Sweeps in this process, in local worker processes and on Ray (lowbit.sweep), and the
sensitivity pass run each way."""

import json
import operator
import os
import sys

import pytest
import torch

from lowbit.cli import main
from lowbit.sweep import SweepError, run_jobs


def _ray():
    """Ray, or a skip; with LOWBIT_REQUIRE_RAY=1 a missing Ray fails instead (CI)."""
    try:
        import ray
    except ImportError:
        if os.environ.get("LOWBIT_REQUIRE_RAY") == "1":
            raise
        pytest.skip("Ray is not installed (pip install 'lowbit[ray]')")
    return ray


def test_serial_and_process_pool_give_the_same_ordered_results():
    jobs = list(range(-6, 7))
    serial = run_jobs(operator.pow, jobs[7:], shared=3, progress=False)
    assert serial == [3**j for j in jobs[7:]]
    pooled = run_jobs(operator.pow, jobs[7:], workers=2, shared=3, progress=False)
    assert pooled == serial
    assert run_jobs(abs, jobs, workers=2, progress=False) == [abs(j) for j in jobs]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_is_named(workers):
    with pytest.raises(SweepError, match=r"job 2 0 failed: ZeroDivisionError") as e:
        run_jobs(operator.truediv, [4, 2, 0, 1], workers=workers, shared=1.0, progress=False)
    assert "ZeroDivisionError" in e.value.remote_traceback


def test_unpicklable_work_is_refused_before_any_process_starts():
    with pytest.raises(SweepError, match="cannot be sent to worker processes"):
        run_jobs(lambda j: j, [1, 2], workers=2, progress=False)


def test_missing_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(SweepError, match=r"pip install 'lowbit\[ray\]'"):
        run_jobs(abs, [1], ray_address="local", progress=False)


def test_ray_and_workers_flags_go_with_method_auto_only(capsys):
    for flag in (["--ray", "local"], ["--workers", "2"]):
        code = main(["compress", "--method", "prom", "--model", "lenet5", "--data", "sample",
                     "--out", "unused", "--json", *flag])  # fmt: skip
        out, _ = capsys.readouterr()
        assert code != 0 and "go with --method auto" in json.loads(out)["error"]


def _sensitivity(**where):
    from lowbit import data, models
    from lowbit.sensitivity import layer_sensitivity

    torch.manual_seed(0)
    net = models.create("lenet5")  # untrained: the table need not be useful, only equal
    ds = data.load("sample", "train").subset(264, seed=0)
    x = (torch.as_tensor(ds.images).float() / 255.0).reshape(-1, 1, 28, 28)
    y = torch.as_tensor(ds.labels, dtype=torch.long)
    res = layer_sensitivity(net, x[:64], x[64:], y[64:], ["int8", "ternary", "sst-16-2"],
                            latency=False, progress=False, **where)  # fmt: skip
    for r in res["rows"]:
        r.pop("seconds")  # wall time of the job, the one figure allowed to differ
    return res


@pytest.fixture(scope="module")
def serial_table():
    res = _sensitivity()
    assert len(res["rows"]) == 4 * 3
    assert len({r["accuracy"] for r in res["rows"]}) > 1  # not one figure everywhere
    return res


def test_sensitivity_in_worker_processes_equals_the_serial_table(serial_table):
    assert _sensitivity(workers=2) == serial_table


def test_sensitivity_on_a_local_ray_instance_equals_the_serial_table(serial_table):
    ray = _ray()
    assert _sensitivity(workers=2, ray_address="local") == serial_table
    assert not ray.is_initialized()  # the instance it started is shut down


def test_an_unreachable_cluster_is_one_clear_error():
    _ray()
    with pytest.raises(SweepError, match="cannot reach Ray at 127.0.0.1:1"):
        run_jobs(abs, [1], ray_address="127.0.0.1:1", progress=False)


def test_ray_runs_jobs_in_order_and_names_a_failing_one():
    ray = _ray()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        got = run_jobs(operator.pow, list(range(8)), ray_address="auto", shared=2, progress=False)
        assert got == [2**j for j in range(8)]
        with pytest.raises(SweepError, match=r"job 1 0 failed: ZeroDivisionError"):
            run_jobs(operator.truediv, [1, 0, 2], ray_address="auto", shared=1, progress=False)
        assert ray.is_initialized()  # the caller's instance is left running
    finally:
        ray.shutdown()
