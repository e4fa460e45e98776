"""Layer importance: cached removal equals the naive one, sane one-pass methods, the reusable record, the plot."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama

from gaqprune.core.importance import compute_layer_importance, model_fingerprint, removal_importance_naive
from gaqprune.errors import GaqpruneError
from gaqprune.run.records import importance_record, load_importance, save_importance
from gaqprune.run.report import plot_layer_importance


def _assert_close(cached: dict, naive: dict, rel: float = 1e-4) -> None:
    assert list(cached) == list(naive)
    # Relative to the perplexities involved: a score near zero is a difference of two large numbers.
    scale = naive.dense_perplexity
    for layer in naive:
        assert abs(cached[layer] - naive[layer]) <= rel * (abs(naive[layer]) + scale), (layer, cached[layer], naive[layer])
    assert cached.dense_perplexity == pytest.approx(naive.dense_perplexity, rel=rel)


def _identity_layer(model, layer: int):
    """Zero the projections that write into the residual stream: the layer then returns its input."""
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight.zero_()
        model.model.layers[layer].mlp.down_proj.weight.zero_()
    return model


def _meta(model, scores, **kw) -> dict:
    meta = {"base_model": "tiny", "model_fingerprint": model_fingerprint(model), "num_layers": len(model.model.layers),
            "method": "removal", "samples": 6, "seq_len": 32, "data_source": "random", "layer_start": 0,
            "layer_end": None, "seed": 0, "created": "2026-01-01T00:00:00Z"}
    meta.update(kw)
    return meta


def test_cached_removal_equals_naive_tiny(tiny_model, random_windows):
    cached = compute_layer_importance(tiny_model, random_windows, "removal", batch_size=4, progress=False)
    naive = removal_importance_naive(tiny_model, random_windows, batch_size=4)
    assert sorted(cached) == [0, 1, 2, 3]
    _assert_close(cached, naive)
    # Skipping layers of a random model changes perplexity noticeably: the comparison is not 0 == 0.
    assert max(abs(v) for v in cached.values()) > 0.5
    assert cached.dense_perplexity > 100


def test_cached_removal_does_not_depend_on_batching(tiny_model, random_windows):
    a = compute_layer_importance(tiny_model, random_windows, batch_size=6, progress=False)
    b = compute_layer_importance(tiny_model, random_windows, batch_size=4, progress=False)
    for layer in a:
        assert a[layer] == pytest.approx(b[layer], rel=1e-4, abs=1e-4 * a.dense_perplexity)


def test_removal_layer_range_and_naive_range(tiny_model, random_windows):
    full = compute_layer_importance(tiny_model, random_windows, progress=False)
    part = compute_layer_importance(tiny_model, random_windows, layer_start=1, layer_end=3, progress=False)
    naive = removal_importance_naive(tiny_model, random_windows, layer_start=1, layer_end=3)
    assert sorted(part) == [1, 2] and sorted(naive) == [1, 2]
    for layer in (1, 2):
        assert part[layer] == full[layer]  # same inputs, same operations
    _assert_close(part, naive)
    for method in ("activation", "block_influence"):
        assert sorted(compute_layer_importance(tiny_model, random_windows, method, 2, 4, progress=False)) == [2, 3]
    with pytest.raises(GaqpruneError, match="outside the model's 4 layers"):
        compute_layer_importance(tiny_model, random_windows, layer_start=2, layer_end=9, progress=False)
    with pytest.raises(GaqpruneError, match="--importance_method 'magnitude'"):
        compute_layer_importance(tiny_model, random_windows, "magnitude", progress=False)


def test_eager_attention_and_uneven_batches(random_windows):
    model = tiny_llama(attn_implementation="eager")  # an explicit causal mask goes through the layer kwargs
    cached = compute_layer_importance(model, random_windows[:5], batch_size=2, progress=False)
    _assert_close(cached, removal_importance_naive(model, random_windows[:5], batch_size=2))


def test_micro_batches_of_one_shape_share_one_copy_of_the_layer_kwargs(random_windows):
    from gaqprune.core.layers import batch_layer_inputs, micro_batches

    model = tiny_llama(attn_implementation="eager")
    batches = micro_batches(random_windows[:5], 2, "cpu")
    assert [tuple(b.shape) for b in batches] == [(2, 32), (2, 32), (1, 32)]
    inputs = batch_layer_inputs(model, batches)
    assert [tuple(h.shape) for h, _ in inputs] == [(2, 32, 64), (2, 32, 64), (1, 32, 64)]
    assert inputs[0][1] is inputs[1][1] and inputs[2][1] is not inputs[0][1]
    mask = inputs[0][1]["attention_mask"]  # eager attention: an explicit mask, shared by the two full batches
    assert mask is not None and mask.shape[-2:] == (32, 32)
    for (hidden, kwargs), ids in zip(inputs, batches):  # layer 0 on the captured inputs = layer 0 in the model
        assert torch.equal(model.model.layers[0](hidden, **kwargs), _hidden_after_layer0(model, ids))


def _hidden_after_layer0(model, ids):
    with torch.no_grad():
        return model.model(input_ids=ids, output_hidden_states=True).hidden_states[1]


def test_identity_layer_scores_zero(random_windows):
    model = _identity_layer(tiny_llama(), 2)
    removal = compute_layer_importance(model, random_windows, progress=False)
    naive = removal_importance_naive(model, random_windows)
    assert removal[2] == 0.0  # the skipped layer added exactly zero to the stream
    assert abs(naive[2]) < 1e-4 * naive.dense_perplexity
    assert min(abs(removal[layer]) for layer in (0, 1, 3)) > 1e-3
    influence = compute_layer_importance(model, random_windows, "block_influence", progress=False)
    activation = compute_layer_importance(model, random_windows, "activation", progress=False)
    assert influence[2] == pytest.approx(0.0, abs=1e-6)
    assert activation[2] == 0.0
    assert min(influence[layer] for layer in (0, 1, 3)) > 1e-3
    assert min(activation[layer] for layer in (0, 1, 3)) > 1e-4


def test_one_pass_methods_values(tiny_model, random_windows):
    influence = compute_layer_importance(tiny_model, random_windows, "block_influence", progress=False)
    activation = compute_layer_importance(tiny_model, random_windows, "activation", progress=False)
    assert sorted(influence) == sorted(activation) == [0, 1, 2, 3]
    assert all(0.0 < v <= 2.0 for v in influence.values())
    assert all(v > 0.0 for v in activation.values())
    assert influence.dense_perplexity is None

    # Recompute layer 1 by hand from the model's own hidden states.
    with torch.no_grad():
        out = tiny_model(input_ids=random_windows, output_hidden_states=True)
    x, y = out.hidden_states[1].double(), out.hidden_states[2].double()
    assert influence[1] == pytest.approx((1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).mean().item(), rel=1e-5)
    assert activation[1] == pytest.approx((y - x).abs().mean().item(), rel=1e-5)


def test_scores_are_bit_identical_across_runs(tiny_model, random_windows):
    for method in ("removal", "activation", "block_influence"):
        a = compute_layer_importance(tiny_model, random_windows, method, batch_size=4, progress=False)
        b = compute_layer_importance(tiny_model, random_windows.clone(), method, batch_size=4, progress=False)
        assert a == b and all(type(v) is float for v in a.values())


def test_bf16_on_cpu(random_windows):
    model = tiny_llama().to(torch.bfloat16)
    cached = compute_layer_importance(model, random_windows, batch_size=4, progress=False)
    naive = removal_importance_naive(model, random_windows, batch_size=4)
    _assert_close(cached, naive)
    fp32 = compute_layer_importance(tiny_llama(), random_windows, progress=False)
    assert cached.dense_perplexity == pytest.approx(fp32.dense_perplexity, rel=0.05)
    influence = compute_layer_importance(model, random_windows, "block_influence", progress=False)
    assert all(0.0 < v <= 2.0 for v in influence.values())


def test_fingerprint_tracks_weights_dtype_and_shapes(tiny_model):
    fp = model_fingerprint(tiny_model)
    assert fp == model_fingerprint(tiny_llama()) and len(fp) == 32
    assert fp != model_fingerprint(tiny_llama(seed=1))
    assert fp != model_fingerprint(tiny_llama().to(torch.bfloat16))
    assert fp != model_fingerprint(tiny_llama(layers=3))
    changed = tiny_llama()
    with torch.no_grad():
        changed.model.layers[3].mlp.up_proj.weight.add_(1e-3)  # e.g. a merged LoRA update
    assert fp != model_fingerprint(changed)


def test_record_round_trip_is_byte_deterministic(tiny_model, random_windows, tmp_path):
    scores = compute_layer_importance(tiny_model, random_windows, progress=False)
    record = importance_record(scores, _meta(tiny_model, scores))
    assert record["scores"] == {str(k): v for k, v in scores.items()}
    assert record["dense_perplexity"] == scores.dense_perplexity and record["layer_end"] == 4
    assert record["gaqprune_version"] and record["created"] == "2026-01-01T00:00:00Z"
    save_importance(tmp_path / "a.json", record)
    again = compute_layer_importance(tiny_model, random_windows, progress=False)
    save_importance(tmp_path / "b.json", importance_record(again, _meta(tiny_model, again)))
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    # Without a given timestamp only "created" differs between two records of the same inputs.
    meta = _meta(tiny_model, scores)
    del meta["created"]
    fresh = importance_record(scores, meta)
    assert {k for k in record if record[k] != fresh[k]} <= {"created"}

    expected = {"num_layers": 4, "model_fingerprint": model_fingerprint(tiny_model), "layer_start": 1, "layer_end": 3}
    loaded = load_importance(tmp_path / "a.json", expected)
    assert loaded == {1: scores[1], 2: scores[2]}  # bit-exact floats, only the requested range
    assert load_importance(tmp_path / "a.json", {}) == dict(scores)
    assert loaded.method == "removal" and loaded.dense_perplexity == scores.dense_perplexity


def test_load_refuses_what_does_not_fit(tiny_model, tmp_path):
    scores = {1: 0.5, 2: 2.5}
    path = tmp_path / "layer_importance_config.json"
    save_importance(path, importance_record(scores, _meta(tiny_model, scores, layer_start=1, layer_end=3)))
    fp = model_fingerprint(tiny_model)

    with pytest.raises(GaqpruneError) as err:
        load_importance(path, {"model_fingerprint": model_fingerprint(tiny_llama(seed=1)), "num_layers": 4})
    msg = str(err.value)
    assert "--importance_config" in msg and str(path) in msg and "model_fingerprint differs" in msg
    assert fp in msg and "\n" not in msg

    with pytest.raises(GaqpruneError, match="num_layers differs: found 4, expected 32"):
        load_importance(path, {"num_layers": 32, "model_fingerprint": fp})
    with pytest.raises(GaqpruneError, match=r"expected layers 0\.\.3 \(missing \[0, 3\]\)"):
        load_importance(path, {"num_layers": 4, "model_fingerprint": fp})
    with pytest.raises(GaqpruneError, match="method differs: found 'removal', expected 'activation'"):
        load_importance(path, {"method": "activation"})
    assert load_importance(path, {"num_layers": 4, "layer_start": 1, "layer_end": 3}) == scores

    with pytest.raises(GaqpruneError, match="--importance_config .*missing.json.*file not found"):
        load_importance(tmp_path / "missing.json", {})
    broken = tmp_path / "broken.json"
    broken.write_text(path.read_text()[:-40])
    with pytest.raises(GaqpruneError, match="is not valid JSON"):
        load_importance(broken, {})
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rates": [0.1]}))
    with pytest.raises(GaqpruneError, match="is not a gaqprune layer importance record"):
        load_importance(other, {})
    record = json.loads(path.read_text())
    record["scores"]["1"] = "high"
    other.write_text(json.dumps(record))
    with pytest.raises(GaqpruneError, match="corrupted scores"):
        load_importance(other, {})
    record = json.loads(path.read_text())
    record["format_version"] = 99  # a newer gaqprune's record: its fields may mean something else
    other.write_text(json.dumps(record))
    with pytest.raises(GaqpruneError, match="has format_version 99; this gaqprune reads records up to version 1"):
        load_importance(other, {})


def test_plot(tmp_path):
    path = tmp_path / "plots" / "layer_importance.png"
    plot_layer_importance({0: 68000.0, 1: 900.0, 2: 3.0, 3: -0.5}, path, "removal")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    plot_layer_importance({0: 0.2, 1: 0.3}, tmp_path / "linear.png", "block_influence", log_scale=False)
    assert (tmp_path / "linear.png").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


@pytest.mark.slow
def test_embedded_model_cached_equals_naive():
    from gaqprune.data.datamodule import LMDataModule
    from gaqprune.models.load import load_model

    model = load_model("embedded")
    windows = LMDataModule().calibration_windows(4, 64, what="--importance_samples")
    cached = compute_layer_importance(model, windows, layer_start=10, layer_end=13, batch_size=4, progress=False)
    naive = removal_importance_naive(model, windows, layer_start=10, layer_end=13, batch_size=4)
    assert sorted(cached) == [10, 11, 12]
    _assert_close(cached, naive)
    # A real pretrained model: finite dense perplexity on Wikipedia text, and skipping a layer hurts.
    assert 5 < cached.dense_perplexity < 500
    assert max(cached.values()) > 0
    influence = compute_layer_importance(model, windows, "block_influence", 10, 13, progress=False)
    assert all(0.0 < v < 1.0 for v in influence.values())
