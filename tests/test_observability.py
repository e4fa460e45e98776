"""What a run shows while it works and leaves to look at: progress bars, TensorBoard defaults, plots."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from gaqprune.cli.main import run

ARGS = ["--importance_samples", "2", "--importance_seq_len", "32", "--num_examples", "2", "--max_seq_len", "32",
        "--compensation_samples", "4", "--compensation_seq_len", "32", "--data.max_seq_len", "32",
        "--pruning_ratio", "0.3", "--min_pruning_rate", "0.1"]


@pytest.fixture
def prune_args(tmp_path, monkeypatch, tiny_model_dir) -> list[str]:
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the river flows past the old mill and the town." for i in range(300)))
    return ["prune", "--base_model", str(tiny_model_dir), "--data.source", str(text), *ARGS]


def test_default_bars_are_tqdm_the_lr_is_monitored_and_stage_bars_show(prune_args, capsys):
    from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar, TQDMProgressBar

    from gaqprune.train.callbacks import ProgressBar

    cli = run([*prune_args, "--save_ckpt_log_name", "bars"])  # (rich or not, the stock bar is replaced)
    bar = cli.trainer.progress_bar_callback
    # tqdm (lines in a log file, like the stage bars), never Lightning's Rich pick; gaqprune's (no v_num)
    assert isinstance(bar, TQDMProgressBar) and not isinstance(bar, RichProgressBar)
    assert type(bar) is ProgressBar
    assert sum(isinstance(c, LearningRateMonitor) for c in cli.trainer.callbacks) == 1
    err = capsys.readouterr().err
    assert "layer importance (removal)" in err and "surgery" in err


def test_enable_progress_bar_false_hides_the_stage_bars_not_the_summary(prune_args, capsys):
    cli = run([*prune_args, "--save_ckpt_log_name", "quiet", "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.progress_bar_callback is None
    out, err = capsys.readouterr()
    assert "layer importance (removal)" not in err and "Taylor scores" not in err and "surgery" not in err
    assert "| layer | importance |" in out and "results in prune_log/quiet/" in out


@pytest.mark.skipif(importlib.util.find_spec("rich") is None, reason="rich is not installed")
def test_a_progress_bar_the_user_configures_is_kept(prune_args):
    from lightning.pytorch.callbacks import RichProgressBar

    cli = run([*prune_args, "--save_ckpt_log_name", "rich", "--trainer.callbacks+=RichProgressBar"])
    assert isinstance(cli.trainer.progress_bar_callback, RichProgressBar)


def test_the_fit_bar_shows_no_version_number():
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import TQDMProgressBar

    from gaqprune.train.callbacks import ProgressBar

    original = TQDMProgressBar.get_metrics
    try:
        TQDMProgressBar.get_metrics = lambda self, trainer, module: {"v_num": 3, "train_loss": 1.5}
        assert ProgressBar().get_metrics(SimpleNamespace(), SimpleNamespace()) == {"train_loss": 1.5}
    finally:
        TQDMProgressBar.get_metrics = original


def test_a_prune_run_logs_its_settings_and_results_for_the_hparams_view(prune_args):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run([*prune_args, "--save_ckpt_log_name", "hp", "--test_after_prune", "true", "--data.max_eval_windows", "2"])
    metrics = json.loads(Path("prune_log/hp/metrics.json").read_text())
    (log_dir,) = Path("lightning_logs/hp").glob("version_*")
    events = EventAccumulator(str(log_dir)).Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["prune/ppl_after"] == [(0, pytest.approx(metrics["ppl_after"], rel=1e-6))]
    assert scalars["prune/achieved_ratio_selected"][0][1] == pytest.approx(
        metrics["params"]["achieved_ratio_selected"], rel=1e-6)
    assert {f"prune/seconds/{stage}" for stage in metrics["seconds"]} <= set(scalars)
    assert [step for step, _ in scalars["prune/layer_rate"]] == [0, 1, 2, 3]  # one point per layer
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["pruning_ratio"].number_value == pytest.approx(0.3)
    assert start.hparams["base_model"].string_value.endswith("tiny-llama")
    assert start.hparams["lora_r"].number_value == 8  # the model's hyperparameters too (a learning-rate sweep)
    assert "layer_end" not in start.hparams  # unset: no "None" text column
    assert "pruning_ratio: 0.3" in (log_dir / "hparams.yaml").read_text()
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"prune/ppl_before", "prune/ppl_after", "prune/model_params_after"} <= {
        m.name.tag for m in experiment.metric_infos}
    assert "| layer | importance |" in events.Tensors("prune/summary/text_summary")[0].tensor_proto.string_val[0].decode()


def test_validate_logs_under_its_own_name_without_a_placeholder_metric(prune_args, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    source = prune_args[prune_args.index("--data.source") + 1]
    run(["validate", "--base_model", str(tiny_model_dir), "--data.source", source, "--data.max_seq_len", "32",
         "--data.max_eval_windows", "2", "--trainer.enable_progress_bar", "false"])
    (log_dir,) = Path("lightning_logs/validate").glob("version_*")
    tags = EventAccumulator(str(log_dir)).Reload().Tags()["scalars"]
    assert "val_ppl" in tags and "hp_metric" not in tags


def test_every_logger_gets_val_ppl_at_the_steps_taken(prune_args, tiny_model_dir):
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Path("loggers.yaml").write_text(
        "trainer:\n  logger:\n"
        "    - class_path: lightning.pytorch.loggers.CSVLogger\n      init_args: {save_dir: csv}\n"
        "    - class_path: lightning.pytorch.loggers.TensorBoardLogger\n      init_args: {save_dir: tb}\n")
    source = prune_args[prune_args.index("--data.source") + 1]
    run(["fit", "--config", "loggers.yaml", "--base_model", str(tiny_model_dir), "--data.source", source,
         "--data.max_seq_len", "32", "--data.max_eval_windows", "4", "--data.batch_size", "4", "--finetune_samples", "16",
         "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
         "--save_ckpt_log_name", "two_loggers"])
    history = json.loads(Path("prune_log/two_loggers/fit_metrics.json").read_text())
    (metrics_csv,) = Path("csv").rglob("metrics.csv")
    rows = [row for row in csv.DictReader(metrics_csv.open()) if row.get("val_ppl")]
    assert [int(row["step"]) for row in rows] == [0, 2, 4]  # before training, then every 2 optimizer steps
    assert float(rows[-1]["val_ppl"]) == pytest.approx(history["val_ppl"], rel=1e-6)
    (tb_dir,) = {f.parent for f in Path("tb").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(tb_dir)).Reload()
    assert [e.step for e in events.Scalars("val_ppl")] == [0, 2, 4]


def test_pruning_results_are_logged_before_the_fine_tune(prune_args):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with pytest.raises(RuntimeError, match="simulated failure before training"):
        run([*prune_args, "--save_ckpt_log_name", "early", "--test_after_prune", "true", "--data.max_eval_windows", "2",
             "--finetune", "true", "--finetune_samples", "8", "--trainer.callbacks+=interrupt.FailAtStart"])
    (log_dir,) = Path("lightning_logs/early").glob("version_*")
    tags = EventAccumulator(str(log_dir)).Reload().Tags()["scalars"]
    assert {"prune/ppl_before", "prune/ppl_after", "prune/achieved_ratio_selected"} <= set(tags)
    assert not Path("prune_log/early/metrics.json").exists()  # the run did not finish


@pytest.mark.parametrize(("values", "scale"), [
    ([228.0, 30.0, 2.5], "log"),  # 91x: a linear axis flattens every layer but the outlier
    ([1.0, 5.0, 9.0], "linear"),
    ([-400.0, 5.0, 2000.0], "symlog"),  # negative removal scores stay visible
])
def test_importance_axes_turn_logarithmic_above_a_tenfold_spread(values, scale):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gaqprune.run.report import scale_importance_axis

    fig, ax = plt.subplots()
    try:
        assert scale_importance_axis(ax, values) == (scale != "linear")
        assert ax.get_yscale() == scale
    finally:
        plt.close(fig)


def test_fit_curves_draw_the_dense_reference(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from gaqprune.run import report

    drawn = []
    monkeypatch.setattr(plt, "close", lambda fig: drawn.append(fig))  # keep the figure to look at
    history = {"train_loss": [(0, 10.8), (1, 10.7)], "val_ppl": [(0, 520.0), (2, 480.0)]}
    report.plot_fit(history, tmp_path / "fit.png", references={"dense": 300.0})
    ppl_ax = drawn[0].axes[1]
    assert [tuple(line.get_ydata()) for line in ppl_ax.lines[1:]] == [(300.0, 300.0)]
    assert ppl_ax.get_legend().get_texts()[0].get_text() == "dense 300.00"
    assert (tmp_path / "fit.png").stat().st_size > 10_000


@pytest.mark.parametrize(("limit", "everything"), [(1.0, True), (1, False), (0.5, False), (4, False)])
def test_only_a_fraction_of_one_validates_every_window(limit, everything):
    # Lightning reads the integer 1 as one batch: the fit's curve must not then start at (or be drawn against) the
    # perplexity --test_after_prune measured on all the windows
    from gaqprune.cli.app import GaqpruneTrainer
    from gaqprune.train.job import validates_everything

    trainer = GaqpruneTrainer(limit_val_batches=limit, logger=False, enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False)
    assert validates_everything(trainer) is everything


def test_per_layer_scalars_reach_a_tensorboard_logger_that_is_not_the_first(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gaqprune.run import report

    tb = TensorBoardLogger(tmp_path / "tb", name="run")
    report.log_per_layer([CSVLogger(tmp_path / "csv"), tb], report.RATE_TAG, {0: 0.2, 1: 0.35})
    events = EventAccumulator(tb.log_dir).Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars(report.RATE_TAG)] == [(0, 0.2), (1, 0.35)]
