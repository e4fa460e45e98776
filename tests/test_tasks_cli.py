"""Zero-shot accuracy from the command line: `gaqprune test --tasks` prints lm-eval's own number (the same as lm-eval's
command line on the same model folder), and `gaqprune prune --eval_tasks` records it before pruning, after it and
after the fine-tune (metrics.json, TensorBoard ``eval/<task>/<metric>``, the printed table)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ARGS, cli, corpus

from gaqprune.models.load import resolve_model_path
from gaqprune.run.zeroshot import WIKI_NEXT, wiki_next_task_dir

LIMIT = "40"


def test_gaqprune_test_tasks_equals_the_lm_eval_command_line(tmp_path):
    result = cli("test", "--tasks", WIKI_NEXT, "--eval_limit", LIMIT, "--trainer.limit_test_batches", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads(next((tmp_path / "lightning_logs" / "test").glob("version_*/tasks.json")).read_text())
    acc_norm = ours["tasks"][WIKI_NEXT]["acc_norm"]
    assert ours["tasks"][WIKI_NEXT]["n"] == int(LIMIT)
    assert f"| {WIKI_NEXT} | {LIMIT} | {100 * ours['tasks'][WIKI_NEXT]['acc']:.2f} | {100 * acc_norm:.2f} |" \
        in result.stdout
    out = tmp_path / "lm_eval_out"
    theirs = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={resolve_model_path('embedded')}",
         "--tasks", WIKI_NEXT, "--include_path", str(wiki_next_task_dir()), "--limit", LIMIT, "--batch_size", "8",
         "--output_path", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    reported = json.loads(next(out.rglob("results_*.json")).read_text())["results"][WIKI_NEXT]
    assert reported["acc_norm,none"] == acc_norm and reported["acc,none"] == ours["tasks"][WIKI_NEXT]["acc"]
    assert 0.25 < acc_norm <= 1.0  # the dense model is above chance (4 choices)


def test_prune_eval_tasks_records_dense_pruned_and_fine_tuned(tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = cli("prune", "--base_model", tiny_model_dir, *ARGS[:-2],  # (with the TensorBoard logger)
                 "--data.source", corpus(tmp_path), "--eval_tasks", WIKI_NEXT, "--eval_limit", "12", "--finetune",
                 "true", "--finetune_samples", "8", "--trainer.max_steps", "2", "--data.batch_size", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "prune_log" / "gaqprune_run" / "metrics.json").read_text())
    stages = ("tasks_before", "tasks_after", "tasks_after_finetune")
    for stage in stages:
        task = metrics[stage]["tasks"][WIKI_NEXT]
        assert task["n"] == 12 and 0.0 <= task["acc"] <= 1.0 and 0.0 <= task["acc_norm"] <= 1.0
        assert metrics[stage]["average"] == task["acc_norm"]  # the reported metric of the one task
    assert "| task (metric) | dense | pruned | fine-tuned |" in result.stdout
    events = EventAccumulator(str(next((tmp_path / "lightning_logs" / "gaqprune_run").glob("version_*")))).Reload()
    curve = [(e.step, e.value) for e in events.Scalars(f"eval/{WIKI_NEXT}/acc")]
    assert curve == [(i, pytest.approx(metrics[s]["tasks"][WIKI_NEXT]["acc"])) for i, s in enumerate(stages)]
