#!/bin/sh
# One entry point for a fresh machine: installs what is missing, then runs.
#
#   sudo ./run.sh demo [--method uid|mark|cgroup|explicit]   watch interception happen
#   sudo ./run.sh test [PYTEST ARGS]                         the whole test suite
#   sudo ./run.sh bench [--quick]                            the benchmark (bench/README.md)
#   sudo ./run.sh proxy [sidecar-proxy ARGS]                 any sidecar-proxy command
#
# The package goes into its own virtual environment outside the checkout
# (SIDECAR_PROXY_VENV, default /opt/sidecar-proxy/venv), built from Debian's
# /usr/bin/python3: the proxy runs as UID 1337, which must be able to execute
# that interpreter (a Python under root's home directory is out of its reach).
set -eu

VENV="${SIDECAR_PROXY_VENV:-/opt/sidecar-proxy/venv}"
HERE="$(cd "$(dirname "$0")" && pwd)"
# the proxy and its tests; socat and haproxy are benchmark peers; linux-perf
# counts the benchmark's system calls; chromium renders the admin page in the
# browser test; podman (with runc: crun does not start on every cgroup set-up)
# builds the images and plays the manifests on Debian bases that debootstrap
# makes (tests/e2e/test_pods.py)
APT_PACKAGES="iptables nftables iproute2 util-linux procps shellcheck busybox socat haproxy linux-perf chromium python3-venv python3-pip podman runc debootstrap"

say() { printf 'run.sh: %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    say "needs root (network namespaces and iptables): try sudo $0 $*"
    exit 2
  fi
}

install_system_packages() {
  missing=""
  for tool in ip iptables nft setpriv shellcheck busybox socat haproxy perf chromium podman runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing="yes"
  done
  /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || missing="yes"
  [ -z "$missing" ] && return 0
  say "installing system packages: $APT_PACKAGES"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086  # a list of package names
  apt-get install -y -qq $APT_PACKAGES >/dev/null
}

install_python_packages() {
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    /usr/bin/python3 -m venv "$VENV"
  fi
  say "installing sidecar-proxy and its test and benchmark dependencies into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${HERE}[test,bench]"
}

main() {
  command="${1:-}"
  [ $# -gt 0 ] && shift
  case "$command" in
    test)
      need_root test
      install_system_packages
      install_python_packages
      cd "$HERE"
      exec "$VENV/bin/python" -m pytest "$@"
      ;;
    demo)
      need_root demo
      install_system_packages
      install_python_packages
      exec "$VENV/bin/sidecar-proxy" demo "$@"
      ;;
    bench)
      need_root bench
      install_system_packages
      install_python_packages
      cd "$HERE"
      exec "$VENV/bin/python" -m bench "$@"
      ;;
    proxy)
      need_root proxy
      install_system_packages
      install_python_packages
      exec "$VENV/bin/sidecar-proxy" "$@"
      ;;
    *)
      say "usage: $0 demo [--method uid|mark|cgroup|explicit] | test [PYTEST ARGS] | bench [--quick] | proxy [ARGS]"
      exit 2
      ;;
  esac
}

main "$@"
