# cython: language_level=3
"""Sans-IO MQTT codec for 3.1 (level 3, ``MQIsdp``), 3.1.1 (level 4) and 5.0 (level 5): the public
import surface of the modules that hold it, one concern each.

* ``packets``: the packet classes (``Connect``, ``Publish``, ...) and the packet type numbers;
* ``properties``: the MQTT 5.0 property identifiers, their table, and the property block's reader
  and writer;
* ``decoder``: ``Decoder.feed(data)`` turns a byte stream into packet objects;
* ``encoder``: ``encode`` turns a packet object into bytes; ``encode_publish`` and
  ``append_publish`` are the fan-out fast paths;
* ``wire``: the byte-level data representation they share (integers, Variable Byte Integers,
  strings, binary data).

The codec holds no socket and knows nothing of sessions. Cython modules cimport from the module that
holds a name; Python code imports from here. This module stays compiled (not a ``codec.py``) so that
a checkout built before the split cannot go on loading its stale ``codec`` extension instead.
"""

from fluxmq._core.decoder import Decoder
from fluxmq._core.encoder import append_publish, encode, encode_publish
from fluxmq._core.packets import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    MQTT5,
    MQTT31,
    MQTT311,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    _TYPE_NAMES,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
    _PublishAck,
    _Record,
)
from fluxmq._core.properties import (
    ASSIGNED_CLIENT_IDENTIFIER,
    AUTHENTICATION_DATA,
    AUTHENTICATION_METHOD,
    CONTENT_TYPE,
    CORRELATION_DATA,
    MAXIMUM_PACKET_SIZE,
    MAXIMUM_QOS,
    MESSAGE_EXPIRY_INTERVAL,
    PAYLOAD_FORMAT_INDICATOR,
    REASON_STRING,
    RECEIVE_MAXIMUM,
    REQUEST_PROBLEM_INFORMATION,
    REQUEST_RESPONSE_INFORMATION,
    RESPONSE_INFORMATION,
    RESPONSE_TOPIC,
    RETAIN_AVAILABLE,
    SERVER_KEEP_ALIVE,
    SERVER_REFERENCE,
    SESSION_EXPIRY_INTERVAL,
    SHARED_SUBSCRIPTION_AVAILABLE,
    SUBSCRIPTION_IDENTIFIER,
    SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    TOPIC_ALIAS,
    TOPIC_ALIAS_MAXIMUM,
    USER_PROPERTY,
    WILDCARD_SUBSCRIPTION_AVAILABLE,
    WILL_DELAY_INTERVAL,
)
from fluxmq._core.wire import MAX_REMAINING_LENGTH
from fluxmq.errors import (
    MalformedPacket,
    MQTTError,
    PacketTooLarge,
    ProtocolError,
    TopicNameInvalid,
    UnsupportedProtocolVersion,
)
