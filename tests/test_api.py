"""The Python API runs the CLI's pipeline: same plan, same pruned weights, same perplexity."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ARGS, corpus, tiny_llama

import gaqprune
from gaqprune.cli.main import run

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
    # the default --allocation search, reproduced for the same seed in another pipeline: every candidate's loss
    assert len(plan["search"]["candidates"]) >= 2
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
    # transformers' own save_pretrained (a Trainer's checkpoints, push_to_hub) writes a loadable checkpoint too
    model.save_pretrained(tmp_path / "hf_saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_saved", trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)
    # and peft's default LoRA targets know the pruned model type (prune, then LoRA)
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2))
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in lora.named_parameters() if "lora_A" in n} == {"q_proj", "v_proj"}


def test_api_results_do_not_depend_on_train_mode(tmp_path, monkeypatch, tiny_model_dir):
    """Dropout on during the analysis would make scores and refit random: prune works in eval mode, restores the mode."""
    from transformers import AutoModelForCausalLM

    text = corpus(tmp_path)
    import numpy as np

    plans = []
    for train in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.3
        model.train(train)
        # a Path tokenizer; the second time, numpy numbers (as a sweep over np.linspace passes them)
        settings = {k: np.float64(v) if isinstance(v, float) else np.int64(v) for k, v in SETTINGS.items()} \
            if train else SETTINGS
        plans.append(gaqprune.prune(model, tiny_model_dir, data=text, progress=False, **settings))
        assert model.training is train
    assert plans[0] == plans[1]


def test_api_refuses_what_it_cannot_prune(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["down_proj"]))
    with pytest.raises(gaqprune.GaqpruneError, match="LoRA adapters"):
        gaqprune.prune(peft_model, tokenizer)
    with pytest.raises(gaqprune.GaqpruneError, match="LoRA adapters"):
        gaqprune.prune(peft_model.get_base_model(), tokenizer)
    # its perplexity is measured with the adapters (zero-initialised here: the base model's)
    assert gaqprune.perplexity(peft_model, tokenizer, seq_len=32, max_windows=2, progress=False) == pytest.approx(
        gaqprune.perplexity(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, seq_len=32, max_windows=2,
                            progress=False), rel=1e-6)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.inference_mode(), pytest.raises(gaqprune.GaqpruneError, match="outside torch.inference_mode"):
        gaqprune.prune(model, tokenizer)
    with pytest.raises(gaqprune.GaqpruneError, match="--data.max_seq_len 1024 exceeds the model's context of 512"):
        gaqprune.perplexity(model, tokenizer, seq_len=1024)


def test_embedded_model_is_recorded_by_its_source(embedded_tokenizer):

    from gaqprune.models.load import EMBEDDED_SOURCE
    from gaqprune.models.pruned import build_config

    model = tiny_llama(vocab_size=len(embedded_tokenizer))
    model.config._name_or_path = "embedded"  # what load_model("embedded") leaves (not its conversion cache path)
    assert build_config(model).gaqprune_base_model == EMBEDDED_SOURCE


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
    for bad, message in [({"num_examples": 2.5}, "--num_examples 2.5 is invalid; give an integer"),
                         ({"alpha": "1"}, "--alpha '1' is invalid; give a number"),
                         ({"pruning_strategy": "random"}, "--pruning_strategy 'random' is invalid"),
                         ({"max_seq_len": 1024}, "--max_seq_len 1024 exceeds the model's context of 512"),
                         ({"compensation_seq_len": 1024}, "--compensation_seq_len 1024 exceeds"),
                         ({"seed": -1}, "--seed -1 is invalid"),
                         ({"seed": "42"}, "gaqprune.prune\\(seed='42'\\) is invalid; give an integer"),
                         ({"progress": "no"}, "gaqprune.prune\\(progress='no'\\) is invalid; give True or False")]:
        with pytest.raises(gaqprune.GaqpruneError, match=message):
            gaqprune.prune(model, str(tiny_model_dir), **bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_api_arguments_of_the_wrong_kind_are_named(tiny_model_dir, tmp_path):
    # were TypeErrors from deep inside, AttributeErrors, or (tokenizer=None) a perplexity with the embedded model's
    # tokenizer: a wrong number for any other model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    small = tiny_llama(vocab_size=256)  # its vocabulary is smaller than the tokenizer's
    for call, message in [
        (lambda: gaqprune.perplexity(model, None), r"gaqprune.perplexity\(tokenizer=None\) is invalid"),
        (lambda: gaqprune.perplexity(model, tokenizer, seq_len="128"), r"perplexity\(seq_len='128'\) is invalid"),
        (lambda: gaqprune.perplexity(model, tokenizer, max_windows=2.5), r"max_windows=2.5\) is invalid; give an "
                                                                         "integer or None"),
        (lambda: gaqprune.perplexity(model, tokenizer, batch_size=None), r"batch_size=None\) is invalid"),
        (lambda: gaqprune.perplexity(small, tokenizer), "more than the model's vocabulary of 256"),
        (lambda: gaqprune.perplexity("embedded", tokenizer), r"perplexity\(model=...\) got a str"),
        (lambda: gaqprune.prune("embedded", tokenizer), r"prune\(model=...\) got a str"),
        (lambda: gaqprune.prune(model, None), r"prune\(tokenizer=None\) is invalid"),
        (lambda: gaqprune.save_pretrained(model, None, tmp_path / "m"), r"save_pretrained\(tokenizer=None\)"),
        (lambda: gaqprune.save_pretrained(model, tokenizer, None), r"save_pretrained\(out_dir=None\) is invalid"),
        (lambda: gaqprune.save_pretrained(model, tokenizer, 123), r"save_pretrained\(out_dir=123\) is invalid"),
        (lambda: gaqprune.perplexity(model, tokenizer.backend_tokenizer), r"perplexity\(tokenizer=...\) got a Tokenizer"),
    ]:
        with pytest.raises(gaqprune.GaqpruneError, match=message):
            call()
    assert not (tmp_path / "m").exists()
    import numpy as np  # numpy's bools and ints are what a sweep over np.arange hands in

    assert gaqprune.perplexity(model, tokenizer, seq_len=np.int64(32), max_windows=np.int64(2),
                               progress=np.False_) > 1


def test_a_target_the_structure_cannot_reach_is_said(tiny_model_dir, caplog):
    # --pruning_ratio 0.99 removed 91 % and said so only in the summary's numbers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plan = gaqprune.prune(model, str(tiny_model_dir), pruning_ratio=0.99, min_pruning_rate=0.99, max_pruning_rate=0.99,
                          layer_start=0, layer_end=4, importance_samples=2, importance_seq_len=32, num_examples=2,
                          max_seq_len=32, compensation="none", progress=False)
    achieved = plan["totals"]["achieved_ratio_selected"]
    assert achieved < 0.98
    assert f"removes {100 * achieved:.2f}% of the selected layers' prunable parameters, short of --pruning_ratio 0.99" \
        in caplog.text
