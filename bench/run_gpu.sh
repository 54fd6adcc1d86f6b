#!/usr/bin/env bash
# The prepared GPU check (one H100/H200-class GPU, random full-size weights, ~6-8 minutes):
#   openvla-7b bf16: the upstream-style reference (transformers generate, eager attention),
#     ours eager, ours compiled (static decode under CUDA graphs), + VLA-Pruner 25%, + int8
#   cogact-base bf16: reference, dense, DiT cache N=5 + VLA-Pruner 25%, + 2 skipped layers
# Writes bench/results/gpu-<device>-*.{md,json,png} naming the device, plus the roofline
# profile of the fastest OpenVLA setting. Uses the GPU machine's own torch/transformers (the
# project's pins do not apply there); the first lines print their versions.
#   bash bench/run_gpu.sh            # from the repository root, on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results/gpu
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'EOF' | tee "$out/versions.txt"
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(0))
EOF
cli="python -m vla_prune_cli.main"
# each part has its own time limit, so one slow compile cannot eat the whole budget
timeout 240 $cli bench --policy openvla-7b --device cuda --dtype bfloat16 --steps 10 \
    --configs reference,dense,dense+compile,vla-pruner@0.25+compile,vla-pruner@0.25+compile+int8 \
    --out "$out" 2>&1 | tail -20 || echo "openvla-7b bench did not finish (exit $?)"
timeout 150 $cli bench --policy cogact-base --device cuda --dtype bfloat16 --steps 10 \
    --configs reference,dense,cache5+vla-pruner@0.25,cache5+vla-pruner@0.25+skip2 \
    --out "$out" 2>&1 | tail -12 || echo "cogact-base bench did not finish (exit $?)"
timeout 90 $cli profile --policy openvla-7b --device cuda --dtype bfloat16 --steps 10 \
    --run vla-pruner@0.25+compile --out "$out/profile-openvla-7b-vp25-compile.json" \
    2>&1 | tail -20 | tee "$out/profile-openvla-7b-vp25-compile.txt" || echo "profile did not finish"
