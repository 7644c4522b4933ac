"""Authentication, authorization and abuse limits, independent of any wire protocol.

The MQTT protocol layer, the HTTP bridge and the transports ask the ``AuthService`` the broker
holds (``broker.auth``); nothing here knows a packet. Modules:

- ``password_file``: Mosquitto password files (``$6$`` and ``$7$`` hashes) and ``fluxmq-passwd``;
- ``acl``: Mosquitto ACL files compiled into a per-client trie with a per-topic decision cache;
- ``http_callout``: an HTTP authentication/authorization service with a bounded TTL cache;
- ``limits``: token buckets (per-IP connect rate, per-client publish rate) and topic caps;
- ``service``: ``AuthService`` and the per-connection ``ClientPolicy``.
"""
