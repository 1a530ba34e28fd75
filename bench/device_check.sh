#!/usr/bin/env bash
# Every GPU measurement issues 18 and 19 ask for, in one run on the lent device (one H100/H200).
# Prepare here (CPU):  .venv/bin/pip download pyautoattack --no-deps -d wheels/   (~42 MB; wheels/ is ignored)
# Then:                run(command="bash bench/device_check.sh", carry=["wheels"], timeout_s=600)
# Budget (estimated from the H100 figures in bench/results/gpu_throughput.md): training step variants with
# compile and CUDA graphs ~5 min, AutoAttack components ~4 min. Figures land in $OUT (copy them to
# bench/results/ with the date and the device).
set -uo pipefail
OUT=${OUT:-bench/results}
python -m pip install -q --no-deps --no-index wheels/*.whl 2>&1 | tail -1
python - <<'PY'
import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())
PY
# Issue 18: fp32 / tf32 / bf16+channels_last / +compile / +CUDA graphs, the 20-step fp32 eager-vs-compiled
# weight check, the per-phase breakdown and the host-device sync count of the default path.
timeout 330 python -m bench.gpu_throughput --steps 10 --warmup 2 --check-steps 20 --profile \
    --out "$OUT/gpu_throughput.md" || echo "gpu_throughput: exit $?"
# Issue 19: seconds per robust point of each AutoAttack component, WRN-34-10, C = 10 and 100.
timeout 240 python -m bench.eval_throughput --device cuda --arch wrn-34-10 --num-classes 10 100 \
    --batch-sizes 256 512 --compile --out "$OUT/eval_throughput.md" || echo "eval_throughput: exit $?"
