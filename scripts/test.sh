#!/usr/bin/env bash
# scripts/test.sh: the full check, as CI runs it.
#
#   PostgreSQL (found or started, see scripts/pg.sh; tests create their own
#   databases on that server via DATABASE_URL)
#   -> headless Chromium (installed if missing, see scripts/browser.sh)
#   -> `fleetgate migrate` (creates DATABASE_URL's database on a fresh server)
#   -> cargo fmt --check -> cargo clippy -D warnings (whole workspace: the gateway
#   and bench/) -> cargo test
#   -> with CI=true: the quick benchmark (bench/, `fleetgate-bench all --quick`), which
#      proves the tool works; CI asserts nothing about its figures.
#
# Extra arguments go to `cargo test` (e.g. scripts/test.sh some_test_name).
# Exits with the status of the first failing step; the private PostgreSQL
# cluster, if this script started it, is stopped in any case.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"
# shellcheck source=scripts/pg.sh
source "$ROOT/scripts/pg.sh"
# shellcheck source=scripts/browser.sh
source "$ROOT/scripts/browser.sh"

# shellcheck disable=SC2317 # called by the EXIT trap
on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    fg_pg_stop_if_ours
    if ((rc == 0)); then
        fg_log "all checks passed"
    else
        fg_err "checks failed (exit status $rc)"
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# step NAME COMMAND...: run one check, stop at the first failure.
step() {
    local name=$1 rc=0
    shift
    fg_log "$name: $*"
    "$@" || rc=$?
    if ((rc != 0)); then
        fg_err "$name failed (exit status $rc)"
        exit "$rc"
    fi
}

if ! command -v cargo >/dev/null 2>&1 && [[ -f ${CARGO_HOME:-${HOME:-}/.cargo}/env ]]; then
    # shellcheck source=/dev/null
    source "${CARGO_HOME:-${HOME:-}/.cargo}/env"
fi
command -v cargo >/dev/null 2>&1 || {
    fg_err "cargo not found; install Rust (https://rustup.rs)"
    exit 1
}
# rustfmt and clippy are in rustup's default profile, but not in the minimal one.
for component in rustfmt clippy; do
    sub=${component/rustfmt/fmt}
    if ! cargo "$sub" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            fg_log "rustup component add $component"
            rustup component add "$component"
        else
            fg_err "cargo $sub is missing and rustup is not available to add $component"
            exit 1
        fi
    fi
done

fg_pg_ensure
export DATABASE_URL
# Headless Chromium for the live page's browser tests (FLEETGATE_SKIP_BROWSER=1 skips them).
fg_browser_ensure || {
    fg_err "could not install Chromium for the browser tests (FLEETGATE_SKIP_BROWSER=1 skips them)"
    exit 1
}

# The data-layer tests (#[sqlx::test]) create their databases through DATABASE_URL's database,
# which must exist: on a fresh server it does not yet. `fleetgate migrate` creates it.
step "database" cargo run --quiet -p fleetgate -- migrate
step "format" cargo fmt --all -- --check
step "clippy" cargo clippy --workspace --all-targets -- -D warnings
step "tests" cargo test "$@"

case ${CI:-} in
true | TRUE | True | 1)
    if [[ -f bench/Cargo.toml ]]; then
        step "benchmark (quick)" cargo run --release -p fleetgate-bench -- all --quick
    fi
    ;;
esac
