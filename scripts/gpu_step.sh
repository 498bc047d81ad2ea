# shellcheck shell=bash
# step NAME LIMIT_S CMD... : run CMD under a time limit cut to what is left of $budget (seconds
# since the script began: $SECONDS), log it to $out/NAME.log, append "NAME rc=..." to $summary,
# print the log's tail; returns CMD's status (1 when out of time). With $STEP_ONLY set, a step
# whose NAME it does not list is skipped (status 0). Sourced by gpu_check.sh and gpu_quality.sh.
step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n "${STEP_ONLY:-}" && " $STEP_ONLY " != *" $name "* ]]; then
        return 0
    fi
    local left=$((budget - SECONDS - 5))
    if ((left < 10)); then
        echo "$name skipped: out of time" | tee -a "$summary"
        return 1
    fi
    ((limit > left)) && limit=$left
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc limit=${limit}s ${SECONDS}s-total $((SECONDS - t0))s" | tee -a "$summary"
    tail -n 4 "$out/$name.log"
    return $rc
}
