# Objects of a __slots__ class made in C without its __init__ (see slots.pyx).

cdef class SlotMaker:
    cdef object cls
    cdef Py_ssize_t count
    cdef Py_ssize_t offsets[16]

    cdef object new(self)
    cdef void put(self, object obj, Py_ssize_t i, object value) noexcept


# the offset of a plain slot ``name`` of ``cls`` (a member descriptor), or -1 when it is not one
cdef Py_ssize_t slot_offset(cls, str name) except -2
