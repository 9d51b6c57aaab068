#!/usr/bin/env bash
# The long campaigns of issue 6, one after the other, at the lowest priority:
#   ring:  libFuzzer, RING_RUNS iterations (default 1,000,000), then corpus merge
#   proto: the random-mutation driver, PROTO_ITERATIONS streams (default 1,000,000)
#   hypo:  hypothesis, HYPO_EXAMPLES examples (default 20,000)
# Logs go to fuzz/build/campaign-*.log; a summary line per campaign to stdout.
set -uo pipefail
cd "$(dirname "$0")"
mkdir -p build
PY=${PYTHON:-python3}
RING_RUNS=${RING_RUNS:-1000000}
PROTO_ITERATIONS=${PROTO_ITERATIONS:-1000000}
HYPO_EXAMPLES=${HYPO_EXAMPLES:-20000}
SEED=${SEED:-1}
what=${*:-ring proto hypo}

stamp() { date -u +%H:%M:%S; }
for w in $what; do
    t0=$(date +%s)
    echo "[$(stamp)] $w: start"
    case $w in
    ring)
        nice -n 19 make -s fuzz-ring RUNS="$RING_RUNS" SEED="$SEED" >build/campaign-ring.log 2>&1
        rc=$?
        grep -E "^Done|stat::number_of_executed_units|stat::average_exec_per_sec|ERROR|invariant" \
            build/campaign-ring.log | tail -5
        ;;
    merge)
        nice -n 19 make -s fuzz-ring-merge >build/campaign-merge.log 2>&1
        rc=$?
        tail -3 build/campaign-merge.log
        ;;
    proto)
        (cd .. && nice -n 19 "$PY" fuzz/proto_fuzz.py --iterations "$PROTO_ITERATIONS" \
            --seed "$SEED" --report-every 100000) >build/campaign-proto.log 2>&1
        rc=$?
        tail -1 build/campaign-proto.log
        ;;
    hypo)
        nice -n 19 make -s fuzz-proto EXAMPLES="$HYPO_EXAMPLES" PYTHON="$PY" \
            >build/campaign-hypo.log 2>&1
        rc=$?
        tail -3 build/campaign-hypo.log
        ;;
    esac
    echo "[$(stamp)] $w: exit $rc after $(( $(date +%s) - t0 )) s"
done
