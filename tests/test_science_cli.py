"""`flashmoe-science` end to end on a tiny budget."""

import json

import pytest

pytest.importorskip("pymatgen.core")
pytest.importorskip("sklearn")

from flashmoe_science.cli import main  # noqa: E402

TINY = ["--dim", "32", "--heads", "2", "--layers", "1", "--experts", "4", "--ffn", "32", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(
        [
            "demo",
            "--out",
            str(out),
            "--epochs",
            "2",
            "--tc-epochs",
            "2",
            "--trees",
            "10",
            "--batch-size",
            "256",
        ]
        + ["--elements", "Li,Na,O,S", "--max-amount", "3", "--top", "5"]
        + TINY
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "expt_gap MAE: model" in text and "random forest" in text
    for f in [
        "summary.json",
        "metrics.md",
        "expt_gap/metrics.md",
        "expt_gap/parity_expt_gap.png",
        "expt_gap/predictions.csv",
        "expt_gap/fold0/best.pt",
        "tc/parity_superconductors.png",
        "screen/screen_band_gap.csv",
        "screen/screen_band_gap.png",
    ]:
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    gap = summary["expt_gap"]
    assert set(gap) == {
        "flashmoe composition transformer",
        "random forest (Magpie-style features)",
        "predict the training mean",
    }
    assert gap["predict the training mean"]["mae_mean"] > 1.0
    assert summary["screen"]["candidates"] > 0

    # The demo's checkpoint drives the screen subcommand.
    rc = main(
        ["screen", "--checkpoint", str(out / "expt_gap/fold0/best.pt"), "--out", str(tmp_path / "s")]
        + [
            "--elements",
            "Ga,As,N",
            "--max-elements",
            "2",
            "--max-amount",
            "2",
            "--no-progress",
            "--exclude-known",
        ]
    )
    assert rc == 0
    assert (tmp_path / "s" / "screen_band_gap.csv").read_text().count("\n") == 1 + 9  # 3 pairs x 3 amounts
    assert "GaAs" in capsys.readouterr().out


def test_train_and_resume(tmp_path, capsys):
    args = [
        "train",
        "--dataset",
        "tc",
        "--out",
        str(tmp_path / "m"),
        "--epochs",
        "2",
        "--batch-size",
        "64",
    ] + TINY
    assert main(args) == 0
    assert (tmp_path / "m" / "model.pt").is_file()
    assert main(args[:6] + ["4"] + args[7:] + ["--resume"]) == 0
    assert "best validation MAE" in capsys.readouterr().out


def test_evaluate_tc_two_folds(tmp_path):
    out = tmp_path / "ev"
    args = [
        "evaluate",
        "--dataset",
        "tc",
        "--folds",
        "0,1",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--trees",
        "5",
    ]
    assert main(args + TINY) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["folds"] == [0, 1] and len(metrics["rows"]) == 6
    assert (out / "environment.json").is_file()


def test_no_cuda_graphs_flag_reaches_the_train_config():
    from flashmoe_science.cli import _train_config, build_parser

    for extra, want in (([], True), (["--no-cuda-graphs"], False)):
        args = build_parser().parse_args(["train", "--dataset", "tc", *extra])
        assert _train_config(args).cuda_graphs is want
