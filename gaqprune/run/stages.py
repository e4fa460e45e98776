"""The stages of one pruning run, shared by `gaqprune prune`, `gaqprune fit --prune` (the callbacks) and the Python
API: layer importance (computed or reused), the calibration windows, the plan, the surgery (``prune_model``), and
what a run writes of the pruned model (``write_pruned``).

Each stage is a plain function; the callers decide which rank computes and how results travel between ranks
(Lightning's ``strategy.broadcast``). Results land in the run folder through atomic writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from gaqprune.atomic import write_json
from gaqprune.core import importance
from gaqprune.core.importance import model_fingerprint
from gaqprune.core.layers import offload_store, state_items
from gaqprune.core.metrics import perplexity
from gaqprune.core.plan import apply_plan, build_plan
from gaqprune.errors import GaqpruneError
from gaqprune.models.names import cache_root
from gaqprune.run.records import importance_record, load_importance, save_importance
from gaqprune.run.report import Stopwatch, plot_layer_importance, plot_rates
from gaqprune.run.rundir import RunDir
from gaqprune.settings import ImportanceSettings, PruneSettings
from gaqprune.version import __version__

log = logging.getLogger(__name__)


def importance_meta(hf_model, imp: ImportanceSettings, start: int, end: int, base_model: str, source: str,
                    seed: int) -> dict:
    return {
        "base_model": base_model,
        "model_fingerprint": model_fingerprint(hf_model),
        "num_layers": len(hf_model.model.layers),
        "method": imp.importance_method,
        "samples": imp.importance_samples,
        "seq_len": imp.importance_seq_len,
        "data_source": source,
        "layer_start": start,
        "layer_end": end,
        "seed": seed,
        "gaqprune_version": __version__,
        "dtype": str(next(hf_model.parameters()).dtype).removeprefix("torch."),
    }


IMPORTANCE_MATCH = ("model_fingerprint", "num_layers", "layer_start", "layer_end")


def check_importance_config(imp: ImportanceSettings, meta: dict) -> None:
    """Refuse an --importance_config that does not fit this run (not a record; another layer count or range; with
    ``meta["model_fingerprint"]``, another model) before anything is written or removed: from the model's config
    before it is loaded, and again from its weights."""
    if imp.skip_importance_analysis:
        load_importance(imp.importance_config, {k: meta[k] for k in IMPORTANCE_MATCH if k in meta})


def layer_importance_stage(hf_model, datamodule, imp: ImportanceSettings, start: int, end: int,
                           run_dir: RunDir | None, meta: dict, device: torch.device, progress: bool) -> dict[int, float]:
    """Compute (or reuse) per-layer importance; writes the record and a bar chart into ``run_dir`` when given."""
    expected = {k: meta[k] for k in IMPORTANCE_MATCH}
    if imp.skip_importance_analysis:
        scores = load_importance(imp.importance_config, expected)
        record = json.loads(Path(imp.importance_config).read_text())
        log.info("layer importance: reused %s (%s, %s samples; no analysis run)", imp.importance_config,
                 record.get("method"), record.get("samples"))
        if record.get("method") != imp.importance_method:
            log.warning("note: --importance_method %s does not apply: the reused --importance_config holds %s scores "
                        "(drop --skip_importance_analysis to measure %s importance)", imp.importance_method,
                        record.get("method"), imp.importance_method)
    else:
        cached = run_dir / RunDir.IMPORTANCE if run_dir is not None else None
        reusable = None
        if cached is not None and cached.is_file():  # an interrupted earlier run left a complete cache
            try:
                record = json.loads(cached.read_text())
                same = all(record.get(k) == meta[k] for k in ("model_fingerprint", "method", "samples", "seq_len",
                                                               "data_source", "layer_start", "layer_end", "seed"))
                reusable = load_importance(cached, expected) if same else None
            except (GaqpruneError, json.JSONDecodeError, OSError):
                reusable = None
        if reusable is not None:
            log.info("reusing layer importance from %s", cached)
            scores = reusable
        else:
            windows = datamodule.calibration_windows(imp.importance_samples, imp.importance_seq_len, seed=meta["seed"],
                                                     what="--importance_samples")
            scores = importance.compute_layer_importance(hf_model, windows.to(device), method=imp.importance_method,
                                                 layer_start=start, layer_end=end, progress=progress)
            record = importance_record(scores, meta)
    if run_dir is not None:
        save_importance(run_dir / RunDir.IMPORTANCE, record)
        plot_layer_importance(scores, run_dir / RunDir.IMPORTANCE_PLOT, method=record.get("method", "removal"))
    return scores


def taylor_windows(datamodule, settings: PruneSettings, seed: int, device: torch.device) -> torch.Tensor:
    """The Taylor calibration windows: the same on every rank for the same seed."""
    return datamodule.calibration_windows(settings.num_examples, settings.max_seq_len, seed=seed + 1,
                                          what="--num_examples").to(device)


def compensation_windows(datamodule, settings: PruneSettings, seed: int, device: torch.device,
                         taylor: torch.Tensor | None = None) -> torch.Tensor | None:
    """The windows ``apply_plan`` refits on (the same on every rank for the same seed); None without compensation.

    ``--compensation_samples None``, or Taylor windows of more tokens than the refit's own would be, reuse
    the Taylor windows (``taylor``, drawn here if not given; ``PruneSettings.refits_on_taylor_windows``).
    """
    if settings.compensation == "none":
        return None
    if settings.refits_on_taylor_windows():
        return taylor if taylor is not None else taylor_windows(datamodule, settings, seed, device)
    return datamodule.calibration_windows(settings.compensation_samples, settings.compensation_seq_len, seed=seed + 2,
                                          what="--compensation_samples").to(device)


def check_calibration_budget(datamodule, imp: ImportanceSettings, prune: PruneSettings, seed: int) -> None:
    """Draw (and so check) every calibration window set the pruning will need, before any work is done: a text too
    short for --importance_samples, --num_examples or --compensation_samples fails now, in one line."""
    if not imp.skip_importance_analysis:
        datamodule.calibration_windows(imp.importance_samples, imp.importance_seq_len, what="--importance_samples")
    compensation_windows(datamodule, prune, seed, "cpu", taylor_windows(datamodule, prune, seed, "cpu"))


def dense_perplexity(hf_model, windows: torch.Tensor, batch_size: int, fingerprint: str,
                     progress: str | None = None) -> tuple[float, bool]:
    """(perplexity of the dense model over ``windows``, whether it came from the cache).

    A dense model's perplexity is the same at every pruning ratio, so a ratio sweep or a rerun measures it once: the
    value is cached under ``$GAQPRUNE_CACHE/perplexity/`` keyed by everything it depends on (weights fingerprint,
    config, the windows' tokens, batch size, device type, library versions).
    """
    import transformers

    config = {k: v for k, v in hf_model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    # the fingerprint samples 256 values per tensor; a sum and a norm of every tensor also see a change anywhere else
    # (a folder's weights updated in place), without a full-size copy
    with torch.no_grad():
        sums, norms = [], []
        for _, t in state_items(hf_model):  # name order; an offloaded model's layers are read in one at a time
            sums.append(t.sum(dtype=torch.float32).item())
            norms.append(torch.linalg.vector_norm(t, dtype=torch.float32).item())
    key = {"fingerprint": fingerprint, "sums": sums, "norms": norms, "config": config,
           "attn": hf_model.config._attn_implementation,
           "windows": hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest(), "shape": list(windows.shape),
           "batch_size": batch_size, "device": next(hf_model.parameters()).device.type,
           "versions": [torch.__version__, transformers.__version__, __version__]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = cache_root() / "perplexity" / f"{digest}.json"
    try:
        return float(json.loads(path.read_text())["perplexity"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = perplexity(hf_model, windows, batch_size, progress=progress)
    try:
        write_json(path, {"perplexity": value, "key": key})
    except OSError as err:  # a read-only cache costs a re-measurement next time, nothing else
        log.warning("could not cache the dense perplexity in %s: %s", path, err)
    return value, False


def plan_stage(hf_model, scores: dict[int, float], windows: torch.Tensor, settings: PruneSettings,
               progress: bool, fit_windows: torch.Tensor | None = None) -> dict:
    """Taylor scores + allocation (``--allocation search`` scores its candidates on ``fit_windows``, the refit's)
    -> a deterministic plan."""
    plan = build_plan(hf_model, scores, windows, settings, progress=progress, fit_windows=fit_windows)
    if "search" in plan:
        log.info("allocation search: %d of %d candidate depths scored; %d block(s) removed whole %s",
                 len(plan["search"]["candidates"]), plan["search"]["max_blocks"] + 1, plan["search"]["chosen_blocks"],
                 plan["removed_layers"])
    totals = plan["totals"]
    if totals["achieved_ratio_selected"] < totals["target_ratio"] - 0.01:  # (within a channel otherwise)
        log.warning("note: this plan removes %.2f%% of the selected layers' prunable parameters, short of "
                    "--pruning_ratio %s: every width-pruned layer keeps at least one KV group and some MLP channels, "
                    "and no layer goes beyond --max_pruning_rate; allow whole-layer removal (--whole_layer_rate) or "
                    "select more layers to go further", 100 * totals["achieved_ratio_selected"], totals["target_ratio"])
    return plan


def prune_model(hf_model, datamodule, imp: ImportanceSettings | None, prune: PruneSettings, seed: int, meta: dict,
                device: torch.device, progress: bool, run_dir: RunDir | None = None, clock: Stopwatch | None = None,
                scores: dict[int, float] | None = None) -> tuple[dict[int, float] | None, dict]:
    """The pruning sequence every caller shares: layer importance (computed, or reused from a record) -> the
    calibration windows -> Taylor scores and the plan -> the surgery with its refit, in place. ``scores``: an
    importance already at hand (its stage is skipped; with neither it nor ``imp``, every layer counts the same);
    ``meta``: the importance record's fields (``importance_meta``); ``run_dir``: where the record and its chart go;
    ``clock`` times the stages. Returns ``(scores, plan)``."""
    clock = clock or Stopwatch()
    if scores is None and imp is not None:
        with clock("layer_importance"):
            scores = layer_importance_stage(hf_model, datamodule, imp, meta["layer_start"], meta["layer_end"], run_dir,
                                            meta, device, progress)
    taylor = taylor_windows(datamodule, prune, seed, device)
    refit = compensation_windows(datamodule, prune, seed, device, taylor)
    with clock("taylor_and_plan"):
        plan = plan_stage(hf_model, scores, taylor, prune, progress, refit)
    with clock("surgery"):
        apply_plan(hf_model, plan, refit, progress=progress)
    return scores, plan


def write_pruned(hf_model, tokenizer, run_dir: RunDir, plan: dict, scores: dict[int, float] | None,
                 save_model_of: str | None, save_gguf: str | None, gguf_name: str | None, progress: bool,
                 clock: Stopwatch | None = None) -> None:
    """What a run writes of the model it pruned: the plan, its chart, and (``save_model_of``: the dense model's name,
    recorded in the checkpoint) the model as ``model/``, (``save_gguf``: a weight type) as ``model.gguf``."""
    from gaqprune.models.gguf import save_gguf as write_gguf
    from gaqprune.models.offload import layer_shard_writer
    from gaqprune.models.pruned import save_pretrained_model

    clock = clock or Stopwatch()
    write_json(run_dir / RunDir.PLAN, plan)
    plot_rates(scores or {}, plan, run_dir / RunDir.RATES_PLOT)
    if save_model_of is not None:
        with clock("save"):
            save_pretrained_model(hf_model, tokenizer, run_dir / RunDir.MODEL, overwrite=True, base_model=save_model_of,
                                  write_weights=layer_shard_writer(hf_model) if offload_store(hf_model) else None)
    if save_gguf:
        with clock("save_gguf"):
            write_gguf(hf_model, tokenizer, run_dir / RunDir.GGUF, out_type=save_gguf, overwrite=True, name=gguf_name,
                       progress=progress)
