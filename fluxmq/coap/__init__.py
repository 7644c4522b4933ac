"""CoAP bridge (RFC 7252, 7641, 7959): publish, read retained messages and observe topics over UDP/DTLS.

``codec`` is the sans-IO message codec; ``bridge`` answers requests (routes, auth, Observe, block-wise
transfer) without knowing the transport, ``observation`` is an observer's session delivery, ``settings``
the bridge's knobs; ``listener`` runs it on a gevent UDP socket, ``dtls`` on DTLS.
This package calls the broker's public API and the auth service; it never imports ``protocol`` or ``http``.
"""
