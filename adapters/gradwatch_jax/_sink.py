"""The host end of a check on XLA:CPU without a Python host callback in the step.

Any Python host callback in a jitted function (``jax.debug.callback``, ``io_callback``,
``pure_callback``), even one under a ``lax.cond`` that is never taken, takes the whole function
off JAX's C++ dispatch path: ``pxla.create_cpp_call`` returns ``None`` when the executable
``has_host_callbacks``, and every call then flattens, checks and runs through Python, and runs
synchronously. On a small CPU step that costs more than the measurements (docs/jax.md, "The
host transfer": 1.82x against 1.17x on a 3 ms MLP step).

This module registers an XLA FFI handler instead: a C function pointer (made with ``ctypes``)
that XLA:CPU calls on the check steps, like any custom call. To JAX it is an ordinary
``ffi_call`` with no effect, so the step keeps the C++ path and async dispatch; the handler
copies the check's numbers (one packed ``float32`` vector) off the buffer XLA hands it and
gives them to the watcher whose id leads the vector. Its ``int32`` result goes into the
watcher's state, so XLA cannot drop the call.

The handler speaks the XLA FFI C ABI (``jaxlib/include/xla/ffi/api/c_api.h``): the call
frame, the metadata query XLA makes when it is registered, and ``XLA_FFI_Error_Create`` to fail
the step in strict mode. Where registering fails (another jaxlib, another platform) the watcher
falls back to ``jax.debug.callback`` and says so once.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

TARGET = "gradwatch_check_sink"

_lock = threading.Lock()
#: sink id -> the function given each vector (a watcher's ``_deliver``).
_sinks: dict[int, Callable[[np.ndarray], None]] = {}
_next_id = [1]
#: None: not tried yet; True: registered; a string: why registering failed.
_state: list[Any] = [None]


# -- the XLA FFI C ABI (c_api.h), as much of it as the handler touches -------------------------

class _ExtensionBase(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int),
                ("next", ctypes.c_void_p)]


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion),
                ("traits", ctypes.c_uint32), ("state_type_id", ctypes.c_int64)]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _Sequence(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("size", ctypes.c_int64), ("types", ctypes.POINTER(ctypes.c_int)),
                ("items", ctypes.POINTER(ctypes.c_void_p))]


class _Attrs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("size", ctypes.c_int64), ("types", ctypes.c_void_p),
                ("names", ctypes.c_void_p), ("attrs", ctypes.c_void_p)]


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]


_ERROR_CREATE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ErrorCreateArgs))


class _Api(ctypes.Structure):  # the leading fields of XLA_FFI_Api
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("api_version", _ApiVersion), ("internal_api", ctypes.c_void_p),
                ("error_create", _ERROR_CREATE)]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("api", ctypes.POINTER(_Api)), ("ctx", ctypes.c_void_p),
                ("stage", ctypes.c_int), ("args", _Sequence), ("rets", _Sequence),
                ("attrs", _Attrs), ("future", ctypes.c_void_p)]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("dtype", ctypes.c_int), ("data", ctypes.c_void_p), ("rank", ctypes.c_int64),
                ("dims", ctypes.POINTER(ctypes.c_int64))]


_METADATA_EXTENSION = 1  # XLA_FFI_Extension_Metadata
_EXECUTE = 3  # XLA_FFI_ExecutionStage_EXECUTE
_F32, _S32 = 11, 4  # XLA_FFI_DataType
_INTERNAL = 13  # XLA_FFI_Error_Code_INTERNAL
#: The FFI API version this handler is written against (c_api.h of jaxlib 0.10: 0.3); XLA
#: accepts handlers of its major version and a minor version up to its own.
_MAJOR, _MINOR = 0, 1

_HANDLER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CallFrame))


def _fail(frame: Any, message: str) -> int | None:
    """An XLA_FFI_Error for ``message``: XLA fails the step with it."""
    try:
        args = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None,
                                message.encode("utf-8", "replace"), _INTERNAL)
        return frame.api.contents.error_create(ctypes.byref(args))
    except Exception:  # no API to make an error with: the step goes on
        return None


def _handle(frame_p: Any) -> int | None:
    frame = frame_p.contents
    try:
        if frame.extension_start:
            base = ctypes.cast(frame.extension_start, ctypes.POINTER(_ExtensionBase)).contents
            if base.type == _METADATA_EXTENSION:
                ext = ctypes.cast(frame.extension_start,
                                  ctypes.POINTER(_MetadataExtension)).contents
                meta = ext.metadata.contents
                meta.api_version.major_version = _MAJOR
                meta.api_version.minor_version = _MINOR
                meta.traits = 0
                return None
        if frame.stage != _EXECUTE:
            return None
        if frame.args.size != 1 or frame.rets.size != 1:
            return _fail(frame, "gradwatch: the check sink takes one vector and returns one int")
        arg = ctypes.cast(frame.args.items[0], ctypes.POINTER(_Buffer)).contents
        ret = ctypes.cast(frame.rets.items[0], ctypes.POINTER(_Buffer)).contents
        if arg.dtype != _F32 or arg.rank != 1 or ret.dtype != _S32:
            return _fail(frame, "gradwatch: the check sink takes a float32 vector")
        n = int(arg.dims[0])
        vector = np.ctypeslib.as_array(ctypes.cast(arg.data, ctypes.POINTER(ctypes.c_float)),
                                       shape=(n,)).copy()
        ctypes.cast(ret.data, ctypes.POINTER(ctypes.c_int32))[0] = 1
        sink = _sinks.get(int(vector[:1].view(np.int32)[0])) if n else None
        if sink is not None:  # (a removed watcher's checks are dropped)
            sink(vector)
        return None
    except Exception as exc:  # strict mode's error, or a bug: the step fails with it
        return _fail(frame, f"{type(exc).__name__}: {exc}")


_handler = _HANDLER(_handle)  # kept alive for the life of the process


def register() -> bool | str:
    """Register the handler with XLA:CPU once; True, or why it could not be."""
    with _lock:
        if _state[0] is None:
            try:
                import jax

                new = ctypes.pythonapi.PyCapsule_New
                new.restype = ctypes.py_object
                new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
                capsule = new(ctypes.cast(_handler, ctypes.c_void_p).value,
                              b"xla._CUSTOM_CALL_TARGET", None)
                jax.ffi.register_ffi_target(TARGET, capsule, platform="cpu")
                _state[0] = True
            except Exception as exc:
                _state[0] = f"{type(exc).__name__}: {exc}"
        return _state[0]


def open_sink(deliver: Callable[[np.ndarray], None]) -> int:
    """A new sink id; vectors that lead with it go to ``deliver`` (on XLA's thread)."""
    with _lock:
        sid = _next_id[0]
        _next_id[0] += 1
        _sinks[sid] = deliver
        return sid


def close_sink(sid: int) -> None:
    with _lock:
        _sinks.pop(sid, None)


def send(vector: Any) -> Any:
    """Traced: hand ``vector`` (float32 ``[N]``, the sink id bit-cast in element 0) to the host
    when this runs; returns an int32 that the caller must keep (in the state)."""
    import jax
    import jax.numpy as jnp

    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((), jnp.int32))(vector)
