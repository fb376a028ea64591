#!/usr/bin/env bash
# Runs every test tier of kafka-batch. On a fresh Debian machine it first
# installs what building librdkafka needs.
#
#   tier 1: unit and property tests of the pure layers (envelope, settings, offsets)
#   tier 2: integration tests against the embedded broker (librdkafka's mock
#           cluster, on loopback, inside each test process), and doc tests
#   bad input: 1,000,000 arbitrary keys, values and headers through the
#           decoder, in release mode (tests/decode_fuzz.rs)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in libssl-dev pkg-config zlib1g-dev make g++; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing build dependencies: ${need[*]}"
  apt-get update -qq && apt-get install -y -qq "${need[@]}"
fi

echo "== tier 1: unit and property tests"
cargo test --lib
echo "== tier 2: integration tests on the embedded broker, and doc tests"
cargo test --test '*'
cargo test --doc
echo "== bad input: 1,000,000 fuzzed records through the decoder"
KAFKA_BATCH_FUZZ_CASES=1000000 cargo test --release --test decode_fuzz -- --nocapture
