#!/usr/bin/env bash
# Every CPU benchmark whose results are committed under bench/results/ (one thread per policy,
# configurations interleaved in one process; each result file records its own command).
# Run on a quiet machine: other processes on the cores change the absolute numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
python bench/prefill_speedup.py --policy small-openvla --keep 0.5 0.25 0.125 --reps 15 \
    --out "$out/cpu-prefill-speedup-small-openvla.json" | tee "$out/cpu-prefill-speedup-small-openvla.txt"
python bench/pruning_overhead.py --policy embedded-openvla tiny-openvla small-openvla --steps 20 \
    --out "$out/cpu-pruning-overhead.json" | tee "$out/cpu-pruning-overhead.txt"
python bench/vla_cache_speed.py --policy small-openvla --steps 20 --out "$out/cpu-vla-cache-speed"
python bench/engine_speed.py --policy embedded-openvla small-openvla --steps 20 \
    --out "$out/cpu-engine-speed"
vla-prune bench --policy small-openvla --steps 8 --out "$out"
vla-prune bench --policy small-cogact --steps 8 --out "$out"
for p in tiny-openvla small-openvla tiny-cogact small-cogact; do
    vla-prune profile --policy "$p" --steps 20 --out "$out/cpu-profile-$p.json" \
        | tee "$out/cpu-profile-$p.txt"
done
vla-prune info --policy openvla-7b --per-layer --out "$out/openvla-7b-info.json" | tee "$out/openvla-7b-info.txt"
vla-prune info --policy cogact-base --out "$out/cogact-base-info.json" | tee "$out/cogact-base-info.txt"
