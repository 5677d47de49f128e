#!/usr/bin/env bash
# `spattn report` on one H200, alone on the card (issue 21): the CUDA path at 1024 / 4096 / 8192 tokens, every
# family, pass-key retrieval (9 keys, at every length: session 7's run had 3 at 1024 only, 4.3 s), the threads view
# and the kernel references (spattn's triton kernel against
# FlexAttention and SDPA), latency timed in bfloat16 (Note [latency dtype] in src/spattn/report/config.py).
#
#   OUT=/path/to/out bash benchmarks/report_h200.sh [TIME_BUDGET_SECONDS [MORE REPORT OPTIONS]]   # default 118
#
# Further options go to `spattn report` after the script's own (the last of a repeated option wins), e.g. the CPU
# dry run of this path: `OUT=/tmp/h200-dry bash benchmarks/report_h200.sh 300 --device cpu --lengths 256,512
# --budgets 0.25 --selectors probe --kernel-references --latency-dtype bfloat16`.
#
# Run from the repository root. Writes $OUT/report-h200.log (the terminal, with the seconds of every phase) and
# $OUT/report-h200.tgz (results.json, report.html, figures/ and the stage cache .spattn-report/: a run killed by
# the timeout still brings back every finished stage as JSON). The report's own --time-budget skips what would
# not fit and lists it in results.json (timings.skipped_for_time); `timeout` adds 25 s for the interpreter, CUDA
# start and the last stage's overshoot, so the whole command stays under TIME_BUDGET + 30 s of device time.
# The learned family needs a gate checkpoint distilled for SmolLM2 (spattn.learned.save_gates; e.g. the one
# benchmarks/real_model_h200.py writes): give its path in SPATTN_REPORT_GATES, otherwise the report lists that
# family as skipped and says why.
set -u
: "${OUT:?set OUT to the output folder}"
budget=${1:-118}
shift $(( $# > 0 ? 1 : 0 ))
gates=()
if [[ -n "${SPATTN_REPORT_GATES:-}" && -f "${SPATTN_REPORT_GATES}" ]]; then
  gates=(--gates "$SPATTN_REPORT_GATES")
fi
start=$(date +%s.%N)
echo "report_h200: budget ${budget} s, gates: ${gates[*]:-none}, $(date -u +%FT%TZ)" | tee "$OUT/report-h200.log"
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader 2>&1 | tee -a "$OUT/report-h200.log"
SPATTN_TRITON_AUTOTUNE=0 PYTHONPATH=src COLUMNS=140 timeout $((budget + 25)) \
  python -m spattn.cli.main report --device cuda --lengths 1024,4096,8192 --budgets 0.05,0.1,0.25 \
    --selectors probe,antidiagonal,pooled "${gates[@]}" --repeats 5 --retrieval-samples 9 --time-budget "$budget" \
    -o "$OUT/report-h200" "$@" >> "$OUT/report-h200.log" 2>&1
rc=$?
end=$(date +%s.%N)
echo "report_h200: exit ${rc}, $(python -c "print(f'{${end} - ${start}:.1f}')") s wall" | tee -a "$OUT/report-h200.log"
tar -C "$OUT" -czf "$OUT/report-h200.tgz" report-h200 && rm -rf "$OUT/report-h200"
exit "$rc"
