"""Build the Cython core (fluxmq/_core) on install; everything else is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

CORE_MODULES = [
    # the MQTT codec by concern; codec re-exports them for Python code
    "wire",
    "packets",
    "properties",
    "decoder",
    "encoder",
    "codec",
    "trie",
    "entry",
    "queue_wire",
    "forward",
    "stats_core",
    "broker_core",
    "conn_state",
    "outbuf",
    "framebuf",
    "publish_frame",
    "slots",
    "relay",
    "sent",
    "dqueue",
]

extensions = [
    Extension(f"fluxmq._core.{name}", [f"fluxmq/_core/{name}.pyx"], extra_compile_args=["-O2"])
    for name in CORE_MODULES
]
# The connection's typed hot state and the lone message's read-to-send path (does I/O: not in _core).
extensions.append(
    Extension("fluxmq.protocol._hub_read", ["fluxmq/protocol/_hub_read.pyx"], extra_compile_args=["-O2"])
)
# A Route stream's per-batch work between workers: the copies in and out of its shared-memory ring
# (fluxmq.cluster.ring), a batch's frame parsed and the ack's frame written and read.
extensions += [
    Extension(f"fluxmq.cluster.{name}", [f"fluxmq/cluster/{name}.pyx"], extra_compile_args=["-O2"])
    for name in ("_ringcopy", "_linkframe")
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
)
