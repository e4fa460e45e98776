"""Interruption safety and determinism of `gaqprune prune`."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import ARGS, cli_command, corpus, tiny_llama


def prune_cmd(model: Path, text: Path, name: str, *extra: str) -> list[str]:
    return cli_command("prune", "--base_model", str(model), "--data.source", str(text),
            "--save_ckpt_log_name", name, *ARGS, *extra)


def strip_created(path: Path) -> dict:
    record = json.loads(path.read_text())
    record.pop("created", None)
    return record


def test_two_identical_runs_write_byte_identical_plans(tmp_path, tiny_model_dir):
    text = corpus(tmp_path)
    for name in ("a", "b"):
        r = subprocess.run(prune_cmd(tiny_model_dir, text, name, "--importance_samples", "6"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = tmp_path / "prune_log" / "a", tmp_path / "prune_log" / "b"
    assert (a / "pruning_plan.json").read_bytes() == (b / "pruning_plan.json").read_bytes()
    assert r.stdout.strip().splitlines()[-1].startswith("results in prune_log/b/: config.yaml, layer_importance.png")
    # the run's config.yaml re-runs it as it is (`prune --config FILE`, like the files in configs/)
    r = subprocess.run(cli_command("prune", "--config", str(a / "config.yaml"),
                        "--save_ckpt_log_name", "c"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "prune_log" / "c" / "pruning_plan.json").read_bytes() == (a / "pruning_plan.json").read_bytes()
    assert strip_created(a / "layer_importance_config.json") == strip_created(b / "layer_importance_config.json")
    plan = json.loads((a / "pruning_plan.json").read_text())
    assert 0.25 < plan["totals"]["achieved_ratio_selected"] < 0.35
    assert {p.name for p in a.iterdir()} >= {"config.yaml", "layer_importance_config.json", "pruning_plan.json",
                                             "metrics.json", "layer_importance.png", "pruning_rates.png"}


def no_partial_files(run_dir: Path) -> None:
    if not run_dir.exists():
        return
    for f in run_dir.rglob("*"):
        assert ".tmp-" not in f.name, f"half-written file left behind: {f}"
        if f.suffix == ".json":
            json.loads(f.read_text())  # complete JSON or nothing


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_kill_during_analysis_leaves_nothing_half_written_and_rerun_works(tmp_path, tiny_model_dir, sig):
    text = corpus(tmp_path)
    cmd = prune_cmd(tiny_model_dir, text, "killed", "--importance_samples", "400")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until the removal analysis is running
        chunk = proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else proc.stderr.readline()
        seen += chunk if isinstance(chunk, str) else chunk.decode()
        if "layer importance" in seen or proc.poll() is not None:
            break
    assert proc.poll() is None, f"run ended before it could be interrupted: {seen[-2000:]}"
    time.sleep(1.0)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    if sig == signal.SIGTERM:  # a scheduler's pre-emption: said, and the signal's own status (was: killed silently)
        assert proc.returncode == 143 and "gaqprune: terminated (SIGTERM)" in proc.stderr.read()
    run_dir = tmp_path / "prune_log" / "killed"
    no_partial_files(run_dir)
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "pruning_plan.json").exists()
    r = subprocess.run(prune_cmd(tiny_model_dir, text, "killed", "--importance_samples", "8"), cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    no_partial_files(run_dir)
    assert json.loads((run_dir / "metrics.json").read_text())["params"]["achieved_ratio_selected"] > 0.25


def test_sigterm_while_a_folder_is_written_removes_its_temporary_copy(tmp_path):
    # SIGTERM during the save of a pruned model left a model-sized .model.tmp-* folder (Ctrl-C did not)
    import os

    from gaqprune.atomic import Terminated, atomic_dir, sigterm_unwinds

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as info, sigterm_unwinds(), atomic_dir(tmp_path / "model") as tmp:
        (tmp / "model.safetensors").write_bytes(b"0" * 1000)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
    assert info.value.code == 143
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_saved_files_are_readable_by_others_as_plain_writes_are(tmp_path):
    # safetensors writes 0600: on a shared machine nobody else could load the saved model
    import os

    from gaqprune.atomic import atomic_dir

    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "w.safetensors").write_bytes(b"x")
            (tmp / "w.safetensors").chmod(0o600)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "a.json").write_text("{}")
    finally:
        os.umask(mask)
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "model").rglob("*") if f.is_file()} == {
        "w.safetensors": 0o644, "a.json": 0o644}


def test_reuse_of_importance_config_spends_no_forward_pass(tmp_path, monkeypatch, tiny_model_dir, caplog):
    import torch

    from gaqprune.cli.main import run
    from gaqprune.core import importance as layer_importance

    monkeypatch.chdir(tmp_path)
    text = corpus(tmp_path)
    base = ["prune", "--base_model", str(tiny_model_dir), "--data.source", str(text), "--importance_samples", "6",
            *ARGS, "--trainer.enable_progress_bar", "false"]
    run([*base, "--save_ckpt_log_name", "first"])
    cache = tmp_path / "prune_log" / "first" / "layer_importance_config.json"

    calls = {"analysis": 0, "decoder_forwards": 0}
    real = layer_importance.compute_layer_importance

    def counting(*args, **kwargs):
        calls["analysis"] += 1
        return real(*args, **kwargs)

    original_forward = torch.nn.Module.__call__

    def counting_call(self, *args, **kwargs):
        if type(self).__name__ == "LlamaModel":
            calls["decoder_forwards"] += 1
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(layer_importance, "compute_layer_importance", counting)
    from gaqprune.run import stages as pipeline

    real_stage = pipeline.layer_importance_stage

    def stage_counting_forwards(*args, **kwargs):
        monkeypatch.setattr(torch.nn.Module, "__call__", counting_call)
        try:
            return real_stage(*args, **kwargs)
        finally:
            monkeypatch.setattr(torch.nn.Module, "__call__", original_forward)

    monkeypatch.setattr(pipeline, "layer_importance_stage", stage_counting_forwards)
    run([*base, "--save_ckpt_log_name", "second", "--skip_importance_analysis", "true", "--importance_config", str(cache)])
    assert calls == {"analysis": 0, "decoder_forwards": 0}
    first = strip_created(cache)
    second = strip_created(tmp_path / "prune_log" / "second" / "layer_importance_config.json")
    assert first["scores"] == second["scores"]
    # and the control: the same counter sees the forwards of a fresh analysis
    run([*base, "--save_ckpt_log_name", "third"])
    assert calls["analysis"] == 1 and calls["decoder_forwards"] > 0
    # another method asked for while reusing removal scores: said, not silently ignored
    run([*base, "--save_ckpt_log_name", "fourth", "--skip_importance_analysis", "true", "--importance_config", str(cache),
         "--importance_method", "activation"])
    assert "--importance_method activation does not apply: the reused --importance_config holds removal scores" in \
        caplog.text


def test_dense_perplexity_is_measured_once_per_model_and_windows(tmp_path, monkeypatch, random_windows):
    """A ratio sweep or a rerun reads the dense perplexity back instead of measuring it again, but only for the same
    weights and the same evaluation windows."""
    import torch

    from gaqprune.core.importance import model_fingerprint
    from gaqprune.core.metrics import perplexity
    from gaqprune.run.stages import dense_perplexity

    monkeypatch.setenv("GAQPRUNE_CACHE", str(tmp_path))
    model = tiny_llama()
    measured = perplexity(model, random_windows, 4)
    assert dense_perplexity(model, random_windows, 4, model_fingerprint(model)) == (measured, False)
    assert dense_perplexity(model, random_windows, 4, model_fingerprint(model)) == (measured, True)
    # other windows, or weights changed everywhere (a fine-tune, a merged LoRA): measured, not read back
    value, cached = dense_perplexity(model, random_windows[:3], 4, model_fingerprint(model))
    assert not cached and value == perplexity(model, random_windows[:3], 4) != measured
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    value, cached = dense_perplexity(model, random_windows, 4, model_fingerprint(model))
    assert not cached and value == perplexity(model, random_windows, 4) != measured
    # a change between the fingerprint's samples (a folder's weights updated in place) is seen too
    sampled = model_fingerprint(model)
    with torch.no_grad():
        model.lm_head.weight[7, 10] += 5.0
    assert model_fingerprint(model) == sampled
    value, cached = dense_perplexity(model, random_windows, 4, sampled)
    assert not cached and value == perplexity(model, random_windows, 4)
    assert len(list((tmp_path / "perplexity").glob("*.json"))) == 4


def test_saved_model_names_its_origin_by_absolute_path(tmp_path, monkeypatch, tiny_model_dir):
    """A relative --base_model is recorded absolute: a later fit's distillation teacher (the model it was pruned
    from) must resolve from any folder, not from wherever that fit runs."""
    import shutil

    from gaqprune.cli.main import run

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    run(["prune", "--base_model", "models/tiny", "--data.source", str(corpus(tmp_path)), "--importance_samples", "4",
         *ARGS, "--save_model", "true", "--save_ckpt_log_name", "rel", "--trainer.enable_progress_bar", "false"])
    config = json.loads((tmp_path / "prune_log" / "rel" / "model" / "config.json").read_text())
    assert config["gaqprune_base_model"] == str((tmp_path / "models" / "tiny").resolve())


def test_validate_notes_a_dtype_other_than_the_saved_one(tmp_path, monkeypatch, caplog, embedded_tokenizer):
    """A bf16 checkpoint validated at the default float32 gives slightly other numbers than its bf16 pruning run did:
    said in one line, not left for the user to puzzle over."""
    import logging

    import torch

    from gaqprune.cli.main import run

    tiny_llama(vocab_size=len(embedded_tokenizer)).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    embedded_tokenizer.save_pretrained(tmp_path / "bf16")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="gaqprune")
    common = ["--base_model", str(tmp_path / "bf16"), "--data.max_seq_len", "32", "--data.max_eval_windows", "2",
              "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    run(["validate", *common])
    assert "was saved in bfloat16 and is measured in float32 (--dtype)" in caplog.text
    caplog.clear()
    run(["validate", *common, "--dtype", "bfloat16"])
    assert "was saved in" not in caplog.text
