#!/bin/bash
# Creates streamrec's topics; the one-shot `topics` service runs it in the apache/kafka image.
# Existing topics are kept. One whose partition count differs from PARTITIONS stops the job, because
# the workers are told PARTITIONS too and Kafka never shrinks a topic (docs/deploy.md, "Scaling out").
set -euo pipefail

kafka_topics=/opt/kafka/bin/kafka-topics.sh
bootstrap=${BOOTSTRAP:?set BOOTSTRAP, e.g. kafka:9092}
partitions=${PARTITIONS:?set PARTITIONS, the partition count of the data topics}
replication=${REPLICATION_FACTOR:?set REPLICATION_FACTOR, 1 for a single broker}

create() {
  local topic=$1 count=$2
  shift 2
  "$kafka_topics" --bootstrap-server "$bootstrap" --create --if-not-exists \
    --topic "$topic" --partitions "$count" --replication-factor "$replication" "$@"
  local actual
  actual=$("$kafka_topics" --bootstrap-server "$bootstrap" --describe --topic "$topic" | grep -c 'Partition: ')
  if [ "$actual" != "$count" ]; then
    echo "error: topic $topic has $actual partitions, expected $count; set PARTITIONS=$actual or recreate the topics (docs/deploy.md, 'Scaling out')" >&2
    exit 1
  fi
  echo "topic $topic: $actual partitions, replication factor $replication"
}

# Data topics share one partition count: a session's clicks and its recommendations stay on one partition number.
for topic in clicks recommendations clicks-dlq; do
  create "$topic" "$partitions"
done
# Control topic: few, small, ordered messages; compacted so the newest update is kept however old it is
# (a worker that starts reads it to the end and serves the newest bundle).
create model-updates 1 --config cleanup.policy=compact
