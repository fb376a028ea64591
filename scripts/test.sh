#!/usr/bin/env bash
# Runs every test tier of kafka-batch. On a fresh Debian machine it first
# installs what building librdkafka needs, and tansu (in the background).
#
#   tier 1: unit and property tests of the pure layers (envelope, settings, offsets)
#   tier 2: integration tests against the embedded broker (librdkafka's mock
#           cluster, on loopback, inside each test process): the promise
#           checker (tests/promise.rs), the regressions, the kafka-batch
#           command run as a user would, the Prometheus endpoint scraped over
#           HTTP, the job queue (tests/jobs.rs); and doc tests
#   bad input: 1,000,000 arbitrary keys, values and headers through the
#           decoder, in release mode (tests/decode_fuzz.rs)
#   tier 3: reliability on a real broker: tansu (an Apache Kafka compatible
#           broker from crates.io, installed here once, ~12 minutes on 2
#           cores), started on a free loopback port and stopped by its
#           process id when this script ends, pass or fail; consumer group
#           member processes joined, left, killed with SIGKILL and stopped
#           with SIGTERM (tests/real_broker.rs, examples/group_member.rs);
#           the job queue's topics created and its jobs run
#           (tests/real_broker_jobs.rs)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in libssl-dev pkg-config zlib1g-dev make g++ python3; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing build dependencies: ${need[*]}"
  apt-get update -qq && apt-get install -y -qq "${need[@]}"
fi

# tansu for tier 3: its install (about 12 minutes on 2 cores, once) runs in
# the background while the other tiers build and run.
TANSU_VERSION=0.6.0
export PATH="$HOME/.cargo/bin:$PATH"
tansu_install_log=$(mktemp)
tansu_install=
tansu_pid=
tansu_log=
# Whatever happens, stop what this script started, by process id.
cleanup() {
  local status=$?
  if [ "$status" -ne 0 ] && [ -n "$tansu_log" ] && [ -s "$tansu_log" ]; then
    echo "the last lines tansu logged:"
    tail -n 40 "$tansu_log"
  fi
  for pid in $tansu_install $tansu_pid; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -f "$tansu_install_log" ${tansu_log:+"$tansu_log"}
}
trap cleanup EXIT
if ! tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
  echo "installing tansu $TANSU_VERSION in the background (log: $tansu_install_log)"
  nice -n 5 cargo install tansu --version "$TANSU_VERSION" --features dynostore --locked \
    >"$tansu_install_log" 2>&1 &
  tansu_install=$!
fi

# Every feature is built and tested: the `cli` command and the `prometheus`
# endpoint are off by default for services, and their tests need them on.
echo "== tier 1: unit and property tests (default features, then all)"
cargo test --lib
cargo test --lib --all-features
echo "== tier 2: integration tests on the embedded broker (the promise checker, the kafka-batch command, the Prometheus endpoint included), and doc tests"
cargo test --all-features --test '*'
cargo test --all-features --doc
echo "== bad input: 1,000,000 fuzzed records through the decoder"
KAFKA_BATCH_FUZZ_CASES=1000000 cargo test --release --test decode_fuzz -- --nocapture

echo "== tier 3: reliability on a real broker (tansu)"
if [ -n "$tansu_install" ]; then
  echo "waiting for the tansu install to finish"
  if ! wait "$tansu_install"; then
    cat "$tansu_install_log"
    echo "installing tansu failed (log above)"
    exit 1
  fi
  tansu_install=
fi
cargo build --release --example group_member
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
tansu_log=$(mktemp)
# tansu logs at RUST_LOG's level: a verbose one inherited from the caller
# writes gigabytes a minute, so it is held at warnings.
RUST_LOG=warn tansu broker \
  --listener-url "tcp://127.0.0.1:$port" \
  --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine memory://tansu/ >"$tansu_log" 2>&1 &
tansu_pid=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  kill -0 "$tansu_pid" 2>/dev/null || { cat "$tansu_log"; echo "tansu did not start"; exit 1; }
  sleep 0.2
done
echo "tansu $TANSU_VERSION (pid $tansu_pid) listening on 127.0.0.1:$port"
REAL_BROKER_BOOTSTRAP="127.0.0.1:$port" \
REAL_BROKER_MEMBER_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/examples/group_member" \
  cargo test --release --test real_broker -- --test-threads=1
REAL_BROKER_BOOTSTRAP="127.0.0.1:$port" \
  cargo test --release --test real_broker_jobs
