"""A private copy of an image's state: an answer and its memo key taken from one state.

Another thread can edit an image and restore it while an answer about it is computed
(A -> B -> A). The image's state read before and after is A both times, but the answer
was computed on B: kept under A, B's answer (say, clean) would be handed out for A (an
edited, dirty image) long after the edits stopped. No comparison of states taken before
and after can see it. So every answer the package remembers is computed on a private
copy of the image, taken once (:func:`freeze`), and remembered under the key read from
that copy: the answer is exactly the answer for the key's state, whatever other threads
do to the image meanwhile. The copy may mix two states (each attribute is read once,
not all at one instant): the key is that mix, and so is what the answer was computed on.

The copy is made without the image's constructor (which rewrites header fields):

- the image: a new instance of the same class with a copy of its ``__dict__``;
- the header: the same class, its ``__dict__`` copied, its field array rebuilt from one
  read of its bytes with the same dtype (byte order and layout included), and its
  NIfTI extensions copied, each holding its bytes as read once (an extension's object,
  editable in place, is not shared: it is decoded again from those bytes if asked for);
- the affine: a copy of the array (same dtype and byte order);
- the file map: a new dict of copied file holders;
- the data object: a private copy of the proxy (:func:`~.snapshot.private_proxy`), so
  its read parameters cannot change under the answer; its
  :func:`~.snapshot.data_origin`, the image's proxy, is what keys and records name;
- the provenance record: a copy of every field (:func:`~.provenance.give_private_record`),
  attached to the copy itself. What a check learns is filed in the image's own record
  (:func:`~.provenance.source_record`).

Every other attribute of these objects (and of the extension list and its items) is
shared with the image, so it must be an immutable plain value (a string, a number, a
dtype, a tuple of them...): a method shadowed on the instance (bound to the image's own
object) or a mutable attribute would let the copy read the live image. Any other value,
and any class of the user's own that reads its state otherwise than nibabel's
(:func:`~.recheck.nibabel_behaviour`), and no copy is made.

Only images the memos keep answers for are frozen (NIfTI/Analyze images reading through
a proxy by absolute name, no data cache, bound to their files: see
:func:`~.recheck.image_key`); every other image is answered in full, on itself, every
time. The copy is never registered anywhere (no provenance table, no weak map) and never
handed out: it lives while the answer is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from nibabel.analyze import AnalyzeImage

from .provenance import _FROZEN, _PRIVATE, Record, binding_of, give_private_record, record_of
from .recheck import image_key, nibabel_behaviour
from .snapshot import plain_value, private_proxy

__all__ = ['Frozen', 'freeze', 'frozen_of']


@dataclass(frozen=True, eq=False)
class Frozen:
    """A private copy of an image, the key read from it and the records it is checked with.

    ``image`` is the copy, ``key`` :func:`~.recheck.image_key` of it (naming the image's
    own data object), ``record`` the copy's private record and ``source`` the image's
    record it was copied from.
    """

    image: Any
    key: tuple
    record: Record
    source: Record


def frozen_of(img: Any) -> Frozen | None:
    """The :class:`Frozen` of ``img`` when it is a private copy, else None."""
    state = getattr(img, '__dict__', _NO_STATE)
    key = state.get(_FROZEN)
    if key is None:
        return None
    record, source = state[_PRIVATE]
    return Frozen(img, key, record, source)


_NO_STATE: dict = {}


def freeze(img: Any) -> Frozen | None:
    """A private copy of ``img`` to compute a remembered answer on, or None.

    None for an image whose answers are not remembered (:func:`~.recheck.image_key` is
    None, no file, no record) and whenever the copy cannot be made cleanly (another
    thread changing the image's file names meanwhile, say): the caller then answers on
    the image itself and remembers nothing. A private copy freezes to itself.

    Examples
    --------
    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> from nipype_nibtrack.recheck import image_key
    >>> img = nib.load(os.path.join(data_path, 'anatomical.nii'))
    >>> frozen = freeze(img)
    >>> frozen.image is not img and frozen.key == image_key(img)
    True
    >>> img.header['descrip'] = b'edited'  # the copy does not follow
    >>> frozen.key == image_key(frozen.image) != image_key(img)
    True
    >>> freeze(frozen.image).image is frozen.image
    True
    """
    known = frozen_of(img)
    if known is not None:
        return known
    if not isinstance(img, AnalyzeImage):  # the only family with a key (image_key)
        return None
    binding = binding_of(img)  # binds a first-seen image, as a check would
    source = record_of(img)
    if binding is None or source is None:
        return None
    try:
        copy = _copy_image(img)
    except (AttributeError, TypeError, ValueError, KeyError):  # changed while copied
        return None
    record = give_private_record(copy, source)
    bound = record.binding
    # the copy must be bound as its record says: else its file names moved meanwhile
    if bound is None or binding_of(copy) is not bound or record.binding is not bound:
        return None
    key = image_key(copy)
    if key is None:
        return None
    copy.__dict__[_FROZEN] = key  # the copy's own: no cycle, nothing registered
    return Frozen(copy, key, record, source)


_IMAGE_COPIED = frozenset({'_header', '_affine', '_dataobj', 'file_map', 'extra', '_load_cache'})


def _copy_image(img: Any) -> Any:
    state = dict(img.__dict__)  # one read of every attribute
    _require_plain(state, _IMAGE_COPIED)
    state['_header'] = _copy_header(state['_header'])
    affine = state['_affine']
    if not isinstance(affine, np.ndarray):
        raise TypeError('not an array affine')
    state['_affine'] = affine.copy()
    state['_dataobj'] = private_proxy(state['_dataobj'])
    holders = list(state['file_map'].items())  # one read (not an iterator another thread breaks)
    state['file_map'] = {key: _copy_plain(holder) for key, holder in holders}
    if isinstance(state.get('extra'), dict):
        state['extra'] = dict(state['extra'])
    state.pop('_load_cache', None)  # nothing reads it; it shares the header's extensions
    copy = object.__new__(type(img))
    copy.__dict__.update(state)
    return copy


def _copy_header(header: Any) -> Any:
    state = dict(header.__dict__)
    _require_plain(state, _HEADER_COPIED)
    fields = state['_structarr']
    # one read of the bytes, the same dtype: what binaryblock and every getter read
    state['_structarr'] = np.ndarray(fields.shape, fields.dtype, bytearray(fields.tobytes()))
    extensions = state.get('extensions')
    if extensions is not None:
        _require_class(type(extensions))
        copied = type(extensions)()
        copied.extend(_copy_extension(ext) for ext in list(extensions))
        shared = dict(getattr(extensions, '__dict__', _NO_STATE))
        _require_plain(shared)
        copied.__dict__.update(shared)
        state['extensions'] = copied
    copy = object.__new__(type(header))
    copy.__dict__.update(state)
    return copy


def _copy_extension(ext: Any) -> Any:
    # its bytes, synced from its object if it has one, read once (and copied when the
    # object is a bytearray, which the plain extension class keeps as its content)
    _require_class(type(ext))
    raw = bytes(ext.content)
    copy = _copy_plain(ext, _EXTENSION_COPIED)
    copy.__dict__.pop('_object', None)  # decoded again from ``raw`` if ever asked for
    copy._raw = raw
    return copy


_HEADER_COPIED = frozenset({'_structarr', 'extensions'})
_EXTENSION_COPIED = frozenset({'_raw', '_object'})


def _copy_plain(obj: Any, copied: frozenset = frozenset()) -> Any:
    _require_class(type(obj))
    state = dict(obj.__dict__)
    _require_plain(state, copied)
    copy = object.__new__(type(obj))
    copy.__dict__.update(state)
    return copy


def _require_class(klass: type) -> None:
    if not nibabel_behaviour(klass):
        raise TypeError(f'{klass.__qualname__} reads its state its own way')


def _require_plain(state: dict, copied: frozenset = frozenset()) -> None:
    # shared with the image: only values nobody can change in place
    for name, value in state.items():
        if name not in copied and not plain_value(value):
            raise TypeError(f'attribute {name} would be shared with the image')
