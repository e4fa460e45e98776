"""``--offload cpu|disk``: the decoder layers' weights stay off the device and come in one layer at a time, and every
stage computes exactly what it computes without offload (the same plan, the same weights, the same perplexities, bit
for bit: each layer runs the same operations on the same inputs, only the loop order over layers and micro-batches
changes, and micro-batches are independent)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ARGS, check_bare, cli, corpus, load_bare, random_ids, spread, tiny_family, tiny_llama, tiny_llama_config

from gaqprune.core.importance import compute_layer_importance, model_fingerprint
from gaqprune.core.layers import offload_store
from gaqprune.core.metrics import perplexity
from gaqprune.core.plan import apply_plan, build_plan
from gaqprune.models import offload
from gaqprune.models.load import load_model
from gaqprune.models.pruned import load_pruned, save_pretrained_model
from gaqprune.settings import PruneSettings

SETTINGS = PruneSettings(pruning_ratio=0.4, layer_start=0, layer_end=6, min_pruning_rate=0.1, max_pruning_rate=0.9,
                         whole_layer_rate=0.8, compensation="residual", num_examples=6, max_seq_len=32,
                         allocation="fixed")
def tied(layers: int = 6):
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(layers=layers)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return spread(LlamaForCausalLM(config))


BUILDERS = {"llama": lambda: tiny_llama(layers=6), "tied": tied, "qwen2": lambda: tiny_family("qwen2", layers=6)}


class Residency:
    """Counts layer reads and the most layers ever resident at once."""

    def __init__(self, monkeypatch):
        self.now = self.most = self.reads = 0
        original = offload.OffloadStore.resident
        counter = self

        def resident(store, layer, keep=False):
            class Tracked:
                def __enter__(self):
                    self.inner = original(store, layer, keep)
                    out = self.inner.__enter__()
                    counter.reads += 1
                    counter.now += 1
                    counter.most = max(counter.most, counter.now)
                    return out

                def __exit__(self, *exc):
                    counter.now -= 1
                    return self.inner.__exit__(*exc)

            return Tracked()

        monkeypatch.setattr(offload.OffloadStore, "resident", resident)


def run_stages(model, windows, eval_windows, reads=None) -> dict:
    out = {"fingerprint": model_fingerprint(model), "ppl": perplexity(model, eval_windows, 2)}
    for method in ("removal", "activation", "block_influence"):
        before = reads.reads if reads else 0
        out[method] = dict(compute_layer_importance(model, windows, method, progress=False, batch_size=2))
        out[f"{method}_reads"] = (reads.reads - before) if reads else None
    out["plan"] = build_plan(model, out["removal"], windows, SETTINGS, progress=False)
    apply_plan(model, out["plan"], windows)
    out["ppl_after"] = perplexity(model, eval_windows, 2)
    return out


def saved_weights(model, folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if offload_store(model) is None:
        return {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"
                or not model.config.tie_word_embeddings}
    folder.mkdir()
    offload.layer_shard_writer(model)(folder)
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_offloaded_stages_compute_exactly_what_the_model_in_memory_computes(kind, tmp_path, monkeypatch):
    folder = tmp_path / "dense"
    BUILDERS[kind]().save_pretrained(folder)
    windows, eval_windows = random_ids(6, 32, 0), random_ids(5, 32, 1)
    reference = run_stages(load_model(str(folder)), windows, eval_windows)
    dense = load_model(str(folder))
    apply_plan(dense, reference["plan"], windows)
    expected_weights = saved_weights(dense, None)
    assert reference["plan"]["removed_layers"], "the plan should remove a whole layer too"
    reads = Residency(monkeypatch)
    for mode in ("cpu", "disk"):
        model = offload.load_offloaded(str(folder), "float32", mode)
        assert all(p.is_meta for p in model.model.layers.parameters())  # no layer is held outside the store
        got = run_stages(model, windows, eval_windows, reads)
        for key in ("fingerprint", "ppl", "removal", "activation", "block_influence", "plan", "ppl_after"):
            assert got[key] == reference[key], (mode, key)
        weights = saved_weights(model, tmp_path / f"saved-{mode}")
        assert sorted(weights) == sorted(expected_weights)
        assert all(torch.equal(weights[k], expected_weights[k]) for k in weights), mode
        # one layer at a time; layer importance reads every layer once (the removal streams advance together)
        assert reads.most == 1
        assert got["removal_reads"] == got["activation_reads"] == got["block_influence_reads"] == 6
        assert all(p.is_meta for p in model.model.layers.parameters())


def test_a_pruned_checkpoint_is_offloaded_too(tmp_path):
    model = tiny_llama(layers=6)
    windows = random_ids(6, 32, 0)
    apply_plan(model, build_plan(model, {i: 1.0 + i for i in range(6)}, windows, SETTINGS, progress=False), windows)
    folder = save_pretrained_model(model, None, tmp_path / "pruned")
    eval_windows = random_ids(5, 32, 1)
    expected = perplexity(load_pruned(folder), eval_windows, 2)
    assert offload.load_offloaded(str(folder), "float32", "disk").__class__ is load_pruned(folder).__class__
    assert perplexity(offload.load_offloaded(str(folder), "float32", "disk"), eval_windows, 2) == expected


def test_a_cast_to_another_dtype_is_the_one_from_pretrained_makes(tmp_path):
    folder = tmp_path / "dense"
    tiny_llama().save_pretrained(folder)
    eval_windows = random_ids(4, 16, 1)
    expected = perplexity(load_model(str(folder), dtype="bfloat16"), eval_windows, 2)
    assert perplexity(offload.load_offloaded(str(folder), "bfloat16", "disk"), eval_windows, 2) == expected


def test_prune_with_disk_offload_saves_the_same_model_and_it_loads_in_stock_transformers(tmp_path, tiny_model_dir):
    text = corpus(tmp_path)
    runs = {}
    for mode in ("none", "disk"):
        result = cli("prune", "--base_model", tiny_model_dir, *ARGS, "--data.source", text, "--save_model", "true",
                     "--test_after_prune", "true", "--offload", mode, "--save_ckpt_log_name", f"run_{mode}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[mode] = tmp_path / "prune_log" / f"run_{mode}"
    plans = [json.loads((runs[m] / "pruning_plan.json").read_text()) for m in ("none", "disk")]
    assert plans[0] == plans[1]
    metrics = [json.loads((runs[m] / "metrics.json").read_text()) for m in ("none", "disk")]
    assert metrics[0]["ppl_before"] == metrics[1]["ppl_before"] and metrics[0]["ppl_after"] == metrics[1]["ppl_after"]
    assert not any(p.name.startswith(".gaqprune-offload") for p in runs["disk"].iterdir())  # its scratch is gone
    shards = sorted(p.name for p in (runs["disk"] / "model").glob("*.safetensors"))
    assert len(shards) == 1 + json.loads((runs["disk"] / "model" / "config.json").read_text())["num_hidden_layers"]
    a, b = load_pruned(runs["none"] / "model"), load_pruned(runs["disk"] / "model")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    ids = random_ids(2, 16, 3, vocab_size=a.config.vocab_size)
    with torch.no_grad():
        expected = a(ids).logits
    out = load_bare(runs["disk"] / "model", ids, tmp_path)
    check_bare(out)
    assert torch.equal(out["logits"], expected)


def test_the_allocation_search_scores_an_offloaded_model_exactly(tmp_path, monkeypatch):
    from dataclasses import replace

    folder = tmp_path / "dense"
    tiny_llama(layers=6).save_pretrained(folder)
    windows, fit = random_ids(6, 32, 0), random_ids(8, 32, 2)
    settings = replace(SETTINGS, allocation="search", whole_layer_rate=None)
    importance = {i: 1.0 + (i * 7) % 5 for i in range(6)}
    reference = build_plan(load_model(str(folder)), importance, windows, settings, progress=False, fit_windows=fit)
    assert len(reference["search"]["candidates"]) > 1
    reads = Residency(monkeypatch)
    model = offload.load_offloaded(str(folder), "float32", "disk")
    got = build_plan(model, importance, windows, settings, progress=False, fit_windows=fit)
    assert got == reference
    assert reads.most == 1 and all(p.is_meta for p in model.model.layers.parameters())
