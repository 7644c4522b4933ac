"""The shared etcd fixture serves the v3 API through etcd3gw (the client the cluster uses)."""

import etcd3gw


def test_shared_etcd_answers_v3_puts_and_gets(etcd_server, etcd_prefix):
    host, port = etcd_server.endpoint.rsplit("//", 1)[1].split(":")
    client = etcd3gw.client(host=host, port=int(port))
    key = etcd_prefix + "k"
    client.put(key, "v")
    assert client.get(key) == [b"v"] or client.get(key) == ["v"]
