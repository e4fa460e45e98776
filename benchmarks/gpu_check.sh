#!/usr/bin/env bash
# One-shot GPU check (one H200, Llama-3-8B shape, random weights, bf16) within a global budget (GPU_CHECK_BUDGET_S, 600 s).
#
#   bash benchmarks/gpu_check.sh            # from the repository root; JSON + logs go to $OUT if set, else a temp dir
#
# Steps, each under `timeout` and isolated (a failure prints FAILED and the next step runs):
#   1. stages standard  (50 x 128 importance, 10 x 64 Taylor, ratio 0.25; incl. save of the pruned model to /tmp)
#   2. stages precise   (128 x 128 importance, 32 x 64 Taylor; save skipped)
#   3. Taylor one pass vs one backward per layer (27 layers, 10 x 64 tokens)
#   4. inference dense vs pruned (prefill 1x2048, 16x512; decode batch 1 and 16: CUDA graph, static eager, fused
#      projections + CUDA graph, HF generate with its dynamic and its static cache, both eager; plus a torch.profiler
#      table of HF generate and the CUDA allocator's state per model and batch)
#   5. inference_compiled: decode batch 16 and 1 with the fused step through torch.compile + CUDA graph, and the plain
#      CUDA-graph step beside it (no prefill), on a model pruned over all 32 layers: the guide's standard range, where
#      ratio 0.25 allows the issue's 1.3x (gaqprune's default range 3..29 allows 1.24x; step 4 measures that one)
#   0. cli: the `gaqprune` CLI end to end on the GPU (benchmarks/cli_smoke.py: prune with --save_gguf, reload through
#      remote code, validate, a bf16-mixed LoRA fit, `fit --prune` under a one-device DDP / NCCL) on a tiny random
#      model; about a minute. Needs jsonargparse + gguf, which the image lacks: carry them as wheels (see below)
#   0. gemm: one Llama-3-8B MLP at decode batches 1, 16, 64, dense width vs pruned widths aligned to 256 / 128 / 64 /
#      32 / nothing (does --channel_multiple 64 decode as fast as 128 or 256?); seconds
#   6. inference_hf_compiled (not in the default list): decode batch 16 with HF generate's own torch.compile of a
#      static cache (what a transformers user gets); two compiles of the whole model, so only when time is left
# GPU_CHECK_STEPS (default: cli, gemm and steps 1-5) picks steps by name, e.g. GPU_CHECK_STEPS="inference inference_compiled".
# A global budget (GPU_CHECK_BUDGET_S, default 600 s) caps the per-step timeouts so the whole script ends in time;
# each step keeps back what the steps after it need (a slow earlier step shortens or skips the ones before it).
# GPU_CHECK_SMOKE=1 runs the same steps on a tiny random model on the CPU (tests this script, not the GPU).
# The benchmark steps need only torch, transformers, lightning, torchmetrics, safetensors (no datasets / jsonargparse /
# gguf, no internet). The cli step needs jsonargparse[signatures] and gguf: download their wheels here once
# (benchmarks/README.md, "GPU check") into .whl/, carry it, and start the device command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site;
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TRANSFORMERS_VERBOSITY=error
RES="${OUT:-$(mktemp -d /tmp/gaqprune-gpu-check.XXXXXX)}"
mkdir -p "$RES"
BUDGET="${GPU_CHECK_BUDGET_S:-600}"
STEPS=" ${GPU_CHECK_STEPS:-cli gemm stages_standard stages_precise taylor inference inference_compiled} "
T0=$(date +%s)
declare -A STATUS

step() {  # step NAME TIMEOUT_S RESERVE_S SCRIPT ARGS...  (RESERVE_S: budget kept back for the steps after it)
    local name=$1 limit=$2 reserve=$3
    shift 3
    if [[ "$STEPS" != *" $name "* ]]; then
        STATUS[$name]="${STATUS[$name]:-not selected}"
        return
    fi
    local left=$((BUDGET - ($(date +%s) - T0) - reserve))
    ((limit > left)) && limit=$left
    if ((limit < 30)); then
        echo "=== $name: SKIPPED (global budget of ${BUDGET} s spent)"
        STATUS[$name]="skipped"
        return
    fi
    echo "=== $name (timeout ${limit} s, t=$(($(date +%s) - T0)) s): python3 $*"
    local t=$(date +%s)
    timeout -k 10 "$limit" python3 "$@" 2>&1 | grep --line-buffered -v -e "Writing model shards" -e "^\s*warnings.warn" | tee "$RES/$name.log"
    local rc=${PIPESTATUS[0]}
    if ((rc == 0)); then STATUS[$name]="ok"; else STATUS[$name]="FAILED rc=$rc"; echo "=== $name FAILED (rc $rc)"; fi
    echo "=== $name: ${STATUS[$name]} in $(($(date +%s) - t)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$RES/gpu.txt" || echo "nvidia-smi FAILED"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name())" 2>&1 | tee -a "$RES/gpu.txt" || echo "FAILED"

M=(--model llama3-8b --device cuda --dtype bfloat16)
INF=()
if [[ "${GPU_CHECK_SMOKE:-0}" == 1 ]]; then  # test this script's plumbing on a CPU: tiny random model, small shapes
    M=(--model tiny --device cpu --dtype float32)
    CLI=(--device cpu)
    INF=(--prefill 1x128 --decode_batch 2 --prompt 32 --eager_steps 4)
    COMPILED=(--decode_batch 2 --prompt 32 --eager_steps 4 --paths compiled-eager static-eager --layer_start 0 --layer_end 8)
    GEMM=(--device cpu --dtype float32 --hidden 256 --intermediate 1024 --batches 1 16 --calls 3)
    HF_COMPILED=(--decode_batch 2 --prompt 32 --eager_steps 4 --paths hf-static)  # hf-compiled is CUDA-only
else
    CLI=(--device cuda)
    COMPILED=(--decode_batch 16 1 --paths compiled-graph graph --layer_start 0 --layer_end 32)
    HF_COMPILED=(--decode_batch 16 --paths hf-compiled)
    GEMM=(--device cuda --dtype bfloat16)
fi
reserve() {  # budget the selected steps after this one need: reserve NAME:SECONDS ...
    local total=0 item
    for item in "$@"; do [[ "$STEPS" == *" ${item%%:*} "* ]] && total=$((total + ${item##*:})); done
    echo $total
}
if [[ "$STEPS" == *" cli "* ]] && ! python3 -c "import jsonargparse, gguf" 2>/dev/null; then
    echo "=== cli: SKIPPED (jsonargparse / gguf missing: carry their wheels, see the header)"
    STATUS[cli]="skipped (no jsonargparse / gguf)"
    STEPS="${STEPS/ cli / }"
fi
step cli 150 "$(reserve gemm:60 inference:200 inference_compiled:240 inference_hf_compiled:240)" benchmarks/cli_smoke.py \
    "${CLI[@]}" --out /tmp/gaqprune-cli-smoke --report "$RES/cli"
step gemm 60 "$(reserve inference:200 inference_compiled:240 inference_hf_compiled:240)" benchmarks/gemm_alignment.py \
    "${GEMM[@]}" --out "$RES/gemm.json"
step stages_standard 150 "$(reserve inference:200 inference_compiled:240 inference_hf_compiled:240)" benchmarks/stages.py "${M[@]}" \
    --scheme standard --save_dir /tmp --out "$RES/stages_standard.json"
step stages_precise 100 "$(reserve inference:200 inference_compiled:240 inference_hf_compiled:240)" benchmarks/stages.py "${M[@]}" \
    --scheme precise --skip_save --out "$RES/stages_precise.json"
step taylor 80 "$(reserve inference:200 inference_compiled:240 inference_hf_compiled:240)" benchmarks/taylor.py "${M[@]}" \
    --num_examples 10 --max_seq_len 64 --out "$RES/taylor.json"
step inference 220 "$(reserve inference_compiled:240 inference_hf_compiled:240)" benchmarks/inference.py "${M[@]}" --prune plan \
    --paths graph static-eager fused-graph hf-eager hf-static "${INF[@]}" --profile_hf "$RES/profile_hf" --out "$RES/inference.json"
step inference_compiled 300 "$(reserve inference_hf_compiled:240)" benchmarks/inference.py "${M[@]}" --prune plan \
    --prefill "${COMPILED[@]}" --out "$RES/inference_compiled.json"
step inference_hf_compiled 300 0 benchmarks/inference.py "${M[@]}" --prune plan --prefill "${HF_COMPILED[@]}" \
    --out "$RES/inference_hf_compiled.json"

echo
echo "================ gpu_check summary (wall $(($(date +%s) - T0)) s; results in $RES) ================"
for name in cli gemm stages_standard stages_precise taylor inference inference_compiled inference_hf_compiled; do echo "$name: ${STATUS[$name]:-not run}"; done
python3 - "$RES" <<'EOF' || echo "summary FAILED"
import json, sys
from pathlib import Path

res = Path(sys.argv[1])


def get(name):
    p = res / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


summary = {}
c = get("cli/cli_smoke")
if c:
    # a step cut short by the timeout has rc None and no seconds
    print("cli on " + c["device"] + ": " + ", ".join(f"{k} rc {v['rc']} {v.get('seconds')} s" for k, v in c["steps"].items())
          + (" | all checks passed" if not c["failures"] else f" | FAILED {c['failures']}"))
    summary["cli"] = {k: {"rc": v["rc"], "seconds": v.get("seconds")} for k, v in c["steps"].items()}
    summary["cli_failures"] = c["failures"]
g = get("gemm")
if g:
    for b, sec in g["seconds"].items():
        print(f"gemm batch {b}: MLP speed-up vs dense (ideal): " + ", ".join(
            f"{name} {sec['dense'] / s:.3f}x ({g['widths']['dense'] / g['widths'][name]:.3f}x)"
            for name, s in sec.items() if name != "dense"))
    summary["gemm"] = g
for scheme, target in (("standard", 30), ("precise", 90)):
    s = get(f"stages_{scheme}")
    if s:
        sec = s["seconds"]
        line = ", ".join(f"{k} {v:.1f}" for k, v in sec.items())
        print(f"stages {scheme}: {line} s | importance+Taylor+surgery {s['seconds_importance_taylor_surgery']:.1f} s "
              f"(target < {target}) | peak {s['peak_over_bf16_weights']:.2f}x bf16 weights (target <= 2.2)"
              + ("" if s.get("complete") else " | INCOMPLETE (save did not finish)"))
        summary[f"stages_{scheme}"] = {"seconds": sec, "core_s": s["seconds_importance_taylor_surgery"],
                                       "peak_x_bf16": s["peak_over_bf16_weights"], "complete": s.get("complete")}
t = get("taylor")
if t:
    sec, extra, w = t["seconds"], t["extra_peak_bytes"], t["weight_bytes"]
    print("taylor: " + ", ".join(f"{k} {sec[k]:.2f} s (peak {1 + extra[k] / w:.2f}x weights)" for k in sec)
          + f"; one pass (streamed) vs per layer {t['speedup']:.2f}x, max rel diff {t['max_relative_difference']:.1e} "
          f"({'agree' if t['agree'] else 'DISAGREE'})")
    summary["taylor"] = {k: t[k] for k in ("seconds", "extra_peak_bytes", "weight_bytes", "speedup", "max_relative_difference")}
for name in ("inference", "inference_compiled", "inference_hf_compiled"):
    i = get(name)
    if not i:
        continue
    print(f"{name}: ideal {i['ideal_speedup']:.3f}x; static-path check {i['static_path_check']}; pruned by {i['prune']}")
    ratios = {}
    for shape, d in i["dense"]["prefill"].items():
        p = i["pruned"]["prefill"][shape]
        ratios[f"prefill {shape}"] = p / d
        print(f"  prefill {shape}: dense {d:,.0f} pruned {p:,.0f} tok/s -> {p / d:.2f}x")
    for b, paths in i["dense"]["decode"].items():
        for path, d in paths.items():
            p = i["pruned"]["decode"][b].get(path)
            if path.endswith(" setup s"):
                print(f"  decode batch {b} {path.removesuffix(' setup s')}: compile + capture dense {d} s, pruned {p} s")
            elif isinstance(d, float) and isinstance(p, float):
                ratios[f"decode b{b} {path}"] = p / d
                print(f"  decode batch {b} {path}: dense {d:,.1f} pruned {p:,.1f} tok/s -> {p / d:.2f}x")
            else:
                print(f"  decode batch {b} {path}: dense {d} pruned {p}")
    for model in ("dense", "pruned"):
        for when, state in i[model].get("allocator", {}).items():
            if state:
                print(f"  CUDA allocator, {model} {when}: " + ", ".join(f"{k} {v}" for k, v in state.items()))
    summary[name] = {"ideal": i["ideal_speedup"], "ratios": ratios, "dense": i["dense"], "pruned": i["pruned"]}
(res / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"wrote {res / 'summary.json'}")
EOF
