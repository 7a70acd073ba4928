#!/bin/bash
# The GPU measurements (smoke, speed, the paper schedule), in few device calls (30 device-minutes a session,
# 10 minutes a call, the machine released after 30 s idle). Stage once on this machine, from the project root:
#   ../shared/tools/device-prep
# then each phase is one `device` run with carry [".dev"] and the command
#   "source .dev/env.sh && bash benchmarks/gpu_session.sh PHASE"
# Phases (what comes back lies in $OUT):
#   smoke   a few steps of DeSTSeg, TESD and STFPM, default precision, both stages, then test (~2 min)
#   speed   benchmarks/end_to_end.py (DeSTSeg paper schedule, 3000 PNGs) + metrics_speed.py --device cuda
#   bench   starts the paper-schedule benchmark in the background (bottle 3 seeds, then metal_plate 1 seed)
#           and returns; follow with `poll` calls, back to back
#   schedules  why the paper schedule scored under the cpu one on bottle: starts, in the
#           background, bottle seeds 0-1 with the cpu schedule and with the paper's stage 1 followed by 500
#           or 1000 segmentation steps instead of 4000 (schedule files); compare with bench's paper rows
#   poll    waits up to 9 minutes for what bench/schedules started, then copies results and logs to $OUT
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
  bench|schedules)
    # one background job per phase, run one after the other (one GPU); poll waits for all of them
    mkdir -p $B; echo "$1" >> $B/jobs
    R=(-m destseg benchmark --teacher efficientnet_lite0 --texture-dir $DATA/textures --no-progress)
    if [ "$1" = bench ]; then
      cmd="$PY ${R[*]} --data mvtec=$DATA/mvtec --categories bottle --models destseg --seeds 3 --schedule paper \
        --out $B/bottle && $PY ${R[*]} --data mpdd=$DATA/mpdd --categories metal_plate --models destseg --seeds 1 \
        --schedule paper --out $B/metal"
    else
      echo '{"destseg": {"student_steps": 1000, "steps": 1500}}' > $B/seg500.json
      echo '{"destseg": {"student_steps": 1000, "steps": 2000}}' > $B/seg1000.json
      cmd="true"
      for s in cpu $B/seg500.json $B/seg1000.json; do
        cmd="$cmd && $PY ${R[*]} --data mvtec=$DATA/mvtec --categories bottle --models destseg --seeds 2 \
          --schedule $s --out $B/sched-$(basename $s .json)"
      done
    fi
    prev=$(grep -v -x "$1" $B/jobs | tail -1)
    setsid nohup bash -c "while [ -n '$prev' ] && [ ! -f $B/done-$prev ]; do sleep 5; done; $cmd; \
      echo exit \$? > $B/done-$1" > $B/$1.log 2>&1 &
    sleep 20; tail -3 $B/$1.log ;;
  poll)
    all_done() { for j in $(cat $B/jobs 2>/dev/null); do [ -f $B/done-$j ] || return 1; done; }
    for _ in $(seq 54); do all_done && break; sleep 10; done
    mkdir -p "$OUT/bench"
    cp $B/*.log $B/done-* "$OUT/bench/" 2>/dev/null
    for f in $B/*/results.* $B/*/*.log $B/*/*/metrics.json $B/*/*/train.log $B/*/*/bench.json; do
      [ -f "$f" ] && { d="$OUT/bench/${f#$B/}"; mkdir -p "$(dirname "$d")"; cp "$f" "$d"; }
    done
    ls $B/*/ 2>/dev/null; for j in $(cat $B/jobs 2>/dev/null); do echo "$j: $(cat $B/done-$j 2>/dev/null || echo running)"; done ;;
  *) sed -n 2,15p "$0"; exit 2 ;;
esac
