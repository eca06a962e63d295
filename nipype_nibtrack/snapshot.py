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
from dataclasses import dataclass
from functools import singledispatch
from typing import Any

import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.cifti2 import Cifti2Header
from nibabel.minc1 import MincImageArrayProxy
from nibabel.parrec import PARRECArrayProxy, PARRECHeader
from nibabel.spatialimages import SpatialHeader
from nibabel.wrapstruct import WrapStruct

__all__ = ['ProxySpec', 'Snapshot', 'header_bytes', 'proxy_spec', 'snapshot']


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
def _(header: SpatialHeader) -> bytes:
    return repr(
        (
            type(header).__name__,
            header.get_data_dtype().str,
            tuple(int(n) for n in header.get_data_shape()),
            tuple(float(z) for z in header.get_zooms()),
            getattr(header, 'info', None),  # AFNIHeader
        )
    ).encode()


@header_bytes.register
def _(header: PARRECHeader) -> bytes:
    base = header_bytes.dispatch(SpatialHeader)(header)
    return base + repr(sorted(header.general_info.items())).encode() + header.image_defs.tobytes()


@header_bytes.register
def _(header: Cifti2Header) -> bytes:
    return header.to_xml()


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
        return os.path.abspath(file_like), None, False
    fd = _fileno(file_like)
    name = getattr(file_like, 'name', None)
    if fd is None:
        return None, None, True
    return (os.path.abspath(name) if isinstance(name, str) else None), fd, False


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
        path = os.path.abspath(handle.filename)
    except AttributeError:  # MINC1: a netcdf memory map, no descriptor to check
        fd, path = None, None
    params = (tuple(dataobj.shape), dataobj.minc_file.get_data_dtype().str)
    return ProxySpec('MincImageArrayProxy', path, params, fd)


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
