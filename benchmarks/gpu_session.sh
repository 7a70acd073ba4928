#!/bin/bash
# The GPU measurements that issues #13 and #18 ask for, in few device calls (30 device-minutes a session,
# 10 minutes a call, the machine released after 30 s idle). Stage once on this machine, from the project root:
#   ../shared/tools/device-prep
# then each phase is one `device` run with carry [".dev"] and the command
#   "source .dev/env.sh && bash benchmarks/gpu_session.sh PHASE"
# Phases (what comes back lies in $OUT):
#   smoke   a few steps of DeSTSeg, TESD and STFPM, default precision, both stages, then test (~2 min)
#   speed   benchmarks/end_to_end.py (DeSTSeg paper schedule, 3000 PNGs) + metrics_speed.py --device cuda
#   bench   starts the paper-schedule benchmark in the background (bottle 3 seeds, then metal_plate 1 seed)
#           and returns; follow with `poll` calls, back to back
#   poll    waits up to 9 minutes for the benchmark, then copies its results and logs to $OUT
set -u
: "${DATA:?source .dev/env.sh first}" "${OUT:?run this through the device tool (OUT is its output folder)}"
B=/tmp/gpu-bench
PY=python3
case "${1:-}" in
  smoke)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
    for m in destseg tesd stfpm; do
      extra=(--steps 20 --student-steps 10 --texture-dir "$DATA/textures")
      [ $m = stfpm ] && extra=(--epochs 2)
      $PY -m destseg train --data "$DATA/mvtec" --category bottle --model $m --teacher efficientnet_lite0 \
        --schedule paper "${extra[@]}" --out /tmp/smoke-$m --overwrite --no-progress > "$OUT/smoke-$m.log" 2>&1 \
        && $PY -m destseg test --run /tmp/smoke-$m --json --no-progress >> "$OUT/smoke-$m.log" 2>&1
      echo "$m: exit $? ($(grep -o '"precision": "[a-z0-9]*"' "$OUT/smoke-$m.log" | tail -1))"
    done ;;
  speed)
    $PY benchmarks/end_to_end.py --data "$DATA/mvtec" --category bottle --model destseg --schedule paper \
      --texture-dir "$DATA/textures" --pngs 3000 --out /tmp/e2e > "$OUT/e2e.log" 2>&1
    echo "end_to_end: exit $?"; cp /tmp/e2e/summary.* "$OUT/" 2>/dev/null
    $PY benchmarks/metrics_speed.py --n 1000 3000 --device cuda | tee "$OUT/metrics_speed_cuda.md"
    $PY benchmarks/metrics_speed.py --n 1000 3000 | tee "$OUT/metrics_speed_numpy.md" ;;
  bench)
    mkdir -p $B
    setsid nohup bash -c "$PY -m destseg benchmark --data mvtec=$DATA/mvtec --categories bottle --models destseg \
      --seeds 3 --schedule paper --teacher efficientnet_lite0 --texture-dir $DATA/textures --out $B/bottle \
      --no-progress && $PY -m destseg benchmark --data mpdd=$DATA/mpdd --categories metal_plate --models destseg \
      --seeds 1 --schedule paper --teacher efficientnet_lite0 --texture-dir $DATA/textures --out $B/metal \
      --no-progress; echo exit \$? > $B/done" > $B/bench.log 2>&1 &
    sleep 20; tail -3 $B/bench.log ;;
  poll)
    for _ in $(seq 54); do [ -f $B/done ] && break; sleep 10; done
    mkdir -p "$OUT/bench"
    cp $B/bench.log $B/done "$OUT/bench/" 2>/dev/null
    for f in $B/*/results.* $B/*/*.log $B/*/*/metrics.json $B/*/*/train.log $B/*/*/bench.json; do
      [ -f "$f" ] && { d="$OUT/bench/${f#$B/}"; mkdir -p "$(dirname "$d")"; cp "$f" "$d"; }
    done
    ls $B/*/ 2>/dev/null; cat $B/done 2>/dev/null || echo "still running" ;;
  *) sed -n 2,12p "$0"; exit 2 ;;
esac
