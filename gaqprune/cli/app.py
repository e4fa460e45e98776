"""`gaqprune` command line: a LightningCLI with subcommands prune | fit | validate | test.

The parameter guide's flags are plain top-level flags (``--base_model``, ``--importance_samples``,
``--pruning_ratio``, ...); Lightning's own groups stay nested (``--trainer.*``, ``--model.*``,
``--data.*``). ``gaqprune prune`` is a method of ``GaqpruneTrainer``; ``gaqprune fit --prune true``
prunes in ``Callback.setup`` and then fine-tunes with LoRA in the same run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import signal
import sys
import threading
import warnings
from argparse import ArgumentError
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gaqprune.atomic import Terminated, sigterm_unwinds, write_json, write_text
from gaqprune.data.text import LMDataModule
from gaqprune.errors import GaqpruneError
from gaqprune.models.load import EMBEDDED, model_name, model_origin
from gaqprune.run import stages as pipeline
from gaqprune.settings import FinetuneSettings, ImportanceSettings, PruneSettings, RunSettings
from gaqprune.train.module import LitCausalLM

log = logging.getLogger("gaqprune")
# The settings dataclasses document each field in a docstring under it: show those in --help.
set_parsing_settings(docstring_parse_attribute_docstrings=True)
SETTINGS = {"importance": ImportanceSettings, "pruning": PruneSettings, "run": RunSettings, "finetune": FinetuneSettings}


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


class GaqpruneTrainer(L.Trainer):
    def prune(self, model: LitCausalLM, datamodule: LMDataModule | None = None, job: PruneJob | None = None) -> dict:
        """Load, analyse layer importance, Taylor-score, prune, (evaluate), save; optionally fine-tune."""
        from gaqprune.core.metrics import perplexity
        from gaqprune.core.plan import apply_plan, layer_range

        job = job or PruneJob(ImportanceSettings(), PruneSettings(), RunSettings(), FinetuneSettings(), EMBEDDED)
        datamodule = datamodule or LMDataModule(tokenizer=job.base_model)
        hf_model = model.model
        num_layers = len(hf_model.model.layers)
        start, end = layer_range(job.pruning, num_layers)
        out_dir = pipeline.check_run_dir(job.run)
        device = self.strategy.root_device
        progress = pipeline.shows_progress(self)
        # Fail on data problems before anything is computed or written.
        if not job.importance.skip_importance_analysis:
            datamodule.calibration_windows(job.importance.importance_samples, job.importance.importance_seq_len,
                                           what="--importance_samples")
        taylor_windows = pipeline.taylor_windows(datamodule, job.pruning, job.run.seed, device)
        refit_windows = pipeline.compensation_windows(datamodule, job.pruning, job.run.seed, device, taylor_windows)
        eval_windows = datamodule.eval_windows() if job.run.test_after_prune else None
        if job.finetune.finetune:  # the fine-tune's data (instruction records, training windows) checked now
            datamodule.train_windows_limit = job.finetune.finetune_samples
            check_val_interval(self, datamodule, datamodule.num_train_examples())
            if self.limit_val_batches:
                datamodule.eval_windows()  # the fit validates on them
        if not self.is_global_zero:  # a rank Lightning started for the fit of `prune --finetune` (see check_launch)
            return self._join_finetune(model, datamodule, job, out_dir, refit_windows) if job.finetune.finetune else {}
        clock = pipeline.Stopwatch()
        metrics: dict = {"base_model": job.base_model}
        hf_model.to(device)
        meta = pipeline.importance_meta(hf_model, job.importance, start, end, job.base_model, datamodule.source,
                                        job.run.seed)
        pipeline.check_importance_config(job.importance, meta)
        # every check passed: --overwrite removes the previous run's results now, before anything new is written (an
        # unfinished run's leftovers go in any case)
        pipeline.clear_results(job.run)
        with clock("layer_importance"):  # first: a reused cache is checked before any heavy work
            scores = pipeline.layer_importance_stage(hf_model, datamodule, job.importance, start, end, out_dir, meta,
                                                     device, progress)
        if job.config_yaml:
            write_text(out_dir / "config.yaml", job.config_yaml)
        if eval_windows is not None:
            metrics.update(eval_seq_len=int(eval_windows.shape[1]), eval_windows=int(eval_windows.shape[0]))
            with clock("eval_before"):
                metrics["ppl_before"], metrics["ppl_before_cached"] = pipeline.dense_perplexity(
                    hf_model, eval_windows, datamodule.eval_batch_size, meta["model_fingerprint"],
                    progress="dense perplexity" if progress else None)
        with clock("taylor_and_plan"):
            plan = pipeline.plan_stage(hf_model, scores, taylor_windows, job.pruning, progress)
        write_json(out_dir / pipeline.PLAN_FILE, plan)
        with clock("surgery"):
            apply_plan(hf_model, plan, refit_windows, progress=progress)
        pipeline.plot_rates(scores, plan, out_dir / "pruning_rates.png")
        if eval_windows is not None:
            with clock("eval_after"):
                metrics["ppl_after"] = perplexity(hf_model, eval_windows, datamodule.eval_batch_size,
                                                  progress="pruned perplexity" if progress else None)
        if job.run.save_model:
            from gaqprune.models.pruned import save_pretrained_model

            with clock("save"):
                save_pretrained_model(hf_model, datamodule.tokenizer, out_dir / "model", overwrite=True,
                                      base_model=model_origin(job.base_model))
        if job.run.save_gguf:
            from gaqprune.models.gguf import save_gguf

            with clock("save_gguf"):
                save_gguf(hf_model, datamodule.tokenizer, out_dir / "model.gguf", out_type=job.run.save_gguf,
                          overwrite=True, name=model_name(job.base_model), progress=progress)
        metrics.update(params=plan["totals"], seconds=clock.seconds)
        self._log_prune_layers(scores, plan)
        logged = pipeline.result_values(metrics)  # now: a fine-tune can take hours (or fail)
        if self.is_global_zero:
            pipeline.log_results(self.loggers, logged)
            print(pipeline.summary_table(plan, metrics))
        if job.finetune.finetune:
            from gaqprune.train.lora import export_finetuned

            if not job.trainer_limits:
                self.fit_loop.max_epochs = job.finetune.finetune_epochs
            if "ppl_after" in metrics and self._validates_everything():  # measured on the windows the fit
                model.trainer = self  # validates on: its curve starts there (every rank decides alike: _join_finetune)
                model.record_start(metrics["ppl_after"])
                self.num_sanity_val_steps = 0
            plan_path = out_dir / pipeline.PLAN_FILE
            os.environ[PLAN_ENV] = f"{plan_path}#{hashlib.sha256(plan_path.read_bytes()).hexdigest()}"
            model.plan_digest = pipeline.plan_digest(plan)
            resume = self._resumable(model, job)
            try:
                with clock("finetune"):  # (the other ranks start here, with PLAN_ENV)
                    self.fit(model, datamodule=datamodule, ckpt_path=resume)
            finally:
                os.environ.pop(PLAN_ENV, None)
            model.to(self.strategy.root_device)  # Lightning's teardown left it on the CPU (hours of eval for 8B)
            if eval_windows is not None:
                metrics["ppl_after_finetune"] = perplexity(
                    model.model, eval_windows.to(model.device), datamodule.eval_batch_size,
                    progress="fine-tuned perplexity" if progress else None)
                if self.is_global_zero:
                    print(f"perplexity after fine-tuning: {metrics['ppl_after_finetune']:.2f} (dense "
                          f"{metrics['ppl_before']:.2f} | pruned {metrics['ppl_after']:.2f})")
            if self.is_global_zero:
                metrics["finetune_outputs"] = export_finetuned(
                    model, datamodule.tokenizer, out_dir, job.run.save_gguf, pruned_here=True,
                    adapter_base=out_dir / "model" if job.run.save_model else None, progress=progress)
                pipeline.plot_fit(model.history, out_dir / pipeline.FIT_PLOT,
                                  references={"dense": metrics["ppl_before"]}  # on the windows validated
                                  if "ppl_before" in metrics and self._validates_everything() else None)
            metrics["seconds"] = clock.seconds
        if self.is_global_zero:
            settings = {**datamodule.hparams, **model.hparams, "base_model": job.base_model,
                        **{k: v for part in (job.importance, job.pruning, job.run, job.finetune)
                           for k, v in dataclasses.asdict(part).items()}}
            pipeline.log_run_results(self.loggers, settings, metrics, logged, pipeline.summary_table(plan, metrics))
        write_json(out_dir / pipeline.METRICS_FILE, metrics)  # written last: marks the run as finished
        if self.is_global_zero:
            written = sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir() if not p.name.startswith("."))
            print(f"results in {out_dir}/: {', '.join(written)}")
        return metrics

    def _join_finetune(self, model: LitCausalLM, datamodule: LMDataModule, job: PruneJob, out_dir: Path,
                       refit_windows: torch.Tensor) -> dict:
        """Another rank of `prune --finetune` under DDP/FSDP: Lightning started this process (the same command) when
        rank 0 began the fit, after rank 0 had pruned and written the plan. Cut the model to rank 0's plan instead of
        analysing and scoring again (scores on other hardware could break a tie the other way), write nothing,
        and join the fit. DDP then copies rank 0's weights to every rank; FSDP shards each rank's own copy, whose
        refit is the same computation on the same windows (equal on identical devices)."""
        import json

        from gaqprune.core.plan import apply_plan

        path, _, digest = os.environ.get(PLAN_ENV, "").rpartition("#")
        plan_path = out_dir / pipeline.PLAN_FILE
        if not plan_path.is_file() or Path(path).resolve() != plan_path.resolve() \
                or hashlib.sha256(plan_path.read_bytes()).hexdigest() != digest:
            raise GaqpruneError(f"rank {self.global_rank}: no plan from rank 0 of this run at {plan_path}; start "
                                "`gaqprune prune --finetune` once (Lightning starts the other ranks itself), with every "
                                "rank seeing the same run folder")
        model.model.to(self.strategy.root_device)
        plan = json.loads(plan_path.read_text())
        apply_plan(model.model, plan, refit_windows, progress=False)
        model.plan_digest = pipeline.plan_digest(plan)
        if not job.trainer_limits:
            self.fit_loop.max_epochs = job.finetune.finetune_epochs
        if job.run.test_after_prune and self._validates_everything():
            self.num_sanity_val_steps = 0  # as rank 0, which measured the pruned model already (a collective)
        self.fit(model, datamodule=datamodule, ckpt_path=self._resumable(model, job))
        return {}

    def _resumable(self, model: LitCausalLM, job: PruneJob) -> str | None:
        """The checkpoint an interrupted run of this `prune --finetune` left (``checkpoints/last.ckpt``; --overwrite
        removed it), to resume its fine-tune from: a rerun prunes to the same plan (layer importance from its cache)."""
        last = pipeline.last_checkpoint(job.run)
        if last is None or not self.checkpoint_callback:
            return None
        check_ckpt_path(str(last))  # a pickle that names more than tensors is refused, never run
        if model.structure_mismatch(torch.load(last, map_location="cpu", weights_only=True, mmap=True)) is not None:
            raise GaqpruneError(f"{str(last)!r} is the checkpoint of an unfinished fine-tune of another pruning plan "
                                "(other kept units); rerun with that run's settings to resume it, or start over "
                                "with --overwrite true")
        if self.is_global_zero:
            log.info("resuming the interrupted fine-tune from %s", last)
        return str(last)

    def _validates_everything(self) -> bool:
        """Whether the fit validates on all the evaluation windows (``limit_val_batches`` 1.0; the integer 1 is one
        batch), the ones ``--test_after_prune`` measured."""
        return isinstance(self.limit_val_batches, float) and self.limit_val_batches == 1.0

    def _log_prune_layers(self, scores: dict[int, float], plan: dict) -> None:
        if self.is_global_zero:
            pipeline.log_per_layer(self.loggers, pipeline.IMPORTANCE_TAG, scores)
            pipeline.log_per_layer(self.loggers, pipeline.RATE_TAG, {e["index"]: e["achieved_rate"] for e in plan["layers"]})


class GaqpruneCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}
        commands["prune"] = {"model", "datamodule", "job"}
        return commands

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("prune", "fit"):
            for settings in SETTINGS.values():
                parser.add_class_arguments(settings, nested_key=None, fail_untyped=False)
            for name in ("finetune_method", "distill_weight", "distill_temperature", "teacher_model"):
                parser.link_arguments(name, f"model.{name}")
        if subcommand == "fit":
            parser.add_argument("--prune", type=bool, default=False,
                                help="Prune in Callback.setup (layer importance + GQA pruning) before fine-tuning.")
        return parser

    def _parse_ckpt_path(self) -> None:
        """Lightning reads a --ckpt_path file's hyperparameters first thing: a missing or junk file is refused before."""
        if self.config.get("subcommand"):
            check_ckpt_path(self.config[self.config.subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--base_model", type=str, default=EMBEDDED,
                            help="'embedded' (SmolLM2-135M-Instruct, offline), a HF model folder, a .gguf file, "
                                 "a hub id such as meta-llama/Meta-Llama-3-8B-Instruct, or a gaqprune checkpoint.")
        parser.add_argument("--dtype", type=str, default="float32", help="Weight dtype: float32, bfloat16 or float16.")
        parser.set_defaults({"trainer.log_every_n_steps": 10,  # Lightning's 50 logs no loss at all in short fits
                             "trainer.num_sanity_val_steps": -1})  # a fit's curve starts at the untrained model
        parser.link_arguments("base_model", "model.base_model")
        parser.link_arguments("base_model", "data.tokenizer")
        parser.link_arguments("dtype", "model.dtype")

    def _settings(self, cls):
        cfg = self.config[self.subcommand]
        return cls(**{name: cfg[name] for name in cls.__dataclass_fields__})

    def before_instantiate_classes(self) -> None:
        """Cheap validation of every flag before the model is loaded or any folder is written."""
        from gaqprune.models.load import (
            check_tokenizer_files,
            check_weight_files,
            load_config,
            resolve_dtype,
            resolve_model_path,
        )

        cfg = self.config[self.subcommand]
        resolve_dtype(cfg["dtype"])
        trains = self.subcommand == "fit" or (self.subcommand == "prune" and cfg["finetune"])
        validate_data_settings(cfg["data"], trains)
        check_trainer_flags(cfg["trainer"], trains, prune_finetune=self.subcommand == "prune" and cfg["finetune"])
        model_config = load_config(cfg["base_model"])
        check_tokenizer_files(cfg["base_model"])
        check_weight_files(cfg["base_model"])
        saved, used = getattr(model_config, "dtype", None), resolve_dtype(cfg["dtype"])
        if self.subcommand in ("validate", "test") and isinstance(saved, torch.dtype) and saved != used:
            saved, used = (str(d).removeprefix("torch.") for d in (saved, used))
            log.info("note: %s was saved in %s and is measured in %s (--dtype); a run that worked in %s measured "
                     "slightly different perplexities", cfg["base_model"], saved, used, saved)
        context = getattr(model_config, "max_position_embeddings", None)
        seq_len = cfg["data"]["max_seq_len"]
        if context and seq_len > context:
            raise GaqpruneError(f"--data.max_seq_len {seq_len} exceeds the model's "
                                f"context of {context} tokens")
        validate_seed(cfg.get("seed", 0))
        if self.subcommand == "prune" or (self.subcommand == "fit" and cfg.get("prune")):
            imp, prune, run, fin = (self._settings(c) for c in SETTINGS.values())
            validate_pruning(imp, prune, model_config)
            if imp.skip_importance_analysis:  # its layers, now (its model: once the weights are loaded)
                from gaqprune.core.plan import layer_range

                start, end = layer_range(prune, model_config.num_hidden_layers)
                pipeline.check_importance_config(imp, {"num_layers": model_config.num_hidden_layers,
                                                       "layer_start": start, "layer_end": end})
            validate_finetune_settings(fin, cfg["model"])
            if fin.finetune and self.subcommand == "prune":
                validate_teacher(fin, cfg["base_model"], model_config)
            pipeline.check_run_dir(run)
            if self.subcommand == "prune":  # (a fit checks it below)
                pipeline.check_unfinished_fit(run, resuming=fin.finetune, how="by running `prune --finetune` again")
        if self.subcommand == "fit":
            run = self._settings(RunSettings)
            fin = self._settings(FinetuneSettings)
            validate_finetune_settings(fin, cfg["model"])
            validate_teacher(fin, cfg["base_model"], model_config)
            if cfg.get("prune") and run.test_after_prune:
                raise GaqpruneError("--test_after_prune is for `gaqprune prune`; under `fit` the validation set is "
                                    "evaluated during training (--trainer.val_check_interval)")
            if not cfg.get("prune"):  # a guide user's `fit --pruning_ratio 0.25` fine-tuned the dense model, silently
                given = [f"--{f.name} {cfg[f.name]}" for cls in (ImportanceSettings, PruneSettings)
                         for f in dataclasses.fields(cls) if cfg[f.name] != f.default]
                given += ["--test_after_prune true"] if run.test_after_prune else []
                from gaqprune.models.pruned import is_pruned_checkpoint

                if given and is_pruned_checkpoint(resolve_model_path(cfg["base_model"])):
                    # the recovery fine-tune of a pruned model, e.g. with the pruning run's config file reused
                    log.info("note: %s: pruning flags, ignored by `fit` of the pruned model %s (no --prune true)",
                             ", ".join(given), cfg["base_model"])
                elif given:
                    raise GaqpruneError(f"{', '.join(given)}: pruning flags do nothing in `fit` without --prune true; "
                                        "add --prune true to prune before fine-tuning, or drop them")
            # a fit may add its results to a prune run's folder, never replace a fit's (or a pruning run's, with --prune)
            pipeline.check_run_dir(run, pipeline.FINISHED if cfg.get("prune") else pipeline.FIT_RESULTS)
            pipeline.check_unfinished_fit(run, resuming=bool(cfg.get("ckpt_path")))
            if cfg.get("ckpt_path") == "last" and pipeline.last_checkpoint(run) is None \
                    and not _configures_checkpoints(cfg["trainer"].get("callbacks")):  # (Lightning: step 0)
                raise GaqpruneError(f"--ckpt_path last: no checkpoint to resume in "
                                    f"{str(pipeline.run_dir(run) / pipeline.CHECKPOINTS)!r} (--save_ckpt_log_name "
                                    f"{run.save_ckpt_log_name!r}); give the run's name or a checkpoint file")
        if self.subcommand in ("prune", "fit"):
            run = self._settings(RunSettings)
            check_gguf(run, cfg["base_model"], model_config)
            # last: only a run that passed every check claims its folder (until the command ends: run())
            pipeline.hold_run_dir(run)

    def instantiate_trainer(self, **kwargs):
        """Lightning rejects impossible --trainer.* combinations (e.g. strategy fsdp on the CPU) with a ValueError
        while building the Trainer: a user mistake, reported in one line like every other one."""
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") is None:
            # TensorBoard logs of a run go under its name (lightning_logs/<save_ckpt_log_name>/version_N), so a run
            # renamed with --save_ckpt_log_name (a ratio sweep) does not mix its curves into another run's folder;
            # validate / test under lightning_logs/validate|test; no placeholder hp_metric of -1 anywhere
            from lightning.pytorch.loggers import TensorBoardLogger

            root = Path(trainer_cfg.get("default_root_dir") or ".")
            name = self._settings(RunSettings).save_ckpt_log_name if self.subcommand in ("prune", "fit") \
                else self.subcommand
            kwargs.setdefault("logger", TensorBoardLogger(root / "lightning_logs", name=name, default_hp_metric=False))
        from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar, TQDMProgressBar
        from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar

        # what the user configured, before Lightning adds its defaults
        own_checkpoints = _configures_checkpoints(trainer_cfg.get("callbacks"))
        own_bar = _configures(trainer_cfg.get("callbacks"), LightningProgressBar)
        own_lr_monitor = _configures(trainer_cfg.get("callbacks"), LearningRateMonitor)
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except LIGHTNING_REFUSALS as err:
            raise GaqpruneError(f"--trainer settings rejected by Lightning: {err}") from None
        cfg = self.config[self.subcommand]
        bar = trainer.progress_bar_callback
        if type(bar) in (RichProgressBar, TQDMProgressBar) and not own_bar:
            from gaqprune.train.callbacks import ProgressBar  # Lightning's stock pick (Rich when installed): see ProgressBar

            trainer.callbacks[trainer.callbacks.index(bar)] = ProgressBar()
        if self.subcommand in ("prune", "fit") and trainer.loggers and not own_lr_monitor:
            # warm-up and cosine decay are part of every fine-tune: the learning rate per step in TensorBoard
            trainer.callbacks.insert(0, LearningRateMonitor(logging_interval="step"))
        if self.subcommand in ("prune", "fit") and trainer.checkpoint_callback is not None and not own_checkpoints:
            # Lightning's default keeps its checkpoints in the logger's version_N folder, new for every run, so
            # --ckpt_path last never finds the previous one, and saves only at epoch ends. In the run folder instead,
            # with last.ckpt, and in a single process also when the fit is interrupted (Ctrl-C, a scheduler's
            # SIGTERM, an error): that save is a collective, and a rank failing alone would hang the others in it.
            from lightning.pytorch.callbacks import ModelCheckpoint

            ours = ModelCheckpoint(dirpath=pipeline.run_dir(self._settings(RunSettings)) / pipeline.CHECKPOINTS,
                                   save_last=True, save_on_exception=trainer.world_size == 1)
            trainer.callbacks[trainer.callbacks.index(trainer.checkpoint_callback)] = ours
        strategy = cfg["trainer"].get("strategy")
        prune_finetune = self.subcommand == "prune" and bool(cfg.get("finetune"))
        check_launch(trainer, trains=self.subcommand == "fit" or prune_finetune,
                     strategy=strategy if isinstance(strategy, str) else getattr(strategy, "class_path", strategy),
                     prune_finetune=prune_finetune)
        return trainer

    def before_prune(self) -> None:
        trainer = self.config.prune.trainer
        self._job = PruneJob(*(self._settings(c) for c in SETTINGS.values()), base_model=self.config.prune.base_model,
                             config_yaml=self._subcommand_parsers["prune"].dump(self.config.prune, skip_none=False),
                             trainer_limits=trainer.max_epochs is not None or trainer.max_steps != -1)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "prune":
            kwargs["job"] = self._job
        return kwargs

    def before_fit(self) -> None:
        cfg = self.config.fit
        imp, prune, run, fin = (self._settings(c) for c in SETTINGS.values())
        self.datamodule.train_windows_limit = fin.finetune_samples
        if cfg.trainer.max_epochs is None and cfg.trainer.max_steps == -1:
            self.trainer.fit_loop.max_epochs = fin.finetune_epochs
        if cfg.get("prune"):
            from gaqprune.train.callbacks import GQAPrune, LayerImportance

            pipeline.check_calibration_budget(self.datamodule, imp, prune, run.seed)  # before any work, like `prune`
            out_dir = str(pipeline.run_dir(run))
            importance = LayerImportance(imp, prune, cfg.base_model, seed=run.seed, out_dir=out_dir)
            save_model = model_origin(cfg.base_model) if run.save_model else None
            self.trainer.callbacks.extend([importance, GQAPrune(prune, importance, seed=run.seed, out_dir=out_dir,
                                                                save_model_of=save_model, save_gguf=run.save_gguf,
                                                                gguf_name=model_name(cfg.base_model))])
        examples = self.datamodule.num_train_examples()
        check_val_interval(self.trainer, self.datamodule, examples)
        if cfg.trainer.max_epochs is None and cfg.trainer.max_steps != -1 and not cfg.get("ckpt_path"):
            # the epochs the steps take, for the progress bar (a resumed fit counts from where it stopped: left alone)
            batches = max(1, train_batches(self.trainer, self.datamodule, examples) // self.trainer.accumulate_grad_batches)
            self.trainer.fit_loop.max_epochs = math.ceil(cfg.trainer.max_steps / batches)
        if cfg.get("prune"):  # a reused importance config that does not fit: refused before anything is removed
            from gaqprune.core.plan import layer_range

            hf_model = self.model.model
            meta = pipeline.importance_meta(hf_model, imp, *layer_range(prune, len(hf_model.model.layers)),
                                            cfg.base_model, self.datamodule.source, run.seed)
            pipeline.check_importance_config(imp, meta)
        results = pipeline.RUN_FILES if cfg.get("prune") else (*pipeline.FIT_RESULTS, pipeline.CHECKPOINTS)
        if cfg.get("ckpt_path"):  # the checkpoints are what it resumes from
            results = tuple(name for name in results if name != pipeline.CHECKPOINTS)
        pipeline.clear_results(run, results)

    def after_fit(self) -> None:
        """Validate the final model if the fit stopped between validations; save the LoRA adapters and a merged model
        in the run folder (rank 0)."""
        history = self.model.history["val_ppl"]
        if self.trainer.limit_val_batches and (not history or history[-1][0] != self.trainer.global_step):
            # --trainer.max_steps / max_time ended the fit between validations: the exported model gets its own
            # number (every rank: a collective), not none or an older step's
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        if not self.trainer.is_global_zero:
            return
        from gaqprune.train.lora import export_finetuned

        run = self._settings(RunSettings)
        pruned_here = bool(self.config.fit.get("prune"))
        paths = export_finetuned(self.model, self.datamodule.tokenizer, pipeline.run_dir(run), run.save_gguf,
                                 pruned_here=pruned_here, progress=pipeline.shows_progress(self.trainer),
                                 adapter_base=pipeline.run_dir(run) / "model" if pruned_here and run.save_model else None)
        pipeline.plot_fit(self.model.history, pipeline.run_dir(run) / pipeline.FIT_PLOT)
        val_ppl = self.trainer.callback_metrics.get("val_ppl")
        val_ppl = None if val_ppl is None else float(val_ppl)
        logger = self.trainer.logger  # its log_dir, not Trainer.log_dir: that one is a collective, and only rank 0 is here
        steps = self.trainer.global_step
        val_step = self.model.history["val_ppl"][-1][0] if val_ppl is not None else None  # of the latest validation
        write_json(pipeline.run_dir(run) / pipeline.FIT_METRICS_FILE, {
            "base_model": self.config.fit.base_model, "steps": steps, "val_ppl_start": self.model.val_ppl_start,
            "val_ppl": val_ppl, "val_ppl_step": val_step, "log_dir": getattr(logger, "log_dir", None),
            "outputs": paths})
        for name, path in paths.items():
            log.info("saved %s to %s", name, path)
        if self.model.val_ppl_start is not None and val_ppl is not None:
            print(f"validation perplexity: {self.model.val_ppl_start:.2f} before training -> {val_ppl:.2f} at step "
                  f"{val_step} (of {steps})")


def _configures(callbacks, base: type) -> bool:
    """Whether --trainer.callbacks (or a config file) brings its own ``base`` callback (or a subclass): instantiated
    callbacks, or their class_path before instantiation."""
    import importlib

    for callback in callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []:
        if isinstance(callback, base):
            return True
        module, _, name = str(getattr(callback, "class_path", "")).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module or "lightning.pytorch.callbacks"), name) if name else None
        except (ImportError, AttributeError):
            continue
        if isinstance(cls, type) and issubclass(cls, base):
            return True
    return False


def _configures_checkpoints(callbacks) -> bool:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return _configures(callbacks, ModelCheckpoint)


def _lightning_refusals() -> tuple[type[Exception], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    # TypeError: --trainer.devices abc; ImportError: a strategy whose package is missing (xla)
    return MisconfigurationException, ValueError, TypeError, ImportError


LIGHTNING_REFUSALS = _lightning_refusals()


def check_trainer_flags(trainer_cfg, trains: bool, prune_finetune: bool = False) -> None:
    """Lightning judges --trainer.accelerator/strategy/devices/num_nodes/precision only when it builds the Trainer,
    after the model is loaded (minutes for an 8B model): build a bare Trainer from them first, so a mistake costs
    no model load."""
    for flag in ("max_steps", "max_epochs"):
        if trains and trainer_cfg.get(flag) == 0:  # exported the untrained model as a fine-tune's result
            raise GaqpruneError(f"--trainer.{flag} 0 trains nothing; give at least 1, or leave it unset "
                                "(--finetune_epochs then sets the length)")
    args = {k: trainer_cfg.get(k) for k in ("accelerator", "strategy", "devices", "num_nodes", "precision")}
    args = {k: v for k, v in args.items() if v is not None}
    if trainer_cfg.get("plugins") or not all(isinstance(v, (str, int, list)) for v in args.values()):
        return  # plugins (a cluster environment), or a strategy/accelerator object: judged by the real Trainer
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the bare Trainer's "GPU available" lines would print twice
    try:
        trainer = L.Trainer(**args, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
    except LIGHTNING_REFUSALS as err:
        raise GaqpruneError(f"--trainer settings rejected by Lightning: {err}") from None
    finally:
        quiet.setLevel(level)
    check_launch(trainer, trains, args.get("strategy"), prune_finetune)


PLAN_ENV = "GAQPRUNE_PRUNED_PLAN"  # "<plan path>#<sha256>": set by rank 0 of `prune --finetune` for the ranks it starts


def check_launch(trainer: L.Trainer, trains: bool, strategy: object = None, prune_finetune: bool = False) -> None:
    """Refuse process launches that would lose the work or hang, before anything is computed or written."""
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if trains and isinstance(launcher, _MultiProcessingLauncher):
        # the workers train their own copies; Lightning hands back only plain weights (not the LoRA modules, not a
        # pruned shape), so the export would silently be the untrained model
        raise GaqpruneError(
            f"--trainer.strategy {strategy}: its processes are started by {launcher._start_method!r} (as with "
            "ddp_spawn, ddp_fork, ddp_notebook) and keep a fine-tune's weights to themselves, so nothing trained "
            "could be exported; use --trainer.strategy ddp or fsdp (one process per device, started as a script)")
    environment = getattr(trainer.strategy, "cluster_environment", None)
    external = environment is not None and environment.creates_processes_externally and PLAN_ENV not in os.environ
    if prune_finetune and trainer.world_size > 1 and (external or trainer.num_nodes > 1):
        # rank 0 prunes before the fit and the ranks Lightning starts then read its plan; ranks started beside it
        # (torchrun, SLURM, other nodes) would have no plan to read
        raise GaqpruneError(
            "`prune --finetune` on processes started by torchrun, SLURM or on several nodes: run `gaqprune fit --prune "
            "true` with the same flags instead (it prunes on rank 0 inside the fit and shares the plan with every "
            "rank), or `prune --save_model true` first and then `fit --base_model <run>/model` under your launcher")
    if trainer.num_nodes > 1 and isinstance(environment, LightningEnvironment) and "NODE_RANK" not in os.environ:
        raise GaqpruneError(
            f"--trainer.num_nodes {trainer.num_nodes}: start gaqprune on every node with NODE_RANK (0..."
            f"{trainer.num_nodes - 1}), MASTER_ADDR and MASTER_PORT set, or under SLURM or torchrun; NODE_RANK is "
            "not set here, and the processes would wait for nodes that never come")


def validate_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise GaqpruneError(f"--seed {seed} is invalid; give an integer in [0, 2**63)")


def validate_pruning(imp: ImportanceSettings, prune: PruneSettings, model_config) -> tuple[int, int]:
    """Every layer-importance and pruning setting against the model's config (no weights needed); returns the
    resolved layer range. Shared by `gaqprune prune`, `fit --prune` and ``gaqprune.prune``."""
    from gaqprune.core.plan import validate_prune_settings

    context = getattr(model_config, "max_position_embeddings", None)
    validate_importance_settings(imp, context)
    layers = validate_prune_settings(prune, getattr(model_config, "num_hidden_layers", 0),
                                     getattr(model_config, "intermediate_size", None))
    for flag, value in (("--max_seq_len", prune.max_seq_len), ("--compensation_seq_len", prune.compensation_seq_len)):
        if context and value > context:
            raise GaqpruneError(f"{flag} {value} exceeds the model's context of {context} tokens")
    return layers


def validate_importance_settings(imp: ImportanceSettings, context: int | None) -> None:
    if imp.importance_samples < 1:
        raise GaqpruneError(f"--importance_samples {imp.importance_samples} must be at least 1")
    if imp.importance_seq_len < 2 or (context and imp.importance_seq_len > context):
        raise GaqpruneError(f"--importance_seq_len {imp.importance_seq_len} must be in [2, {context}] (the model's context)")
    if imp.skip_importance_analysis:
        if not imp.importance_config:
            raise GaqpruneError("--skip_importance_analysis true needs --importance_config PATH (a layer_importance_config.json)")
        path = Path(imp.importance_config)
        if path.is_dir():
            raise GaqpruneError(f"--importance_config {imp.importance_config!r} is a folder; give the "
                                "layer_importance_config.json file in it")
        if not path.is_file():
            raise GaqpruneError(f"--importance_config {imp.importance_config!r}: file not found")
        import json

        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
            raise GaqpruneError(f"--importance_config {imp.importance_config!r} is not valid JSON ({err})") from None
    elif imp.importance_config:
        raise GaqpruneError(f"--importance_config {imp.importance_config!r} is only read with --skip_importance_analysis true")


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
    model is loaded (Lightning found a missing one after that, and a junk one with an unpickler traceback)."""
    if ckpt_path is None or ckpt_path in ("last", "best", "hpc") or str(ckpt_path).lower().startswith("registry") \
            or "://" in str(ckpt_path):
        return
    import zipfile

    path = Path(ckpt_path).expanduser()
    if path.is_dir():  # a sharded (FSDP, DeepSpeed) checkpoint: judged by its strategy
        return
    if not path.is_file():
        raise GaqpruneError(f"--ckpt_path {ckpt_path!r}: file not found; give a checkpoint file (.ckpt) or 'last' "
                            "(the run's latest)")
    if not zipfile.is_zipfile(path):  # what torch.save writes
        raise GaqpruneError(f"--ckpt_path {ckpt_path!r} is not a Lightning checkpoint (not a file torch.save wrote)")
    import pickle

    try:  # torch's weights_only reader runs nothing: it refuses any global beyond tensors and plain containers
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise GaqpruneError(f"--ckpt_path {ckpt_path!r} holds more than a Lightning checkpoint of tensors and plain "
                            f"values ({' '.join(str(err).split())[-160:]}); gaqprune never runs code from a checkpoint "
                            "file") from None


def validate_data_settings(data: dict, trains: bool) -> None:
    """``--data.*``: window and batch sizes, and (when a fine-tune will read it) the instruction data file."""
    for flag, low in (("max_seq_len", 2), ("batch_size", 1), ("eval_batch_size", 1), ("num_workers", 0)):
        if data[flag] < low:
            raise GaqpruneError(f"--data.{flag} {data[flag]} is invalid; give an integer >= {low}")
    if not 0.0 < data["eval_fraction"] <= 1.0:
        raise GaqpruneError(f"--data.eval_fraction {data['eval_fraction']} is invalid; give the share of a text file "
                            "evaluated, in (0, 1] (1.0: all of it)")
    if data["max_eval_windows"] is not None and data["max_eval_windows"] < 1:
        raise GaqpruneError(f"--data.max_eval_windows {data['max_eval_windows']} is invalid; give a count >= 1, or "
                            "null for every window")
    if trains and data["instruction_data"] and not Path(data["instruction_data"]).expanduser().is_file():
        raise GaqpruneError(f"--data.instruction_data {data['instruction_data']!r}: file not found")
    from gaqprune.data.text import check_local_source

    check_local_source(data["source"])
    check_local_source(data["eval_source"])


def validate_finetune_settings(fin: FinetuneSettings, model_cfg) -> None:
    from gaqprune.train.module import DEFAULT_LORA_TARGETS

    for flag, value, ok, accepted in (
        ("lora_r", model_cfg["lora_r"], model_cfg["lora_r"] >= 1, "an integer >= 1"),
        ("lora_alpha", model_cfg["lora_alpha"], model_cfg["lora_alpha"] > 0, "a number > 0"),
        ("lora_dropout", model_cfg["lora_dropout"], 0 <= model_cfg["lora_dropout"] < 1, "a probability in [0, 1)"),
        ("learning_rate", model_cfg["learning_rate"], model_cfg["learning_rate"] > 0, "a number > 0"),
        ("weight_decay", model_cfg["weight_decay"], model_cfg["weight_decay"] >= 0, "a number >= 0"),
        ("warmup_steps", model_cfg["warmup_steps"], model_cfg["warmup_steps"] >= 0, "an integer >= 0"),
    ):
        if not ok:
            raise GaqpruneError(f"--model.{flag} {value} is invalid; give {accepted}")
    unknown = sorted(set(model_cfg["lora_target_modules"] or []) - set(DEFAULT_LORA_TARGETS))
    if unknown:
        raise GaqpruneError(f"--model.lora_target_modules {unknown} names no projection of a Llama layer; use any of "
                            f"{', '.join(DEFAULT_LORA_TARGETS)}")
    if fin.finetune_samples < 1:
        raise GaqpruneError(f"--finetune_samples {fin.finetune_samples} must be at least 1")
    if fin.finetune_epochs < 1:
        raise GaqpruneError(f"--finetune_epochs {fin.finetune_epochs} must be at least 1")
    if not 0.0 <= fin.distill_weight <= 1.0:
        raise GaqpruneError(f"--distill_weight {fin.distill_weight} must be in [0, 1] (0 = no distillation)")
    if not fin.distill_temperature > 0:
        raise GaqpruneError(f"--distill_temperature {fin.distill_temperature} must be > 0")
    if fin.teacher_model and fin.distill_weight == 0:
        raise GaqpruneError(f"--teacher_model {fin.teacher_model!r} is only used with --distill_weight > 0")
    if fin.finetune_method == "full":
        import inspect

        defaults = inspect.signature(LitCausalLM.__init__).parameters
        changed = [name for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
                   if model_cfg[name] != defaults[name].default]
        if changed:
            raise GaqpruneError(f"--finetune_method full trains every weight, so --model.{changed[0]} "
                                f"{model_cfg[changed[0]]!r} would have no effect; drop it or use --finetune_method lora")


def validate_teacher(fin: FinetuneSettings, base_model: str, student_config) -> None:
    """With --distill_weight > 0: the teacher must be readable and share the student's vocabulary."""
    if fin.distill_weight == 0:
        return
    from gaqprune.models.load import load_config
    from gaqprune.train.module import teacher_source

    source = teacher_source(base_model, fin.teacher_model)
    try:
        teacher_config = load_config(source)
    except GaqpruneError as err:
        raise GaqpruneError(f"--teacher_model {source!r} cannot be used as the distillation teacher ({err}); "
                            "pass --teacher_model with the dense model's folder or hub id") from None
    if teacher_config.vocab_size != student_config.vocab_size:
        raise GaqpruneError(f"--teacher_model {source!r} has a vocabulary of {teacher_config.vocab_size} tokens, the "
                            f"model being fine-tuned {student_config.vocab_size}; distillation needs the same tokenizer")


def check_gguf(run: RunSettings, base_model: str, model_config) -> None:
    """With --save_gguf, refuse a model or tokenizer the GGUF export cannot write before any work is done."""
    if run.save_gguf:
        from gaqprune.models.gguf import check_supported
        from gaqprune.models.load import load_tokenizer

        check_supported(model_config, load_tokenizer(base_model))


_KINDS = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string", "NoneType": "null"}


def _accepted(types: str) -> str | None:
    """What jsonargparse's type list (``typing.Literal['a', 'b']``, ``<class 'int'>``, ...) accepts, in words; None
    when it holds a type this cannot put in words (a list, a class path): the parser's own message says more."""
    literals = r"typing\.Literal\[(.*?)\]"
    if re.sub(r"<class '\w+'>", "", re.sub(literals, "", types)).strip(" ,"):
        return None
    choices = [c.strip(" '") for group in re.findall(literals, types) for c in group.split(",")]
    parts = [f"one of {', '.join(dict.fromkeys(choices))}"] if choices else []
    parts += [_KINDS.get(name, name) for name in re.findall(r"<class '(\w+)'>", types)]
    return " or ".join(dict.fromkeys(parts))


def one_line(message: str) -> str:
    """Parser errors span lines; users get one: the flag, the value and what is accepted."""
    plain = re.search(r'key "([^"]+)":\s*Expected a (typing\.Literal\[.*?\]|<class \'\w+\'>)\. Got value: (.*)', message,
                      re.S)
    union = re.search(r'key "([^"]+)":\s*Does not validate against any of the Union subtypes\s*Subtypes: \[(.*?)\]\s*'
                      r'Errors:.*Given value: (.*)', message, re.S)
    for match in (plain, union):
        if match and _accepted(match.group(2)):
            flag, types, value = match.groups()
            return f"--{flag} {value.strip()!r} is not accepted; give {_accepted(types)}"
    return " ".join(message.split())


def bool_flags() -> set[str]:
    """The switches of the parameter guide, e.g. ``--save_model``, that its users write without a value."""
    import dataclasses

    flags = {"--prune"}
    for cls in SETTINGS.values():
        flags |= {f"--{f.name}" for f in dataclasses.fields(cls) if f.type in (bool, "bool")}
    return flags


def expand_bare_flags(args: list[str]) -> list[str]:
    """``--save_model`` alone means ``--save_model true`` (the guide's usage); explicit values pass through."""
    switches, out = bool_flags(), []
    for i, arg in enumerate(args):
        out.append(arg)
        following = args[i + 1] if i + 1 < len(args) else None
        if arg in switches and (following is None or following.startswith("--")):
            out.append("true")
    return out


def _no_tips(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


KEPT = ("complete results are kept and a rerun reuses them; a fine-tune's checkpoint too (resume: --ckpt_path last, "
        "or rerun `prune --finetune`)")


def run(args: list[str] | None = None) -> GaqpruneCLI:
    """Run the CLI and return it; user mistakes become one-line errors with exit status 2."""
    args = expand_bare_flags(sys.argv[1:] if args is None else list(args))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # args are sys.argv with bare switches expanded; Lightning warns whenever both are set
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    # Lightning 2.6 on torch 2.10+: an internal deprecation, printed on every fit, nothing a user can act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub", "gguf"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not pipeline._launch_rank_is_zero():  # one set of model-loading bars, not one per rank
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to 42" on every call
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_tips)  # Lightning's product adverts
    interrupted = []

    def on_sigint(signum, frame):  # Lightning turns a fit's KeyboardInterrupt into exit status 1: remember it was one
        interrupted.append(signum)
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    try:
        with sigterm_unwinds():
            return GaqpruneCLI(
                LitCausalLM,
                LMDataModule,
                trainer_class=GaqpruneTrainer,
                save_config_kwargs={"overwrite": True},
                seed_everything_default=42,
                args=args,
                parser_kwargs={"default_env": False, "exit_on_error": False},
            )
    except (GaqpruneError, ArgumentError) as err:
        print(f"gaqprune: error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"gaqprune: interrupted; {KEPT}", file=sys.stderr)
        sys.exit(130)
    except (SIGTERMException, Terminated):  # a SystemExit without a code: a pre-empted job would read as a success
        print(f"gaqprune: terminated (SIGTERM); {KEPT}", file=sys.stderr)
        sys.exit(143)
    except SystemExit as err:
        if interrupted and err.code == 1:
            print(f"gaqprune: interrupted; {KEPT}", file=sys.stderr)
            sys.exit(130)
        raise
    finally:
        pipeline.release_run_dirs()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


__all__ = ["GaqpruneCLI", "GaqpruneTrainer", "PruneJob", "run"]
