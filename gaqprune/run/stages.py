"""The pruning pipeline as stages shared by `gaqprune prune` and the Lightning callbacks.

Each stage is a plain function; the callers decide which rank computes and how results travel
between ranks. Results land in the run folder through atomic writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from gaqprune import __version__
from gaqprune.atomic import unwritable
from gaqprune.errors import GaqpruneError
from gaqprune.settings import ImportanceSettings, PruneSettings, RunSettings

log = logging.getLogger(__name__)
IMPORTANCE_FILE = "layer_importance_config.json"
PLAN_FILE = "pruning_plan.json"
METRICS_FILE = "metrics.json"
# A finished run: `prune` writes metrics.json last; a fit (which writes none) leaves these.
FIT_METRICS_FILE = "fit_metrics.json"
FIT_PLOT = "fit_curves.png"
FIT_RESULTS = ("model_finetuned", "model_finetuned.gguf", "lora_adapter", FIT_PLOT, FIT_METRICS_FILE)
FINISHED = (METRICS_FILE, *FIT_RESULTS)
# a fine-tune's Lightning checkpoints (LoRA weights + optimizer state): last.ckpt is what --ckpt_path last resumes
CHECKPOINTS = "checkpoints"
# What --overwrite removes before a new run writes anything (the layer-importance cache stays: it is reused only
# where its recorded settings match).
RUN_FILES = (*FINISHED, "model", "model.gguf", "config.yaml", PLAN_FILE, "pruning_rates.png", CHECKPOINTS)


def run_dir(run: RunSettings) -> Path:
    return Path(run.output_dir) / run.save_ckpt_log_name


def check_run_dir(run: RunSettings, results: tuple[str, ...] = FINISHED) -> Path:
    """The run folder, checked: a plain name, not a file, and holding none of ``results`` (a finished run's) unless
    --overwrite. An unfinished run is resumed: its caches are reused where they match, its other files rewritten."""
    name = run.save_ckpt_log_name
    if not name or name in (".", "..") or Path(name).name != name:
        raise GaqpruneError(f"--save_ckpt_log_name {name!r} is invalid; give a plain folder name (no '/', not '.' or '..')")
    path = run_dir(run)
    for where, what in ((Path(run.output_dir), "--output_dir"), (path, "--save_ckpt_log_name")):
        if where.exists() and not where.is_dir():
            raise GaqpruneError(f"{what}: {str(where)!r} is a file, not a folder; pick another name")
    found = [name for name in results if (path / name).exists()]
    if found and not run.overwrite:
        raise GaqpruneError(
            f"--save_ckpt_log_name {run.save_ckpt_log_name!r}: run folder {str(path)!r} already holds results "
            f"({', '.join(found)}); pick another name or pass --overwrite true"
        )
    refused = unwritable(path)
    if refused is not None:
        raise GaqpruneError(f"--output_dir: cannot write to {str(refused[0])!r} ({refused[1]}); give --output_dir a "
                            "folder you can write to")
    if path.is_dir():  # leftovers of a killed write: never complete, never reused
        for stale in path.glob(".*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    return path


def _launch_rank_is_zero() -> bool:
    """Whether this is the process that launched the run: every rank variable a launcher sets (torchrun, SLURM,
    Lightning's own DDP launcher, which sets only LOCAL_RANK and inherits the rest) is 0 or unset."""
    return all(os.environ.get(var, "0") in ("", "0") for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def shows_progress(trainer) -> bool:
    """Whether this process shows gaqprune's stage bars: rank 0, unless ``--trainer.enable_progress_bar false``."""
    return trainer.is_global_zero and trainer.progress_bar_callback is not None


_HELD: list = []  # the run-folder locks this process holds (released by release_run_dirs)


def hold_run_dir(run: RunSettings):
    """Claim the run folder for this process (the launching one; the ranks it starts write nothing there) until
    ``release_run_dirs`` or its exit: a second run of the same name at the same time (from another shell) would
    interleave its files with this one's and silently replace its results. Returns the held lock, or None."""
    from filelock import FileLock, Timeout

    if not _launch_rank_is_zero():
        return None
    path = run_dir(run)
    # in a per-user temp folder, keyed by the run folder's absolute path: a refused run leaves no trace in the output
    # folder (so this guards the runs of one machine and temp folder; a shared file system's locks are unreliable)
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    lock = FileLock(Path(tempfile.gettempdir()) / f"gaqprune-locks-{user}"
                    / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".lock"))
    try:
        Path(lock.lock_file).parent.mkdir(exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        raise GaqpruneError(f"--save_ckpt_log_name {run.save_ckpt_log_name!r}: run folder {str(path)!r} is in use by "
                            "another gaqprune run right now; wait for it or pick another name") from None
    except OSError as err:  # an unusable temp folder must not stop the run: it only loses this guard
        log.warning("note: running without the run-folder lock (%s)", err)
        return None
    _HELD.append(lock)
    return lock


def release_run_dirs() -> None:
    """Release the run folders this process claimed (the CLI's end: a notebook's next run may use the same name)."""
    while _HELD:
        _HELD.pop().release()


def plan_digest(plan: dict) -> str:
    """A hash of what the pruned model's structure is (which units each layer kept): a fine-tune's checkpoint
    resumes only onto the same cut, not onto other channels of equal count."""
    kept = [(e["index"], e["removed_whole"], e["kept_groups"], e["kept_channels"]) for e in plan["layers"]]
    return hashlib.sha256(json.dumps(kept).encode()).hexdigest()


def last_checkpoint(run: RunSettings) -> Path | None:
    """The latest checkpoint of this run's fine-tune (``checkpoints/last.ckpt``), if one was written."""
    last = run_dir(run) / CHECKPOINTS / "last.ckpt"
    return last if last.is_file() else None


def check_unfinished_fit(run: RunSettings, resuming: bool, how: str = "with --ckpt_path last") -> None:
    """A fine-tune that was interrupted left ``checkpoints/last.ckpt``: starting over (or a run without a fine-tune)
    would replace or remove it, so it must be asked for (--overwrite true) or the checkpoint resumed (``how``)."""
    last = last_checkpoint(run)
    if last is not None and not resuming and not run.overwrite:
        raise GaqpruneError(f"--save_ckpt_log_name {run.save_ckpt_log_name!r}: {str(last)!r} is the checkpoint of an "
                            f"unfinished fine-tune; resume it {how}, or start over with --overwrite true")


def check_calibration_budget(datamodule, imp: ImportanceSettings, prune: PruneSettings, seed: int) -> None:
    """Draw (and so check) every calibration window set the pruning will need, before any work is done: a text too
    short for --importance_samples, --num_examples or --compensation_samples fails now, in one line."""
    if not imp.skip_importance_analysis:
        datamodule.calibration_windows(imp.importance_samples, imp.importance_seq_len, what="--importance_samples")
    compensation_windows(datamodule, prune, seed, "cpu", taylor_windows(datamodule, prune, seed, "cpu"))


def clear_results(run: RunSettings, results: tuple[str, ...] = RUN_FILES) -> None:
    """Remove the previous run's ``results`` before the new run writes anything, so the folder never mixes two runs
    (the importance cache stays: it is reused only where its recorded settings match). With --overwrite that is a
    finished run's; without it ``check_run_dir`` has refused a finished one, so what is there is an unfinished run's
    leftovers (a model saved before a Ctrl-C, which this run may not rewrite), except its fine-tune's checkpoints:
    ``check_unfinished_fit`` let the run start only to resume them."""
    path = run_dir(run)
    if not path.is_dir():
        return
    if not run.overwrite:
        results = tuple(name for name in results if name != CHECKPOINTS)
    for name in results:  # every rank of a DDP fit runs this: tolerate a file another rank removed first
        old = path / name
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def importance_meta(hf_model, imp: ImportanceSettings, start: int, end: int, base_model: str, source: str,
                    seed: int) -> dict:
    from gaqprune.core.importance import model_fingerprint

    return {
        "base_model": base_model,
        "model_fingerprint": model_fingerprint(hf_model),
        "num_layers": len(hf_model.model.layers),
        "method": imp.importance_method,
        "samples": imp.importance_samples,
        "seq_len": imp.importance_seq_len,
        "data_source": source,
        "layer_start": start,
        "layer_end": end,
        "seed": seed,
        "gaqprune_version": __version__,
        "dtype": str(next(hf_model.parameters()).dtype).removeprefix("torch."),
    }


IMPORTANCE_MATCH = ("model_fingerprint", "num_layers", "layer_start", "layer_end")


def check_importance_config(imp: ImportanceSettings, meta: dict) -> None:
    """Refuse an --importance_config that does not fit this run (not a record; another layer count or range; with
    ``meta["model_fingerprint"]``, another model) before anything is written or removed: from the model's config
    before it is loaded, and again from its weights."""
    if imp.skip_importance_analysis:
        from gaqprune.core import importance as li

        li.load_importance(imp.importance_config, {k: meta[k] for k in IMPORTANCE_MATCH if k in meta})


def layer_importance_stage(hf_model, datamodule, imp: ImportanceSettings, start: int, end: int, out_dir: Path | None,
                           meta: dict, device: torch.device, progress: bool) -> dict[int, float]:
    """Compute (or reuse) per-layer importance; writes the cache JSON and a bar chart when ``out_dir`` is set."""
    from gaqprune.core import importance as li

    expected = {k: meta[k] for k in IMPORTANCE_MATCH}
    if imp.skip_importance_analysis:
        scores = li.load_importance(imp.importance_config, expected)
        record = json.loads(Path(imp.importance_config).read_text())
        log.info("layer importance: reused %s (%s, %s samples; no analysis run)", imp.importance_config,
                 record.get("method"), record.get("samples"))
        if record.get("method") != imp.importance_method:
            log.warning("note: --importance_method %s does not apply: the reused --importance_config holds %s scores "
                        "(drop --skip_importance_analysis to measure %s importance)", imp.importance_method,
                        record.get("method"), imp.importance_method)
    else:
        cached = out_dir / IMPORTANCE_FILE if out_dir is not None else None
        reusable = None
        if cached is not None and cached.is_file():  # an interrupted earlier run left a complete cache
            try:
                record = json.loads(cached.read_text())
                same = all(record.get(k) == meta[k] for k in ("model_fingerprint", "method", "samples", "seq_len",
                                                               "data_source", "layer_start", "layer_end", "seed"))
                reusable = li.load_importance(cached, expected) if same else None
            except (GaqpruneError, json.JSONDecodeError, OSError):
                reusable = None
        if reusable is not None:
            log.info("reusing layer importance from %s", cached)
            scores = reusable
        else:
            windows = datamodule.calibration_windows(imp.importance_samples, imp.importance_seq_len, seed=meta["seed"],
                                                     what="--importance_samples")
            scores = li.compute_layer_importance(hf_model, windows.to(device), method=imp.importance_method,
                                                 layer_start=start, layer_end=end, progress=progress)
            record = li.importance_record(scores, meta)
    if out_dir is not None:
        li.save_importance(out_dir / IMPORTANCE_FILE, record)
        li.plot_layer_importance(scores, out_dir / "layer_importance.png", method=record.get("method", "removal"))
    return scores


def taylor_windows(datamodule, settings: PruneSettings, seed: int, device: torch.device) -> torch.Tensor:
    """The Taylor calibration windows: the same on every rank for the same seed."""
    return datamodule.calibration_windows(settings.num_examples, settings.max_seq_len, seed=seed + 1,
                                          what="--num_examples").to(device)


def compensation_windows(datamodule, settings: PruneSettings, seed: int, device: torch.device,
                         taylor: torch.Tensor | None = None) -> torch.Tensor | None:
    """The windows ``apply_plan`` refits on (the same on every rank for the same seed); None without compensation.

    ``--compensation_samples None`` reuses the Taylor windows (``taylor``, drawn here if not given).
    """
    if settings.compensation == "none":
        return None
    if settings.compensation_samples is None:
        return taylor if taylor is not None else taylor_windows(datamodule, settings, seed, device)
    return datamodule.calibration_windows(settings.compensation_samples, settings.compensation_seq_len, seed=seed + 2,
                                          what="--compensation_samples").to(device)


def dense_perplexity(hf_model, windows: torch.Tensor, batch_size: int, fingerprint: str,
                     progress: str | None = None) -> tuple[float, bool]:
    """(perplexity of the dense model over ``windows``, whether it came from the cache).

    A dense model's perplexity is the same at every pruning ratio, so a ratio sweep or a rerun measures it once: the
    value is cached under ``$GAQPRUNE_CACHE/perplexity/`` keyed by everything it depends on (weights fingerprint,
    config, the windows' tokens, batch size, device type, library versions).
    """
    import hashlib

    import transformers

    from gaqprune.atomic import write_json
    from gaqprune.core.metrics import perplexity
    from gaqprune.models.load import cache_root

    config = {k: v for k, v in hf_model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    # the fingerprint samples 256 values per tensor; a sum and a norm of every tensor also see a change anywhere else
    # (a folder's weights updated in place), without a full-size copy
    with torch.no_grad():
        tensors = hf_model.state_dict().values()
        sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors]).tolist()
        norms = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]).tolist()
    key = {"fingerprint": fingerprint, "sums": sums, "norms": norms, "config": config,
           "attn": hf_model.config._attn_implementation,
           "windows": hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest(), "shape": list(windows.shape),
           "batch_size": batch_size, "device": next(hf_model.parameters()).device.type,
           "versions": [torch.__version__, transformers.__version__, __version__]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = cache_root() / "perplexity" / f"{digest}.json"
    try:
        return float(json.loads(path.read_text())["perplexity"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = perplexity(hf_model, windows, batch_size, progress=progress)
    try:
        write_json(path, {"perplexity": value, "key": key})
    except OSError as err:  # a read-only cache costs a re-measurement next time, nothing else
        log.warning("could not cache the dense perplexity in %s: %s", path, err)
    return value, False


def plan_stage(hf_model, scores: dict[int, float], windows: torch.Tensor, settings: PruneSettings,
               progress: bool) -> dict:
    """Taylor scores + allocation -> a deterministic plan."""
    from gaqprune.core.plan import build_plan

    plan = build_plan(hf_model, scores, windows, settings, progress=progress)
    totals = plan["totals"]
    if totals["achieved_ratio_selected"] < totals["target_ratio"] - 0.01:  # (within a channel otherwise)
        log.warning("note: this plan removes %.2f%% of the selected layers' prunable parameters, short of "
                    "--pruning_ratio %s: every width-pruned layer keeps at least one KV group and some MLP channels, "
                    "and no layer goes beyond --max_pruning_rate; allow whole-layer removal (--whole_layer_rate) or "
                    "select more layers to go further", 100 * totals["achieved_ratio_selected"], totals["target_ratio"])
    return plan


IMPORTANCE_TAG, RATE_TAG = "prune/layer_importance", "prune/layer_rate"  # by `prune` and `fit --prune` alike


def log_per_layer(loggers, name: str, values: dict[int, float]) -> None:
    """One scalar per layer (step = layer index) in every TensorBoard logger (other loggers would mix layer indices
    into their step column)."""
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_scalar"):
            for layer, value in sorted(values.items()):
                experiment.add_scalar(name, value, global_step=layer)
            experiment.flush()  # `gaqprune prune` never closes the logger; keep the events readable right away


RESULT_SCALARS = ("ppl_before", "ppl_after", "ppl_after_finetune")
RESULT_PARAMS = ("achieved_ratio_selected", "achieved_ratio_decoder", "achieved_ratio_model", "model_params_after")


def result_values(metrics: dict) -> dict[str, float]:
    """A pruning run's results as logger scalars: ``prune/ppl_*``, the achieved ratios, the parameters left."""
    values = {f"prune/{k}": float(metrics[k]) for k in RESULT_SCALARS if k in metrics}
    values.update({f"prune/{k}": float(v) for k, v in metrics.get("params", {}).items() if k in RESULT_PARAMS})
    return values


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

    from gaqprune.atomic import save_figure
    from gaqprune.core.importance import scale_importance_axis

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
        ax.set_title(f"pruning plan: {totals.get('achieved_ratio_selected', 0):.1%} of the selected layers' prunable "
                     f"parameters removed (target {totals.get('target_ratio', 0):.1%})", fontsize=10)
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

    from gaqprune.atomic import save_figure

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
