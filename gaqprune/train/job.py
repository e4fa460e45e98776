"""The jobs the command line runs on a Lightning Trainer: `gaqprune prune` (with its optional fine-tune) and the set-up
and end of `gaqprune fit` (with or without pruning in ``Callback.setup``).

`prune` on rank 0: checks -> dense perplexity -> ``prune_model`` (importance, plan, surgery) -> ``write_pruned`` ->
pruned perplexity -> metrics; with ``--finetune``, a Lightning fit follows, whose other ranks (started by Lightning
when the fit begins) receive rank 0's plan in ``GQAPrune.setup`` by ``strategy.broadcast``, as in `fit --prune`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from gaqprune.atomic import write_json, write_text
from gaqprune.core.layers import offload_store
from gaqprune.core.metrics import perplexity
from gaqprune.core.plan import plan_digest
from gaqprune.data.datamodule import LMDataModule
from gaqprune.errors import GaqpruneError
from gaqprune.models.names import EMBEDDED, model_name, model_origin
from gaqprune.models.offload import to_device
from gaqprune.run import report, stages, zeroshot
from gaqprune.run.rundir import RunDir
from gaqprune.run.zeroshot import ZeroShotSettings
from gaqprune.settings import FinetuneSettings, ImportanceSettings, PruneSettings, RunSettings
from gaqprune.train.callbacks import GQAPrune, LayerImportance, shows_progress
from gaqprune.train.module import LitCausalLM

log = logging.getLogger("gaqprune")
# Set in the environment of the ranks Lightning starts for the fit of `prune --finetune` (they inherit it at launch):
# they are this run's own ranks, not ones an external launcher (torchrun, SLURM) started beside rank 0
LAUNCH_ENV = "GAQPRUNE_FINETUNE_RANK"


@dataclass
class PruneJob:
    """Everything `gaqprune prune` needs besides the model and the data."""

    importance: ImportanceSettings
    pruning: PruneSettings
    run: RunSettings
    finetune: FinetuneSettings
    base_model: str
    config_yaml: str = ""
    trainer_limits: bool = False  # --trainer.max_epochs or max_steps given: they bound the fine-tune, not --finetune_epochs
    tasks: ZeroShotSettings | None = None  # --eval_tasks: lm-eval accuracy before and after pruning and the fine-tune


def evaluate_tasks(trainer: L.Trainer, hf_model, tokenizer, tasks: ZeroShotSettings, batch_size: int, step: int,
                   progress: bool) -> dict:
    """lm-eval's accuracy of ``hf_model`` on ``tasks`` (on the run's device), logged as ``eval/<task>/<metric>``."""
    results = zeroshot.evaluate(hf_model, tokenizer, tasks, batch_size=batch_size,
                                device=trainer.strategy.root_device, progress=progress)
    report.log_task_results(trainer.loggers, results, step)
    return results


def run_prune(trainer: L.Trainer, model: LitCausalLM, datamodule: LMDataModule | None = None,
              job: PruneJob | None = None) -> dict:
    """`gaqprune prune`: load, analyse layer importance, Taylor-score, prune, (evaluate), save; optionally fine-tune."""
    job = job or PruneJob(ImportanceSettings(), PruneSettings(), RunSettings(), FinetuneSettings(), EMBEDDED)
    datamodule = datamodule or LMDataModule(tokenizer=job.base_model)
    hf_model = model.model
    start, end = job.pruning.layer_range(len(hf_model.model.layers))
    run_dir = RunDir(job.run).check()
    device = trainer.strategy.root_device
    progress = shows_progress(trainer)
    # Fail on data problems before anything is computed or written.
    stages.check_calibration_budget(datamodule, job.importance, job.pruning, job.run.seed)
    eval_windows = datamodule.eval_windows() if job.run.test_after_prune else None
    if job.finetune.finetune:  # the fine-tune's data (instruction records, training windows) checked now
        datamodule.train_windows_limit = job.finetune.finetune_samples
        check_val_interval(trainer, datamodule, datamodule.num_train_examples())
        if trainer.limit_val_batches:
            datamodule.eval_windows()  # the fit validates on them
    if not trainer.is_global_zero:  # a rank Lightning started for the fit of `prune --finetune`: see GQAPrune
        return _join_finetune(trainer, model, datamodule, job, run_dir) if job.finetune.finetune else {}
    clock = report.Stopwatch()
    metrics: dict = {"base_model": job.base_model}
    to_device(hf_model, device)  # an offloaded model: all but the decoder layers, which go one at a time
    meta = stages.importance_meta(hf_model, job.importance, start, end, job.base_model, datamodule.source, job.run.seed)
    stages.check_importance_config(job.importance, meta)
    # every check passed: --overwrite removes the previous run's results now, before anything new is written (an
    # unfinished run's leftovers go in any case)
    run_dir.clear()
    store = offload_store(hf_model)
    if store is not None:  # layers the surgery changed wait in the run folder until the save
        store.scratch_parent = run_dir.path
    if job.config_yaml:
        write_text(run_dir / RunDir.CONFIG, job.config_yaml)
    if eval_windows is not None:
        metrics.update(eval_seq_len=int(eval_windows.shape[1]), eval_windows=int(eval_windows.shape[0]))
        with clock("eval_before"):
            metrics["ppl_before"], metrics["ppl_before_cached"] = stages.dense_perplexity(
                hf_model, eval_windows, datamodule.eval_batch_size, meta["model_fingerprint"],
                progress="dense perplexity" if progress else None)
    if job.tasks is not None:
        with clock("tasks_before"):
            metrics["tasks_before"] = evaluate_tasks(trainer, hf_model, datamodule.tokenizer, job.tasks,
                                                     datamodule.eval_batch_size, 0, progress)
    scores, plan = stages.prune_model(hf_model, datamodule, job.importance, job.pruning, job.run.seed, meta, device,
                                      progress, run_dir=run_dir, clock=clock)
    stages.write_pruned(hf_model, datamodule.tokenizer, run_dir, plan, scores,
                        model_origin(job.base_model) if job.run.save_model else None, job.run.save_gguf,
                        model_name(job.base_model), progress, clock)
    if eval_windows is not None:
        with clock("eval_after"):
            metrics["ppl_after"] = perplexity(hf_model, eval_windows, datamodule.eval_batch_size,
                                              progress="pruned perplexity" if progress else None)
    if job.tasks is not None:
        with clock("tasks_after"):
            metrics["tasks_after"] = evaluate_tasks(trainer, hf_model, datamodule.tokenizer, job.tasks,
                                                    datamodule.eval_batch_size, 1, progress)
    metrics.update(params=plan["totals"], seconds=clock.seconds)
    log_prune_layers(trainer, scores, plan)
    logged = report.result_values(metrics)  # now: a fine-tune can take hours (or fail)
    report.log_results(trainer.loggers, logged)
    print(report.summary_table(plan, metrics))
    if job.finetune.finetune:
        _finetune_pruned(trainer, model, datamodule, job, run_dir, plan, metrics, eval_windows, clock, progress)
    settings = {**datamodule.hparams, **model.hparams, "base_model": job.base_model,
                **{k: v for part in (job.importance, job.pruning, job.run, job.finetune)
                   for k, v in dataclasses.asdict(part).items()}}
    report.log_run_results(trainer.loggers, settings, metrics, logged, report.summary_table(plan, metrics))
    if store is not None:
        store.close()
    write_json(run_dir / RunDir.METRICS, metrics)  # written last: marks the run as finished
    written = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.path.iterdir() if not p.name.startswith("."))
    print(f"results in {run_dir.path}/: {', '.join(written)}")
    return metrics


def _finetune_pruned(trainer: L.Trainer, model: LitCausalLM, datamodule: LMDataModule, job: PruneJob, run_dir: RunDir,
                     plan: dict, metrics: dict, eval_windows: torch.Tensor | None, clock: report.Stopwatch,
                     progress: bool) -> None:
    """Rank 0 of `prune --finetune`: the LoRA fit of the model it has just pruned, its perplexity and its exports."""
    from gaqprune.train.lora import export_finetuned

    if not job.trainer_limits:
        trainer.fit_loop.max_epochs = job.finetune.finetune_epochs
    if "ppl_after" in metrics and validates_everything(trainer):  # measured on the windows the fit validates on:
        model.trainer = trainer  # its curve starts there (every rank decides alike: _join_finetune)
        model.record_start(metrics["ppl_after"])
        trainer.num_sanity_val_steps = 0
    model.plan_digest = plan_digest(plan)
    resume = resumable(trainer, model, run_dir)
    # the other ranks, which Lightning starts now, receive the plan from this one
    trainer.callbacks.append(GQAPrune(job.pruning, seed=job.run.seed, plan=plan, pruned_on_rank_zero=True))
    os.environ[LAUNCH_ENV] = "1"
    try:
        with clock("finetune"):
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
    finally:
        os.environ.pop(LAUNCH_ENV, None)
    model.to(trainer.strategy.root_device)  # Lightning's teardown left it on the CPU (hours of eval for 8B)
    if eval_windows is not None:
        metrics["ppl_after_finetune"] = perplexity(model.model, eval_windows.to(model.device), datamodule.eval_batch_size,
                                                   progress="fine-tuned perplexity" if progress else None)
        print(f"perplexity after fine-tuning: {metrics['ppl_after_finetune']:.2f} (dense {metrics['ppl_before']:.2f} | "
              f"pruned {metrics['ppl_after']:.2f})")
    if job.tasks is not None:
        with clock("tasks_after_finetune"):
            metrics["tasks_after_finetune"] = evaluate_tasks(trainer, model.model, datamodule.tokenizer, job.tasks,
                                                             datamodule.eval_batch_size, 2, progress)
        print("zero-shot accuracy after fine-tuning (lm-eval):\n" + report.task_table(metrics))
    metrics["finetune_outputs"] = export_finetuned(
        model, datamodule.tokenizer, run_dir, job.run.save_gguf, pruned_here=True,
        adapter_base=run_dir / RunDir.MODEL if job.run.save_model else None, progress=progress)
    report.plot_fit(model.history, run_dir / RunDir.FIT_PLOT,
                    references={"dense": metrics["ppl_before"]}  # on the windows validated
                    if "ppl_before" in metrics and validates_everything(trainer) else None)
    metrics["seconds"] = clock.seconds


def _join_finetune(trainer: L.Trainer, model: LitCausalLM, datamodule: LMDataModule, job: PruneJob,
                   run_dir: RunDir) -> dict:
    """Another rank of `prune --finetune` under DDP/FSDP: Lightning started this process (the same command) when rank
    0 began the fit, after rank 0 had pruned. It analyses and scores nothing (scores on other hardware could break a
    tie the other way) and writes nothing: in the fit's ``setup``, ``GQAPrune`` receives rank 0's plan and cuts this
    rank's model to it. DDP then copies rank 0's weights to every rank; FSDP shards each rank's own copy, whose refit
    is the same computation on the same windows (equal on identical devices)."""
    model.model.to(trainer.strategy.root_device)
    if not job.trainer_limits:
        trainer.fit_loop.max_epochs = job.finetune.finetune_epochs
    if job.run.test_after_prune and validates_everything(trainer):
        trainer.num_sanity_val_steps = 0  # as rank 0, which measured the pruned model already (a collective)
    trainer.callbacks.append(GQAPrune(job.pruning, seed=job.run.seed, plan=None, pruned_on_rank_zero=True))
    trainer.fit(model, datamodule=datamodule, ckpt_path=resumable(trainer, model, run_dir))
    return {}


def resumable(trainer: L.Trainer, model: LitCausalLM, run_dir: RunDir) -> str | None:
    """The checkpoint an interrupted run of this `prune --finetune` left (``checkpoints/last.ckpt``; --overwrite
    removed it), to resume its fine-tune from: a rerun prunes to the same plan (layer importance from its record)."""
    last = run_dir.last_checkpoint()
    if last is None or not trainer.checkpoint_callback:
        return None
    check_ckpt_path(str(last))  # a pickle that names more than tensors is refused, never run
    # (rank 0 judges it: the other ranks of `prune --finetune` receive the plan only in the fit's setup)
    if trainer.is_global_zero and \
            model.structure_mismatch(torch.load(last, map_location="cpu", weights_only=True, mmap=True)) is not None:
        raise GaqpruneError(f"{str(last)!r} is the checkpoint of an unfinished fine-tune of another pruning plan "
                            "(other kept units); rerun with that run's settings to resume it, or start over "
                            "with --overwrite true")
    if trainer.is_global_zero:
        log.info("resuming the interrupted fine-tune from %s", last)
    return str(last)


def validates_everything(trainer: L.Trainer) -> bool:
    """Whether the fit validates on all the evaluation windows (``limit_val_batches`` 1.0; the integer 1 is one
    batch), the ones ``--test_after_prune`` measured."""
    return isinstance(trainer.limit_val_batches, float) and trainer.limit_val_batches == 1.0


def log_prune_layers(trainer: L.Trainer, scores: dict[int, float], plan: dict) -> None:
    if trainer.is_global_zero:
        report.log_per_layer(trainer.loggers, report.IMPORTANCE_TAG, scores)
        report.log_plan(trainer.loggers, plan)


# ------------------------------------------------------------------------------------------------ `gaqprune fit`


@dataclass
class FitJob:
    """What `gaqprune fit` needs besides the trainer, the model and the data."""

    importance: ImportanceSettings
    pruning: PruneSettings
    run: RunSettings
    finetune: FinetuneSettings
    base_model: str
    prune: bool = False  # --prune: prune in Callback.setup before fine-tuning
    ckpt_path: str | None = None
    max_epochs: int | None = None
    max_steps: int = -1


def prepare_fit(trainer: L.Trainer, model: LitCausalLM, datamodule: LMDataModule, job: FitJob) -> None:
    """Before `gaqprune fit`: its length, the pruning callbacks (with --prune), every check that needs the loaded
    model, then the previous run's results removed (never a fine-tune's checkpoint it resumes from)."""
    run_dir = RunDir(job.run)
    datamodule.train_windows_limit = job.finetune.finetune_samples
    if job.max_epochs is None and job.max_steps == -1:
        trainer.fit_loop.max_epochs = job.finetune.finetune_epochs
    if job.prune:
        stages.check_calibration_budget(datamodule, job.importance, job.pruning, job.run.seed)  # before any work
        importance = LayerImportance(job.importance, job.pruning, job.base_model, seed=job.run.seed,
                                     out_dir=str(run_dir.path))
        save_model = model_origin(job.base_model) if job.run.save_model else None
        trainer.callbacks.extend([importance, GQAPrune(job.pruning, importance, seed=job.run.seed, out_dir=str(run_dir.path),
                                                       save_model_of=save_model, save_gguf=job.run.save_gguf,
                                                       gguf_name=model_name(job.base_model))])
    examples = datamodule.num_train_examples()
    check_val_interval(trainer, datamodule, examples)
    if job.max_epochs is None and job.max_steps != -1 and not job.ckpt_path:
        # the epochs the steps take, for the progress bar (a resumed fit counts from where it stopped: left alone)
        batches = max(1, train_batches(trainer, datamodule, examples) // trainer.accumulate_grad_batches)
        trainer.fit_loop.max_epochs = math.ceil(job.max_steps / batches)
    if job.prune:  # a reused importance record that does not fit: refused before anything is removed
        hf_model = model.model
        meta = stages.importance_meta(hf_model, job.importance, *job.pruning.layer_range(len(hf_model.model.layers)),
                                      job.base_model, datamodule.source, job.run.seed)
        stages.check_importance_config(job.importance, meta)
    results = RunDir.RUN_FILES if job.prune else (*RunDir.FIT_RESULTS, RunDir.CHECKPOINTS)
    if job.ckpt_path:  # the checkpoints are what it resumes from
        results = tuple(name for name in results if name != RunDir.CHECKPOINTS)
    run_dir.clear(results)


def finish_fit(trainer: L.Trainer, model: LitCausalLM, datamodule: LMDataModule, job: FitJob) -> None:
    """After `gaqprune fit`: validate the final model if the fit stopped between validations; save the LoRA adapters
    and a merged model in the run folder, its curves and ``fit_metrics.json`` (rank 0)."""
    from gaqprune.train.lora import export_finetuned

    history = model.history["val_ppl"]
    if trainer.limit_val_batches and (not history or history[-1][0] != trainer.global_step):
        # --trainer.max_steps / max_time ended the fit between validations: the exported model gets its own number
        # (every rank: a collective), not none or an older step's
        trainer.validate(model, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return
    run_dir = RunDir(job.run)
    paths = export_finetuned(model, datamodule.tokenizer, run_dir, job.run.save_gguf, pruned_here=job.prune,
                             progress=shows_progress(trainer),
                             adapter_base=run_dir / RunDir.MODEL if job.prune and job.run.save_model else None)
    report.plot_fit(model.history, run_dir / RunDir.FIT_PLOT)
    val_ppl = trainer.callback_metrics.get("val_ppl")
    val_ppl = None if val_ppl is None else float(val_ppl)
    logger = trainer.logger  # its log_dir, not Trainer.log_dir: that one is a collective, and only rank 0 is here
    steps = trainer.global_step
    val_step = model.history["val_ppl"][-1][0] if val_ppl is not None else None  # of the latest validation
    write_json(run_dir / RunDir.FIT_METRICS, {
        "base_model": job.base_model, "steps": steps, "val_ppl_start": model.val_ppl_start, "val_ppl": val_ppl,
        "val_ppl_step": val_step, "log_dir": getattr(logger, "log_dir", None), "outputs": paths})
    for name, path in paths.items():
        log.info("saved %s to %s", name, path)
    if model.val_ppl_start is not None and val_ppl is not None:
        print(f"validation perplexity: {model.val_ppl_start:.2f} before training -> {val_ppl:.2f} at step {val_step} "
              f"(of {steps})")


# ------------------------------------------------------------------------------------------------ fit checks


def train_batches(trainer: L.Trainer, datamodule: LMDataModule, examples: int) -> int:
    """Training batches per epoch on each rank of a fit over ``examples`` training examples."""
    batches = math.ceil(math.ceil(examples / trainer.world_size) / datamodule.batch_size)
    limit = trainer.limit_train_batches
    return min(batches, limit) if isinstance(limit, int) else int(batches * limit)


def check_val_interval(trainer: L.Trainer, datamodule: LMDataModule, examples: int) -> None:
    """Lightning refuses an integer --trainer.val_check_interval above an epoch's training batches, with a traceback
    and (in `prune --finetune`) only after pruning: check it before any work."""
    interval = trainer.val_check_interval
    if not isinstance(interval, int) or trainer.check_val_every_n_epoch is None or trainer.limit_val_batches == 0:
        return
    batches = train_batches(trainer, datamodule, examples)
    if interval > batches:
        raise GaqpruneError(
            f"--trainer.val_check_interval {interval} is more than the {batches} training batches of an epoch "
            f"({examples} examples, --data.batch_size {datamodule.batch_size}); give at most {batches}, a fraction "
            "of an epoch such as 1.0, or more --finetune_samples")


def check_ckpt_path(ckpt_path: str | None) -> None:
    """``--ckpt_path FILE`` (not Lightning's keywords, not a remote URL): an existing checkpoint file, checked before the
    model is loaded (Lightning found a missing one after that, and a junk one with an unpickler traceback), read by
    torch's weights_only reader, which runs nothing: it refuses any global beyond tensors and plain containers."""
    if ckpt_path is None or ckpt_path in ("last", "best", "hpc") or str(ckpt_path).lower().startswith("registry") \
            or "://" in str(ckpt_path):
        return
    path = Path(ckpt_path).expanduser()
    if path.is_dir():  # a sharded (FSDP, DeepSpeed) checkpoint: judged by its strategy
        return
    if not path.is_file():
        raise GaqpruneError(f"--ckpt_path {ckpt_path!r}: file not found; give a checkpoint file (.ckpt) or 'last' "
                            "(the run's latest)")
    if not zipfile.is_zipfile(path):  # what torch.save writes
        raise GaqpruneError(f"--ckpt_path {ckpt_path!r} is not a Lightning checkpoint (not a file torch.save wrote)")
    import pickle

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise GaqpruneError(f"--ckpt_path {ckpt_path!r} holds more than a Lightning checkpoint of tensors and plain "
                            f"values ({' '.join(str(err).split())[-160:]}); gaqprune never runs code from a checkpoint "
                            "file") from None
