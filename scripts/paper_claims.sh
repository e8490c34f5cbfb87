#!/usr/bin/env bash
# The paper-claims experiments of issue 26 (docs/paper-claims.md), start to finish, on one CPU thread:
# build the code corpus (if absent), train the four runs one after another (MoE and dense twin at two
# sizes: experiments/code/{xs,s}-{moe,dense}.toml), then the analysis into docs/paper-claims/.
#   scripts/paper_claims.sh                 (from the repository root; about 65 minutes on one core)
#   RUNS="xs-moe xs-dense" scripts/paper_claims.sh     (a subset)
# A finished run (runs/code/NAME/model exists) is skipped; an interrupted one resumes from its checkpoint.
# DEADLINE=HH:MM (UTC, today) keeps a pair of runs from starting when the pair is not expected to finish in
# time (estimated from the runs before it, the larger size at SLOWER x the time); unset: no limit.
# STOP_AT=HH:MM (UTC, today) stops a run still training then (it keeps its last checkpoint; the analysis
# reports it as stopped), so that nothing trains past it.
set -euo pipefail
bin=${MIXTRAL:-.venv/bin/mixtral}
py=${PYTHON:-.venv/bin/python}
runs=${RUNS:-xs-moe xs-dense s-moe s-dense}
# One thread for every run: the comparison's throughput numbers and this machine's other user both need it.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p runs/code
[ -f data/code/train.jsonl ] || "$py" scripts/build_code_corpus.py
slower=${SLOWER:-1.4}
last_s=0  # seconds the previous run took
skip=" "  # dense twins of skipped MoE runs
for name in $runs; do
    out=runs/code/$name
    [[ $skip == *" $name "* ]] && continue
    if [ -d "$out/model" ]; then
        echo "$(date -u +%H:%M:%S) $name: already trained, skipped"
        continue
    fi
    if [ -n "${DEADLINE:-}" ] && [ "$last_s" -gt 0 ] && [[ $name == *-moe ]]; then
        left=$(( $(date -u -d "$DEADLINE" +%s) - $(date -u +%s) ))
        need=$(awk -v t="$last_s" -v f="$slower" 'BEGIN { printf "%d", 2 * t * f }')
        if [ "$need" -gt "$left" ]; then
            echo "$(date -u +%H:%M:%S) $name: skipped with its twin: ~${need}s needed, ${left}s left before $DEADLINE"
            skip="$skip${name%-moe}-dense "
            continue
        fi
    fi
    start=$(date -u +%s)
    resume=()
    [ -d "$out/checkpoint" ] && resume=(--resume)
    echo "$(date -u +%H:%M:%S) $name: training (log: $out.log)"
    limit=()
    [ -n "${STOP_AT:-}" ] && limit=(timeout $(( $(date -u -d "$STOP_AT" +%s) - $(date -u +%s) )))
    "${limit[@]}" "$bin" train --config "experiments/code/$name.toml" "${resume[@]}" >"$out.log" 2>&1 || true
    last_s=$(( $(date -u +%s) - start ))
    echo "$(date -u +%H:%M:%S) $name: $(grep '^done:' "$out.log" || tail -1 "$out.log")"
done
echo "$(date -u +%H:%M:%S) analysis"
"$py" scripts/paper_claims_analysis.py
echo "$(date -u +%H:%M:%S) all done"
