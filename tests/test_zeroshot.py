"""Zero-shot task accuracy through lm-evaluation-harness (``gaqprune.run.zeroshot``).

Refusals come before any model is touched and in one line; the shipped task is a deterministic function of the
embedded corpus's evaluation articles; ``evaluate`` runs lm-eval on dense, pruned and LoRA models in hand (that it
gives exactly the number lm-eval's own command line reports, on the embedded model: ``tests/test_tasks_cli.py``).
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from helpers import prune, tiny_llama

from gaqprune.errors import GaqpruneError
from gaqprune.run import zeroshot
from gaqprune.run.zeroshot import WIKI_NEXT, ZeroShotSettings, check_settings

needs_lm_eval = pytest.mark.skipif(__import__("importlib").util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install -e '.[eval]')")


def refused(settings: ZeroShotSettings) -> str:
    with pytest.raises(GaqpruneError) as err:
        check_settings(settings)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.fixture
def empty_hf_caches(tmp_path, monkeypatch):
    """No dataset has been downloaded: both Hugging Face caches point at empty folders."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return tmp_path


def local_task(folder: Path, name: str = "tiny_local", docs: int = 3) -> Path:
    """A task of one's own for --task_path: ``docs`` two-choice documents in a JSONL file next to its YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"q": f"Two plus {i} is", "choices": [f"{2 + i}.", "a fish."], "label": 0} for i in range(docs)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(folder / 'data.jsonl'))}\n"
        f"  cache_dir: {json.dumps(str(folder / 'hf'))}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n')
    return folder


# ------------------------------------------------------------------------------------------------- refusals


def test_a_limit_below_one_or_not_whole_is_refused_first():
    for limit in (0, -3, 2.5, True):
        message = refused(ZeroShotSettings(tasks="no_such_task_at_all", eval_limit=limit))
        assert message.startswith(f"--eval_limit {limit!r} must be a whole number")
    assert check_settings(ZeroShotSettings()) == []
    assert refused(ZeroShotSettings(eval_limit=5)).startswith("--eval_limit is only used with --tasks")
    assert refused(ZeroShotSettings(tasks="boolq,,piqa")).startswith("--tasks 'boolq,,piqa' has an empty name")


def test_missing_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets where it is not installed
    message = refused(ZeroShotSettings(tasks="commonsense"))
    assert "lm-evaluation-harness, which is not installed" in message and 'pip install -e ".[eval]"' in message


@needs_lm_eval
def test_unknown_task_is_refused_with_close_matches_before_the_model_is_touched():
    message = refused(ZeroShotSettings(tasks="piqa,hellaswg"))
    assert message.startswith("--tasks 'hellaswg' is not an lm-eval task, group or tag;")
    assert "close matches: hellaswag" in message and "presets: commonsense" in message
    assert WIKI_NEXT in message and "--task_path FOLDER" in message
    with pytest.raises(GaqpruneError, match="'hellaswg' is not an lm-eval task"):
        zeroshot.evaluate(object(), object(), ZeroShotSettings(tasks="hellaswg"))  # an object() has no .training


@needs_lm_eval
def test_unreadable_or_empty_task_folders_are_refused(tmp_path):
    (tmp_path / "file.yaml").write_text("task: x\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.yaml").write_text("just: [a, list\n")  # lm-eval would skip it without a word
    cases = {str(tmp_path / "missing"): "does not exist", str(tmp_path / "file.yaml"): "is a file, not a folder",
             str(tmp_path / "empty"): "holds no .yaml file", str(tmp_path / "junk"): "lm-eval finds no task in its 1"}
    for folder, words in cases.items():
        message = refused(ZeroShotSettings(tasks="boolq", task_path=folder))
        assert message.startswith(f"--task_path {folder!r}") and words in message
    if os.geteuid() != 0:  # root reads any folder
        locked = tmp_path / "locked"
        local_task(locked)
        locked.chmod(0)
        try:
            assert "cannot be read" in refused(ZeroShotSettings(tasks="tiny_local", task_path=str(locked)))
        finally:
            locked.chmod(0o755)


@needs_lm_eval
def test_a_hub_task_offline_is_refused_unless_its_dataset_is_cached(empty_hf_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = refused(ZeroShotSettings(tasks="arc_easy"))
    assert message.startswith("--tasks 'arc_easy' reads the hub dataset allenai/ai2_arc (ARC-Easy), which is not in")
    assert "HF_HUB_OFFLINE is set" in message and WIKI_NEXT in message
    # a preset and a tag are checked task by task
    assert refused(ZeroShotSettings(tasks="commonsense")).startswith("--tasks 'boolq' reads the hub dataset aps/super_glue")
    assert " (in 'ai2_arc') " in refused(ZeroShotSettings(tasks="ai2_arc"))
    # downloaded once: accepted offline
    (empty_hf_caches / "hub" / "datasets--allenai--ai2_arc" / "snapshots" / "0123abc").mkdir(parents=True)
    assert check_settings(ZeroShotSettings(tasks="arc_easy,arc_challenge,arc_easy")) == ["arc_easy", "arc_challenge"]


@needs_lm_eval
def test_without_offline_flags_an_uncached_hub_task_needs_the_network(empty_hf_caches, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    asked = []
    monkeypatch.setattr(zeroshot, "hub_reachable", lambda: asked.append(1) or False)
    assert "and the hub cannot be reached" in refused(ZeroShotSettings(tasks="piqa"))
    monkeypatch.setattr(zeroshot, "hub_reachable", lambda: asked.append(1) or True)
    assert check_settings(ZeroShotSettings(tasks="piqa,winogrande")) == ["piqa", "winogrande"]
    assert len(asked) == 2  # once per check, not once per task


@needs_lm_eval
def test_the_commonsense_preset_expands_to_the_seven_paper_tasks(monkeypatch):
    monkeypatch.setattr(zeroshot, "dataset_cached", lambda path: True)
    names = check_settings(ZeroShotSettings(tasks="commonsense,boolq,arc_easy"))
    assert names == ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    assert [zeroshot.REPORTED[n] for n in names] == ["acc", "acc", "acc_norm", "acc", "acc", "acc_norm", "acc_norm"]


# ------------------------------------------------------------------------------------------------- the shipped task


def eval_and_train_articles():
    from gaqprune.data.corpus import embedded_articles
    from gaqprune.models.names import cache_root

    return embedded_articles(cache_root())


def test_the_shipped_task_is_deterministic_and_cached():
    folder = zeroshot.wiki_next_task_dir()
    jsonl, yaml = folder / f"{WIKI_NEXT}.jsonl", folder / f"{WIKI_NEXT}.yaml"
    first, stamp = jsonl.read_bytes(), jsonl.stat().st_mtime_ns
    assert zeroshot.wiki_next_task_dir() == folder and jsonl.stat().st_mtime_ns == stamp  # not rewritten
    jsonl.unlink()
    yaml.unlink()
    zeroshot.wiki_next_task_dir()
    assert jsonl.read_bytes() == first  # generated again from nothing: the same bytes
    assert f'test: "{jsonl.resolve()}"' in yaml.read_text()  # lm-eval needs the absolute path
    articles = eval_and_train_articles()["eval"]
    assert zeroshot.wiki_next_items(articles) == zeroshot.wiki_next_items(articles)
    assert zeroshot.wiki_next_items(articles, seed=1) != zeroshot.wiki_next_items(articles)


def test_the_shipped_task_reads_only_evaluation_articles():
    corpus = eval_and_train_articles()
    items = [json.loads(line) for line in (zeroshot.wiki_next_task_dir() / f"{WIKI_NEXT}.jsonl").read_text().splitlines()]
    assert len(items) == zeroshot.WIKI_NEXT_ITEMS == 300
    assert [item["id"] for item in items] == list(range(300))
    labels = [item["label"] for item in items]
    assert all(labels.count(k) >= 50 for k in range(4))  # the answer's position is not a giveaway
    assert len({item["article"] for item in items}) == 10
    for item in items:
        article, answer = corpus["eval"][item["article"]], item["choices"][item["label"]]
        assert len(set(item["choices"])) == 4
        paragraphs = [" ".join(line.split()) for line in article.splitlines()]  # sentences are re-joined by one space
        follows = " ".join(f"{item['context']} {answer}".split())
        assert any(follows in paragraph for paragraph in paragraphs)  # the answer follows its context
        for choice in item["choices"]:
            homes = [i for i, text in enumerate(corpus["eval"]) if choice in text]
            assert homes and (choice == answer or item["article"] not in homes)  # wrong choices: other articles
            assert 0.5 * len(answer) <= len(choice) <= 2 * len(answer)
        for text in (item["context"], *item["choices"]):
            assert not any(text in train for train in corpus["train"])  # never a calibration article


# ------------------------------------------------------------------------------------------------- evaluate


def check_result(result: dict, tasks: dict[str, int], limit: int | None) -> None:
    assert set(result) == {"tasks", "average", "limit", "lm_eval_version"} and result["limit"] == limit
    assert result["lm_eval_version"] == "0.4.13"
    assert {task: metrics["n"] for task, metrics in result["tasks"].items()} == tasks
    for metrics in result["tasks"].values():
        assert 0.0 <= metrics["acc"] <= 1.0 and metrics["reported"] in metrics
    reported = [m[m["reported"]] for m in result["tasks"].values()]
    assert result["average"] == pytest.approx(sum(reported) / len(reported))
    assert json.loads(json.dumps(result)) == result


@needs_lm_eval
def test_evaluate_a_tiny_model_on_the_shipped_task(embedded_tokenizer, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # not a git checkout: lm-eval's `git describe` printed "fatal: not a git repository"
    model = tiny_llama(vocab_size=len(embedded_tokenizer)).train()
    random.seed(7)
    torch.manual_seed(7)
    expected_draws = (random.random(), torch.rand(1))
    random.seed(7)
    torch.manual_seed(7)
    result = zeroshot.evaluate(model, embedded_tokenizer, ZeroShotSettings(tasks=WIKI_NEXT, eval_limit=12),
                               batch_size=4, progress=False)
    check_result(result, {WIKI_NEXT: 12}, 12)
    metrics = result["tasks"][WIKI_NEXT]
    assert 0.0 <= metrics["acc_norm"] <= 1.0 and metrics["reported"] == "acc_norm"
    assert (metrics["acc"] * 12).is_integer()
    assert model.training  # lm-eval put it in eval mode; restored
    assert (random.random(), torch.rand(1)) == expected_draws  # lm-eval re-seeds the generators; restored
    table = zeroshot.format_table(result).splitlines()
    assert len(table) == 4 and table[2].startswith(f"| {WIKI_NEXT} | 12 | ")
    assert zeroshot.scalars(result)[f"eval/{WIKI_NEXT}/acc"] == metrics["acc"]
    assert "fatal" not in capfd.readouterr().err


@needs_lm_eval
def test_evaluate_pruned_and_lora_models_and_a_task_folder(embedded_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    from gaqprune.models.pruned import load_pruned, save_pretrained_model

    folder = local_task(tmp_path / "tasks", docs=5)
    settings = ZeroShotSettings(tasks=f"{WIKI_NEXT},tiny_local", task_path=str(folder), eval_limit=8)
    assert check_settings(settings) == [WIKI_NEXT, "tiny_local"]
    pruned = prune(tiny_llama(vocab_size=len(embedded_tokenizer)))
    in_memory = zeroshot.evaluate(pruned, embedded_tokenizer, settings, progress=False)
    check_result(in_memory, {WIKI_NEXT: 8, "tiny_local": 5}, 8)  # a task of 5 documents gives 5
    assert in_memory["tasks"]["tiny_local"]["reported"] == "acc" and "acc_norm" not in in_memory["tasks"]["tiny_local"]
    loaded = load_pruned(save_pretrained_model(pruned, embedded_tokenizer, tmp_path / "pruned"))
    assert loaded.config.model_type == "gaqprune_llama"
    assert zeroshot.evaluate(loaded, embedded_tokenizer, settings, progress=False) == in_memory
    # LoRA adapters start as the identity (B = 0): the same numbers through peft's wrapper
    lora = get_peft_model(tiny_llama(vocab_size=len(embedded_tokenizer)), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    dense = zeroshot.evaluate(tiny_llama(vocab_size=len(embedded_tokenizer)), embedded_tokenizer, settings, progress=False)
    assert zeroshot.evaluate(lora, embedded_tokenizer, settings, progress=False) == dense


def test_summary_table_and_scalars_from_lm_evals_output():
    out = {"results": {"boolq": {"alias": "boolq", "acc,none": 0.6, "acc_stderr,none": 0.01},
                       "hellaswag": {"alias": "hellaswag", "acc,none": 0.3, "acc_stderr,none": "N/A",
                                     "acc_norm,none": 0.4, "acc_norm_stderr,none": 0.02},
                       "gsm8k": {"exact_match,strict-match": 0.05, "exact_match,flexible-extract": 0.1}},
           "n-samples": {"boolq": {"original": 3270, "effective": 10}, "hellaswag": {"original": 10042, "effective": 10},
                         "gsm8k": {"original": 1319, "effective": 10}}}
    result = zeroshot.summarise(out, 10)
    assert result["tasks"]["boolq"] == {"acc": 0.6, "acc_stderr": 0.01, "reported": "acc", "n": 10}
    assert result["tasks"]["hellaswag"]["reported"] == "acc_norm" and "acc_stderr" not in result["tasks"]["hellaswag"]
    assert result["tasks"]["gsm8k"]["reported"] == "exact_match_strict-match"
    assert result["average"] == pytest.approx((0.6 + 0.4 + 0.05) / 3)
    assert zeroshot.format_table(result).splitlines()[3] == "| hellaswag | 10 | 30.00 | 40.00 | 40.00 |"
    assert zeroshot.format_table(result).splitlines()[-1] == "| average | | | | 35.00 |"
    assert zeroshot.scalars(result, "test") == {
        "test/boolq/acc": 0.6, "test/boolq/acc_stderr": 0.01, "test/boolq/reported": 0.6,
        "test/hellaswag/acc": 0.3, "test/hellaswag/acc_norm": 0.4, "test/hellaswag/acc_norm_stderr": 0.02,
        "test/hellaswag/reported": 0.4, "test/gsm8k/exact_match_strict-match": 0.05,
        "test/gsm8k/exact_match_flexible-extract": 0.1, "test/gsm8k/reported": 0.05, "test/average": result["average"]}
