#!/usr/bin/env bash
# Mutation audit: breaks the code that decides and writes, one small change at a
# time, with cargo-mutants, and reports which breakages the tests catch. Not part of
# scripts/test.sh: a full run takes hours on a 2-core machine. docs/MUTATION.md explains the
# results and how to read them.
#
#   bash scripts/mutants.sh                         # every deciding/writing module
#   bash scripts/mutants.sh src/plan/guard.rs       # one module (paths or globs)
#   MUTANTS_TESTS="--lib --test it -- tests:: plan_props::" bash scripts/mutants.sh 'src/plan/*.rs'
#   MUTANTS_ARGS="--shard 1/4" bash scripts/mutants.sh  # extra cargo-mutants options
#
# Environment (all optional):
#   MUTANTS_JOBS            parallel build/test jobs (default 1; each one copies the tree)
#   MUTANTS_TIMEOUT         seconds one mutant's test run may take (default 900); a mutant
#                           that makes the tests hang counts as "timeout" (caught, in effect)
#   MUTANTS_BUILD_TIMEOUT   seconds one mutant's build may take (default 900)
#   MUTANTS_TESTS           arguments for `cargo test` (default: the library's unit tests and
#                           the integration tests that judge safety; see SAFETY_TESTS below)
#   MUTANTS_ARGS            more cargo-mutants options, e.g. "--re finish" or "--shard 1/4"
#   MUTANTS_OUT             output directory (default target/mutants; results in
#                           $MUTANTS_OUT/mutants.out/{caught,missed,timeout,unviable}.txt)
#   CARGO_MUTANTS_VERSION   version to install (default 27.1.0)
#
# cargo-mutants copies the tree to a scratch directory and mutates the copy, so the working
# tree is never touched. With one job the copy builds into target/mutants-target, which keeps
# the compiled dependencies between runs and never mixes with target/debug.
set -euo pipefail
cd "$(dirname "$0")/.."

version="${CARGO_MUTANTS_VERSION:-27.1.0}"
tools="$PWD/target/tools"
bin="$tools/bin/cargo-mutants"
if [[ ! -x "$bin" ]] || ! "$bin" mutants --version 2>/dev/null | grep -q "$version"; then
    echo "installing cargo-mutants $version into $tools"
    cargo install --locked cargo-mutants --version "$version" --root "$tools"
fi

bash scripts/ensure-postgres.sh test
export TEST_DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

# The modules that decide (plan), write (store), see the cluster (listing and confirmation)
# and put them in order (sweep).
if [[ $# -gt 0 ]]; then
    files=("$@")
else
    files=(src/plan/decide.rs src/plan/guard.rs src/plan/mod.rs src/store/*.rs src/cluster/kube_api/*.rs src/sweep/*.rs)
fi
file_args=()
for f in "${files[@]}"; do
    file_args+=(--file "$f")
done

# Tests that judge safety: the library's unit tests (every one is in a `tests` module) and
# these modules of the integration-test binary (tests/it/), chosen by name filters. The daemon,
# soak and Prometheus tests are left out by default: they take minutes each and repeat what
# these check through the same code. (The fake API server's conformance tests are in the
# testkit crate, which no mutant of the reconciler changes.)
SAFETY_TESTS="--lib --test it -- tests:: rules:: sweep:: faults:: plan_props:: cli:: undo:: bad_input::"
read -r -a test_args <<<"${MUTANTS_TESTS:-$SAFETY_TESTS}"
read -r -a extra_args <<<"${MUTANTS_ARGS:-}"

jobs="${MUTANTS_JOBS:-1}"
out="${MUTANTS_OUT:-target/mutants}"
mkdir -p "$out"
if [[ "$jobs" == 1 ]]; then
    export CARGO_TARGET_DIR="$PWD/target/mutants-target"
fi

echo "mutating: ${files[*]}"
echo "tests:    cargo test ${test_args[*]}"
set +e
"$bin" mutants \
    "${file_args[@]}" \
    --jobs "$jobs" \
    --timeout "${MUTANTS_TIMEOUT:-900}" \
    --build-timeout "${MUTANTS_BUILD_TIMEOUT:-900}" \
    --output "$out" \
    --copy-target=false \
    --colors never \
    --caught --unviable \
    ${extra_args[@]+"${extra_args[@]}"} \
    -- "${test_args[@]}"
status=$?
set -e

# cargo-mutants exits 0 when every mutant was caught, 2 when some were missed, 3 when some
# timed out, 4 when the unmutated tree failed its tests (nothing else is meaningful then).
results="$out/mutants.out"
count() {
    if [[ -f "$results/$1.txt" ]]; then
        grep -c . "$results/$1.txt" || true
    else
        echo 0
    fi
}
echo
echo "== mutation audit: ${files[*]}"
if [[ $status -eq 4 ]]; then
    echo "the unmutated tree fails its tests; fix that first ($results/log/baseline.log)"
    exit 4
fi
caught=$(count caught)
missed=$(count missed)
timeout=$(count timeout)
unviable=$(count unviable)
echo "caught:   $caught"
echo "timeout:  $timeout (the tests hung or ran past ${MUTANTS_TIMEOUT:-900}s: caught in effect)"
echo "missed:   $missed"
echo "unviable: $unviable (did not build; say nothing about the tests)"
if [[ "$missed" != 0 ]]; then
    echo
    echo "missed mutants (each on a safety path needs a test or a written reason in docs/MUTATION.md):"
    sed 's/^/  /' "$results/missed.txt"
fi
echo "mutation audit: $caught caught, $missed missed, $timeout timeout, $unviable unviable"
exit "$status"
