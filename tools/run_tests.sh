#!/usr/bin/env bash
# Install what the tests need (mosquitto from Debian, meshdl with its test extras) and
# run the whole suite. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  fi
fi
# torch==2.13.0 (CPU build) is pinned in setup.py: pip takes it from the local wheel cache
python -m pip install -q -e ".[test]"
python -m pytest -q "$@"
