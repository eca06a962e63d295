"""pydra checksums that follow image content.

Without this pydra hashes an image by walking its attributes: its file rewritten on disk
(same size) leaves the hash unchanged and a stale cached result comes back. Registered
through pydra's public registry (``pydra.utils.hash.register_serializer``):

- an image hashes as the file it resolves to, exactly as pydra hashes a ``File`` of that
  path: a clean image like its own file, a dirty one like its content-addressed store
  file (written once, never touched). The persistent hash cache is keyed on the file's
  full identity (device, inode, size, mtime, ctime), stricter than pydra's own (path,
  mtime) key for files;
- an image *class* used as a field type hashes as its qualified name: pydra's default
  for classes walks their ``__dict__`` and fails on nibabel's (a dict with mixed keys).
  pydra's serializer for types recurses into ``Optional[...]``/``list[...]`` by direct
  calls, so a type that names an image class at any depth is serialised here.
"""

from __future__ import annotations

import inspect
import os
import types
import typing as ty
from collections.abc import Iterator
from typing import Any

from fileformats.generic import File
from nibabel.filebasedimages import FileBasedImage
from pydra.utils import hash as pydra_hash
from pydra.utils.hash import Cache, bytes_repr, register_serializer

from .coercion import image_classes
from .pickling import register
from .resolving import image_path

__all__ = ['install']

#: What pydra serialises type objects with, by the type of the type object
_TYPE_KINDS = (type, ty._GenericAlias, ty._SpecialForm, types.UnionType, types.GenericAlias)
_pydra_repr = {kind: bytes_repr.dispatch(kind) for kind in _TYPE_KINDS}


def _image_repr(img: FileBasedImage, cache: Cache) -> Iterator[Any]:
    register(type(img))  # a class defined after install(): its jobs pickle small too
    path = image_path(img)
    st = os.stat(path)
    chunks = bytes_repr(File(path), cache)
    next(chunks)  # pydra's (path, mtime) cache key: replaced by the file's full identity
    yield (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    yield from chunks


def _type_repr(klass: Any, cache: Cache) -> Iterator[bytes]:
    if inspect.isclass(klass) and issubclass(klass, FileBasedImage):
        yield f'type:(nibabel:{klass.__module__}.{klass.__qualname__})'.encode()
        return
    origin, args = ty.get_origin(klass), ty.get_args(klass)
    if not (args and image_classes(klass)):
        yield from _pydra_repr.get(type(klass), pydra_hash.bytes_repr_type)(klass, cache)
        return
    yield b'type:(origin:('
    yield from _type_repr(origin, cache)
    yield b'),args:('
    for arg in args:
        yield from _type_repr(arg, cache)
    yield b'))'


def install() -> None:
    """Register the serializers; calling it again changes nothing."""
    if bytes_repr.dispatch(FileBasedImage) is _image_repr:
        return
    register_serializer(FileBasedImage)(_image_repr)
    for kind in _TYPE_KINDS:
        register_serializer(kind)(_type_repr)
