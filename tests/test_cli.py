"""The command line: JSON contract, error behaviour, help, train -> eval."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.train import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_the_zoo(capsys):
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0
    names = {m["name"] for m in json.loads(out)["models"]}
    assert {"lenet300", "lenet5", "vgg_small", "resnet20", "resnet18", "mobilenetv2",
            "mobilenetv2_224"} <= names  # fmt: skip


COMMANDS = ["models", "train", "eval", "analyze", "compress", "ptq", "sensitivity", "save",
            "run", "bench", "compare", "demo"]  # fmt: skip


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(re.search(rf"^\s+{c}\b", listed, re.M) for c in COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    assert "usage: lowbit" in capsys.readouterr().out


def test_train_then_eval_json(tmp_path, capsys):
    code, out, err = run(
        capsys, "train", "--model", "lenet5", "--data", "sample", "--epochs", "1",
        "--limit-train", "256", "--limit-test", "128", "--out", str(tmp_path / "r"),
        "--json", "--quiet", "--batch-size", "32",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads(out)  # stdout is exactly one JSON object
    assert 0.0 <= res["test_accuracy"] <= 1.0 and res["test_accuracy"] > 0.3
    assert Path(res["checkpoint"]).is_file()
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["train"]["epochs"] == 1 and config["data"]["train_samples"] == 256
    code, out, err = run(capsys, "eval", "--checkpoint", res["checkpoint"], "--json",
                         "--limit-test", "128")  # fmt: skip
    assert code == 0, err
    ev = json.loads(out)
    assert ev["test_accuracy"] == pytest.approx(res["test_accuracy"])
    assert ev["checkpoint"] == res["checkpoint"] and ev["data"] == "sample"


def test_unknown_model_is_a_clear_json_error(tmp_path, capsys):
    code, out, err = run(capsys, "train", "--model", "no_such_net", "--data", "sample",
                         "--out", str(tmp_path), "--json")  # fmt: skip
    assert code != 0
    msg = json.loads(out)["error"]
    assert "no_such_net" in msg and "resnet20" in msg and "package.module:factory" in msg
    assert "Traceback" not in err


def test_unknown_dataset_lists_valid_names(tmp_path, capsys):
    code, out, _ = run(capsys, "train", "--model", "lenet5", "--data", "imagenet",
                       "--out", str(tmp_path), "--json")  # fmt: skip
    assert code != 0
    msg = json.loads(out)["error"]
    assert "imagenet" in msg and "fashion-mnist" in msg and "cifar10" in msg


def test_missing_data_root_says_how_to_point_at_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    code, out, _ = run(capsys, "train", "--model", "lenet5", "--data", "mnist",
                       "--out", str(tmp_path), "--json")  # fmt: skip
    assert code != 0
    msg = json.loads(out)["error"]
    assert "--data-dir" in msg and "LOWBIT_DATA" in msg


def test_usage_error_under_json_is_json(capsys):
    code, out, err = run(capsys, "train", "--json", "--model", "lenet5")  # no --data/--out
    assert code == 2
    assert "error" in json.loads(out)
    assert "required" in err


def test_bad_model_arg(tmp_path, capsys):
    code, out, _ = run(capsys, "train", "--model", "resnet20", "--model-arg", "widht=0.5",
                       "--data", "sample", "--out", str(tmp_path), "--json")  # fmt: skip
    assert code != 0 and "widht" in json.loads(out)["error"]


def test_eval_missing_checkpoint(tmp_path, capsys):
    code, out, _ = run(capsys, "eval", "--checkpoint", str(tmp_path / "x.pt"), "--json")
    assert code != 0 and "not found" in json.loads(out)["error"]


def test_eval_wrong_data_shape(tmp_path, capsys, shared_data):
    code, out, err = run(
        capsys, "train", "--model", "lenet5", "--data", "sample", "--epochs", "1",
        "--limit-train", "64", "--limit-test", "32", "--out", str(tmp_path / "r"), "--json",
        "--quiet",
    )  # fmt: skip
    assert code == 0, err
    ckpt = json.loads(out)["checkpoint"]
    code, out, _ = run(capsys, "eval", "--checkpoint", ckpt, "--data", "cifar10", "--json",
                       "--data-dir", str(shared_data), "--limit-test", "8")  # fmt: skip
    assert code != 0 and "expects [1, 28, 28]" in json.loads(out)["error"]


def test_console_script_has_no_traceback(tmp_path):
    """The real entry point, in a subprocess: error text only, non-zero exit."""
    proc = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "eval", "--checkpoint", str(tmp_path / "nope.pt")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "checkpoint not found" in proc.stderr
    assert proc.stdout == ""


def test_mnist_from_shared_data(tmp_path, capsys, shared_data):
    code, out, err = run(
        capsys, "train", "--model", "lenet300", "--data", "mnist", "--data-dir",
        str(shared_data), "--epochs", "3", "--limit-train", "512", "--limit-test", "256",
        "--out", str(tmp_path / "m"), "--json", "--quiet", "--batch-size", "32",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["test_accuracy"] > 0.5


def test_analyze_json_keys(capsys):
    code, out, err = run(capsys, "analyze", "--model", "mobilenetv2_224", "--method", "prom",
                         "--input-shape", "1,3,224,224", "--json")  # fmt: skip
    assert code == 0, err
    rep = json.loads(out)
    for key in ("energy_pj", "storage_bytes"):
        assert rep["totals"][key] > 0
    for key in ("energy_vs_fp16", "storage_vs_fp16", "storage_vs_fp32"):
        assert rep["ratios"][key] > 1
    assert rep["convention"] == "operand-width"


def test_compress_prom_end_to_end(tmp_path, capsys):
    code, out, err = run(
        capsys, "compress", "--method", "prom", "--model", "mobilenetv2", "--model-arg",
        "width=0.25", "--data", "sample", "--epochs", "1", "--limit-train", "64",
        "--limit-test", "32", "--batch-size", "32", "--out", str(tmp_path / "c"), "--json",
        "--quiet",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads(out)
    for key in ("method", "model", "test_accuracy", "fp_test_accuracy", "storage_bytes",
                "compression_vs_fp32", "energy_vs_fp16", "density", "out"):  # fmt: skip
        assert res[key] is not None, key
    assert res["compression_vs_fp32"] > 4 and res["energy_vs_fp16"] > 10
    assert 0 < res["density"] < 1  # ternary pointwise weights have zeros
    for f in ("cost.json", "cost.md", "summary.md", "qat/last.pt", "fp/last.pt", "model.lowbit"):
        assert (tmp_path / "c" / f).exists(), f
    # the frozen model predicts what the QAT model predicts; the file holds what the cost
    # model counts
    assert res["frozen_agreement"] >= 0.99
    assert res["packed_payload_bytes"] == pytest.approx(res["storage_bytes"], rel=0.01)
    assert res["packed_bytes"] == (tmp_path / "c" / "model.lowbit").stat().st_size
    code, out, err = run(capsys, "eval", "--checkpoint", res["checkpoint"], "--json",
                         "--limit-test", "32")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["test_accuracy"] == pytest.approx(res["test_accuracy"])
    # lowbit save freezes the checkpoint again: the same file contents
    code, out, err = run(capsys, "save", res["checkpoint"], "-o", str(tmp_path / "again.lowbit"),
                         "--json")  # fmt: skip
    assert code == 0, err
    saved = json.loads(out)
    assert saved["payload_bytes"] == res["packed_payload_bytes"]
    assert saved["method"] == "prom" and saved["storage_bytes"] == res["storage_bytes"]
    code, out, err = run(capsys, "analyze", "--checkpoint", saved["path"], "--json")
    assert code == 0, err
    assert json.loads(out)["totals"]["storage_bytes"] == saved["payload_bytes"]
    # lowbit run: the packed file alone, with lowbit's runtime, on the same test subset
    code, out, err = run(capsys, "run", saved["path"], "--data", "sample", "--limit-test", "32",
                         "--check", "--json")  # fmt: skip
    assert code == 0, err
    ran = json.loads(out)
    assert ran["agreement_with_reference"] == 1.0 and ran["test_samples"] == 32
    assert ran["test_accuracy"] == pytest.approx(res["frozen_test_accuracy"])


def test_save_errors(tmp_path, capsys):
    target = str(tmp_path / "x.lowbit")
    code, out, err = run(capsys, "save", str(tmp_path / "none.pt"), "-o", target, "--json")
    assert code == 1 and "Traceback" not in err and json.loads(out)["error"]
    code, out, err = run(capsys, "analyze", "--checkpoint", str(tmp_path / "none.lowbit"), "--json")
    assert code == 1 and "Traceback" not in err and json.loads(out)["error"]
    junk = tmp_path / "junk.lowbit"
    junk.write_bytes(b"junk")
    code, out, err = run(capsys, "analyze", "--checkpoint", str(junk), "--json")
    assert code == 1 and "not a lowbit file" in json.loads(out)["error"]


def test_compress_unknown_method(tmp_path, capsys):
    code, out, err = run(capsys, "compress", "--method", "magic", "--model", "lenet5",
                         "--data", "sample", "--out", str(tmp_path), "--json")  # fmt: skip
    assert code == 2 and "invalid choice" in json.loads(out)["error"]


def test_compress_with_distillation_records_it(tmp_path, capsys):
    code, out, err = run(
        capsys, "compress", "--method", "prom", "--model", "mobilenetv2", "--model-arg",
        "width=0.25", "--data", "sample", "--epochs", "1", "--limit-train", "64",
        "--limit-test", "32", "--batch-size", "32", "--out", str(tmp_path / "c"), "--json",
        "--quiet", "--distill", "0.5", "--distill-temperature", "2",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads(out)
    want = {"weight": 0.5, "temperature": 2.0}
    assert json.loads((tmp_path / "c" / "config.json").read_text())["distill"] == want
    assert load_checkpoint(res["checkpoint"])["distill"] == want
    assert res["frozen_agreement"] >= 0.99


def test_compress_bn_recalibrate_freezes_the_recalibrated_model(tmp_path, capsys):
    code, out, err = run(
        capsys, "compress", "--method", "prom", "--model", "mobilenetv2", "--model-arg",
        "width=0.25", "--data", "sample", "--epochs", "1", "--limit-train", "64",
        "--limit-test", "32", "--batch-size", "32", "--out", str(tmp_path / "c"), "--json",
        "--quiet", "--bn-recalibrate", "2",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads(out)
    bn = res["bn_recalibrate"]
    assert bn["batches"] == 2 and bn["images"] == 64 and 0 <= bn["test_accuracy_before"] <= 1
    assert res["checkpoint"].endswith("recalibrated.pt")
    last = load_checkpoint(tmp_path / "c" / "qat" / "last.pt")["state_dict"]
    recal = load_checkpoint(res["checkpoint"])["state_dict"]
    stats = [k for k in last if k.endswith("running_mean")]
    assert stats and any(not torch.equal(last[k], recal[k]) for k in stats)
    weights = [k for k in last if k.endswith("weight")]
    assert all(torch.equal(last[k], recal[k]) for k in weights)  # statistics only
    assert res["frozen_agreement"] >= 0.99  # the freeze folded the new statistics
    assert "BatchNorm recalibrated" in (tmp_path / "c" / "summary.md").read_text()


@pytest.mark.parametrize("argv, msg", [
    (["--method", "burn", "--distill", "0.5"], "--distill applies"),
    (["--method", "prom", "--distill", "1.5"], "distillation weight"),
    (["--method", "burn", "--bn-recalibrate", "5"], "--bn-recalibrate applies"),
    (["--method", "prom", "--bn-recalibrate", "-1"], "--bn-recalibrate must be"),
])  # fmt: skip
def test_compress_distill_errors(tmp_path, capsys, argv, msg):
    code, out, err = run(capsys, "compress", "--model", "lenet5", "--data", "sample", "--epochs",
                         "1", "--limit-train", "32", "--out", str(tmp_path / "c"), "--json",
                         "--quiet", *argv)  # fmt: skip
    assert code == 1 and "Traceback" not in err
    assert msg in json.loads(out)["error"]
