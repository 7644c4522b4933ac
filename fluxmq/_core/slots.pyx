# cython: language_level=3
"""Objects of a ``__slots__`` class made in C without calling its ``__init__``.

The relay makes a ``Message`` per QoS 1 message and an ``Inflight`` per QoS 1 delivery; a call of a
Python class runs its ``__init__`` frame (callgrind: ~2,700 instructions for a ``Message``, ~2,500
for an ``Inflight``). ``SlotMaker(cls, names)`` checks that ``names`` are exactly the slots of
``cls`` (each a plain member descriptor, no ``__dict__``) and keeps each one's offset; ``new()``
allocates an instance as ``object.__new__`` does (every slot unset) and ``put(obj, i, value)``
fills slot ``names[i]``. The caller fills every slot, as the class's ``__init__`` would (tests
compare the two for the relay's classes).

No I/O and no fluxmq imports.
"""

from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF, Py_XDECREF

from types import MemberDescriptorType


cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    object PyType_GenericAlloc(PyTypeObject* t, Py_ssize_t nitems)


cdef Py_ssize_t slot_offset(cls, str name) except -2:
    """The byte offset in an instance of ``cls`` of its slot ``name`` (what the class's member
    descriptor reads: an object pointer, NULL while unset), or -1 when the attribute the class
    finds for ``name`` is not a plain member descriptor (a property, a class attribute, none)."""
    descr = getattr(cls, name, None)
    if type(descr) is not MemberDescriptorType:
        return -1
    return (<PyMemberDescrObject*><PyObject*>descr).d_member.offset


cdef class SlotMaker:
    """Makes instances of ``cls`` whose slots are ``names`` (in that order for ``put``)."""

    def __init__(self, cls, tuple names):
        if not isinstance(cls, type) or len(names) > 16:
            raise TypeError("a class with at most 16 slots")
        slots = set()
        for klass in cls.__mro__:
            if klass is object:
                continue
            found = klass.__dict__.get("__slots__")
            if found is None:
                raise TypeError(f"{klass.__name__} has no __slots__ (instances have a __dict__)")
            slots.update((found,) if isinstance(found, str) else found)
        if slots != set(names) or len(names) != len(slots):
            raise TypeError(f"{cls.__name__}'s slots are {sorted(slots)}, not {sorted(names)}")
        if cls.__new__ is not object.__new__ or (<PyTypeObject*>cls).tp_itemsize:
            raise TypeError(f"{cls.__name__} is not made by object.__new__")
        self.cls = cls
        self.count = len(names)
        for i, name in enumerate(names):
            self.offsets[i] = slot_offset(cls, name)
            if self.offsets[i] < 0:
                raise TypeError(f"{cls.__name__}.{name} is not a slot")

    cdef object new(self):
        """An instance with every slot unset (``object.__new__``'s allocation)."""
        return PyType_GenericAlloc(<PyTypeObject*>self.cls, 0)

    cdef void put(self, object obj, Py_ssize_t i, object value) noexcept:
        """Set slot ``i`` of ``obj`` (made by ``new``) to ``value``."""
        cdef PyObject** slot = <PyObject**>((<char*><PyObject*>obj) + self.offsets[i])
        Py_INCREF(value)
        Py_XDECREF(slot[0])
        slot[0] = <PyObject*>value

    def make(self, *values):
        """An instance with its slots set to ``values`` (in the order of ``names``)."""
        if len(values) != self.count:
            raise TypeError(f"{self.count} values")
        obj = self.new()
        for i, value in enumerate(values):
            self.put(obj, i, value)
        return obj
