"""LitCausalLM: a HF causal LM as a LightningModule (loss, perplexity, optional LoRA).

It knows nothing about pruning: the pruning callbacks change ``self.model`` in ``setup`` before
any strategy wraps it; LoRA is attached afterwards in ``configure_model``.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch

from gaqprune.core.metrics import Perplexity, causal_losses, causal_nll
from gaqprune.core.units import layer_shapes
from gaqprune.errors import GaqpruneError
from gaqprune.models.load import load_config, load_model
from gaqprune.models.names import EMBEDDED, EMBEDDED_SOURCE

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LitCausalLM(L.LightningModule):
    def __init__(
        self,
        base_model: str = EMBEDDED,
        dtype: str = "float32",
        finetune_method: Literal["lora", "full"] = "lora",
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        gradient_checkpointing: bool = False,
        chunk_tokens: int = 4096,
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
        teacher_model: str | None = None,
        offload: Literal["none", "cpu", "disk"] = "none",
    ):
        """
        Args:
            base_model: 'embedded', a HF model folder, a .gguf file, a hub id or a gaqprune checkpoint.
            dtype: weight dtype: float32, bfloat16 or float16.
            finetune_method: 'lora' trains low-rank adapters only; 'full' trains every weight.
            lora_r: LoRA rank.
            lora_alpha: LoRA scaling numerator (scale = alpha / r).
            lora_dropout: dropout on the LoRA input.
            lora_target_modules: projections that get adapters (default: all attention and MLP ones).
            learning_rate: peak learning rate of AdamW.
            weight_decay: AdamW weight decay.
            warmup_steps: linear warm-up steps before the schedule.
            lr_schedule: decay after warm-up.
            gradient_checkpointing: recompute layer activations in backward to save memory.
            chunk_tokens: tokens per LM-head chunk in the loss (bounds logits memory for big vocabularies).
            distill_weight: w in loss = (1 - w) * NLL + w * T^2 * KL(teacher || student); 0 = no teacher.
            distill_temperature: T of the distillation term.
            teacher_model: the teacher (default: the dense model the pruned one came from, as recorded in its
                checkpoint, or base_model itself when pruning happens in the same run).
            offload: where the decoder layers' weights live: 'none' (in the model), 'cpu' (host memory) or 'disk'
                (the input's safetensors files); with cpu/disk one layer at a time is on the device
                (``gaqprune.models.offload``; `gaqprune prune` only).
        """
        super().__init__()
        self.save_hyperparameters()
        if offload == "none":
            self.model = load_model(base_model, dtype=dtype)
        else:
            from gaqprune.models.offload import load_offloaded

            self.model = load_offloaded(base_model, dtype, offload)
        self.val_ppl = Perplexity()
        self.test_ppl = Perplexity()
        self.lora_attached = False
        self.val_ppl_start: float | None = None  # the validation perplexity before training (see on_validation_epoch_end)
        self.plan_digest: str | None = None  # the pruning plan the model was cut to (pipeline.plan_digest), if any
        # (step, value) pairs of this process's fit, for the run folder's fit_curves.png
        self.history: dict[str, list[tuple[int, float]]] = {"train_loss": [], "val_ppl": []}
        self._teacher = None  # plain attribute, never a submodule: no strategy wraps it, no checkpoint stores it

    @staticmethod
    def check_args(model_cfg: dict, finetune_method: str) -> None:
        """``--model.*`` before the model is loaded: the LoRA and optimiser values, LoRA targets that name a Llama
        projection, and no LoRA flag where ``--finetune_method full`` would ignore it."""
        import inspect

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
        if finetune_method == "full":
            defaults = inspect.signature(LitCausalLM.__init__).parameters
            changed = [name for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
                       if model_cfg[name] != defaults[name].default]
            if changed:
                raise GaqpruneError(f"--finetune_method full trains every weight, so --model.{changed[0]} "
                                    f"{model_cfg[changed[0]]!r} would have no effect; drop it or use --finetune_method lora")

    # -- model set-up -------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Attach LoRA (idempotent: Lightning may call this more than once)."""
        if self.trainer is None or self.trainer.state.fn != "fit" or self.lora_attached:
            return
        self.model.train()  # load_model() returns eval mode; LoRA dropout (and Lightning's check) want train mode
        if self.hparams.finetune_method == "lora":
            self._inject_lora(self.hparams)
        else:
            for p in self.model.parameters():
                p.requires_grad_(True)
        if self.hparams.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        self.lora_attached = True

    def _inject_lora(self, hparams) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=hparams["lora_r"],
            lora_alpha=hparams["lora_alpha"],
            lora_dropout=hparams["lora_dropout"],
            target_modules=list(hparams["lora_target_modules"] or DEFAULT_LORA_TARGETS),
            bias="none",
        )
        for p in self.model.parameters():
            p.requires_grad_(False)
        inject_adapter_in_model(config, self.model)

    def on_fit_start(self) -> None:
        """Load the frozen distillation teacher (every rank holds a full copy; it is never sharded)."""
        if self.hparams.distill_weight > 0 and self._teacher is None:
            teacher = load_model(teacher_source(self.hparams.base_model, self.hparams.teacher_model),
                                 dtype=self.hparams.dtype).to(self.device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            object.__setattr__(self, "_teacher", teacher)  # bypass nn.Module registration

    def on_fit_end(self) -> None:
        object.__setattr__(self, "_teacher", None)  # free its memory before export

    def on_train_start(self) -> None:
        self.model.train()  # load_model() returns eval mode; LoRA dropout needs train mode

    # -- steps --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None):
        return causal_nll(self.model, input_ids, attention_mask, chunk_tokens=self.hparams.chunk_tokens, labels=labels)

    def training_step(self, batch, batch_idx):
        # batch: (windows,) or (input_ids, attention_mask, labels) for instruction data
        input_ids, attention_mask, labels = (*batch, None, None)[:3]
        nll, kl, count = causal_losses(self.model, input_ids, attention_mask, self.hparams.chunk_tokens, labels,
                                       teacher=self._teacher, temperature=self.hparams.distill_temperature)
        tokens = count.clamp(min=1)
        loss = nll / tokens
        if self._teacher is not None:
            w = self.hparams.distill_weight
            distill = kl / tokens
            self.log_dict({"train_lm_loss": loss.detach(), "train_distill_loss": distill.detach()}, on_step=True, on_epoch=False)
            loss = (1.0 - w) * loss + w * distill
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {self.global_step}; lower the learning rate")
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.history["train_loss"].append((self.global_step, float(loss.detach())))  # (synced above already)
        return loss

    def _eval_update(self, metric, batch) -> None:
        # batch: (windows, real) from data.EvalWindows (a padding window, real False, predicts no counted token), or
        # (windows,) from another datamodule
        windows, real = (*batch, None)[:2]
        metric.update(*self(windows, labels=None if real is None else windows.masked_fill(~real[:, None], -100)))

    def validation_step(self, batch, batch_idx):
        self._eval_update(self.val_ppl, batch)
        # in a fit, logged by on_validation_epoch_end at the number of steps taken (Lightning would log it one step
        # earlier, beside the loss of the step before the validation; the curve's start would share step 0)
        self.log("val_ppl", self.val_ppl, prog_bar=True, on_epoch=True, on_step=False,
                 logger=self.trainer.state.fn != "fit")

    def on_validation_epoch_end(self) -> None:
        """Every validation's perplexity joins the history (and, in a fit, every logger at the current step) here,
        before ModelCheckpoint saves in ``on_validation_end``, so a checkpoint's history includes the validation that
        triggered it. A fit's sanity check over the whole validation set (``--trainer.num_sanity_val_steps -1``,
        gaqprune's default) measures the model before training: recorded as the curve's start, at the fit's first
        step. Other sanity checks are not measurements of anything and are not recorded."""
        trainer = self.trainer
        if not self.val_ppl.update_called:
            return
        if trainer.sanity_checking:
            if trainer.global_step == 0 and trainer.num_sanity_val_batches == trainer.num_val_batches:
                # (a fit resumed from an epoch's end sanity-checks a trained model: not a start, not recorded)
                self.record_start(float(self.val_ppl.compute()))  # a collective under DDP: every rank is here
            return
        value = float(self.val_ppl.compute())  # (cached: Lightning's own epoch-end logging reuses it)
        self.history["val_ppl"].append((trainer.global_step, value))
        if trainer.state.fn == "fit":
            self._log_to_all({"val_ppl": value})

    def record_start(self, val_ppl: float) -> None:
        """The validation perplexity before training: logged at the fit's first step and kept for the summary."""
        self.val_ppl_start = val_ppl
        self.history["val_ppl"].append((self.trainer.global_step, val_ppl))
        self._log_to_all({"val_ppl": val_ppl})

    def _log_to_all(self, metrics: dict[str, float]) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)

    def test_step(self, batch, batch_idx):
        self._eval_update(self.test_ppl, batch)
        self.log("test_ppl", self.test_ppl, prog_bar=True, on_epoch=True, on_step=False)

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, max(0, total - 1))
        schedule = self.hparams.lr_schedule

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            if schedule == "cosine":
                return 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * min(progress, 1.0))).item())
            if schedule == "linear":
                return max(0.0, 1.0 - progress)
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints hold only what trains (LoRA weights), never the frozen base ----------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.hparams.finetune_method == "lora" and self.lora_attached:
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["gaqprune_layer_shapes"] = layer_shapes(self.model)
        # a resumed fit's curves and summary then cover the whole fit, not only what came after the resume
        checkpoint["gaqprune_history"] = {"history": self.history, "val_ppl_start": self.val_ppl_start}
        if self.plan_digest is not None:
            checkpoint["gaqprune_plan_digest"] = self.plan_digest

    def structure_mismatch(self, checkpoint: dict) -> str | None:
        """What a checkpoint was trained on that this model is not: ``"layer shapes"``, ``"kept units"`` (the same
        shapes cut from other units by another pruning plan), or None when its adapters fit this model."""
        saved = checkpoint.get("gaqprune_layer_shapes")
        if saved is not None and saved != layer_shapes(self.model):
            return "layer shapes"
        planned = checkpoint.get("gaqprune_plan_digest")
        if planned is not None and self.plan_digest is not None and planned != self.plan_digest:
            return "kept units"
        return None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # LoRA checkpoints hold adapters only, so loading cannot be strict; the recorded layer shapes make sure the
        # adapters land on the model they were trained on (not, say, the dense model when --prune was left out).
        fitting = self.trainer is not None and self.trainer.state.fn == "fit"
        mismatch = self.structure_mismatch(checkpoint)
        if mismatch == "layer shapes":
            raise GaqpruneError(
                f"--ckpt_path: the checkpoint was trained on a model of other layer shapes than --base_model "
                f"{self.hparams.base_model!r}; " + (
                    "resume with the --base_model and pruning settings (--prune, --config) of the run that wrote it"
                    if fitting else "give the pruned model it was trained on as --base_model (a `fit --prune` run "
                    "saves it as <run>/model with --save_model true)"))
        if mismatch == "kept units":
            raise GaqpruneError("--ckpt_path: the checkpoint was trained on a model cut by another pruning plan (other "
                                "kept units); resume with the pruning settings of the run that wrote it")
        carried = checkpoint.get("gaqprune_history")
        if carried is not None and fitting:
            self.history = {key: list(values) for key, values in carried["history"].items()}
            self.val_ppl_start = carried["val_ppl_start"]
        state = checkpoint.get("state_dict", {})
        if not self.lora_attached and any("lora_" in key for key in state):
            # validate / test --ckpt_path of a LoRA fit: the adapters it trained, with the rank and targets it
            # trained them with (its hyperparameters, whatever this command's --model.lora_* say)
            self._inject_lora({**self.hparams, **checkpoint.get("hyper_parameters", {})})
            self.lora_attached = True
            unknown = sorted(set(state) - set(self.state_dict()))  # (an unwrapped model here: no fit, no FSDP)
            if unknown:
                raise GaqpruneError(f"--ckpt_path holds {len(unknown)} weights this model has no place for (first: "
                                    f"{unknown[0]!r}); give the --base_model of the run that wrote it")
        self.strict_loading = not any("lora_" in key for key in state)



def teacher_source(base_model: str, teacher_model: str | None = None) -> str:
    """The distillation teacher: ``teacher_model`` if given, else the dense model ``base_model`` was pruned from
    (recorded in a gaqprune checkpoint's config as ``gaqprune_base_model``), else ``base_model`` itself (pruning
    happens in the same run, so the loaded model is still the dense one)."""
    if teacher_model:
        return teacher_model
    source = getattr(load_config(base_model), "gaqprune_base_model", None) or base_model
    return EMBEDDED if source == EMBEDDED_SOURCE else source


def check_teacher(distill_weight: float, teacher_model: str | None, base_model: str, student_config) -> None:
    """With --distill_weight > 0: the teacher must be readable and share the student's vocabulary."""
    if distill_weight == 0:
        return
    source = teacher_source(base_model, teacher_model)
    try:
        teacher_config = load_config(source)
    except GaqpruneError as err:
        raise GaqpruneError(f"--teacher_model {source!r} cannot be used as the distillation teacher ({err}); "
                            "pass --teacher_model with the dense model's folder or hub id") from None
    if teacher_config.vocab_size != student_config.vocab_size:
        raise GaqpruneError(f"--teacher_model {source!r} has a vocabulary of {teacher_config.vocab_size} tokens, the "
                            f"model being fine-tuned {student_config.vocab_size}; distillation needs the same tokenizer")
