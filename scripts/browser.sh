# shellcheck shell=bash
# scripts/browser.sh: make sure headless Chromium and chromedriver are installed, for the browser
# tests of the live page (tests/gateway/browser.rs).
#
# This is a library, meant to be sourced (scripts/test.sh does):
#
#   source scripts/browser.sh
#   fg_browser_ensure            # installs Debian's chromium + chromium-driver when missing
#
# The tests look for /usr/bin/chromium and /usr/bin/chromedriver (or FLEETGATE_CHROMIUM and
# FLEETGATE_CHROMEDRIVER). With FLEETGATE_SKIP_BROWSER=1 nothing is installed and the browser
# tests skip themselves. Functions return non-zero on failure and never call `exit`.

if [[ -n ${FG_BROWSER_SH_LOADED:-} ]]; then
    return 0
fi
FG_BROWSER_SH_LOADED=1

if ! declare -F fg_log >/dev/null; then
    fg_log() { printf '==> %s\n' "$*" >&2; }
    fg_warn() { printf '==> warning: %s\n' "$*" >&2; }
    fg_err() { printf '==> error: %s\n' "$*" >&2; }
fi

# Run a command as root: directly, or with sudo.
fg_browser__as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        fg_err "need root (or sudo) to run: $*"
        return 1
    fi
}

fg_browser__present() {
    [[ -x ${FLEETGATE_CHROMIUM:-/usr/bin/chromium} && -x ${FLEETGATE_CHROMEDRIVER:-/usr/bin/chromedriver} ]]
}

# Install chromium and chromium-driver from Debian's packages unless both are there.
fg_browser_ensure() {
    case ${FLEETGATE_SKIP_BROWSER:-} in
    1 | true | yes)
        fg_log "FLEETGATE_SKIP_BROWSER=$FLEETGATE_SKIP_BROWSER: browser tests will be skipped"
        return 0
        ;;
    esac
    if fg_browser__present; then
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        fg_err "chromium/chromedriver not found and apt-get is not available; install Chromium" \
            "and its driver (set FLEETGATE_CHROMIUM/FLEETGATE_CHROMEDRIVER), or set" \
            "FLEETGATE_SKIP_BROWSER=1 to skip the browser tests"
        return 1
    fi
    # Without recommends (no desktop services); a font package so that pages render text.
    fg_log "installing headless Chromium for the browser tests: apt-get install chromium chromium-driver"
    fg_browser__as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get -q -o DPkg::Lock::Timeout=300 update >&2 || return 1
    fg_browser__as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends \
        chromium chromium-driver fonts-dejavu-core >&2 || return 1
    if ! fg_browser__present; then
        fg_err "chromium-driver installed, but ${FLEETGATE_CHROMIUM:-/usr/bin/chromium} or" \
            "${FLEETGATE_CHROMEDRIVER:-/usr/bin/chromedriver} is still missing"
        return 1
    fi
}
