#!/usr/bin/env bash
# Set up everything gateway needs on Debian 12, then run the demo or the tests.
#
#   ./run.sh demo [args]         .venv/bin/gateway demo [args]
#   ./run.sh test [pytest args]  ruff check, then pytest -q -rs tests [pytest args]
#   ./run.sh bench [args]        benchmarks/bench.py [args] (minutes: see its --help)
#
# Each call is self-sufficient and idempotent: missing apt packages are
# installed (apt is skipped when all are present), .venv is created and the
# project (with its cffi extension gateway._native) reinstalled only when
# pyproject.toml / setup.py / cffi_build/* changed, bcc from Debian is made
# importable in the venv, and the guest kernel image for the QEMU tests is
# cached in ${GATEWAY_CACHE:-/var/cache/gateway}. Runs as root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.gateway-install-stamp"
export GATEWAY_CACHE="${GATEWAY_CACHE:-/var/cache/gateway}"

APT_PACKAGES=(
    dpdk-dev qemu-system-x86 python3-bpfcc libxdp-dev libbpf-dev linux-headers-amd64
    busybox-static ethtool iproute2 python3-venv python3-dev pkg-config gcc make git
    clang libclang-rt-14-dev
    golang-go golang-github-appc-cni-dev
    systemd
    prometheus
    libvirt-daemon-system libvirt-clients
    tcpdump tshark
)

log() { printf '[run.sh] %s\n' "$*" >&2; }
die() { printf '[run.sh] error: %s\n' "$*" >&2; exit 1; }

usage() {
    cat >&2 <<EOF
usage: $0 demo [args]          run the demo (gateway demo)
       $0 test [pytest args]   ruff check + pytest
       $0 bench [args]         the benchmark (benchmarks/bench.py)
EOF
    exit 2
}

ensure_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (apt packages, network namespaces, XDP): sudo $0 $*"
}

ensure_apt() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]; then
            missing+=("$p")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}" </dev/null
}

python_ok() { # python_ok BIN: true if BIN runs and is >= 3.11
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

pick_python() {
    local c
    for c in python3 python3.13 python3.12 python3.11 /usr/bin/python3; do
        if command -v "$c" >/dev/null 2>&1 && python_ok "$c"; then
            command -v "$c"
            return 0
        fi
    done
    die "no python3 >= 3.11 found (apt-get install python3 python3-venv)"
}

ensure_venv() {
    if [ -x "$VENV/bin/python" ] && python_ok "$VENV/bin/python" \
        && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        return 0
    fi
    local py
    py="$(pick_python)"
    log "creating $VENV with $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
    rm -rf "$VENV"
    "$py" -m venv "$VENV" || die "python venv creation failed (apt-get install python3-venv?)"
}

install_hash() {
    # everything that changes what `pip install -e` builds
    {
        sha256sum pyproject.toml
        [ -f setup.py ] && sha256sum setup.py
        find cffi_build -type f \( -name '*.py' -o -name '*.c' -o -name '*.h' \) -print0 \
            | sort -z | xargs -0 -r sha256sum
        "$VENV/bin/python" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}

native_ok() {
    # The extension must import from this checkout and be newer than its sources: an
    # older in-tree build (e.g. _native.cpython-311-*.so from build_native.py) takes
    # precedence over pip's _native.abi3.so and would shadow it.
    "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import pathlib, sys
import gateway, gateway._native
root = pathlib.Path.cwd().resolve()
so = pathlib.Path(gateway._native.__file__).resolve()
if not so.is_relative_to(root):
    sys.exit(1)
srcs = [p for p in (root / "cffi_build").iterdir() if p.suffix in (".c", ".h", ".py")]
sys.exit(0 if all(so.stat().st_mtime >= p.stat().st_mtime for p in srcs) else 1)
EOF
}

ensure_install() {
    local want
    want="$(install_hash)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && native_ok; then
        return 0
    fi
    log "pip install -e '.[test]'"
    rm -f "$STAMP"
    touch "$VENV/.install-start"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]' </dev/null
    # drop in-tree builds of the extension older than this install: they shadow the new one
    find gateway -maxdepth 1 -name '_native*.so' ! -newer "$VENV/.install-start" -print -delete \
        | sed 's/^/[run.sh] removed stale /' >&2
    if ! native_ok; then
        # Editable installs may leave the built extension in a build dir only:
        # build it next to the sources, where `import gateway._native` finds it.
        log "gateway._native not importable after pip install -e: building it in place"
        "$VENV/bin/python" setup.py -q build_ext --inplace
        native_ok || die "gateway._native still not importable: $("$VENV/bin/python" -c \
            'import gateway._native' 2>&1 | tail -1)"
    fi
    echo "$want" >"$STAMP"
}

ensure_bcc() {
    local dist=/usr/lib/python3/dist-packages/bcc site
    [ -d "$dist" ] || die "$dist missing (apt-get install python3-bpfcc)"
    mkdir -p "$VENV/bcc-link"
    ln -sfn "$dist" "$VENV/bcc-link/bcc"
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$VENV/bcc-link" >"$site/gateway-bcc.pth"
    "$VENV/bin/python" -c 'import bcc' 2>/dev/null \
        || die "'import bcc' fails in the venv: $("$VENV/bin/python" -c 'import bcc' 2>&1 | tail -1)"
}

export_bcc_env() {
    # Debian's linux-headers-amd64 splits the 6.1 headers in -common and -amd64:
    # bcc needs kconfig.h from -common and the generated headers from -amd64.
    local common="" arch="" d
    for d in $(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V); do common="$d"; done
    [ -n "$common" ] || { log "warning: no /usr/src/linux-headers-*-common"; return 0; }
    arch="${common%-common}-amd64"
    [ -d "$arch" ] || { log "warning: $arch missing"; return 0; }
    export BCC_KERNEL_SOURCE="${BCC_KERNEL_SOURCE:-$common}"
    # extra clang flags for bcc's BPF(cflags=...): read by gateway's XDP loader
    export GATEWAY_BPF_CFLAGS="${GATEWAY_BPF_CFLAGS:--I$arch/arch/x86/include/generated -I$arch/include -I$arch/arch/x86/include/generated/uapi -I$arch/include/generated/uapi}"
}

ensure_guest_cache() {
    log "guest image cache: $GATEWAY_CACHE"
    "$VENV/bin/python" -c 'from gateway.testing.guest import ensure_guest; print(ensure_guest())' \
        >/dev/null || die "building the QEMU guest image failed"
}

setup() {
    ensure_root "$@"
    ensure_apt
    ensure_venv
    ensure_install
    ensure_bcc
    export_bcc_env
    export PATH="$VENV/bin:$PATH"
}

main() {
    [ $# -ge 1 ] || usage
    local cmd="$1"
    shift
    case "$cmd" in
    test)
        setup "$cmd"
        ensure_guest_cache
        log "ruff check"
        "$VENV/bin/ruff" check .
        # default to the whole tests/ directory unless test paths were given
        local a paths=(tests)
        for a in "$@"; do
            if [[ "$a" != -* && -e "${a%%::*}" ]]; then
                paths=()
                break
            fi
        done
        log "pytest"
        local rc=0
        "$VENV/bin/python" -m pytest -q -rs "${paths[@]}" "$@" </dev/null || rc=$?
        exit "$rc"
        ;;
    demo)
        setup "$cmd"
        "$VENV/bin/python" -c 'import gateway.cli' 2>/dev/null \
            || die "gateway.cli does not import: $("$VENV/bin/python" -c 'import gateway.cli' 2>&1 | tail -1)"
        exec "$VENV/bin/gateway" demo "$@"
        ;;
    bench)
        setup "$cmd"
        exec "$VENV/bin/python" benchmarks/bench.py "$@"
        ;;
    -h | --help | help) usage ;;
    *) usage ;;
    esac
}

main "$@"
