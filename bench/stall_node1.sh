#!/bin/bash
# Reproduces a node stalled during session moves (docs/cluster.rst, "A node stalled during the
# moves"): runs one e2e test and SIGSTOPs its node1 (e2: arbiter and worker) for a few seconds, so
# its etcd lease (lease_ttl 2 s in the e2e tests) is lost. Prints the test's "moves:" line and
# result; the nodes' logs stay under the basetemp.
#   bench/stall_node1.sh TREE BASETEMP TESTID DELAY STALL
#   bench/stall_node1.sh . /tmp/stall 'tests/e2e/test_moving_sessions.py::test_a_session_moving_between_nodes_loses_no_message_and_doubles_no_qos2_one[1-own]' 5 4
# DELAY: seconds after node1 appears; STALL: seconds it stays stopped.
cd "$1" || exit 1
rm -rf "$2"
timeout 300 /work/main/.venv/bin/python -m pytest -q -p no:randomly "$3" --basetemp="$2" -s > "$2.out" 2>&1 &
PY=$!
PAT="fluxmq.node.cli --config $2/.*/nodes/node1/"
for _ in $(seq 1 150); do P=$(pgrep -f "$PAT" | tr '\n' ' '); [ -n "$P" ] && break; sleep 0.2; done
sleep "$4"
P=$(pgrep -f "$PAT" | tr '\n' ' ')
echo "node1 pids: $P"
# shellcheck disable=SC2086
kill -STOP $P; sleep "$5"; kill -CONT $P
wait $PY
grep -E "moves:|passed|failed|lost runs|lease" "$2.out" | head -8
