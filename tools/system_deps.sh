#!/usr/bin/env bash
# The Debian packages the tests need, installed when missing (`make system-deps`, run by `make test`):
# chromium + chromium-driver (the web demo's browser test), openssl (the serve TLS test's throwaway
# certificate), redis-server (the durable-conversation tests against a real Redis), gcc + libc6-dev (serve
# builds its argv_secrets library with them). Fails loudly when they cannot be installed: a missing install
# step must never show up as a skipped test.
set -euo pipefail
need=""
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need="$need chromium"
command -v chromedriver >/dev/null 2>&1 || need="$need chromium-driver"
command -v openssl >/dev/null 2>&1 || need="$need openssl"
command -v redis-server >/dev/null 2>&1 || need="$need redis-server"
# a C compiler: serve builds its small argv_secrets preload library with it (keys off tritonserver's command line)
{ command -v cc >/dev/null 2>&1 && [ -f /usr/include/stdio.h ]; } || need="$need gcc libc6-dev"
[ -z "$need" ] && exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
command -v apt-get >/dev/null 2>&1 || { echo "error: the tests need Debian's$need and this machine has no apt-get; install them, then rerun" >&2; exit 1; }
echo "installing Debian packages:$need" >&2
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need; } >/dev/null; then
  echo "error: could not install$need (apt-get failed); the tests need them" >&2
  exit 1
fi
