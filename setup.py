"""Build the Cython core (fluxmq/_core) on install; everything else is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

CORE_MODULES = ["codec", "trie", "entry", "queue_wire", "forward", "relay", "sent", "dqueue"]

extensions = [
    Extension(f"fluxmq._core.{name}", [f"fluxmq/_core/{name}.pyx"], extra_compile_args=["-O2"])
    for name in CORE_MODULES
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
