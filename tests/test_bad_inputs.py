"""Every user mistake: one-line error naming the flag and value, exit status 2, no run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import cli_command, tiny_llama_config

from gaqprune.cli.main import run

RUN = "bad"
SMALL = ["--importance_samples", "2", "--importance_seq_len", "32", "--num_examples", "2", "--max_seq_len", "32",
         "--compensation_samples", "4", "--compensation_seq_len", "32",
         "--data.max_seq_len", "32", "--data.max_eval_windows", "2", "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false", "--save_ckpt_log_name", RUN]


@pytest.fixture
def text_file(tmp_path) -> Path:
    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(f"Paragraph {i}: the river flows past the old mill and the town." for i in range(300)))
    return f


def importance_json(path: Path, num_layers: int = 4, fingerprint: str = "0" * 16) -> Path:
    from gaqprune.run.records import importance_record, save_importance

    meta = {"base_model": "other", "model_fingerprint": fingerprint, "num_layers": num_layers, "method": "removal",
            "samples": 2, "seq_len": 32, "data_source": "x", "layer_start": 0, "layer_end": num_layers, "seed": 42,
            "gaqprune_version": "0.1.0"}
    save_importance(path, importance_record({i: float(i + 1) for i in range(num_layers)}, meta))
    return path


def cases(tmp: Path, model: Path, text: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra args, text the one-line error must contain)."""
    empty = tmp / "empty.txt"
    empty.write_text("\n \n")
    binary = tmp / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02binary\x00" * 100)
    corrupt = tmp / "corrupt.json"
    corrupt.write_text('{"scores": {"0": 1.0,')
    data = ["--data.source", str(text)]
    gelu = tmp / "gelu"  # config and tokenizer only: --save_gguf must refuse it before any weight is loaded
    if not gelu.exists():
        from transformers import AutoTokenizer

        tiny_llama_config(vocab_size=49152, hidden_act="gelu").save_pretrained(gelu)
        AutoTokenizer.from_pretrained(model).save_pretrained(gelu)
    windowed = tmp / "mistral"  # config and tokenizer only: llama.cpp's 'deci' layers have no sliding window
    if not windowed.exists():
        from transformers import AutoTokenizer, MistralConfig

        MistralConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=8, sliding_window=16).save_pretrained(windowed)
        AutoTokenizer.from_pretrained(model).save_pretrained(windowed)
    notok = tmp / "notok"  # a weights-only copy: refused before the weights are loaded (was: a message cut at "one of:")
    if not notok.exists():
        import shutil

        notok.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(model / name, notok / name)
    pickled = tmp / "pickled"  # weights that are a pickle naming a function: refused unread, never run
    if not pickled.exists():
        import shutil

        import torch

        pickled.mkdir()
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(model / name, pickled / name)
        torch.save({"model.embed_tokens.weight": torch.zeros(2), "payload": Payload(tmp / "payload-ran")},
                   pickled / "pytorch_model.bin")
    deci = tmp / "pruned.gguf"  # what --save_gguf writes: llama.cpp's 'deci' architecture, not readable back
    if not deci.exists():
        import gguf

        writer = gguf.GGUFWriter(deci, "deci")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
    return {
        "ratio_zero": ([*data, "--pruning_ratio", "0"], "--pruning_ratio 0"),
        "ratio_above_one": ([*data, "--pruning_ratio", "1.5"], "--pruning_ratio 1.5"),
        "min_above_max": ([*data, "--min_pruning_rate", "0.4", "--max_pruning_rate", "0.2"], "--min_pruning_rate 0.4"),
        "min_outside": ([*data, "--min_pruning_rate", "-0.1"], "--min_pruning_rate -0.1"),
        "max_outside": ([*data, "--max_pruning_rate", "1.0"], "--max_pruning_rate 1.0"),
        "target_unreachable": ([*data, "--pruning_ratio", "0.05", "--min_pruning_rate", "0.15"], "not reachable"),
        "alpha_negative": ([*data, "--alpha", "-1"], "--alpha -1"),
        "layer_start_after_end": ([*data, "--layer_start", "3", "--layer_end", "2"], "--layer_start 3"),
        "layer_end_outside": ([*data, "--layer_start", "0", "--layer_end", "9"], "--layer_end 9"),
        "importance_samples_zero": ([*data, "--importance_samples", "0"], "--importance_samples 0"),
        "num_examples_zero": ([*data, "--num_examples", "0"], "--num_examples 0"),
        "too_many_samples": ([*data, "--importance_samples", "5000"], "--importance_samples 5000 asks for more windows"),
        "seq_len_above_context": ([*data, "--max_seq_len", "4096"], "--max_seq_len 4096 exceeds the model's context"),
        "unknown_strategy": ([*data, "--pruning_strategy", "random"], "--pruning_strategy 'random' is not accepted"),
        "unknown_method": ([*data, "--importance_method", "magic"], "--importance_method 'magic' is not accepted"),
        "missing_model": (["--base_model", str(tmp / "no_model")], "does not exist"),
        "unreadable_model": (["--base_model", str(text)], "is not a model folder"),
        "importance_other_model": (
            [*data, "--skip_importance_analysis", "true", "--importance_config", str(importance_json(tmp / "o.json"))],
            "--importance_config"),
        "importance_other_layer_count": (
            [*data, "--skip_importance_analysis", "true",
             "--importance_config", str(importance_json(tmp / "l.json", num_layers=30))], "--importance_config"),
        "importance_corrupted": (
            [*data, "--skip_importance_analysis", "true", "--importance_config", str(corrupt)], "is not valid JSON"),
        "importance_missing": (
            [*data, "--skip_importance_analysis", "true", "--importance_config", str(tmp / "nope.json")], "file not found"),
        "config_without_skip": ([*data, "--importance_config", str(corrupt)], "only read with --skip_importance_analysis"),
        "empty_text_file": (["--data.source", str(empty)], "is empty"),
        "binary_text_file": (["--data.source", str(binary)], "looks binary"),
        "unknown_dataset": (["--data.source", "no-such-org/no-such-dataset-xyz"], "could not be loaded"),
        "finetune_samples_zero": ([*data, "--finetune", "true", "--finetune_samples", "0"], "--finetune_samples 0"),
        "finetune_full_with_lora_rank": (
            [*data, "--finetune", "true", "--finetune_method", "full", "--model.lora_r", "32"], "--finetune_method full"),
        "compensation_samples_zero": ([*data, "--compensation_samples", "0"], "--compensation_samples 0"),
        "compensation_samples_too_many": ([*data, "--compensation_samples", "5000"],
                                          "--compensation_samples 5000 asks for more windows"),
        "compensation_seq_len_above_context": ([*data, "--compensation_seq_len", "4096"],
                                               "--compensation_seq_len 4096 exceeds the model's context"),
        "fsdp_on_cpu": ([*data, "--trainer.strategy", "fsdp", "--trainer.accelerator", "cpu"],
                        "strategy `fsdp` requires a GPU"),
        "spawned_finetune": ([*data, "--finetune", "true", "--trainer.strategy", "ddp_spawn", "--trainer.devices", "2",
                              "--trainer.accelerator", "cpu"], "--trainer.strategy ddp_spawn: its processes are started"),
        "num_nodes_without_cluster": ([*data, "--trainer.num_nodes", "2", "--trainer.strategy", "ddp",
                                       "--trainer.accelerator", "cpu"], "--trainer.num_nodes 2: start gaqprune on every"),
        "devices_not_a_number": ([*data, "--trainer.devices", "abc", "--trainer.accelerator", "cpu"],
                                 "--trainer settings rejected by Lightning"),
        "mistral_window_gguf": (["--base_model", str(windowed), *data, "--save_gguf", "f16"],
                                "cannot write a model with sliding_window=16 as GGUF"),
        "gguf_unknown_type": ([*data, "--save_gguf", "q4"],
                              "--save_gguf 'q4' is not accepted; give one of f32, f16, bf16, q8_0 or null"),
        "layer_start_not_integer": ([*data, "--layer_start", "1.5"],
                                    "--layer_start '1.5' is not accepted; give an integer or null"),
        "ratio_not_a_number": ([*data, "--pruning_ratio", "abc"], "--pruning_ratio 'abc' is not accepted; give a finite"),
        "gguf_unsupported_model": (["--base_model", str(gelu), *data, "--save_gguf", "f16"], "hidden_act is 'gelu'"),
        "gguf_deci_as_base_model": (["--base_model", str(deci), *data], "give the run's model/ folder instead"),
        "eval_batch_size_zero": ([*data, "--data.eval_batch_size", "0"], "--data.eval_batch_size 0"),
        "eval_batch_size_negative": ([*data, "--data.eval_batch_size", "-2", "--test_after_prune", "true"],
                                     "--data.eval_batch_size -2"),
        "max_eval_windows_negative": ([*data, "--data.max_eval_windows", "-1", "--test_after_prune", "true"],
                                      "--data.max_eval_windows -1"),
        "missing_text_file": (["--data.source", str(tmp / "nope.txt")], "'" + str(tmp / "nope.txt") + "': file not found"),
        "missing_eval_file": ([*data, "--data.eval_source", str(tmp / "nope.txt"), "--test_after_prune", "true"],
                              "file not found"),
        "channel_multiple_above_width": ([*data, "--channel_multiple", "1000"], "--channel_multiple 1000"),
        "lora_unknown_target": ([*data, "--finetune", "true", "--model.lora_target_modules", "[foo_proj]"],
                                "--model.lora_target_modules ['foo_proj']"),
        "lora_rank_zero": ([*data, "--finetune", "true", "--model.lora_r", "0"], "--model.lora_r 0"),
        "learning_rate_negative": ([*data, "--finetune", "true", "--model.learning_rate", "-1"], "--model.learning_rate -1"),
        "batch_size_zero": ([*data, "--finetune", "true", "--data.batch_size", "0"], "--data.batch_size 0"),
        "instruction_data_missing": ([*data, "--finetune", "true", "--data.instruction_data", str(tmp / "nope.json")],
                                     "--data.instruction_data"),
        "run_name_dot": ([*data, "--save_ckpt_log_name", "."], "--save_ckpt_log_name '.'"),
        "run_name_with_path": ([*data, "--save_ckpt_log_name", "../elsewhere"], "--save_ckpt_log_name '../elsewhere'"),
        "seed_overflow": ([*data, "--seed", "100000000000000000000000"], "--seed 100000000000000000000000"),
        "val_check_interval_above_epoch": ([*data, "--finetune", "true", "--finetune_samples", "16",
                                            "--trainer.val_check_interval", "100"],
                                           "--trainer.val_check_interval 100 is more than the 2 training batches"),
        "whole_layer_rate_above_one": ([*data, "--allocation", "fixed", "--whole_layer_rate", "5", "--pruning_ratio",
                                        "0.7"], "--whole_layer_rate 5.0 is invalid; give a rate in (0, 1]"),
        "whole_layer_rate_with_search": ([*data, "--whole_layer_rate", "0.6"],
                                         "--whole_layer_rate 0.6 applies to --allocation fixed"),
        "allocation_unknown": ([*data, "--allocation", "evolve"], "--allocation 'evolve' is not accepted"),
        "finetune_max_steps_zero": ([*data, "--finetune", "true", "--trainer.max_steps", "0"],
                                    "--trainer.max_steps 0 trains nothing"),
        "importance_is_folder": ([*data, "--skip_importance_analysis", "true", "--importance_config", str(tmp)],
                                 "is a folder; give the layer_importance_config.json file in it"),
        "tasks_unknown": ([*data, "--eval_tasks", "no_such_task"],
                          "--eval_tasks 'no_such_task' is not an lm-eval task, group or tag"),
        "tasks_hub_offline": ([*data, "--eval_tasks", "arc_easy"], "reads the hub dataset allenai/ai2_arc"),
        "tasks_folder_missing": ([*data, "--eval_tasks", "gaqprune_wiki_next", "--task_path", str(tmp / "nope")],
                                 "does not exist; give a folder of lm-eval task YAML files"),
        "tasks_limit_without_tasks": ([*data, "--eval_limit", "5"], "--eval_limit 5 applies to the tasks of --eval_tasks"),
        "tasks_with_offload": ([*data, "--eval_tasks", "gaqprune_wiki_next", "--offload", "cpu"],
                               "cannot be combined with --offload cpu"),
        "offload_unknown": ([*data, "--offload", "gpu"], "--offload 'gpu' is not accepted; give one of none, cpu, disk"),
        "offload_with_finetune": ([*data, "--offload", "cpu", "--finetune", "true"],
                                  "--offload cpu cannot be combined with --finetune"),
        "offload_with_gguf": ([*data, "--offload", "disk", "--save_gguf", "f16"],
                              "--offload disk cannot be combined with --save_gguf"),
        # checked from the folder listing, before the pickle is looked at
        "offload_disk_without_safetensors": (["--base_model", str(pickled), *data, "--offload", "disk"],
                                             "--offload disk reads the weights from --base_model's safetensors files"),
        "eval_fraction_above_one": ([*data, "--data.eval_fraction", "1.5"], "--data.eval_fraction 1.5 is invalid"),
        "model_without_tokenizer": (["--base_model", str(notok), *data], "has no tokenizer (no tokenizer.json"),
        "pickled_weights": (["--base_model", str(pickled), *data],
                            "pytorch_model.bin is a pickle that holds more than tensors (it names os.makedirs)"),
        # root may write anywhere by the permission bits, yet nothing can be created under /proc
        "output_dir_uncreatable": ([*data, "--output_dir", "/proc/gaqprune-test/runs"],
                                   "--output_dir: cannot write to '/proc' (cannot create '/proc/gaqprune-test'"),
        # the fit validates: too little evaluation text was found after the pruning and the save
        "finetune_eval_text_too_short": ([*data, "--finetune", "true", "--data.eval_fraction", "0.001"],
                                         "holds no full window of 32 tokens"),
    }


CASE_NAMES = [
    "ratio_zero", "ratio_above_one", "min_above_max", "min_outside", "max_outside", "target_unreachable",
    "alpha_negative", "layer_start_after_end", "layer_end_outside", "importance_samples_zero", "num_examples_zero",
    "too_many_samples", "seq_len_above_context", "unknown_strategy", "unknown_method", "missing_model",
    "unreadable_model", "importance_other_model", "importance_other_layer_count", "importance_corrupted",
    "importance_missing", "config_without_skip", "empty_text_file", "binary_text_file", "unknown_dataset",
    "finetune_samples_zero", "finetune_full_with_lora_rank", "compensation_samples_zero",
    "compensation_samples_too_many", "compensation_seq_len_above_context", "fsdp_on_cpu", "spawned_finetune",
    "num_nodes_without_cluster", "devices_not_a_number", "mistral_window_gguf",
    "gguf_unknown_type",
    "gguf_unsupported_model", "gguf_deci_as_base_model", "eval_batch_size_zero", "eval_batch_size_negative",
    "max_eval_windows_negative", "missing_text_file", "missing_eval_file", "channel_multiple_above_width",
    "lora_unknown_target", "lora_rank_zero", "learning_rate_negative", "batch_size_zero", "instruction_data_missing",
    "run_name_dot", "run_name_with_path", "seed_overflow", "val_check_interval_above_epoch",
    "finetune_eval_text_too_short", "eval_fraction_above_one", "model_without_tokenizer", "layer_start_not_integer",
    "ratio_not_a_number", "whole_layer_rate_above_one", "whole_layer_rate_with_search", "allocation_unknown",
    "finetune_max_steps_zero", "importance_is_folder",
    "pickled_weights", "output_dir_uncreatable", "offload_unknown", "offload_with_finetune", "offload_with_gguf",
    "offload_disk_without_safetensors", "tasks_unknown", "tasks_hub_offline", "tasks_folder_missing",
    "tasks_limit_without_tasks", "tasks_with_offload",
]


class Payload:
    """What a malicious pickle holds: reading it back with pickle's defaults would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.makedirs, (str(self.marker),)


def run_prune(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run(["prune", *args])
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_refused_cleanly(name, tmp_path, monkeypatch, capsys, tiny_model_dir, text_file):
    monkeypatch.chdir(tmp_path)
    extra, expected = cases(tmp_path, tiny_model_dir, text_file)[name]
    args = ["--base_model", str(tiny_model_dir), *SMALL, *extra]
    if "--base_model" in extra:  # the case brings its own model
        args = [*SMALL, *extra]
    code, err = run_prune(args, capsys)
    errors = [line for line in err.splitlines() if line.startswith("gaqprune: error:")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1, err[-2000:]
    assert expected in errors[0], errors[0]
    assert "Traceback" not in err
    assert not (tmp_path / "prune_log" / RUN).exists()
    assert not (tmp_path / "prune_log").exists() or not any((tmp_path / "prune_log").iterdir())
    assert not (tmp_path / "elsewhere").exists()


def test_pickled_weights_are_never_run(tmp_path, monkeypatch, capsys, tiny_model_dir, text_file):
    monkeypatch.chdir(tmp_path)
    extra, expected = cases(tmp_path, tiny_model_dir, text_file)["pickled_weights"]
    for call in (lambda: run_prune([*SMALL, *extra], capsys),
                 lambda: __import__("gaqprune").load_model(str(tmp_path / "pickled"))):  # the Python API too
        try:
            call()
        except SystemExit as err:
            assert err.code == 2
        except Exception as err:
            assert type(err).__name__ == "GaqpruneError" and "holds more than tensors" in str(err)
        assert not (tmp_path / "payload-ran").exists()
    import pickle

    with pytest.raises(pickle.UnpicklingError):  # the file does hold a call (torch refuses it, naming it)
        __import__("torch").load(tmp_path / "pickled" / "pytorch_model.bin", weights_only=True)


def test_case_list_is_complete(tmp_path, tiny_model_dir, text_file):
    assert sorted(cases(tmp_path, tiny_model_dir, text_file)) == sorted(CASE_NAMES)


def test_existing_run_folder_needs_overwrite(tmp_path, monkeypatch, capsys, tiny_model_dir, text_file):
    monkeypatch.chdir(tmp_path)
    done = tmp_path / "prune_log" / RUN
    done.mkdir(parents=True)
    (done / "metrics.json").write_text(json.dumps({"finished": True}))
    code, err = run_prune(["--base_model", str(tiny_model_dir), *SMALL, "--data.source", str(text_file)], capsys)
    assert code == 2 and "already holds results (metrics.json)" in err and "--overwrite true" in err
    assert json.loads((done / "metrics.json").read_text()) == {"finished": True}  # untouched
    # a fit's results count too (a fit writes no metrics.json)
    (done / "metrics.json").unlink()
    (done / "lora_adapter").mkdir()
    code, err = run_prune(["--base_model", str(tiny_model_dir), *SMALL, "--data.source", str(text_file)], capsys)
    assert code == 2 and "already holds results (lora_adapter)" in err
    # a file where the run folder would be
    (tmp_path / "prune_log" / "file").write_text("x")
    code, err = run_prune(["--base_model", str(tiny_model_dir), *SMALL, "--data.source", str(text_file),
                           "--save_ckpt_log_name", "file"], capsys)
    assert code == 2 and "is a file, not a folder" in err


def test_unwritable_output_dir_is_refused_before_any_work(tmp_path, monkeypatch, capsys, tiny_model_dir, text_file):
    # found at the first write, after the layer importance (prune) or the whole fine-tune (fit), with a traceback
    import os

    from gaqprune.run import rundir

    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(rundir.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    code, err = run_prune(["--base_model", str(tiny_model_dir), *SMALL, "--data.source", str(text_file),
                           "--output_dir", str(locked / "runs")], capsys)
    assert code == 2 and f"cannot write to {str(locked)!r}" in err and "Traceback" not in err
    assert list(locked.iterdir()) == []


def test_a_run_folder_in_use_by_another_run_is_refused(tmp_path, monkeypatch, capsys, tiny_model_dir, text_file):
    # two runs of one name at once interleaved their files, and the later one's results silently replaced the other's
    import subprocess

    from gaqprune.run.rundir import RunDir
    from gaqprune.settings import RunSettings

    monkeypatch.chdir(tmp_path)
    held = RunDir(RunSettings(save_ckpt_log_name=RUN)).hold()  # as a running job would
    args = ["--base_model", str(tiny_model_dir), *SMALL, "--data.source", str(text_file)]
    r = subprocess.run(cli_command("prune", *args), cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2 and "is in use by another gaqprune run" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "prune_log").exists()  # refused without a trace
    held.release()
    assert run(["prune", *args]) is not None  # free again
    assert (tmp_path / "prune_log" / RUN / "metrics.json").is_file()
    # and released when the command ends: the same name again in this process (a notebook, prune then fit)
    assert run(["prune", *args, "--overwrite", "true"]) is not None


def test_only_the_launching_process_claims_the_run_folder(monkeypatch, tmp_path):
    # the ranks Lightning's DDP launcher starts carry LOCAL_RANK only; under `srun --pty bash` they also inherit
    # SLURM_PROCID=0, which made rank 1 claim (and fail on) the folder rank 0 held
    from gaqprune.run import rundir

    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert rundir.launch_rank_is_zero()
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert rundir.launch_rank_is_zero()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not rundir.launch_rank_is_zero()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "3")
    assert not rundir.launch_rank_is_zero()
    # an unusable temp folder (another user's, read-only) costs the guard, not the run
    from gaqprune.settings import RunSettings

    monkeypatch.setenv("RANK", "0")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setattr(rundir.tempfile, "gettempdir", lambda: str(blocker))
    assert rundir.RunDir(RunSettings(save_ckpt_log_name="x", output_dir=str(tmp_path))).hold() is None


def test_own_model_checkpoint_subclasses_are_recognised():
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from gaqprune.cli.launch import _configures_checkpoints

    class Mine(ModelCheckpoint):
        pass

    assert _configures_checkpoints([Mine()]) and _configures_checkpoints(Mine())
    assert _configures_checkpoints([SimpleNamespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint")])
    assert _configures_checkpoints([SimpleNamespace(class_path="ModelCheckpoint")])
    assert not _configures_checkpoints([SimpleNamespace(class_path="lightning.pytorch.callbacks.EarlyStopping")])
    assert not _configures_checkpoints(None) and not _configures_checkpoints([])


def test_overwrite_replaces_the_whole_previous_run(tmp_path, monkeypatch, capsys, tiny_model_dir, text_file):
    # --overwrite must not leave the previous run's results next to the new ones (a 0.25 model/ beside a 0.4 plan)
    monkeypatch.chdir(tmp_path)
    done = tmp_path / "prune_log" / RUN
    for name in ("model", "lora_adapter", "model_finetuned"):
        (done / name).mkdir(parents=True)
    (done / "metrics.json").write_text(json.dumps({"finished": True}))
    (done / "model.gguf").write_text("old")
    cli = run(["prune", "--base_model", str(tiny_model_dir), *SMALL, "--data.source", str(text_file),
               "--pruning_ratio", "0.4", "--overwrite", "true"])
    assert cli is not None
    assert sorted(p.name for p in done.iterdir() if p.suffix != ".png") == [
        "config.yaml", "layer_importance_config.json", "metrics.json", "pruning_plan.json"]
    assert json.loads((done / "pruning_plan.json").read_text())["settings"]["pruning_ratio"] == 0.4
    assert "finished" not in json.loads((done / "metrics.json").read_text())


@pytest.mark.parametrize("command", ["prune", "fit"])
def test_overwrite_keeps_the_previous_run_when_a_check_fails(command, tmp_path, monkeypatch, capsys, tiny_model_dir,
                                                             text_file):
    # a reused importance config that does not fit the run (here: another layer range) was refused after
    # --overwrite had removed the previous run's model and results
    monkeypatch.chdir(tmp_path)
    args = ["--base_model", str(tiny_model_dir), *SMALL, "--data.source", str(text_file), "--save_model", "true"]
    assert run(["prune", *args, "--layer_start", "1", "--layer_end", "3"]) is not None
    done = tmp_path / "prune_log" / RUN
    before = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    assert {"model", "metrics.json", "pruning_plan.json", "config.yaml"} <= set(before)
    reuse = ["--skip_importance_analysis", "true", "--importance_config", str(done / "layer_importance_config.json")]
    extra = ["--prune", "true", "--trainer.max_steps", "1"] if command == "fit" else []
    with pytest.raises(SystemExit) as exit_info:
        run([command, *args, *extra, *reuse, "--layer_start", "0", "--layer_end", "4", "--overwrite", "true"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "expected layers 0..3" in err, err[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in done.iterdir()} == before  # nothing removed or rewritten


@pytest.mark.parametrize("extra, expected", [
    (["--skip_importance_analysis", "true", "--importance_config", "l.json"], "num_layers differs: found 30, expected 4"),
    (["--data.eval_fraction", "0"], "--data.eval_fraction 0.0 is invalid"),
    (["--eval_tasks", "no_such_task"], "--eval_tasks 'no_such_task' is not an lm-eval task"),
])
def test_cheap_checks_come_before_the_model_is_loaded(extra, expected, tmp_path, monkeypatch, capsys, tiny_model_dir,
                                                      text_file):
    # found after minutes of loading an 8B model
    from gaqprune.train import module as lit_module

    monkeypatch.chdir(tmp_path)
    importance_json(tmp_path / "l.json", num_layers=30)
    monkeypatch.setattr(lit_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, err = run_prune(["--base_model", str(tiny_model_dir), *SMALL, "--data.source", str(text_file),
                           "--layer_start", "0", "--layer_end", "4", *extra], capsys)
    assert code == 2 and expected in err, err[-2000:]


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_missing_or_junk_checkpoint_is_refused_before_the_model_is_loaded(command, tmp_path, monkeypatch, capsys,
                                                                           tiny_model_dir, text_file):
    from gaqprune.train import module as lit_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lit_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint" * 10)
    import torch

    torch.save({"state_dict": {}, "payload": Payload(tmp_path / "payload-ran")}, tmp_path / "pickled.ckpt")
    for ckpt, expected in (("nope.ckpt", "--ckpt_path 'nope.ckpt': file not found"),
                           ("junk.ckpt", "--ckpt_path 'junk.ckpt' is not a Lightning checkpoint"),
                           ("pickled.ckpt", "--ckpt_path 'pickled.ckpt' holds more than a Lightning checkpoint")):
        with pytest.raises(SystemExit) as exit_info:
            run([command, "--base_model", str(tiny_model_dir), "--data.source", str(text_file), "--ckpt_path", ckpt,
                 "--trainer.logger", "false"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and expected in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "lightning_logs").exists() and not (tmp_path / "prune_log").exists()
    assert not (tmp_path / "payload-ran").exists()


def test_pruning_flags_without_prune_in_fit_are_refused(tmp_path, monkeypatch, capsys, tiny_model_dir, text_file):
    # `fit --pruning_ratio 0.3` fine-tuned the dense model and said nothing
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--base_model", str(tiny_model_dir), "--data.source", str(text_file), "--pruning_ratio", "0.3",
             "--importance_samples", "4", "--trainer.logger", "false"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert "--importance_samples 4, --pruning_ratio 0.3: pruning flags do nothing in `fit` without --prune true" in err
    assert not (tmp_path / "prune_log").exists()
    # the recovery fit of a pruned model may reuse the pruning run's settings (its config.yaml): noted, not refused
    run(["prune", "--base_model", str(tiny_model_dir), *SMALL, "--data.source", str(text_file), "--save_model", "true"])
    cli = run(["fit", "--base_model", f"prune_log/{RUN}/model", "--data.source", str(text_file), *SMALL[:-2],
               "--pruning_ratio", "0.3", "--save_ckpt_log_name", "recovery", "--finetune_samples", "8",
               "--trainer.max_steps", "1"])
    assert cli.trainer.global_step == 1


def test_checkpoint_forms_lightning_resolves_itself_pass(tmp_path):
    from gaqprune.train.job import check_ckpt_path

    for ckpt in ("last", "best", "hpc", "registry", "registry:model:latest", "REGISTRY", "s3://bucket/x.ckpt",
                 str(tmp_path)):  # a folder: a sharded FSDP / DeepSpeed checkpoint
        check_ckpt_path(ckpt)


def test_an_unfinished_runs_leftovers_do_not_stay_beside_a_new_run(tmp_path, monkeypatch, capsys, tiny_model_dir,
                                                                  text_file):
    # a run stopped after saving model/ left it; a rerun of that name without --save_model kept it beside its own
    # plan and metrics (a 0.25 model in a 0.4 run's folder)
    monkeypatch.chdir(tmp_path)
    done = tmp_path / "prune_log" / RUN
    (done / "model").mkdir(parents=True)
    (done / "model.gguf").write_text("old")
    (done / "checkpoints").mkdir()
    (done / "checkpoints" / "last.ckpt").write_text("an unfinished fine-tune's")
    args = ["prune", "--base_model", str(tiny_model_dir), *SMALL, "--data.source", str(text_file)]
    # a prune without --finetune would not resume that fine-tune: refused, not removed
    with pytest.raises(SystemExit) as exit_info:
        run(args)
    assert exit_info.value.code == 2 and "unfinished fine-tune; resume it by running `prune --finetune` again" in \
        capsys.readouterr().err
    assert (done / "checkpoints" / "last.ckpt").is_file() and (done / "model").is_dir()
    (done / "checkpoints" / "last.ckpt").unlink()
    assert run(args) is not None
    assert sorted(p.name for p in done.iterdir() if p.suffix != ".png") == [
        "checkpoints", "config.yaml", "layer_importance_config.json", "metrics.json", "pruning_plan.json"]


def test_guide_switches_work_without_a_value():
    from gaqprune.cli.main import expand_bare_flags

    args = ["prune", "--save_model", "--test_after_prune", "--pruning_ratio", "0.25", "--finetune",
            "--skip_importance_analysis", "--importance_config", "x.json", "--overwrite", "false", "--finetune"]
    assert expand_bare_flags(args) == [
        "prune", "--save_model", "true", "--test_after_prune", "true", "--pruning_ratio", "0.25", "--finetune", "true",
        "--skip_importance_analysis", "true", "--importance_config", "x.json", "--overwrite", "false", "--finetune", "true"]


@pytest.mark.parametrize("extra, expected", [
    (["--num_examples", "5000"], "--num_examples 5000 asks for more windows"),
    (["--compensation_samples", "5000"], "--compensation_samples 5000 asks for more windows"),
    (["--test_after_prune", "true"], "--test_after_prune is for `gaqprune prune`"),
    (["--trainer.val_check_interval", "100"], "--trainer.val_check_interval 100 is more than the"),
])
def test_fit_with_prune_checks_before_any_work(extra, expected, tmp_path, monkeypatch, capsys, tiny_model_dir,
                                               text_file):
    # `fit --prune` checks what `prune` checks, before the layer analysis runs or the run folder is written
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--prune", "true", "--base_model", str(tiny_model_dir), *SMALL, "--data.source", str(text_file),
             "--trainer.max_steps", "1", *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("gaqprune: error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and expected in errors[0], err[-2000:]
    assert not (tmp_path / "prune_log").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--trainer.strategy", "fsdp", "--trainer.accelerator", "cpu"], "strategy `fsdp` requires a GPU"),
    (["--finetune", "true", "--trainer.strategy", "ddp_spawn", "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
     "its processes are started by 'spawn'"),
])
def test_trainer_mistakes_cost_no_model_load(extra, expected, tmp_path, monkeypatch, capsys, tiny_model_dir):
    """Lightning judges --trainer.* when it builds the Trainer, after the model (minutes for 8B): checked first."""
    from gaqprune.train import module as lit_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lit_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, err = run_prune(["--base_model", str(tiny_model_dir), *extra], capsys)
    errors = [line for line in err.splitlines() if line.startswith("gaqprune: error:")]
    assert code == 2 and len(errors) == 1 and expected in errors[0], err[-2000:]


def test_prune_finetune_under_an_external_launcher_is_refused(tmp_path, monkeypatch, capsys, tiny_model_dir):
    """torchrun / SLURM start every rank at once: the other ranks would have no plan from rank 0 to read."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "0")  # what torchrun sets (Lightning then starts no processes itself)
    code, err = run_prune(["--base_model", str(tiny_model_dir), "--finetune", "true", "--trainer.strategy", "ddp",
                           "--trainer.devices", "2", "--trainer.accelerator", "cpu"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("gaqprune: error:")]
    assert code == 2 and len(errors) == 1 and "run `gaqprune fit --prune true`" in errors[0], err[-2000:]
    assert not (tmp_path / "prune_log").exists()


def test_parser_type_errors_become_one_line_with_what_is_accepted():
    from gaqprune.cli.main import one_line

    union = ('Parser key "save_gguf": Does not validate against any of the Union subtypes\nSubtypes: '
             "[typing.Literal['f32', 'f16'], typing.Literal['f16', 'q8_0'], <class 'NoneType'>]\nErrors:\n  - Expected a "
             "typing.Literal['f32', 'f16']\n  - Expected a <class 'NoneType'>\nGiven value type: <class 'str'>\n"
             "Given value: q4")
    assert one_line(union) == "--save_gguf 'q4' is not accepted; give one of f32, f16, q8_0 or null"
    plain = "Parser key \"pruning_ratio\":\n  Expected a <class 'float'>. Got value: abc"
    assert one_line(plain) == "--pruning_ratio 'abc' is not accepted; give a finite number"
    # a type it cannot put in words: the parser's own message, on one line (not "give null")
    listed = ('Parser key "model.lora_target_modules": Does not validate against any of the Union subtypes\nSubtypes: '
              "[list[str], <class 'NoneType'>]\nErrors:\n  - Expected a <class 'list'>\nGiven value: q_proj")
    assert one_line(listed) == " ".join(listed.split())
