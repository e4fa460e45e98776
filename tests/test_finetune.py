"""LoRA recovery: only adapters train, loss falls, checkpoints hold adapters only, merged export reloads."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import cli, cli_command, gguf_forward

from gaqprune.train.module import LitCausalLM

REPO = Path(__file__).resolve().parent.parent


class _Trainer:  # the two attributes configure_model reads
    class state:
        fn = "fit"


def lora_module(model_dir) -> LitCausalLM:
    lit = LitCausalLM(base_model=str(model_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=5e-3)
    lit._trainer = _Trainer()
    lit.configure_model()
    lit.configure_model()  # idempotent
    return lit


def test_only_lora_weights_get_gradients_and_loss_falls(tiny_model_dir):
    lit = lora_module(tiny_model_dir)
    trainable = {n for n, p in lit.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 4 * 7 * 2  # 4 layers x 7 projections x (A, B)
    batch = torch.randint(3, 5000, (4, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in lit.parameters() if p.requires_grad], lr=1e-2)
    lit.model.train()
    losses = []
    for _ in range(10):
        nll, count = lit(batch)
        loss = nll / count
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in lit.named_parameters() if "lora_" not in n)
        assert sum(p.grad.abs().sum() for n, p in lit.named_parameters() if "lora_B" in n) > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3 and losses[-1] == min(losses)


def test_merged_export_reloads_bit_identically(tiny_model_dir, tmp_path, embedded_tokenizer):
    from gaqprune.models.load import load_model
    from gaqprune.run.rundir import RunDir
    from gaqprune.train.lora import export_finetuned

    lit = lora_module(tiny_model_dir)
    with torch.no_grad():  # make the adapters non-trivial
        for n, p in lit.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    lit.model.eval()
    ids = torch.randint(3, 5000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = lit.model(ids).logits
    paths = export_finetuned(lit, embedded_tokenizer, RunDir.at(tmp_path))
    assert (Path(paths["adapter"]) / "adapter_model.safetensors").is_file()
    with torch.no_grad():
        merged = lit.model(ids).logits
        reloaded_model = load_model(paths["model"])
        reloaded = reloaded_model(ids).logits
    assert torch.allclose(before, merged, atol=1e-4)  # merging changes rounding only
    assert torch.equal(merged, reloaded)  # export is bit-exact
    assert not any("lora_" in n for n, _ in reloaded_model.named_parameters())
    # the adapters alone load with plain peft onto the model they fit, and give the adapted logits
    from peft import PeftModel

    adapter_config = json.loads((Path(paths["adapter"]) / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), paths["adapter"])(ids).logits
    assert (peft_logits - before).abs().max() < 1e-5 < (peft_logits - load_model(str(tiny_model_dir))(ids).logits).abs().max()


FIT_ARGS = ["--data.max_seq_len", "32", "--data.max_eval_windows", "4", "--data.batch_size", "4",
            "--finetune_samples", "16", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]


def scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir)).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def plot_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def dense_val_ppl(model_dir) -> float:
    """The perplexity of the saved model on FIT_ARGS' validation windows, measured in this process."""
    from gaqprune.core.metrics import perplexity
    from gaqprune.data.datamodule import LMDataModule
    from gaqprune.models.load import load_model

    data = LMDataModule(tokenizer=str(model_dir), max_seq_len=32, max_eval_windows=4)
    return perplexity(load_model(str(model_dir)), data.eval_windows(), data.eval_batch_size)


def test_fit_checkpoint_holds_only_lora_and_resumes(tiny_model_dir, tmp_path):
    r = cli("fit", "--base_model", str(tiny_model_dir), *FIT_ARGS, "--trainer.max_steps", "2", "--save_ckpt_log_name", "a",
             "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state)
    assert ckpt.stat().st_size < 2_000_000  # the frozen 6.5M-parameter base is not in it
    fit_metrics = json.loads((tmp_path / "prune_log" / "a" / "fit_metrics.json").read_text())
    assert fit_metrics["steps"] == 2 and Path(fit_metrics["log_dir"]).is_dir()
    # 2 of the epoch's 4 batches: no validation ran during the fit, so the final model gets one at step 2
    assert fit_metrics["val_ppl_step"] == 2 and fit_metrics["val_ppl"] > 1
    # the logs go under the run's name, and the curve starts at the untrained model's perplexity (the sanity check)
    assert Path(fit_metrics["log_dir"]).resolve() == (tmp_path / "lightning_logs" / "a" / "version_0").resolve()
    curve = scalars(fit_metrics["log_dir"], "val_ppl")
    assert [step for step, _ in curve] == [0, 2] and curve[0][1] == pytest.approx(fit_metrics["val_ppl_start"], rel=1e-6)
    assert curve[1][1] == pytest.approx(fit_metrics["val_ppl"], rel=1e-6)
    assert fit_metrics["val_ppl_start"] == pytest.approx(dense_val_ppl(tiny_model_dir), rel=1e-5)
    assert plot_size(tmp_path / "prune_log" / "a" / "fit_curves.png")[0] > 600  # loss and perplexity side by side
    r = cli("fit", "--base_model", str(tiny_model_dir), *FIT_ARGS, "--trainer.max_steps", "4", "--save_ckpt_log_name", "b",
             "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(ckpt), "--save_gguf", "f16",
             "--trainer.val_check_interval", "2", cwd=tmp_path)  # (checkpoints then save when a validation ends)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = sorted(tmp_path.rglob("*step=4.ckpt"))
    assert resumed, list(tmp_path.rglob("*.ckpt"))
    assert (tmp_path / "prune_log" / "b" / "model_finetuned" / "config.json").is_file()
    fit_metrics = json.loads((tmp_path / "prune_log" / "b" / "fit_metrics.json").read_text())
    assert fit_metrics["steps"] == 4 and fit_metrics["val_ppl"] > 1  # the epoch ended: validated
    # the checkpoint the epoch-end validation triggered holds that validation in its history (a resume's curve)
    history = torch.load(resumed[-1], weights_only=False)["gaqprune_history"]["history"]["val_ppl"]
    assert history[-1] == (4, pytest.approx(fit_metrics["val_ppl"], rel=1e-6)), history
    assert (tmp_path / "prune_log" / "b" / "model_finetuned.gguf").stat().st_size > 6_000_000 * 2  # f16 weights
    # validating the fit's checkpoint measures the adapters it holds (not the base model without them)
    r = subprocess.run(cli_command("validate", "--base_model", str(tiny_model_dir),
                        "--data.max_seq_len", "32", "--data.max_eval_windows", "4", "--ckpt_path", str(resumed[-1]),
                        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
                        "--tasks", "gaqprune_wiki_next", "--eval_limit", "16"),
                       cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    validated = float(next(line.split("│")[2] for line in r.stdout.splitlines() if "val_ppl" in line))
    assert validated == pytest.approx(fit_metrics["val_ppl"], rel=1e-9)
    assert validated != pytest.approx(dense_val_ppl(tiny_model_dir), rel=1e-6)
    # and its task accuracy is that of the same adapters merged (the fit's model_finetuned/), not the base model's
    from gaqprune.models.load import load_model, load_tokenizer
    from gaqprune.run.zeroshot import ZeroShotSettings, evaluate

    [tasks_json] = (tmp_path / "lightning_logs" / "validate").glob("version_*/tasks.json")
    with_adapters = json.loads(tasks_json.read_text())["tasks"]["gaqprune_wiki_next"]
    merged = evaluate(load_model(str(tmp_path / "prune_log" / "b" / "model_finetuned")), load_tokenizer(str(tiny_model_dir)),
                      ZeroShotSettings(tasks="gaqprune_wiki_next", eval_limit=16), progress=False)
    assert with_adapters["n"] == 16
    assert (with_adapters["acc"], with_adapters["acc_norm"]) == (merged["tasks"]["gaqprune_wiki_next"]["acc"],
                                                                 merged["tasks"]["gaqprune_wiki_next"]["acc_norm"])
    # adapters trained on other layer shapes (e.g. a pruned model, resumed without --prune) are refused, not loaded
    # into the wrong layers
    wrong = torch.load(ckpt, weights_only=False)
    wrong["gaqprune_layer_shapes"][1]["intermediate_size"] = 64
    torch.save(wrong, tmp_path / "wrong.ckpt")
    r = cli("fit", "--base_model", str(tiny_model_dir), *FIT_ARGS, "--trainer.max_steps", "4", "--save_ckpt_log_name", "c",
             "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(tmp_path / "wrong.ckpt"), cwd=tmp_path)
    errors = [line for line in r.stderr.splitlines() if line.startswith("gaqprune: error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert "other layer shapes" in errors[0] and "resume with" in errors[0], errors[0]
    assert not (tmp_path / "prune_log" / "c" / "model_finetuned").exists()


@pytest.mark.slow
def test_ddp_two_ranks_prune_identically_and_train(tiny_model_dir, tmp_path):
    probe = tmp_path / "probe"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = cli("fit", "--base_model", str(tiny_model_dir), *FIT_ARGS, "--prune", "true", "--pruning_ratio", "0.3",
             "--importance_samples", "4", "--importance_seq_len", "32", "--num_examples", "4", "--max_seq_len", "32",
             "--min_pruning_rate", "0.1", "--distill_weight", "0.5",  # each rank also loads the dense teacher
             "--save_model", "true",  # rank 0 saves the pruned model the adapters fit
             "--save_gguf", "f32",  # and writes it for llama.cpp, as `prune --save_gguf` does (was: only the merged one)
             "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
             "--trainer.max_steps", "2", "--save_ckpt_log_name", "ddp", "--trainer.default_root_dir", str(tmp_path),
             "--trainer.callbacks+=tests.ddp_probe.ShapeProbe", f"--trainer.callbacks.out_dir={probe}",
             cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads((probe / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["shapes"] == ranks[1]["shapes"] and ranks[0]["sha"] == ranks[1]["sha"]
    dense = {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 128}
    assert any(s != dense for s in ranks[0]["shapes"]) or len(ranks[0]["shapes"]) < 4  # it really pruned
    assert ranks[0]["teacher_shapes"] == ranks[1]["teacher_shapes"] == [dense] * 4  # the unpruned model teaches
    assert [(probe / f"rank{i}.steps").read_text() for i in (0, 1)] == ["2", "2"]
    plan = json.loads((tmp_path / "prune_log" / "ddp" / "pruning_plan.json").read_text())
    assert 0.25 < plan["totals"]["achieved_ratio_selected"] < 0.35
    from gaqprune.core.units import layer_shapes
    from gaqprune.models.pruned import load_pruned

    run_dir = tmp_path / "prune_log" / "ddp"
    assert layer_shapes(load_pruned(run_dir / "model")) == ranks[0]["shapes"]
    adapter = json.loads((run_dir / "lora_adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((run_dir / "model").resolve())
    import gguf

    for name in ("model.gguf", "model_finetuned.gguf"):
        widths = list(gguf.GGUFReader(run_dir / name).fields["deci.feed_forward_length"].contents())
        assert widths == [shape["intermediate_size"] for shape in ranks[0]["shapes"]], name


@pytest.mark.slow
def test_ddp_prune_then_finetune_prunes_once(tiny_model_dir, tmp_path):
    """`prune --finetune` on 2 ranks: Lightning starts rank 1 as the same command when the fit begins; rank 1 cuts its
    model to rank 0's plan instead of running the analysis again, writes nothing, and trains in step."""
    probe = tmp_path / "probe"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = cli_command("prune", "--base_model", str(tiny_model_dir), *FIT_ARGS,
           "--pruning_ratio", "0.3", "--importance_samples", "4", "--importance_seq_len", "32", "--num_examples", "4",
           "--max_seq_len", "32", "--compensation_samples", "4", "--min_pruning_rate", "0.1", "--save_model", "true",
           "--test_after_prune", "true", "--finetune", "true", "--trainer.strategy", "ddp", "--trainer.devices", "2",
           "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--save_ckpt_log_name", "pf",
           "--trainer.default_root_dir", str(tmp_path),
           "--trainer.callbacks+=tests.ddp_probe.ShapeProbe", f"--trainer.callbacks.out_dir={probe}")
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "reusing layer importance" not in r.stderr  # rank 1 used to run the whole pipeline again
    ranks = [json.loads((probe / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0]["shapes"] == ranks[1]["shapes"] and ranks[0]["sha"] == ranks[1]["sha"]
    assert [(probe / f"rank{i}.steps").read_text() for i in (0, 1)] == ["2", "2"]
    from gaqprune.core.units import layer_shapes
    from gaqprune.models.pruned import load_pruned

    run_dir = tmp_path / "prune_log" / "pf"
    assert layer_shapes(load_pruned(run_dir / "model")) == ranks[0]["shapes"]
    assert layer_shapes(load_pruned(run_dir / "model_finetuned")) == ranks[0]["shapes"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["finetune_outputs"]) == {"adapter", "model"} and metrics["ppl_after_finetune"] > 1


def alpaca_file(tmp_path: Path) -> Path:
    records = [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else "Show your work.",
                "output": f"{i} + {i + 1} = {2 * i + 1}."} for i in range(12)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    return path


def test_instruction_data_masks_the_prompt(tmp_path, embedded_tokenizer):
    from gaqprune.data.text import alpaca_prompt, instruction_records, tokenize_instructions

    records = instruction_records(str(alpaca_file(tmp_path)))
    ids, mask, labels = tokenize_instructions(records[:2], embedded_tokenizer, seq_len=96)
    assert ids.shape == mask.shape == labels.shape == (2, 96)
    prompt_len = len(embedded_tokenizer(alpaca_prompt(records[0]))["input_ids"])
    answer = embedded_tokenizer(records[0]["output"], add_special_tokens=False)["input_ids"]
    assert (labels[0, :prompt_len] == -100).all()
    assert labels[0, prompt_len : prompt_len + len(answer)].tolist() == answer
    assert labels[0, prompt_len + len(answer)] == embedded_tokenizer.eos_token_id
    assert int(mask[0].sum()) == prompt_len + len(answer) + 1 and (labels[0, int(mask[0].sum()):] == -100).all()
    assert "### Input:\nShow your work." in alpaca_prompt(records[0]) and "### Input" not in alpaca_prompt(records[1])


def test_fit_on_instruction_data(tiny_model_dir, tmp_path):
    r = cli("fit", "--base_model", str(tiny_model_dir), *FIT_ARGS, "--data.max_seq_len", "96",
             "--data.instruction_data", str(alpaca_file(tmp_path)), "--trainer.max_steps", "2", "--save_ckpt_log_name", "i",
             "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "prune_log" / "i" / "lora_adapter" / "adapter_model.safetensors").is_file()


def test_single_command_prune_then_lora(tiny_model_dir, tmp_path):
    """The guide's workflow, its switches written bare: prune ... --finetune --finetune_method lora ..."""
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Item {i}: the bridge over the river was rebuilt in stone." for i in range(800)))
    cmd = cli_command("prune", "--base_model", str(tiny_model_dir), "--data.source", str(text),
           "--save_ckpt_log_name", "one", "--importance_samples", "4", "--importance_seq_len", "32", "--num_examples", "4",
           "--max_seq_len", "32", "--pruning_ratio", "0.3", "--min_pruning_rate", "0.1", "--data.max_seq_len", "32",
           "--data.max_eval_windows", "4", "--save_model", "--save_gguf", "f32", "--test_after_prune", "--finetune",
           "--finetune_method", "lora",
           "--finetune_samples", "16", "--finetune_epochs", "1", "--trainer.enable_progress_bar", "false",
           "--distill_weight", "0.3", "--trainer.log_every_n_steps", "1",  # the teacher: the model before pruning
           "--model.lora_dropout", "0.3",  # must be off when the fine-tuned model is evaluated
           "--trainer.default_root_dir", str(tmp_path))
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [EventAccumulator(str(d)).Reload() for d in {f.parent for f in tmp_path.rglob("events.out.tfevents.*")}]
    distill = [e.value for ev in events if "train_distill_loss" in ev.Tags()["scalars"]
               for e in ev.Scalars("train_distill_loss")]
    assert len(distill) == 2 and all(v > 0 for v in distill)  # 16 windows / batch 8, one epoch
    run_dir = tmp_path / "prune_log" / "one"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"ppl_before", "ppl_after", "ppl_after_finetune"} <= set(metrics)
    # the fit's validation curve starts at the pruned model's perplexity, measured once (no second sanity pass)
    (log_dir,) = (tmp_path / "lightning_logs" / "one").glob("version_*")
    val = scalars(log_dir, "val_ppl")
    assert val[0] == (0, pytest.approx(metrics["ppl_after"], rel=1e-6)) and len(val) == 2, val
    # the last validation, after training, at the number of optimizer steps taken (16 windows / batch 8)
    assert val[1] == (2, pytest.approx(metrics["ppl_after_finetune"], rel=1e-6))
    assert [step for step, _ in scalars(log_dir, "lr-AdamW")] == [0, 1]  # the warm-up, step by step
    assert scalars(log_dir, "prune/ppl_after_finetune") == [(0, pytest.approx(metrics["ppl_after_finetune"], rel=1e-6))]
    assert f"perplexity after fine-tuning: {metrics['ppl_after_finetune']:.2f}" in r.stdout
    assert "layer importance (removal)" not in r.stderr and "perplexity:" not in r.stderr  # no bars: the flag said so
    assert plot_size(run_dir / "fit_curves.png")[0] > 600
    assert (run_dir / "model" / "config.json").is_file() and (run_dir / "model_finetuned" / "config.json").is_file()
    assert (run_dir / "lora_adapter" / "adapter_model.safetensors").is_file()
    # The GGUF files carry the pruned per-layer shapes; the fine-tuned one reproduces the merged model's logits.
    import gguf

    from gaqprune.core.units import layer_shapes
    from gaqprune.models.pruned import load_pruned

    merged = load_pruned(run_dir / "model_finetuned")
    shapes = layer_shapes(merged)
    # the adapters name and fit the pruned model this run saved; plain peft applies them as the merge did
    from peft import PeftModel

    assert json.loads((run_dir / "lora_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == str((run_dir / "model").resolve())
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(load_pruned(run_dir / "model"), run_dir / "lora_adapter")(ids).logits
        torch.testing.assert_close(adapted, merged(ids).logits, rtol=1e-4, atol=1e-4)
    # both saved models name the dense model they were pruned from (the teacher a later fit distils from)
    origin = {json.loads((run_dir / d / "config.json").read_text())["gaqprune_base_model"] for d in ("model", "model_finetuned")}
    assert origin == {str(tiny_model_dir)}
    assert min(shape["intermediate_size"] for shape in shapes) < 128  # pruned
    for name in ("model.gguf", "model_finetuned.gguf"):
        fields = gguf.GGUFReader(run_dir / name).fields
        for key, field in (("attention.head_count", "num_attention_heads"), ("attention.head_count_kv",
                           "num_key_value_heads"), ("feed_forward_length", "intermediate_size")):
            assert list(fields[f"deci.{key}"].contents()) == [shape[field] for shape in shapes], (name, key)
    with torch.no_grad():
        torch.testing.assert_close(gguf_forward(run_dir / "model_finetuned.gguf", ids), merged(ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_prune_finetune_honours_trainer_max_epochs(tiny_model_dir, tmp_path, monkeypatch):
    # --finetune_epochs (3) replaced an explicit --trainer.max_epochs 1
    from gaqprune.cli.main import run

    monkeypatch.chdir(tmp_path)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Item {i}: the bridge over the river was rebuilt in stone." for i in range(800)))
    args = ["prune", "--base_model", str(tiny_model_dir), "--data.source", str(text), "--importance_samples", "4",
            "--importance_seq_len", "32", "--num_examples", "2", "--max_seq_len", "32", "--compensation", "none",
            "--finetune", "--trainer.limit_val_batches", "0", "--trainer.logger", "false", *FIT_ARGS]
    assert run([*args, "--save_ckpt_log_name", "one", "--trainer.max_epochs", "1"]).trainer.global_step == 4  # 16 / 4
    assert run([*args, "--save_ckpt_log_name", "two", "--finetune_epochs", "2"]).trainer.global_step == 8


def test_a_resumed_sanity_check_is_not_a_start(tiny_model_dir):
    """Resuming from an epoch's end, Lightning sanity-checks a trained model: that is no 'before training' value."""
    lit = LitCausalLM(base_model=str(tiny_model_dir))

    class Trainer:
        sanity_checking, num_sanity_val_batches, num_val_batches, loggers = True, [2], [2], []

    lit._trainer = Trainer()
    lit.val_ppl.update(torch.tensor(20.0, dtype=torch.float64), torch.tensor(10))
    for step, recorded in ((4, None), (0, pytest.approx(7.389, rel=1e-3))):
        Trainer.global_step = step
        lit.on_validation_epoch_end()
        assert lit.val_ppl_start == recorded


def test_terminated_fit_resumes_with_ckpt_path_last_and_reports_the_whole_fit(tiny_model_dir, tmp_path):
    # Lightning's default checkpoints went to a new version_N folder per run (--ckpt_path last found nothing and the
    # fit silently restarted at step 0), SIGTERM exited 0, and a resumed fit forgot where its curve started.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    args = ["--base_model", str(tiny_model_dir), *FIT_ARGS, "--trainer.max_steps", "6", "--save_ckpt_log_name", "r",
            "--trainer.default_root_dir", str(tmp_path)]
    run = tmp_path / "prune_log" / "r"
    r = cli("fit", *args, "--trainer.callbacks+=interrupt.SigtermAt", "--trainer.callbacks.step", "2", cwd=tmp_path, env=env)
    assert r.returncode == 143, r.stderr[-3000:]
    assert "terminated (SIGTERM)" in r.stderr
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2 and not (run / "fit_metrics.json").exists()
    start = torch.load(last, weights_only=False)["gaqprune_history"]["val_ppl_start"]
    # starting over would overwrite the unfinished fit's checkpoint: asked for, not done
    r = cli("fit", *args, cwd=tmp_path, env=env)
    assert r.returncode == 2 and "unfinished fine-tune; resume it with --ckpt_path last" in r.stderr, r.stderr[-2000:]
    r = cli("fit", *args, "--save_ckpt_log_name", "other", "--ckpt_path", "last", cwd=tmp_path, env=env)
    # (nothing to resume under that name: said, not a silent fresh start at step 0)
    assert r.returncode == 2 and "--ckpt_path last: no checkpoint to resume" in r.stderr, r.stderr[-2000:]
    r = cli("fit", *args, "--ckpt_path", "last", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    fit_metrics = json.loads((run / "fit_metrics.json").read_text())
    assert fit_metrics["steps"] == 6 and fit_metrics["val_ppl_start"] == pytest.approx(start, rel=1e-12)
    # max_steps 6 ends between validations (4 batches per epoch): the exported model is validated at step 6
    assert fit_metrics["val_ppl_step"] == 6 and fit_metrics["val_ppl"] > 1
    assert torch.load(last, weights_only=False)["global_step"] == 6


def test_a_fit_that_fails_before_training_leaves_nothing_to_resume(tiny_model_dir, tmp_path):
    # a checkpoint of step 0 would make the rerun ask to resume or --overwrite a fit that never trained (the save on
    # an exception skips step 0: Lightning's ModelCheckpoint counts step 0 as saved)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    args = ["--base_model", str(tiny_model_dir), *FIT_ARGS, "--trainer.max_steps", "2", "--save_ckpt_log_name", "f",
            "--trainer.default_root_dir", str(tmp_path)]
    r = cli("fit", *args, "--trainer.callbacks+=interrupt.FailAtStart", cwd=tmp_path, env=env)
    assert r.returncode != 0 and "simulated failure before training" in r.stderr
    assert not list((tmp_path / "prune_log").rglob("*.ckpt"))
    r = cli("fit", *args, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]


def test_terminated_prune_finetune_resumes_its_fine_tune_when_run_again(tiny_model_dir, tmp_path):
    # The README's promise for a killed run, "resumed by running it again", held for the layer importance only: the
    # fine-tune started over at step 0. The rerun prunes to the same plan and continues from checkpoints/last.ckpt.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    cmd = cli_command("prune", "--base_model", str(tiny_model_dir), *FIT_ARGS,
           "--pruning_ratio", "0.3", "--importance_samples", "4", "--importance_seq_len", "32", "--num_examples", "4",
           "--max_seq_len", "32", "--compensation_samples", "4", "--min_pruning_rate", "0.1", "--finetune", "true",
           "--trainer.max_steps", "6", "--save_ckpt_log_name", "pf", "--trainer.default_root_dir", str(tmp_path))
    run = tmp_path / "prune_log" / "pf"
    r = subprocess.run([*cmd, "--trainer.callbacks+=interrupt.SigtermAt", "--trainer.callbacks.step", "3"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 143, r.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert not (run / "metrics.json").exists()
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reusing layer importance" in r.stderr and "resuming the interrupted fine-tune from" in r.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    assert set(json.loads((run / "metrics.json").read_text())["finetune_outputs"]) == {"adapter", "model"}
    # another plan cannot resume that fine-tune: said before any training, and --overwrite true starts over
    import shutil

    from gaqprune.run.rundir import RunDir

    for name in RunDir.FINISHED:  # back to an unfinished run (its checkpoint only)
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink(missing_ok=True)
    # (8 Taylor windows instead of 4: the same rates and layer shapes, other kept channels)
    r = subprocess.run([*cmd, "--num_examples", "8"], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    errors = [line for line in r.stderr.splitlines() if line.startswith("gaqprune: error:")]
    assert r.returncode == 2 and errors and "another pruning plan" in errors[0], r.stderr[-3000:]


def test_ctrl_c_during_a_fit_exits_130_with_a_checkpoint(tiny_model_dir, tmp_path):
    # Lightning turns a fit's KeyboardInterrupt into exit status 1, indistinguishable from a crash
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    r = cli("fit", "--base_model", str(tiny_model_dir), *FIT_ARGS, "--trainer.max_steps", "6", "--save_ckpt_log_name", "i",
             "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks+=interrupt.SigintAt",
             "--trainer.callbacks.step", "2", cwd=tmp_path, env=env)
    assert r.returncode == 130 and "gaqprune: interrupted" in r.stderr, r.stderr[-3000:]
    assert torch.load(tmp_path / "prune_log" / "i" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


@pytest.mark.slow
def test_an_error_on_one_ddp_rank_ends_the_fit_instead_of_hanging_it(tiny_model_dir, tmp_path):
    # saving a checkpoint on an exception is a collective: with one rank failing alone, the others waited in it forever
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    r = cli("fit", "--base_model", str(tiny_model_dir), *FIT_ARGS, "--trainer.max_steps", "6", "--save_ckpt_log_name", "d",
             "--trainer.default_root_dir", str(tmp_path), "--trainer.strategy", "ddp", "--trainer.devices", "2",
             "--trainer.accelerator", "cpu", "--trainer.callbacks+=interrupt.FailOnRank", cwd=tmp_path, env=env,
             timeout=240)
    assert r.returncode != 0 and "simulated failure on rank 1" in r.stderr, r.stderr[-3000:]
