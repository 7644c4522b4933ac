#!/bin/sh
# A 2-worker node (memory storage) under mqttload fan-out 1 -> 100 (window 1000), both workers
# sampled by py-spy for 3 s (raw stacks in /tmp/wbench/spy-<pid>.txt). Needs /tmp/wbench/mqttload:
#   gcc -O2 -o /tmp/wbench/mqttload ../shared/tools/mqttload.c -lpthread
set -e
mkdir -p /tmp/wbench
cd /work/wt/w-workers
P=$(/work/main/.venv/bin/python -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
H=$(/work/main/.venv/bin/python -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
/work/main/.venv/bin/python -m fluxmq.node.cli --set server.workers=2 --set server.tcp.plain.addr=127.0.0.1:$P --set server.health_addr=127.0.0.1:$H --set server.websocket.plain.addr= --set server.http.plain.addr= --set server.admin.addr= --set storage.type=memory --set broker.max_queued_messages=1000000 --set log.level=warning > /tmp/wbench/spynode.log 2>&1 &
NODE=$!
sleep 3
W=$(cat /proc/$NODE/task/$NODE/children)
taskset -c 0 /tmp/wbench/mqttload --mode fanout --subs 100 --count 20000 --duration 6 --port $P > /tmp/wbench/spyload.txt 2>&1 &
L=$!
sleep 1
for w in $W; do /work/main/.venv/bin/py-spy record -p $w -d 3 -r 200 -f raw -o /tmp/wbench/spy-$w.txt > /dev/null 2>&1 & done
wait $L
sleep 1
kill $NODE; wait $NODE
echo $W
