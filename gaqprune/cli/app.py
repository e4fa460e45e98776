"""`gaqprune` command line: a LightningCLI with subcommands prune | fit | validate | test.

The parameter guide's flags are plain top-level flags (``--base_model``, ``--importance_samples``,
``--pruning_ratio``, ...), the fields of the settings dataclasses; Lightning's own groups stay nested
(``--trainer.*``, ``--model.*``, ``--data.*``). ``gaqprune prune`` is a method of ``GaqpruneTrainer`` running
``train.job.run_prune``; ``gaqprune fit --prune true`` prunes in ``Callback.setup`` and then fine-tunes with LoRA in the
same run. This module parses and checks what a command asks for, before any model is loaded; the work is elsewhere.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from gaqprune.cli.launch import (
    LIGHTNING_REFUSALS,
    _configures,
    _configures_checkpoints,
    check_launch,
    check_trainer_flags,
    with_collective_timeout,
)
from gaqprune.data.datamodule import LMDataModule
from gaqprune.errors import GaqpruneError
from gaqprune.models.names import EMBEDDED, resolve_dtype
from gaqprune.models.offload import check_offload
from gaqprune.run import stages, zeroshot
from gaqprune.run.rundir import RunDir
from gaqprune.run.zeroshot import ZeroShotSettings
from gaqprune.settings import FinetuneSettings, ImportanceSettings, PruneSettings, RunSettings, check_context
from gaqprune.train import job as jobs
from gaqprune.train.module import LitCausalLM, check_teacher

log = logging.getLogger("gaqprune")
# The settings dataclasses document each field in a docstring under it: show those in --help.
set_parsing_settings(docstring_parse_attribute_docstrings=True)
SETTINGS = {"importance": ImportanceSettings, "pruning": PruneSettings, "run": RunSettings, "finetune": FinetuneSettings}
PruneJob = jobs.PruneJob


class GaqpruneTrainer(L.Trainer):
    def prune(self, model: LitCausalLM, datamodule: LMDataModule | None = None, job: PruneJob | None = None) -> dict:
        """Load, analyse layer importance, Taylor-score, prune, (evaluate), save; optionally fine-tune."""
        return jobs.run_prune(self, model, datamodule, job)


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
        if subcommand in ("prune", "validate", "test"):
            tasks = "eval_tasks" if subcommand == "prune" else "tasks"
            when = "before pruning, after it and after --finetune" if subcommand == "prune" else "after the perplexity"
            parser.add_argument(f"--{tasks}", type=str | None, default=None,
                                help=f"Zero-shot accuracy with lm-evaluation-harness ({when}): comma-separated lm-eval "
                                     "task names or presets: commonsense (boolq, piqa, hellaswag, winogrande, arc_easy, "
                                     "arc_challenge, openbookqa), gaqprune_wiki_next (offline, shipped), or tasks of "
                                     "--task_path. Needs the [eval] extra.")
            parser.add_argument("--task_path", type=str | None, default=None,
                                help="A folder of extra lm-eval task YAML files (lm-eval's --include_path).")
            parser.add_argument("--eval_limit", type=int | None, default=None,
                                help="Only the first N documents of each task (lm-eval's --limit; quick checks).")
        if subcommand == "fit":
            parser.add_argument("--prune", type=bool, default=False,
                                help="Prune in Callback.setup (layer importance + GQA pruning) before fine-tuning.")
        return parser

    def _parse_ckpt_path(self) -> None:
        """Lightning reads a --ckpt_path file's hyperparameters first thing: a missing or junk file is refused before."""
        if self.config.get("subcommand"):
            jobs.check_ckpt_path(self.config[self.config.subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--base_model", type=str, default=EMBEDDED,
                            help="'embedded' (SmolLM2-135M-Instruct, offline), a HF model folder, a .gguf file, "
                                 "a hub id such as meta-llama/Meta-Llama-3-8B-Instruct, or a gaqprune checkpoint.")
        parser.add_argument("--dtype", type=str, default="float32", help="Weight dtype: float32, bfloat16 or float16.")
        parser.add_argument("--offload", type=Literal["none", "cpu", "disk"], default="none",
                            help="Where decoder-layer weights live while `prune` works: 'none' (on the device), 'cpu' "
                                 "(host memory) or 'disk' (the input's safetensors files, memory-mapped); with cpu/disk "
                                 "one layer at a time is on the device (models larger than its memory).")
        parser.set_defaults({"trainer.log_every_n_steps": 10,  # Lightning's 50 logs no loss at all in short fits
                             "trainer.num_sanity_val_steps": -1})  # a fit's curve starts at the untrained model
        parser.link_arguments("base_model", "model.base_model")
        parser.link_arguments("base_model", "data.tokenizer")
        parser.link_arguments("dtype", "model.dtype")
        parser.link_arguments("offload", "model.offload")

    def _tasks(self) -> ZeroShotSettings | None:
        """``--eval_tasks`` (prune) / ``--tasks`` (validate, test) with their ``--task_path`` and ``--eval_limit``."""
        cfg = self.config[self.subcommand]
        name = "eval_tasks" if self.subcommand == "prune" else "tasks"
        if name not in cfg:
            return None
        if cfg[name] is None:
            given = [flag for flag in ("task_path", "eval_limit") if cfg.get(flag) is not None]
            if given:
                raise GaqpruneError(f"--{given[0]} {cfg[given[0]]} applies to the tasks of --{name}, and none are given; "
                                    f"add --{name} NAME[,NAME...] or drop it")
            return None
        return ZeroShotSettings(tasks=cfg[name], task_path=cfg["task_path"], eval_limit=cfg["eval_limit"])

    def _settings(self, cls):
        cfg = self.config[self.subcommand]
        return cls(**{name: cfg[name] for name in cls.__dataclass_fields__})

    def _prunes(self) -> bool:
        return self.subcommand == "prune" or (self.subcommand == "fit" and bool(self.config.fit.get("prune")))

    def before_instantiate_classes(self) -> None:
        """Cheap validation of every flag before the model is loaded or any folder is written."""
        from gaqprune.models.load import check_tokenizer_files, check_weight_files, load_config

        cfg = self.config[self.subcommand]
        resolve_dtype(cfg["dtype"])
        check_offload(cfg["offload"], self.subcommand, bool(cfg.get("finetune")), cfg.get("save_gguf"),
                      cfg["base_model"])
        tasks = self._tasks()
        if tasks is not None:  # names, folders, lm-eval itself, hub datasets: all before the model loads
            if cfg["offload"] != "none":
                raise GaqpruneError(f"--eval_tasks {tasks.tasks} cannot be combined with --offload {cfg['offload']} "
                                    "(lm-eval runs the whole model at once); evaluate the saved model with `gaqprune "
                                    "test --tasks ...`")
            try:
                zeroshot.check_settings(tasks)
            except GaqpruneError as err:  # the module names the flag --tasks; `prune` calls it --eval_tasks
                if self.subcommand != "prune":
                    raise
                raise GaqpruneError(str(err).replace("--tasks ", "--eval_tasks ", 1)) from None
        prune_finetune = self.subcommand == "prune" and bool(cfg["finetune"])
        trains = self.subcommand == "fit" or prune_finetune
        LMDataModule.check_args(cfg["data"], trains)
        check_trainer_flags(cfg["trainer"], trains, prune_finetune=prune_finetune)
        model_config = load_config(cfg["base_model"])
        check_tokenizer_files(cfg["base_model"])
        check_weight_files(cfg["base_model"])
        if self.subcommand in ("validate", "test"):
            self._note_dtype(cfg, model_config)
        context = getattr(model_config, "max_position_embeddings", None)
        check_context("--data.max_seq_len", cfg["data"]["max_seq_len"], context)
        if self.subcommand not in ("prune", "fit"):
            return
        imp, prune, run, fin = (self._settings(c) for c in SETTINGS.values())
        run.check()
        if self._prunes():
            self._check_pruning(imp, prune, model_config)
        if trains:
            fin.check()
            LitCausalLM.check_args(cfg["model"], fin.finetune_method)
            check_teacher(fin.distill_weight, fin.teacher_model, cfg["base_model"], model_config)
        run_dir = RunDir(run)
        if self.subcommand == "prune":
            run_dir.check()
            run_dir.check_unfinished_fit(resuming=fin.finetune, how="by running `prune --finetune` again")
        else:
            self._check_fit(cfg, run, run_dir)
        if run.save_gguf:  # a model or tokenizer the GGUF export cannot write, refused before any work
            from gaqprune.models.gguf import check_supported
            from gaqprune.models.load import load_tokenizer

            check_supported(model_config, load_tokenizer(cfg["base_model"]))
        # last: only a run that passed every check claims its folder (until the command ends: main.run())
        run_dir.hold()

    @staticmethod
    def _note_dtype(cfg, model_config) -> None:
        saved, used = getattr(model_config, "dtype", None), resolve_dtype(cfg["dtype"])
        if isinstance(saved, torch.dtype) and saved != used:
            saved, used = (str(d).removeprefix("torch.") for d in (saved, used))
            log.info("note: %s was saved in %s and is measured in %s (--dtype); a run that worked in %s measured "
                     "slightly different perplexities", cfg["base_model"], saved, used, saved)

    @staticmethod
    def _check_pruning(imp: ImportanceSettings, prune: PruneSettings, model_config) -> None:
        """Every layer-importance and pruning setting against the model's config (no weights needed), and a reused
        importance record's layers (its model is checked once the weights are loaded)."""
        context = getattr(model_config, "max_position_embeddings", None)
        imp.check(context)
        num_layers = getattr(model_config, "num_hidden_layers", 0)
        start, end = prune.check(num_layers, getattr(model_config, "intermediate_size", None), context)
        stages.check_importance_config(imp, {"num_layers": num_layers, "layer_start": start, "layer_end": end})

    def _check_fit(self, cfg, run: RunSettings, run_dir: RunDir) -> None:
        if cfg.get("prune") and run.test_after_prune:
            raise GaqpruneError("--test_after_prune is for `gaqprune prune`; under `fit` the validation set is "
                                "evaluated during training (--trainer.val_check_interval)")
        if not cfg.get("prune"):  # a guide user's `fit --pruning_ratio 0.25` fine-tuned the dense model, silently
            given = [f"--{f.name} {cfg[f.name]}" for cls in (ImportanceSettings, PruneSettings)
                     for f in dataclasses.fields(cls) if cfg[f.name] != f.default]
            given += ["--test_after_prune true"] if run.test_after_prune else []
            from gaqprune.models.load import resolve_model_path
            from gaqprune.models.pruned import is_pruned_checkpoint

            if given and is_pruned_checkpoint(resolve_model_path(cfg["base_model"])):
                # the recovery fine-tune of a pruned model, e.g. with the pruning run's config file reused
                log.info("note: %s: pruning flags, ignored by `fit` of the pruned model %s (no --prune true)",
                         ", ".join(given), cfg["base_model"])
            elif given:
                raise GaqpruneError(f"{', '.join(given)}: pruning flags do nothing in `fit` without --prune true; "
                                    "add --prune true to prune before fine-tuning, or drop them")
        # a fit may add its results to a prune run's folder, never replace a fit's (or a pruning run's, with --prune)
        run_dir.check(RunDir.FINISHED if cfg.get("prune") else RunDir.FIT_RESULTS)
        run_dir.check_unfinished_fit(resuming=bool(cfg.get("ckpt_path")))
        if cfg.get("ckpt_path") == "last" and run_dir.last_checkpoint() is None \
                and not _configures_checkpoints(cfg["trainer"].get("callbacks")):  # (Lightning: step 0)
            raise GaqpruneError(f"--ckpt_path last: no checkpoint to resume in {str(run_dir / RunDir.CHECKPOINTS)!r} "
                                f"(--save_ckpt_log_name {run.save_ckpt_log_name!r}); give the run's name or a "
                                "checkpoint file")

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
        cfg = self.config[self.subcommand]
        prune_finetune = self.subcommand == "prune" and bool(cfg.get("finetune"))
        if prune_finetune or (self.subcommand == "fit" and cfg.get("prune")):
            kwargs.setdefault("strategy", with_collective_timeout(trainer_cfg.get("strategy", "auto")))
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

            ours = ModelCheckpoint(dirpath=RunDir(self._settings(RunSettings)) / RunDir.CHECKPOINTS, save_last=True,
                                   save_on_exception=trainer.world_size == 1)
            trainer.callbacks[trainer.callbacks.index(trainer.checkpoint_callback)] = ours
        strategy = cfg["trainer"].get("strategy")
        check_launch(trainer, trains=self.subcommand == "fit" or prune_finetune,
                     strategy=strategy if isinstance(strategy, str) else getattr(strategy, "class_path", strategy),
                     prune_finetune=prune_finetune)
        return trainer

    def before_prune(self) -> None:
        trainer = self.config.prune.trainer
        self._job = PruneJob(*(self._settings(c) for c in SETTINGS.values()), base_model=self.config.prune.base_model,
                             config_yaml=self._subcommand_parsers["prune"].dump(self.config.prune, skip_none=False),
                             trainer_limits=trainer.max_epochs is not None or trainer.max_steps != -1,
                             tasks=self._tasks())

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "prune":
            kwargs["job"] = self._job
        return kwargs

    def _fit_job(self) -> jobs.FitJob:
        cfg = self.config.fit
        return jobs.FitJob(*(self._settings(c) for c in SETTINGS.values()), base_model=cfg.base_model,
                           prune=bool(cfg.get("prune")), ckpt_path=cfg.get("ckpt_path"),
                           max_epochs=cfg.trainer.max_epochs, max_steps=cfg.trainer.max_steps)

    def before_fit(self) -> None:
        jobs.prepare_fit(self.trainer, self.model, self.datamodule, self._fit_job())

    def after_fit(self) -> None:
        jobs.finish_fit(self.trainer, self.model, self.datamodule, self._fit_job())

    def after_validate(self) -> None:
        self._evaluate_tasks()

    def after_test(self) -> None:
        self._evaluate_tasks()

    def _evaluate_tasks(self) -> None:
        """``--tasks``: lm-eval's accuracy of the model the subcommand evaluated (with a --ckpt_path's weights and
        LoRA adapters), printed as a table, logged as ``eval/<task>/<metric>`` and written to ``tasks.json`` in the
        logger's folder."""
        tasks = self._tasks()
        if tasks is None or not self.trainer.is_global_zero:
            return
        from gaqprune.atomic import write_json
        from gaqprune.train.callbacks import shows_progress

        results = jobs.evaluate_tasks(self.trainer, self.model.model, self.datamodule.tokenizer, tasks,
                                      self.datamodule.eval_batch_size, 0, shows_progress(self.trainer))
        print("zero-shot accuracy (lm-eval):\n" + zeroshot.format_table(results))
        if self.trainer.log_dir:
            write_json(Path(self.trainer.log_dir) / "tasks.json", results)


__all__ = ["SETTINGS", "GaqpruneCLI", "GaqpruneTrainer", "PruneJob"]
