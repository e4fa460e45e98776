"""The Python API runs the CLI's pipeline: same plan, same pruned weights, same perplexity."""

from __future__ import annotations

import json

import pytest
import torch
from test_reliability import ARGS, corpus

import gaqprune
from gaqprune.cli import run

SETTINGS = {"importance_samples": 4, "importance_seq_len": 32, "num_examples": 4, "max_seq_len": 32,
            "pruning_ratio": 0.3, "min_pruning_rate": 0.1, "layer_start": 0, "layer_end": 4}


def test_api_prunes_exactly_as_the_cli(tmp_path, monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(tmp_path)
    text = corpus(tmp_path)
    run(["prune", "--base_model", str(tiny_model_dir), "--data.source", str(text), "--importance_samples", "4", *ARGS,
         "--save_model", "true", "--test_after_prune", "true", "--data.max_eval_windows", "4",
         "--save_ckpt_log_name", "cli", "--trainer.enable_progress_bar", "false"])
    run_dir = tmp_path / "prune_log" / "cli"

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # as a user holds it, not through gaqprune
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plan = gaqprune.prune(model, tokenizer, data=str(text), progress=False, **SETTINGS)
    assert json.loads(json.dumps(plan)) == json.loads((run_dir / "pruning_plan.json").read_text())
    cli_model = gaqprune.load_pruned(run_dir / "model")
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, cli_model(ids).logits, atol=1e-5, rtol=0)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ppl = gaqprune.perplexity(model, tokenizer, data=str(text), seq_len=32, max_windows=4, progress=False)
    assert ppl == pytest.approx(metrics["ppl_after"], rel=1e-5)

    saved = gaqprune.save_pretrained(model, tokenizer, tmp_path / "api_model")
    reloaded = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_api_refuses_bad_settings_before_any_work(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="pruning_rate"):
        gaqprune.prune(model, str(tiny_model_dir), pruning_rate=0.3)
    with pytest.raises(gaqprune.GaqpruneError, match="--pruning_ratio 1.5"):
        gaqprune.prune(model, str(tiny_model_dir), pruning_ratio=1.5)
    with pytest.raises(gaqprune.GaqpruneError, match="--num_examples 100000 asks for more windows"):
        gaqprune.prune(model, str(tiny_model_dir), num_examples=100000, max_seq_len=32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
