#!/usr/bin/env bash
# The GPU measurements behind benchmarks/RESULTS.md: `bash benchmarks/run_on_gpu.sh compare` (ours beside the
# community pipeline), `... tune` (breakdown, bfloat16, compilation, offload) and `... fast` and `... final`
# (the fastest configurations; the community pipeline beside them in `fast`), `... fp8` (float8 and low memory). Expects in the repository root:
#   .bench/sdxl_configs.json (../shared/bench/sdxl_configs.json), .bench/coffee.png (a sample photo),
#   benchmarks/anchors/community_faithdiff.py (diffusers' examples/community/pipeline_faithdiff_stable_diffusion_xl.py)
# and, where diffusers is not installed, wheels in .whl/. Results go to $OUT/results.jsonl (or ./results.jsonl).
set -u
OUT=${OUT:-.}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bench() { timeout "$1" python3 benchmarks/benchmark.py --config .bench/sdxl_configs.json --sample .bench/coffee.png \
  --output "$OUT/results.jsonl" "${@:2}" 2>&1 | grep -v -i -e "warn" -e "kept in float32"; return "${PIPESTATUS[0]}"; }

round=${1:-compare}
if [ "$round" = fp8 ]; then
# Issue 13's goals in one call (about 9 minutes on an H200): the community pipeline beside the exact path compiled,
# float8 compute compiled, and the low-memory mode's peak at 2048 and 4096; deviations from the exact bfloat16 path.
bench 120 --sizes 1024 2048 --tile-batch-size 9 --dtype bfloat16 --anchor benchmarks/anchors/community_faithdiff.py
bench 150 --sizes 1024 2048 --tile-batch-size 9 --dtype bfloat16 --compile full --compile-mode reduce-overhead \
  --offload text-encoders --breakdown
bench 170 --sizes 1024 2048 --tile-batch-size 9 --dtype bfloat16 --fp8 compute --compile full \
  --compile-mode reduce-overhead --offload text-encoders
bench 120 --sizes 2048 4096 --tile-batch-size 1 --dtype bfloat16 --low-vram --warmup-steps 0
fi
if [ "$round" = fast ]; then
# 1. The community pipeline beside ours, eager float16, all 9 tiles of 2048 in one call; stage breakdown of ours.
bench 120 --sizes 1024 2048 --tile-batch-size 9 --breakdown --anchor benchmarks/anchors/community_faithdiff.py
# 2. The fast configuration: bfloat16, whole UNet compiled (static shapes) and replayed as CUDA graphs, fused QKV,
#    text encoders kept in host memory (group offloading); 1024 then 2048. perf_hints says if CUDA graphs are skipped.
TORCH_LOGS=perf_hints bench 400 --sizes 1024 2048 --tile-batch-size 9 --dtype bfloat16 --compile full --compile-mode reduce-overhead \
  --fuse-qkv --offload text-encoders --breakdown
fi
if [ "$round" = final ]; then
# The recommended configuration at 2048: as "fast" without fused QKV (it keeps the unfused weights too, about
# 1.2 GiB, and gained nothing compiled), text encoders offloaded layer by layer.
bench 150 --sizes 2048 --tile-batch-size 9 --dtype bfloat16 --compile full --compile-mode reduce-overhead \
  --offload text-encoders --breakdown
fi
if [ "$round" = compare ]; then
# 1. The community pipeline and ours, eager float16, side by side; tile batch sizes compared at 2048.
bench 200 --sizes 1024 2048 --tile-batch-size 1 3 9 --anchor benchmarks/anchors/community_faithdiff.py
# 2. 4096 x 4096 (49 tiles): peak memory with VAE and LQ-encoder tiling, no warm-up.
bench 150 --sizes 4096 --tile-batch-size 4 --warmup-steps 0
# 3. Ours with regional compilation of the UNet's transformer blocks and fused QKV projections.
bench 200 --sizes 1024 2048 --tile-batch-size 9 --compile regional --fuse-qkv
fi
if [ "$round" = tune ]; then
# Where the time goes (eager), then bfloat16 with regional and whole-UNet compilation, then model offload.
bench 100 --sizes 1024 2048 --tile-batch-size 9 --breakdown --warmup-steps 1
bench 120 --sizes 1024 2048 --tile-batch-size 9 --dtype bfloat16 --compile regional --fuse-qkv
bench 100 --sizes 2048 --tile-batch-size 9 --compile regional --fuse-qkv --offload model
bench 170 --sizes 1024 --tile-batch-size 1 --dtype bfloat16 --compile full --fuse-qkv
fi
