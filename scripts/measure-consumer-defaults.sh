#!/usr/bin/env bash
# Measures the pipeline (consume, enrich, produce, commit) with kafka-batch's
# consumer buffer defaults against librdkafka's and the Python wrapper's, on
# an embedded broker running in its own process (so its memory is not counted).
# Prints messages a second and the pipeline process's peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time; }
cargo build -q --release --examples
records=${PIPELINE_RECORDS:-200000}
configs=(
  "kafka-batch defaults|"
  "librdkafka defaults|KAFKA_BATCH_CONSUMER__KAFKA__QUEUED_MAX_MESSAGES_KBYTES=65536 KAFKA_BATCH_CONSUMER__KAFKA__FETCH_MAX_BYTES=52428800"
  "Python wrapper's buffers|KAFKA_BATCH_CONSUMER__KAFKA__QUEUED_MAX_MESSAGES_KBYTES=10000 KAFKA_BATCH_CONSUMER__KAFKA__QUEUED_MIN_MESSAGES=100 KAFKA_BATCH_CONSUMER__KAFKA__FETCH_MAX_BYTES=1048576"
)
out=$(mktemp -d)
for config in "${configs[@]}"; do
  name=${config%%|*}
  read -r -a overrides <<<"${config#*|}"
  ./target/release/examples/broker pipeline-events:16 pipeline-enriched:16 >"$out/broker" 2>/dev/null &
  broker=$!
  until grep -q bootstrap.servers "$out/broker"; do sleep 0.1; done
  address=$(sed -n 's/bootstrap.servers=//p' "$out/broker")
  env "${overrides[@]}" KAFKA_BATCH_BOOTSTRAP_SERVERS="$address" PIPELINE_RECORDS="$records" \
    /usr/bin/time -v ./target/release/examples/pipeline >"$out/run" 2>"$out/time"
  rate=$(sed -n 's/^enriched.*(\([0-9]*\) messages\/s.*/\1/p' "$out/run")
  rss=$(awk '/Maximum resident/ {print $6}' "$out/time")
  echo "$name: $rate messages/s, peak RSS $((rss / 1024)) MiB"
  kill -TERM "$broker"
  wait "$broker" || true
done
rm -rf "$out"
