"""_Close: the internal exception that stops a connection's read loop and tears it down (raised
by a handler that closes without a reply, caught by ``MQTTConnection.run``)."""


class _Close(Exception):
    """Internal: stop reading and tear the connection down."""
