"""Copies and pickles of images: they keep the provenance record and work for every format.

``copy.copy``, ``copy.deepcopy`` and :mod:`pickle` look up ``copyreg.dispatch_table`` by
exact class, so a reducer is registered for every nibabel image class (subclasses
included, and classes defined later as soon as the package records one of their
images). It rebuilds the image as the default reduction would, then attaches a copy of
the record: the load binding, the ``mark_clean`` baseline, the ``mark_dirty`` override.
A copy is never cleaner than its original.

Data objects that hold a file open (PAR/REC, MINC1/MINC2, ``keep_file_open=True``)
cannot be copied by Python: the copy re-opens the file by its bound absolute path and
checks that it is the same inode. Relative names are made absolute in the copy, so a
later ``chdir`` (nipype changes into node folders) cannot move it to another file.

A front-end's ``Pickler.reducer_override`` wins over the dispatch table, so a front-end
that pickles images as file references keeps working.
"""

from __future__ import annotations

import copyreg
import errno
import os
from dataclasses import dataclass, replace
from functools import singledispatch
from typing import Any

from nibabel.arrayproxy import ArrayProxy
from nibabel.filebasedimages import FileBasedImage
from nibabel.fileholders import FileHolder
from nibabel.minc1 import MincImageArrayProxy
from nibabel.parrec import PARRECArrayProxy

from . import provenance
from .fileid import absolute, fd_id, path_id, regular_opener
from .opening import load_opened, release

__all__ = ['register_image_class']


def _subclasses(klass: type) -> list[type]:
    found, todo = [], [klass]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def register_image_class(klass: type) -> None:
    """Make copies and pickles of ``klass`` images keep their records (idempotent).

    >>> import copy, os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> import nipype_nibtrack as nt
    >>> img = nt.load(os.path.join(data_path, 'anatomical.nii'))
    >>> nt.mark_dirty(img)
    >>> nt.dirty_reason(copy.deepcopy(img))
    'marked dirty by the user'
    """
    if copyreg.dispatch_table.get(klass) is not _reduce_image:
        copyreg.dispatch_table[klass] = _reduce_image


@dataclass(frozen=True)
class _Reopen:
    """A data object holding an open file, to be re-opened by path in the copy."""

    image_class: type
    dataobj_class: type
    state: dict
    path: str
    inode: tuple[int, int] | None

    def open(self) -> Any:
        if self.dataobj_class is PARRECArrayProxy or issubclass(
            self.dataobj_class, PARRECArrayProxy
        ):
            # the proxy keeps it, as nibabel's does; never a FIFO or a device
            fobj = open(self.path, 'rb', opener=regular_opener)  # noqa: SIM115
            self._check(fd_id(fobj.fileno()), fobj.close)
            dataobj = self.dataobj_class.__new__(self.dataobj_class)
            dataobj.__dict__.update(self.state, file_like=fobj)
            return dataobj
        # MINC1 (NetCDF map) and MINC2 (h5py file): load the data object again, from
        # the file the core opens (never a FIFO or a device: see .opening)
        self._check(path_id(self.path), lambda: None)
        with load_opened(self.image_class, {'image': self.path}, hold=True) as fresh:
            dataobj = fresh.dataobj
        self._check(path_id(self.path), lambda: release(fresh))
        return dataobj

    def _check(self, ident: Any, close: Any) -> None:
        if self.inode is not None and (ident is None or (ident.dev, ident.ino) != self.inode):
            close()
            raise OSError(
                errno.ESTALE,
                f'cannot copy this {self.image_class.__name__}: {self.path} is no longer '
                'the file it holds open (replaced or moved). Copy it before replacing the '
                'file, or load the image again',
            )


@singledispatch
def _portable(dataobj: Any, path: str | None, inode: Any, image_class: type) -> Any:
    return dataobj  # arrays and other objects copy themselves


@_portable.register
def _(dataobj: ArrayProxy, path: str | None, inode: Any, image_class: type) -> Any:
    state = dataobj.__getstate__()
    opener = state.pop('_opener', None)
    file_like = state.get('file_like')
    relative = isinstance(file_like, (str, os.PathLike)) and not os.path.isabs(file_like)
    if opener is None and not relative:
        return dataobj
    if relative:
        state['file_like'] = path if path is not None else absolute(file_like)
    copied = type(dataobj).__new__(type(dataobj))
    copied.__setstate__(state)  # re-opens by path when first read
    return copied


@_portable.register
def _(dataobj: PARRECArrayProxy, path: str | None, inode: Any, image_class: type) -> Any:
    state = dict(vars(dataobj))
    file_like = state.pop('file_like')
    name = path or absolute(getattr(file_like, 'name', ''))
    return _Reopen(image_class, type(dataobj), state, name, inode)


@_portable.register
def _(dataobj: MincImageArrayProxy, path: str | None, inode: Any, image_class: type) -> Any:
    if path is None:
        return dataobj
    return _Reopen(image_class, type(dataobj), {}, path, inode)


def _reduce_image(img: Any) -> tuple:
    binding = provenance.binding_of(img)  # first sight now, before any chdir of the copy
    record = provenance.record_of(img)
    state = dict(vars(img))
    for name in provenance.PRIVATE_SLOTS:  # a private copy's (see .frozen): not the copy's
        state.pop(name, None)
    if binding is not None:
        state['file_map'] = {
            key: FileHolder(binding.paths[key], holder.fileobj, holder.pos)
            for key, holder in img.file_map.items()
        }
    dataobj = state.get('_dataobj')
    if dataobj is not None:
        source = binding.source if binding is not None else None
        main = binding.paths.get(type(img).files_types[0][0]) if binding is not None else None
        path = source[1] if source is not None else main
        inode = source[2] if source is not None else _main_inode(binding)
        state['_dataobj'] = _portable(dataobj, path, inode, type(img))
    carried = None
    if record is not None:
        tied = record.holds_dataobj(getattr(img, 'dataobj', None))
        carried = (replace(record, dataobj=None, verdict=None), tied)
    return _rebuild, (type(img), state, carried)


def _main_inode(binding: Any) -> Any:
    if binding is None:
        return None
    return next(iter(binding.inodes.values()), None)


def _rebuild(klass: type, state: dict, carried: tuple | None) -> Any:
    if isinstance(state.get('_dataobj'), _Reopen):
        state = {**state, '_dataobj': state['_dataobj'].open()}
    img = klass.__new__(klass)
    img.__dict__.update(state)
    if carried is not None:
        record, tied = carried
        # a copy of the record: the copy's own data object when the original's was tied
        dataobj = provenance._weak(getattr(img, 'dataobj', None)) if tied else None
        provenance._set_record(img, replace(record, dataobj=dataobj))
    return img


for _klass in _subclasses(FileBasedImage):
    register_image_class(_klass)
