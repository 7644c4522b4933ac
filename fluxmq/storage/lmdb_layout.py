"""The on-disk layout of the LMDB store (``lmdb.LMDBStorage``): its sub-databases, their keys,
the schema version and what each version added. Nothing outside ``fluxmq.storage`` reads it.

Layout (named sub-databases; keys in ``records``)::

    meta           b"magic" -> MAGIC, b"schema_version" -> u32, b"last_alive" -> f64 wall time,
                   b"gc" NUL client_id -> u64: that client's queue entries below this seq are garbage,
                   b"peer" NUL node id -> u64 epoch, u64 seq: the last batch from that cluster peer
                   whose effects are stored (older builds ignore these keys)
    sessions       client_id -> session record
    subscriptions  client_id NUL filter -> options
    inflight       client_id NUL u16 packet id -> entry (outbound QoS 1/2 awaiting PUBACK/PUBCOMP)
    inbound_qos2   client_id NUL u16 packet id -> b"" (inbound QoS 2 awaiting PUBREL)
    queue          client_id NUL u64 seq -> entry (schema 3), or a segment: the entries of seqs
                   seq.. that one commit stored (schema 4; records.encode_segment). The offline
                   queue in order, and the entries of QoS 1/2 messages in flight, named by ``sent``
    sent           client_id NUL u16 (packet id // 16) -> 16 slots: the queue seq each packet id
                   in flight carries, and its QoS 2 released flag (schema 3; records.encode_sent)
    done           client_id NUL -> the client's queue seqs that are done (acknowledged or taken
                   out): a floor and ranges above it (schema 4; records.encode_done)
    retained       topic -> message
    wills          client_id -> delay + message
    queues         durable queue logs, consumer-group progress, delivery counts (schema 3) and
                   persistent sessions' group memberships (schema 3); see queue_log.py
"""

from __future__ import annotations

import struct

MAGIC = b"fluxmq-storage"
#: 2 added the ``queues`` sub-database (durable queues); 3 added ``sent`` (outbound QoS 1/2 in flight
#: as queue entries, see above) and record kinds in ``queues`` (delivery counts, group memberships:
#: queue_log.py), which an older build would misread. An older store is upgraded at open (_migrate).
#: 4 writes a session's queue entries of one commit as one ``queue`` record (a segment) and marks
#: acknowledged ones in its ``done`` record instead of deleting each; schema 3 records read as they are.
SCHEMA_VERSION = 4

DB_NAMES = (
    b"meta",
    b"sessions",
    b"subscriptions",
    b"inflight",
    b"inbound_qos2",
    b"queue",
    b"retained",
    b"wills",
    b"queues",
    b"sent",
    b"done",
)
META, SESSIONS, SUBS, INFLIGHT, INBOUND, QUEUE, RETAINED, WILLS, QUEUES, SENT, DONE = range(len(DB_NAMES))
# Sub-databases added by each schema version (an older store gets them at open: _migrate).
# 3 also: new keys in ``queues``; 4 also: segments in ``queue``; nothing to convert for either.
_ADDED_IN = {2: (b"queues",), 3: (b"sent",), 4: (b"done",)}
# Sub-databases whose keys do not start with a client id (Batch.clients skips them).
_SHARED_DBS = (META, RETAINED, QUEUES)
# Sub-databases whose keys start with client_id NUL: a session's end deletes by prefix there.
# Queues are deleted apart, a chunk per commit (see _gc_queue): 100,000 entries take ~0.1 s.
_CLIENT_DBS = (SUBS, INFLIGHT, INBOUND, SENT, DONE)
_STATE_DBS = (INFLIGHT, INBOUND, SENT, DONE)
_GC_PREFIX = b"gc\x00"
_PEER_PREFIX = b"peer\x00"
_PEER_BATCH = struct.Struct("<QQ")

# values in ``meta``
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")
