# Two images from one file (see deploy/README.md):
#
#   docker build --target proxy -t sidecar-proxy:0.1.0 .       the proxy (UID 1337, no capabilities)
#   docker build --target init  -t sidecar-proxy-init:0.1.0 .  the one-shot iptables step (sh + iptables)
#
# Base images are pinned by tag (what a reader understands) and by the digest of
# the tag's multi-platform index (what the builder actually pulls), so a rebuild
# gets the same bytes. To move to a newer release, change both; the digest is
# what `docker buildx imagetools inspect IMAGE:TAG` prints as "Digest".
#
# Both bases are build arguments, so the images also build without a registry:
# tests/e2e/test_pods.py builds them on local Debian bookworm minbase images with
#   podman build --network host --build-arg PYTHON_BASE=... --build-arg INIT_BASE=... --target proxy|init .
# The "local Debian base:" line above each ARG says what that test makes for it
# (it reads the line: debootstrap's minbase, + these packages); the rest of the
# comment is what the stages assume of any base.

# PYTHON_BASE, for the builder and the proxy stages. It must have:
#   - `python` (3.11+) on PATH, with the venv module and ensurepip: the official
#     image's is /usr/local/bin/python, Debian's /usr/bin/python (python-is-python3);
#     the venv links to whichever it is, so both stages use the same base;
#   - groupadd and useradd (Debian's passwd package; every Debian-based image).
# local Debian base: minbase + python3 python3-venv python-is-python3
ARG PYTHON_BASE=python:3.12.11-slim-bookworm@sha256:519591d6871b7bc437060736b9f7456b8731f1499a57e22e6c285135ae657bf7
# INIT_BASE, for the init stage: a POSIX /bin/sh and either apk (Alpine: the
# packages iptables, ip6tables, iptables-legacy) or apt-get (Debian: iptables,
# which has both backends and ip6tables).
# local Debian base: minbase
ARG INIT_BASE=alpine:3.22.2@sha256:4b7ce07002c69e8f3d704a9c5d6fd3053be500b7f1c69fc0d80990c2ad8dd412

# --- builder: the package and its dependencies in a venv -----------------------------
# Same base as the proxy stage: the venv's interpreter is a link to the base's
# python, so both stages must have the same one at the same path.
FROM ${PYTHON_BASE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's own variable, for this stage only (an ARG, so no image keeps it): a
# build whose TLS is intercepted passes the path of a CA bundle it mounts,
#   --volume BUNDLE:BUNDLE:ro --build-arg PIP_CERT=BUNDLE
# Unset by default, and then pip uses its own bundle.
ARG PIP_CERT

# uvloop and PyYAML ship binary wheels for amd64 and arm64, so no compiler is
# needed; a platform without wheels would need build tools here, never below.
RUN python -m venv /usr/local/sidecar-proxy
WORKDIR /src
# README.md* : the package metadata reads README.md when it is there.
COPY pyproject.toml README.md* ./
COPY proxy ./proxy
# The package's data files are the rule scripts (for `sidecar-proxy demo`
# outside a checkout), so setuptools needs them to build; the proxy never
# runs them (they are the init image's), so they leave the venv right after.
COPY iptables ./iptables
RUN /usr/local/sidecar-proxy/bin/pip install --no-cache-dir . \
    && /usr/local/sidecar-proxy/bin/pip uninstall --yes pip \
    && rm -rf /usr/local/sidecar-proxy/share/sidecar-proxy

# --- proxy: what runs in the pod -------------------------------------------------------
FROM ${PYTHON_BASE} AS proxy

LABEL org.opencontainers.image.title="sidecar-proxy" \
      org.opencontainers.image.description="Transparent TCP proxy for the redirected port (5001) of a service-mesh sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"

# Envoy's command line works here unchanged: Istio's binaryPath default finds
# sidecar-envoy as envoy (the link's target, the venv, is copied in below).
RUN ln -s /usr/local/sidecar-proxy/bin/sidecar-envoy /usr/local/bin/envoy

# A named account for UID/GID 1337 (the design note's ISTIO_PROXY_UID), so
# `ps` and file listings say who it is; the UID itself is what the iptables
# owner match and Kubernetes' runAsUser use.
RUN groupadd --system --gid 1337 sidecar-proxy \
    && useradd --system --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin sidecar-proxy

COPY --from=builder /usr/local/sidecar-proxy /usr/local/sidecar-proxy

# Bytecode was compiled at install time; at run time the root file system is
# read-only (readOnlyRootFilesystem), so never try to write it.
ENV PATH="/usr/local/sidecar-proxy/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 1337:1337

# 5001: the redirected port (ISTIO_PROXY_PORT). 15000: the admin API (/ready,
# /stats, /quitquitquit); it serves the probes from inside the pod.
EXPOSE 5001 15000

# Slim images have no curl: ask /ready with the standard library. urlopen
# raises on anything but 2xx, which exits non-zero.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:15000/ready', timeout=2)"]

# Exec form: the proxy is PID 1 and gets SIGTERM itself, which starts its
# drain (server.py). It starts no children, so no init (tini) is needed to
# reap zombies, and it installs its own SIGTERM/SIGINT handlers, which PID 1
# needs (the kernel applies no default action to PID 1).
STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar-proxy"]
CMD ["run"]

# --- init: the one-shot iptables step --------------------------------------------------
# Only a shell, iptables (both backends: Alpine's iptables is the nft one,
# iptables-legacy the other; which one a node needs is redirect.sh's choice),
# nft (the nft-native backend, and deleting the empty tables iptables-nft
# leaves) and the project's POSIX sh scripts. It runs as root with NET_ADMIN (and
# NET_RAW, which the legacy backend needs) and exits.
FROM ${INIT_BASE} AS init

LABEL org.opencontainers.image.title="sidecar-proxy-init" \
      org.opencontainers.image.description="Installs the iptables redirect to the sidecar proxy, once, at pod start" \
      org.opencontainers.image.licenses="Apache-2.0"

# Package versions are fixed by the pinned release of the base; pinning apk
# or apt versions too breaks the build whenever it ships a security fix.
# Alpine (the default base) or Debian (a local base): whichever package
# manager is there; Debian's iptables package has both backends, and its
# busybox gives validate.sh the nc and ip that Alpine's base has already.
# iproute2: route.sh's policy routing for --inbound-mode tproxy tags its rule
# with a protocol (`ip rule ... protocol`), which BusyBox's ip cannot.
# hadolint ignore=DL3008,DL3018
RUN if command -v apk >/dev/null; then \
        apk add --no-cache iptables ip6tables iptables-legacy nftables iproute2; \
    elif command -v apt-get >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends iptables nftables busybox iproute2 \
        && apt-get clean \
        && rm -rf /var/lib/apt/lists/*; \
    else \
        echo "INIT_BASE has neither apk nor apt-get" >&2; exit 1; \
    fi

COPY iptables/ /usr/local/lib/sidecar-proxy/iptables/

# Run through sh: the scripts need no executable bit, and redirect.sh finds
# lib.sh and method/*.sh next to itself. Flags (--method ...) come as args.
ENTRYPOINT ["/bin/sh", "/usr/local/lib/sidecar-proxy/iptables/redirect.sh"]
