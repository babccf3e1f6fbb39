#!/usr/bin/env bash
# Build the Helm CLI from the Go module proxy into a cache directory outside the repository, once.
#
#   deploy/helm/install-helm.sh            # prints the path of the helm binary on stdout
#   HELM_VERSION=v3.16.3 deploy/helm/install-helm.sh
#
# Idempotent: when the cached binary already reports HELM_VERSION, nothing is built. Needs Go (>= the
# version Helm's go.mod asks for) and access to the Go module proxy; the first build takes a few minutes
# (downloads ~100 modules and compiles Kubernetes' client libraries), later runs take milliseconds.
# Logs go to stderr, so `HELM=$(deploy/helm/install-helm.sh)` works.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.16.3}"
BIN_DIR="${DISTILL_DETECTOR_BIN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/distill-detector/bin}"
HELM_BIN="$BIN_DIR/helm"

installed_version() {
  "$HELM_BIN" version --template '{{.Version}}' 2>/dev/null || true
}

if [[ -x "$HELM_BIN" && "$(installed_version)" == "$HELM_VERSION" ]]; then
  echo "$HELM_BIN"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "install-helm.sh: Go is needed to build helm $HELM_VERSION (https://go.dev/dl/), or put a helm" \
       "binary at $HELM_BIN" >&2
  exit 1
fi

mkdir -p "$BIN_DIR"
echo "install-helm.sh: building helm $HELM_VERSION with $(go version | cut -d' ' -f3) into $BIN_DIR" >&2
start=$(date +%s)
# `go install pkg@version` builds in module mode from the proxy, ignoring any go.mod around us; the
# version is stamped the way Helm's own Makefile does, so `helm version` reports it.
GOBIN="$BIN_DIR" GOFLAGS=-mod=mod CGO_ENABLED=0 \
  go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
  "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
echo "install-helm.sh: built helm $(installed_version) in $(( $(date +%s) - start ))s" >&2
echo "$HELM_BIN"
