"""Foundation: model loading, windowing, perplexity, the CLI's validate subcommand."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import cli

from gaqprune.core.metrics import Perplexity, causal_nll, perplexity
from gaqprune.data.datamodule import LMDataModule
from gaqprune.data.text import make_windows, sample_windows, token_streams
from gaqprune.errors import GaqpruneError
from gaqprune.models.load import embedded_gguf_path, load_model, resolve_dtype


# -- windowing --------------------------------------------------------------------------------
def test_make_windows_drops_remainder():
    ids = torch.arange(1000)
    w = make_windows(ids, 128)
    assert w.shape == (7, 128)
    assert torch.equal(w[1], torch.arange(128, 256))


def test_sample_windows_is_seeded_and_refuses_too_many():
    ids = torch.arange(10 * 64)
    a, b = sample_windows(ids, 64, 4, seed=3, what="--num_examples"), sample_windows(ids, 64, 4, seed=3, what="x")
    assert torch.equal(a, b) and a.shape == (4, 64)
    assert len({int(r[0]) for r in a}) == 4  # distinct windows
    with pytest.raises(GaqpruneError, match="--num_examples 11 asks for more windows"):
        sample_windows(ids, 64, 11, seed=3, what="--num_examples")


def test_local_text_file_split_never_overlaps(tmp_path, embedded_tokenizer):
    f = tmp_path / "doc.txt"
    f.write_text(" ".join(f"word{i}" for i in range(3000)))
    s = token_streams(str(f), embedded_tokenizer, eval_fraction=0.25)
    total = len(s["train"]) + len(s["eval"])
    assert abs(len(s["eval"]) / total - 0.25) < 0.01
    whole = token_streams(str(f), embedded_tokenizer, eval_fraction=1.0)
    assert torch.equal(torch.cat([s["train"], s["eval"]]), whole["eval"])


def test_one_file_named_two_ways_is_one_source(tmp_path, monkeypatch):
    # calibration from an absolute path, evaluation from a relative one: still only the file's tail is evaluated
    f = tmp_path / "doc.txt"
    f.write_text(" ".join(f"word{i}" for i in range(3000)))
    monkeypatch.chdir(tmp_path)
    dm = LMDataModule(source=str(f), eval_source="./doc.txt", max_seq_len=32, eval_fraction=0.25)
    calib = {tuple(w.tolist()) for w in dm.calibration_windows(20, 32)}
    evaluation = {tuple(w.tolist()) for w in dm.eval_windows()}
    assert calib and evaluation and not calib & evaluation
    assert len(dm.streams("./doc.txt")["eval"]) == len(dm.streams(str(f))["eval"])
    # a different file given as eval_source is evaluated whole
    g = tmp_path / "other.txt"
    g.write_text(" ".join(f"token{i}" for i in range(3000)))
    dm = LMDataModule(source=str(f), eval_source="other.txt", max_seq_len=32, eval_fraction=0.25)
    assert len(dm.streams("other.txt")["train"]) == 0 and len(dm.streams("other.txt")["eval"]) > 0


def test_ptb_is_evaluated_on_its_validation_split(monkeypatch):
    # LLM-Pruner's PTB perplexity is on the validation split (wikitext2: test), so published numbers compare
    import datasets

    from gaqprune.data.text import source_texts

    class Split(dict):
        column_names = ["sentence"]

    splits = {name: Split(sentence=[f"{name} a", f"{name} b"]) for name in ("train", "validation", "test")}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: splits)
    assert source_texts("ptb") == ("train a\n\ntrain b", "validation a\n\nvalidation b")


def test_c4_is_a_fixed_draw_of_training_documents_and_the_papers_validation_documents(monkeypatch):
    # tokenizing c4's whole shards took minutes and tens of GB; its perplexity in the papers is the first 1,100
    # validation documents joined by spaces (SparseGPT, Wanda)
    import datasets

    from gaqprune.data.text import C4, source_texts

    splits = {"train": datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(C4["train_docs"] + 5000)]}),
              "validation": datasets.Dataset.from_dict({"text": [f"v{i}" for i in range(3000)]})}
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or splits)
    train, evaluation = source_texts("c4")
    assert calls[0][1]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz",
                                         "validation": "en/c4-validation.00000-of-00008.json.gz"}
    drawn = [int(doc[1:]) for doc in train.split("\n\n")]
    assert len(set(drawn)) == C4["train_docs"] and drawn == sorted(drawn)  # distinct documents, in shard order
    assert drawn[-1] > C4["train_docs"]  # drawn from the whole shard, not its head
    assert evaluation == " ".join(f"v{i}" for i in range(1100))
    assert source_texts("c4") == (train, evaluation)  # the same draw every time (the token cache relies on it)


def test_a_large_hub_dataset_is_a_fixed_draw_and_its_test_split_is_evaluated_whole(monkeypatch):
    # any hub id: a train split of millions of documents would be tokenized whole (hours, tens of GB)
    import datasets

    from gaqprune.data.text import C4, _source_key, source_texts

    n_train = C4["train_docs"] + 3000
    splits = {"train": datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(n_train)]}),
              "test": datasets.Dataset.from_dict({"text": [f"e{i}" for i in range(3000)]})}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: splits)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda *a, **k: list(splits))
    train, evaluation = source_texts("someone/big-corpus")
    drawn = [int(doc[1:]) for doc in train.split("\n\n")]
    assert len(set(drawn)) == C4["train_docs"] and drawn == sorted(drawn) and drawn[-1] > C4["train_docs"]
    assert evaluation == "\n\n".join(f"e{i}" for i in range(3000))  # the evaluation protocol is unchanged
    assert source_texts("someone/big-corpus") == (train, evaluation)
    assert str(C4["train_docs"]) in _source_key("someone/big-corpus")  # token caches made before the cut are not reused
    # a small one is taken whole
    splits["train"] = splits["train"].select(range(100))
    assert source_texts("someone/small-corpus")[0] == "\n\n".join(f"t{i}" for i in range(100))


def test_padded_eval_sampler_counts_every_window_once():
    from torch.utils.data import DataLoader

    from gaqprune.data.datamodule import EvalWindows, PaddedEvalSampler

    windows = torch.arange(5 * 4).reshape(5, 4)
    data = EvalWindows(windows)
    seen, sizes = [], []
    for rank in range(3):  # 5 windows on 3 ranks: 2 each, one of them padding
        batches = list(DataLoader(data, batch_size=2, sampler=PaddedEvalSampler(data, 3, rank)))
        sizes.append(sum(len(w) for w, _ in batches))
        seen += [int(w[0]) // 4 for ws, real in batches for w, r in zip(ws, real) if r]
    assert sizes == [2, 2, 2] and sorted(seen) == [0, 1, 2, 3, 4]


def test_embedded_corpus_split_is_disjoint():
    from gaqprune.data.corpus import embedded_articles
    from gaqprune.models.load import cache_root

    parts = embedded_articles(cache_root())
    assert len(parts["train"]) > 80 and len(parts["eval"]) >= 9
    assert not set(parts["train"]) & set(parts["eval"])


# -- perplexity -------------------------------------------------------------------------------
def test_perplexity_matches_hand_computation(tiny_model):
    windows = torch.randint(3, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = tiny_model(windows).logits.double()
    logp = torch.log_softmax(logits, dim=-1)
    nll = [-logp[b, t, windows[b, t + 1]].item() for b in range(3) for t in range(15)]
    expected = math.exp(sum(nll) / len(nll))
    assert perplexity(tiny_model, windows, batch_size=2) == pytest.approx(expected, rel=1e-5)
    # chunked LM head (chunk of 7 tokens) gives the same sum
    nll_sum, count = causal_nll(tiny_model, windows, chunk_tokens=7)
    assert int(count) == 45 and nll_sum.item() == pytest.approx(sum(nll), rel=1e-5)


def test_perplexity_metric_accumulates_like_one_batch():
    m = Perplexity()
    m.update(torch.tensor(10.0), torch.tensor(4))
    m.update(torch.tensor(2.0), torch.tensor(4))
    assert m.compute().item() == pytest.approx(math.exp(12.0 / 8))


def test_loss_is_differentiable_through_chunks(tiny_model):
    windows = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    nll, count = causal_nll(tiny_model, windows, chunk_tokens=5)
    (nll / count).backward()
    ref = tiny_model(windows, labels=windows).loss
    assert (nll / count).item() == pytest.approx(ref.item(), rel=1e-5)
    assert tiny_model.lm_head.weight.grad.abs().sum() > 0


# -- loading ----------------------------------------------------------------------------------
def test_load_hf_dir_and_dtype(tiny_model_dir):
    model = load_model(str(tiny_model_dir), dtype="bf16")
    assert model.dtype == torch.bfloat16 and len(model.model.layers) == 4
    assert resolve_dtype("fp16") == torch.float16
    with pytest.raises(GaqpruneError, match="--dtype 'int3'"):
        resolve_dtype("int3")


def test_load_embedded_and_gguf_give_the_same_model():
    embedded = load_model("embedded")
    gguf = load_model(str(embedded_gguf_path()))
    cfg = embedded.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert sum(p.numel() for p in embedded.parameters()) == 134_515_008
    assert torch.equal(embedded.model.layers[5].mlp.up_proj.weight, gguf.model.layers[5].mlp.up_proj.weight)


def test_missing_and_non_llama_models_are_refused(tmp_path):
    with pytest.raises(GaqpruneError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(GaqpruneError, match="is a 'gpt2' model; gaqprune prunes Llama-family"):
        load_model(str(tmp_path / "gpt2"))


# -- CLI --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_validate_cli_matches_plain_transformers_loop(tmp_path):
    from gaqprune.cli.main import run

    cli = run(["validate", "--data.max_eval_windows", "24", "--trainer.logger", "false",
               "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    ppl_cli = float(cli.trainer.callback_metrics["val_ppl"])
    # independent loop: HF's own loss over the same windows, weighted by predicted tokens
    model = load_model("embedded")
    windows = LMDataModule().eval_windows()[:24]
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows.split(4):
            loss = model(input_ids=w, labels=w).loss.item()
            total += loss * w.shape[0] * (w.shape[1] - 1)
            count += w.shape[0] * (w.shape[1] - 1)
    ppl_ref = math.exp(total / count)
    assert abs(ppl_cli - ppl_ref) / ppl_ref < 0.005
    assert 15 < ppl_cli < 80  # a real pretrained model on Wikipedia text


def test_validate_cli_on_local_text_file(tmp_path, tiny_model_dir):
    f = tmp_path / "notes.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    r = cli("validate", "--base_model", str(tiny_model_dir), "--data.source", str(f), "--data.max_seq_len", "64",
                "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "val_ppl" in r.stdout


@pytest.mark.slow
def test_validate_under_ddp_counts_each_window_once(tmp_path, tiny_model_dir):
    # 3 windows on 2 ranks: the sampler pads rank 1 with a copy of window 0, which must not count
    from gaqprune.data.datamodule import LMDataModule as DM

    args = ["validate", "--base_model", str(tiny_model_dir), "--data.max_eval_windows", "3", "--data.max_seq_len", "32",
            "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ppl_ddp = float(re.search(r"val_ppl\W+([0-9.]+)", r.stdout).group(1))
    windows = DM(tokenizer=str(tiny_model_dir), max_seq_len=32, max_eval_windows=3).eval_windows()
    assert windows.shape == (3, 32)
    expected = perplexity(load_model(str(tiny_model_dir)), windows)
    assert ppl_ddp == pytest.approx(expected, rel=1e-5)
    assert ppl_ddp != pytest.approx(perplexity(load_model(str(tiny_model_dir)), windows[[0, 1, 2, 0]]), rel=1e-5)


@pytest.mark.parametrize("case", ["missing_model", "empty_file", "non_llama"])
def test_cli_bad_inputs_fail_in_one_line(tmp_path, tiny_model_dir, case):
    args = ["validate", "--trainer.logger", "false"]
    if case == "missing_model":
        args += ["--base_model", str(tmp_path / "missing")]
        expect = "does not exist"
    elif case == "empty_file":
        (tmp_path / "empty.txt").write_text("  \n")
        args += ["--base_model", str(tiny_model_dir), "--data.source", str(tmp_path / "empty.txt")]
        expect = "is empty"
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "g")
        args += ["--base_model", str(tmp_path / "g")]
        expect = "gaqprune prunes Llama-family"
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("gaqprune: error:")]
    assert len(errors) == 1 and expect in errors[0]
    assert r.stderr.strip().splitlines() == errors  # nothing else: no warning, no log line
