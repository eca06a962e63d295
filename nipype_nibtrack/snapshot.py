"""What an image holds apart from its voxels, in a form that compares exactly.

A :class:`Snapshot` is built in microseconds and reads no data: header bytes (with
NIfTI extensions), affine bytes, the NIfTI dtype alias and a description of where the
data object reads from. Two registries, keyed by type with
:func:`functools.singledispatch`, turn headers and data objects into comparable values;
register a function for a new header or proxy class to teach the package a format.
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from functools import singledispatch
from pathlib import PurePath
from typing import Any

import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.cifti2 import Cifti2Header
from nibabel.minc1 import MincImageArrayProxy
from nibabel.parrec import PARRECArrayProxy
from nibabel.spatialimages import SpatialHeader
from nibabel.wrapstruct import WrapStruct

from .fileid import absolute

__all__ = [
    'ProxySpec',
    'Snapshot',
    'data_origin',
    'exact_bytes',
    'header_bytes',
    'plain_value',
    'private_proxy',
    'proxy_spec',
    'snapshot',
]


@dataclass(frozen=True)
class ProxySpec:
    """Where and how a proxy reads its voxels.

    ``path`` is the absolute name of the file read (None when unknown), ``params``
    everything else that decides the values (shape, dtype, offset, scaling...),
    ``fd`` a descriptor the proxy holds open (None when it re-opens the path on each
    access) and ``in_memory`` says the data come from a file object with no file
    behind it, such as ``BytesIO``.
    """

    kind: str
    path: str | None
    params: tuple
    fd: int | None = None
    in_memory: bool = False

    def same_source(self, other: ProxySpec) -> bool:
        return (self.kind, self.path, self.params) == (other.kind, other.path, other.params)


@dataclass(frozen=True)
class Snapshot:
    """Header bytes, affine bytes, dtype alias and data source of an image."""

    header: bytes | None
    extensions: bytes
    affine: bytes | None
    alias: str | None
    proxy: ProxySpec | None


@singledispatch
def header_bytes(header: Any) -> bytes | None:
    """Exact serialisation of a header, or None for a header type with no rule.

    Examples
    --------
    >>> import nibabel as nib
    >>> hdr = nib.Nifti1Header()
    >>> before = header_bytes(hdr)
    >>> hdr['descrip'] = b'edited'
    >>> header_bytes(hdr) == before
    False
    """
    return None


@header_bytes.register
def _(header: WrapStruct) -> bytes:
    # binaryblock is already in the header's byte order, which the tool reads
    return header.endianness.encode() + header.binaryblock


@header_bytes.register
def _(header: SpatialHeader) -> bytes | None:
    # every attribute (PAR/REC general_info and sort flags, AFNI attributes, zooms...)
    # by exact value: never through repr/str, which print options and rounding fool
    try:
        return exact_bytes((type(header).__qualname__, vars(header)))
    except TypeError:  # an attribute of a type with no exact form: no rule
        return None


@header_bytes.register
def _(header: Cifti2Header) -> bytes:
    return header.to_xml()


@singledispatch
def exact_bytes(value: Any) -> bytes:
    """An exact, unambiguous serialisation of a plain value; TypeError for other types.

    Floats by their IEEE bytes, arrays by dtype, shape and bytes, containers by their
    type and items (dicts sorted by key): equal bytes mean equal values, whatever
    numpy's print options.

    Examples
    --------
    >>> import numpy as np
    >>> exact_bytes(0.1) == exact_bytes(0.1 + 1e-18), exact_bytes(0.1) == exact_bytes(0.1 + 1e-16)
    (True, False)
    >>> exact_bytes(np.arange(3.0)) == exact_bytes(np.arange(3.0).astype('f4'))
    False
    >>> exact_bytes(object())
    Traceback (most recent call last):
    ...
    TypeError: no exact serialisation for object values
    """
    raise TypeError(f'no exact serialisation for {type(value).__name__} values')


def _tagged(tag: bytes, payload: bytes) -> bytes:
    return tag + len(payload).to_bytes(8, 'little') + payload


@exact_bytes.register(type(None))
def _(value: None) -> bytes:
    return _tagged(b'N', b'')


@exact_bytes.register(bool)
@exact_bytes.register(np.bool_)
def _(value: Any) -> bytes:
    return _tagged(b'?', b'1' if value else b'0')


@exact_bytes.register(int)
def _(value: int) -> bytes:
    return _tagged(b'i', str(value).encode())


@exact_bytes.register(float)
def _(value: float) -> bytes:
    return _tagged(b'f', np.float64(value).tobytes())


@exact_bytes.register(complex)
def _(value: complex) -> bytes:
    return _tagged(b'c', np.complex128(value).tobytes())


@exact_bytes.register(str)
def _(value: str) -> bytes:
    return _tagged(b's', value.encode('utf-8', 'surrogatepass'))


@exact_bytes.register(bytes)
def _(value: bytes) -> bytes:
    return _tagged(b'b', value)


@exact_bytes.register(np.dtype)
def _(value: np.dtype) -> bytes:
    # descr spells fields, byte order and sizes; only strings and ints inside
    return _tagged(b'd', exact_bytes(value.descr if value.fields else value.str))


@exact_bytes.register(np.ndarray)
@exact_bytes.register(np.generic)
def _(value: Any) -> bytes:
    arr = np.asarray(value)
    if arr.dtype.hasobject:
        return _tagged(b'O', exact_bytes(arr.tolist()))
    head = exact_bytes(arr.dtype) + exact_bytes(tuple(int(n) for n in arr.shape))
    return _tagged(b'a', head + np.ascontiguousarray(arr).tobytes())


@exact_bytes.register(list)
@exact_bytes.register(tuple)
def _(value: Any) -> bytes:
    tag = b'l' if isinstance(value, list) else b't'
    return _tagged(tag, b''.join(exact_bytes(item) for item in value))


@exact_bytes.register(dict)
def _(value: dict) -> bytes:
    items = sorted((exact_bytes(k), exact_bytes(v)) for k, v in value.items())
    return _tagged(b'm', b''.join(k + v for k, v in items))


def extension_bytes(header: Any) -> bytes:
    """The NIfTI extensions exactly as they would be written (empty when none).

    ``Nifti1Header.__eq__`` ignores extensions, so they are compared on their own.

    >>> import nibabel as nib
    >>> hdr = nib.Nifti1Header()
    >>> extension_bytes(hdr)
    b''
    >>> hdr.extensions.append(nib.nifti1.Nifti1Extension(6, b'note'))
    >>> len(extension_bytes(hdr))
    16
    """
    extensions = getattr(header, 'extensions', None)
    if not extensions:
        return b''
    buffer = io.BytesIO()
    extensions.write_to(buffer, byteswap=False)
    return buffer.getvalue()


def _fileno(obj: Any) -> int | None:
    try:
        return obj.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _source(file_like: Any) -> tuple[str | None, int | None, bool]:
    """(absolute path, held descriptor, in-memory) of what a proxy reads."""
    if isinstance(file_like, (str, os.PathLike)):
        return absolute(file_like), None, False  # where it reads now: cwd included
    fd = _fileno(file_like)
    name = getattr(file_like, 'name', None)
    if fd is None:
        return None, None, True
    return (absolute(name) if isinstance(name, str) else None), fd, False


@singledispatch
def proxy_spec(dataobj: Any) -> ProxySpec | None:
    """Describe where a data object reads from; None for in-memory arrays.

    Examples
    --------
    >>> import numpy as np
    >>> proxy_spec(np.zeros(3)) is None
    True
    """
    return None


@proxy_spec.register
def _(dataobj: ArrayProxy) -> ProxySpec:
    path, fd, in_memory = _source(dataobj.file_like)
    opener = getattr(dataobj, '_opener', None)
    if fd is None and opener is not None and not opener.closed:  # keep_file_open=True
        fd = _fileno(opener)
    params = (
        tuple(int(n) for n in dataobj.shape),
        dataobj.dtype.str,
        int(dataobj.offset),
        float(dataobj.slope),
        float(dataobj.inter),
        dataobj.order,
        _bytes_or_none(getattr(dataobj, '_scaling', None)),  # AFNI per-volume scaling
    )
    return ProxySpec(type(dataobj).__name__, path, params, fd, in_memory)


@proxy_spec.register
def _(dataobj: PARRECArrayProxy) -> ProxySpec:
    path, fd, in_memory = _source(dataobj.file_like)
    params = (
        tuple(dataobj.shape),
        dataobj.dtype.str,
        np.asarray(dataobj._slice_indices).tobytes(),
        np.asarray(dataobj._slice_scaling).tobytes(),
        tuple(dataobj._rec_shape),
    )
    return ProxySpec('PARRECArrayProxy', path, params, fd, in_memory)


@proxy_spec.register
def _(dataobj: MincImageArrayProxy) -> ProxySpec:
    handle = dataobj.minc_file._mincfile
    try:  # MINC2: an h5py file held open for the life of the image
        fd = handle.id.get_vfd_handle()
        path = absolute(handle.filename)
    except AttributeError:  # MINC1: a netcdf memory map, no descriptor to check
        fd, path = None, None
    params = (tuple(dataobj.shape), dataobj.minc_file.get_data_dtype().str)
    return ProxySpec('MincImageArrayProxy', path, params, fd)


_ORIGIN = '_nibtrack_origin'  # in a private proxy copy's own __dict__: the proxy it copies


def private_proxy(dataobj: ArrayProxy) -> ArrayProxy:
    """A private copy of a proxy: the same class and read parameters, taken once.

    Nothing else refers to it, so no other thread can change how it reads while an
    answer is computed from it (the parameters are plain attributes any code can set).
    Arrays among them (AFNI's per-volume scaling) are copied too. Its
    :func:`data_origin` is the proxy it copies: memo keys and provenance records name
    that one. Only for a proxy that opens its file by name at each access: one holding
    its file open (``keep_file_open=True``) shares its opener, which nibabel closes when
    a proxy is collected, copy or not (ValueError). Every other attribute must be an
    immutable :func:`plain_value` (or an array, copied, or the proxy's lock): a method
    shadowed on the instance, bound to the proxy itself, would read its live parameters
    (TypeError).

    Examples
    --------
    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> proxy = nib.load(os.path.join(data_path, 'anatomical.nii')).dataobj
    >>> copy = private_proxy(proxy)
    >>> copy is not proxy and data_origin(copy) is proxy and data_origin(proxy) is proxy
    True
    >>> proxy_spec(copy) == proxy_spec(proxy)
    True
    """
    state = dict(dataobj.__dict__)  # one read of every parameter
    if state.get('_persist_opener', True):
        raise ValueError('a proxy holding its file open cannot be copied privately')
    for name, value in state.items():
        if isinstance(value, np.ndarray) and not value.dtype.hasobject:
            state[name] = value.copy()
        elif name == _ORIGIN or (name == '_lock' and isinstance(value, _LOCKS)):
            continue  # named, never read from (the origin) or read with (the lock)
        elif not plain_value(value):
            raise TypeError(f'attribute {name} of the proxy would be shared with it')
    state[_ORIGIN] = state.get(_ORIGIN, dataobj)
    copy = object.__new__(type(dataobj))
    copy.__dict__.update(state)
    return copy


_LOCKS = (type(threading.Lock()), type(threading.RLock()))
_PLAIN = (str, bytes, int, float, complex, type(None), np.dtype, np.generic, type, PurePath)


def plain_value(value: Any) -> bool:
    """True for a value nothing can change in place: a string, bytes, a number, None,
    a dtype, a class, a pure path, or a tuple or frozenset of them.

    >>> plain_value(('f4', 1.0, (2, 3))), plain_value([1]), plain_value(print)
    (True, False, False)
    """
    if isinstance(value, (tuple, frozenset)):
        return all(map(plain_value, value))
    # a structured scalar (np.void) may be a view of an array: writable in place
    return isinstance(value, _PLAIN) and not isinstance(value, np.void)


def data_origin(dataobj: Any) -> Any:
    """The data object ``dataobj`` is a :func:`private_proxy` of, else ``dataobj`` itself."""
    return getattr(dataobj, '__dict__', _NO_STATE).get(_ORIGIN, dataobj)


_NO_STATE: dict = {}


def _bytes_or_none(value: Any) -> bytes | None:
    return None if value is None else np.asarray(value).tobytes()


def snapshot(img: Any) -> Snapshot:
    """Everything an image holds except its voxels; no data is read.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> img = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4))
    >>> before = snapshot(img)
    >>> img.affine[0, 3] += 1e-9
    >>> snapshot(img) == before
    False
    """
    header = img.header
    affine = getattr(img, 'affine', None)
    parts = [header_bytes(header)]
    nifti_header = getattr(img, 'nifti_header', None)  # CIFTI-2 keeps a second header
    if nifti_header is not None and parts[0] is not None:
        parts.append(header_bytes(nifti_header))
    head = None if None in parts else b'\0'.join(parts)
    return Snapshot(
        header=head,
        extensions=extension_bytes(nifti_header if nifti_header is not None else header),
        affine=None if affine is None else np.asarray(affine, dtype=np.float64).tobytes(),
        alias=getattr(img, '_dtype_alias', None),
        proxy=proxy_spec(img.dataobj),
    )
