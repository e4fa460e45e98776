"""What a run reports: logger scalars and hyperparameters, plots in the run folder, the summary table, stage times.

Everything here reads results (the plan, the metrics, a fit's history) and writes them where people look: every
configured logger (TensorBoard's scalars, HParams view and text), PNG files in the run folder, the printed table.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from gaqprune.atomic import save_figure

IMPORTANCE_TAG, RATE_TAG = "prune/layer_importance", "prune/layer_rate"  # by `prune` and `fit --prune` alike
SEARCH_TAG = "prune/allocation_search_loss"  # --allocation search: calibration loss (step = blocks removed whole)


def log_per_layer(loggers, name: str, values: dict[int, float]) -> None:
    """One scalar per layer (step = layer index) in every TensorBoard logger (other loggers would mix layer indices
    into their step column)."""
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_scalar"):
            for layer, value in sorted(values.items()):
                experiment.add_scalar(name, value, global_step=layer)
            experiment.flush()  # `gaqprune prune` never closes the logger; keep the events readable right away


def log_plan(loggers, plan: dict) -> None:
    """The plan's per-layer rates and, after ``--allocation search``, the loss of every depth it scored."""
    log_per_layer(loggers, RATE_TAG, {e["index"]: e["achieved_rate"] for e in plan["layers"]})
    if "search" in plan:
        log_per_layer(loggers, SEARCH_TAG, {c["blocks"]: c["calibration_loss"] for c in plan["search"]["candidates"]
                                            if c["calibration_loss"] != float("inf")})


RESULT_SCALARS = ("ppl_before", "ppl_after", "ppl_after_finetune")


RESULT_PARAMS = ("achieved_ratio_selected", "achieved_ratio_decoder", "achieved_ratio_model", "model_params_after")


# ``--eval_tasks`` results in metrics.json: the model before pruning, after it, after the fine-tune
TASK_STAGES = {"tasks_before": "dense", "tasks_after": "pruned", "tasks_after_finetune": "fine-tuned"}


def result_values(metrics: dict) -> dict[str, float]:
    """A pruning run's results as logger scalars: ``prune/ppl_*``, the achieved ratios, the parameters left, the
    average task accuracy of each ``--eval_tasks`` stage (``prune/tasks_after_average``, ...)."""
    values = {f"prune/{k}": float(metrics[k]) for k in RESULT_SCALARS if k in metrics}
    values.update({f"prune/{k}": float(v) for k, v in metrics.get("params", {}).items() if k in RESULT_PARAMS})
    values.update({f"prune/{k}_average": float(metrics[k]["average"]) for k in TASK_STAGES
                   if metrics.get(k, {}).get("average") is not None})
    return values


def log_task_results(loggers, results: dict, step: int) -> None:
    """One stage's task accuracies as ``eval/<task>/<metric>`` at ``step`` (0 dense, 1 pruned, 2 fine-tuned: one
    curve per metric across the run)."""
    from gaqprune.run.zeroshot import scalars

    for logger in loggers:
        logger.log_metrics(scalars(results, "eval"), step=step)


def task_table(metrics: dict) -> str | None:
    """The ``--eval_tasks`` results side by side: one row per task (its reported metric, in %), one column per stage."""
    stages = [k for k in TASK_STAGES if k in metrics]
    if not stages:
        return None
    tasks = list(metrics[stages[0]]["tasks"])
    head = "| task (metric) | " + " | ".join(TASK_STAGES[k] for k in stages) + " |"
    lines = [head, "|---|" + "---:|" * len(stages)]
    for task in tasks:
        reported = metrics[stages[0]]["tasks"][task]["reported"]
        cells = [f"{100 * metrics[k]['tasks'][task][reported]:.2f}" for k in stages]
        lines.append(f"| {task} ({reported}) | " + " | ".join(cells) + " |")
    if all(metrics[k].get("average") is not None for k in stages):
        lines.append("| average | " + " | ".join(f"{100 * metrics[k]['average']:.2f}" for k in stages) + " |")
    limit = metrics[stages[0]].get("limit")
    return "\n".join(lines) + (f"\n(first {limit} documents of each task: --eval_limit)" if limit else "")


def log_results(loggers, values: dict[str, float]) -> None:
    """Results (not curves) at step 0, in every logger."""
    for logger in loggers:
        logger.log_metrics(values, step=0)


def log_run_results(loggers, settings: dict, metrics: dict, logged: dict[str, float],
                    summary: str | None = None) -> None:
    """A finished pruning run: the results not ``logged`` yet and every stage's seconds (``prune/seconds/<stage>``) in
    every logger; its settings (the CLI's flag names, the model's and the data's hyperparameters) in every logger's
    hyperparameters (``hparams.yaml``); and in TensorBoard an HParams session over all the results, where the runs of
    a sweep compare side by side, and the summary table as text."""
    from lightning.pytorch.core.saving import save_hparams_to_yaml
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard.summary import hparams

    values = result_values(metrics)
    log_results(loggers, {k: v for k, v in values.items() if k not in logged}
                | {f"prune/seconds/{k}": float(v) for k, v in metrics.get("seconds", {}).items()})
    # no None (TensorBoard would turn a column that is a number in other runs into text), no lists (not hparams)
    params = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in settings.items()
              if v is not None and not k.startswith("_")}
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params)
            continue
        logger.hparams.update(params)  # (its log_hyperparams would log the results a second time)
        writer = logger.experiment._get_file_writer()
        for proto in hparams(params, values):
            writer.add_summary(proto, 0)
        if summary is not None:  # indented: a preformatted block in TensorBoard's markdown
            logger.experiment.add_text("prune/summary", "\n".join("    " + line for line in summary.splitlines()))
        logger.experiment.flush()
        if logger.log_dir and Path(logger.log_dir).is_dir():  # a fit wrote it first with only its own hyperparameters
            save_hparams_to_yaml(Path(logger.log_dir) / logger.NAME_HPARAMS_FILE, logger.hparams)


def plot_rates(scores: dict[int, float], plan: dict, path: Path) -> None:
    """The plan per layer, one picture: achieved rate (bars) against the target (ticks) and the rate bounds (dashed),
    the fraction of KV groups and of MLP channels removed (markers), layers outside the range greyed, whole-layer
    removals in red, and the layer importance that drove the rates (line, right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    entries = plan["layers"]
    chosen = [e for e in entries if e["selected"]]
    xs = [e["index"] for e in chosen]
    fig, ax = plt.subplots(figsize=(max(7.0, len(entries) * 0.32 + 2), 4))
    try:
        for e in entries:
            if not e["selected"]:
                ax.axvspan(e["index"] - 0.5, e["index"] + 0.5, color="0.92", lw=0)
        ax.bar(xs, [e["achieved_rate"] for e in chosen], color=["tab:red" if e.get("removed_whole") else "tab:orange"
                                                                 for e in chosen] or "tab:orange",
               label="achieved rate (share of prunable parameters; red: layer removed)")
        ax.plot(xs, [e["target_rate"] for e in chosen], "_", color="black", ms=12, mew=2, label="target rate")
        ax.plot(xs, [1 - e["groups_after"] / e["groups_before"] for e in chosen], "^", color="tab:green", ms=5,
                label="KV groups removed (fraction)")
        ax.plot(xs, [1 - e["channels_after"] / e["channels_before"] for e in chosen], "v", color="tab:purple", ms=5,
                label="MLP channels removed (fraction)")
        settings = plan.get("settings", {})
        for key, style in (("min_pruning_rate", "--"), ("max_pruning_rate", ":")):
            if settings.get(key) is not None:
                ax.axhline(settings[key], ls=style, color="0.45", lw=1, label=f"{key} {settings[key]:g}")
        ax.set_xlim(-0.5, len(entries) - 0.5)
        ax.set_xticks(range(len(entries)))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("decoder layer (grey: outside --layer_start..--layer_end)")
        ax.set_ylabel("fraction removed")
        handles, labels = ax.get_legend_handles_labels()
        if scores:
            ax2 = ax.twinx()
            layers = sorted(scores)
            values = [scores[i] for i in layers]
            handles += ax2.plot(layers, values, "o-", color="tab:blue", ms=3, lw=1)
            log = scale_importance_axis(ax2, values)
            labels.append("layer importance" + (" (log scale)" if log else ""))
            ax2.set_ylabel("layer importance")
        totals = plan["totals"]
        found = plan.get("search")
        searched = "" if not found else (
            f"\n--allocation search: {found['chosen_blocks']} block(s) removed whole; calibration loss by blocks: "
            + ", ".join(f"{c['blocks']}: {c['calibration_loss']:.4f}" for c in found["candidates"]))
        ax.set_title(f"pruning plan: {totals.get('achieved_ratio_selected', 0):.1%} of the selected layers' prunable "
                     f"parameters removed (target {totals.get('target_ratio', 0):.1%}){searched}", fontsize=10)
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False, bbox_to_anchor=(0.5, -0.02))
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_fit(history: dict[str, list[tuple[int, float]]], path: Path, references: dict[str, float] | None = None) -> None:
    """Training loss and validation perplexity against the optimizer step, one picture (nothing without data);
    ``references``: perplexities drawn as labelled horizontal lines (the dense model's, measured on the same
    windows)."""
    if not history["train_loss"] and not history["val_ppl"]:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator


    fig, (loss_ax, ppl_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    if history["train_loss"]:
        steps, losses = zip(*history["train_loss"])
        window = max(1, len(losses) // 20)
        loss_ax.plot(steps, losses, color="tab:blue", alpha=0.35 if window > 1 else 1.0, lw=1, label="per batch")
        if window > 1:  # trailing mean over up to `window` batches
            smooth = [sum(chunk) / len(chunk) for chunk in (losses[max(0, i - window + 1) : i + 1]
                                                             for i in range(len(losses)))]
            loss_ax.plot(steps, smooth, color="tab:blue", lw=2, label=f"mean of {window}")
        loss_ax.legend()
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("training loss")
    if history["val_ppl"]:
        steps, values = zip(*history["val_ppl"])
        ppl_ax.plot(steps, values, "o-", color="tab:orange")
        for (step, value), side in ((history["val_ppl"][0], "left"), (history["val_ppl"][-1], "right")):
            ppl_ax.annotate(f"{value:.2f}", (step, value), textcoords="offset points", ha=side,
                            xytext=(4 if side == "left" else -4, 6))
        for (label, value), style in zip((references or {}).items(), ("--", ":", "-.")):
            ppl_ax.axhline(value, ls=style, color="0.4", lw=1, label=f"{label} {value:.2f}")
            values = (*values, value)
        if min(values) > 0 and max(values) / min(values) > 10:
            ppl_ax.set_yscale("log")
        ppl_ax.margins(y=0.15)  # room for the annotations
        if references:
            ppl_ax.legend(fontsize=8)
    ppl_ax.set_xlabel("optimizer step")
    ppl_ax.set_ylabel("validation perplexity")
    for ax in (loss_ax, ppl_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("gaqprune fine-tune")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def summary_table(plan: dict, metrics: dict) -> str:
    """A Markdown table per layer plus totals, printed at the end of `gaqprune prune`."""
    lines = ["| layer | importance | target rate | achieved rate | KV groups | MLP channels | layer params after |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for e in plan["layers"]:
        if not e["selected"]:
            continue
        imp = e.get("importance")
        groups = "removed" if e["removed_whole"] else f"{e['groups_after']}/{e['groups_before']}"
        channels = "removed" if e["removed_whole"] else f"{e['channels_after']}/{e['channels_before']}"
        lines.append(f"| {e['index']} | {'' if imp is None else f'{imp:.4g}'} | {e['target_rate']:.1%} | "
                     f"{e['achieved_rate']:.1%} | {groups} | {channels} | {e['layer_params_after']:,} |")
    t = plan["totals"]
    lines.append("")
    lines.append(f"removed {t.get('achieved_ratio_selected', 0):.2%} of the selected layers' prunable parameters "
                 f"(target {t['target_ratio']:.2%}), {t.get('achieved_ratio_decoder', 0):.2%} of all "
                 f"decoder-layer parameters, {t.get('achieved_ratio_model', 0):.2%} of the whole model")
    if "ppl_before" in metrics or "ppl_after" in metrics:
        lines.append(f"perplexity (window {metrics.get('eval_seq_len')}, {metrics.get('eval_windows')} windows): "
                     f"dense {metrics.get('ppl_before', float('nan')):.2f}"
                     f"{' (cached)' if metrics.get('ppl_before_cached') else ''} | "
                     f"pruned {metrics.get('ppl_after', float('nan')):.2f}")
    tasks = task_table(metrics)
    if tasks:
        lines += ["", "zero-shot accuracy (lm-eval):", tasks, ""]
    times = metrics.get("seconds", {})
    if times:
        lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    return "\n".join(lines)


class Stopwatch:
    """Times named stages: ``with clock("taylor"): ...``; totals in ``clock.seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        watch = self

        class _Stage:
            def __enter__(self):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                watch.seconds[name] = watch.seconds.get(name, 0.0) + time.perf_counter() - self.t0

        return _Stage()


def scale_importance_axis(ax, values: list[float], log_scale: bool | None = None) -> bool:
    """A log axis for importances whose magnitudes span more than 10x (None: decide; removal spans six orders, and
    on a linear axis one outlier flattens every other layer), symmetric-log when some are zero or negative (linear
    near zero so they stay visible); returns whether the axis is logarithmic."""
    magnitudes = [abs(v) for v in values if v != 0]
    if log_scale is None:
        log_scale = len(magnitudes) > 1 and max(magnitudes) / min(magnitudes) > 10
    if log_scale:
        if min(values) > 0:
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=min(magnitudes) if magnitudes else 1.0)
    return log_scale


def plot_layer_importance(scores: dict[int, float], path: str | os.PathLike, method: str,
                          log_scale: bool | None = None) -> None:
    """Bar chart of ``scores`` per layer, saved atomically as PNG.

    ``log_scale`` None = automatic (see ``scale_importance_axis``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    layers = sorted(scores)
    values = [scores[layer] for layer in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(layers) + 2), 3.5))
    try:
        colors = ["tab:blue" if v >= 0 else "tab:red" for v in values]
        ax.bar(layers, values, color=colors)
        log_scale = scale_importance_axis(ax, values, log_scale)
        labels = {"removal": "PPL(skipped) - PPL(dense)", "activation": "mean |residual update|",
                  "block_influence": "1 - cos(input, output)"}
        ax.set_xlabel("decoder layer")
        ax.set_ylabel(labels.get(method, method))
        ax.set_title(f"layer importance ({method})" + (", log scale" if log_scale else ""))
        ax.set_xticks(layers)
        ax.tick_params(axis="x", labelsize=7)
        save_figure(fig, path)
    finally:
        plt.close(fig)
