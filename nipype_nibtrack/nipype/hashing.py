"""Node hashes that follow image content.

nipype hashes an input by ``str(value)`` unless it is an existing file, so an image
entered the hash as ``<Nifti1Image object at 0x...>``: a new hash for every load of the
same file, the same hash after an edit. :func:`install` makes nipype hash an image as
the file it resolves to: a clean image exactly like its own path (under both
``hash_method`` settings), a dirty one like its content-addressed store file, which is
written once and never touched. It also names iterable folders after image content
instead of ``str(img)``, which is the same for two images with equal headers, and
records an image in nipype's provenance (``write_provenance``) as the file it
resolves to, where nipype's encoder failed on the header object.
"""

from __future__ import annotations

import functools
from contextvars import ContextVar
from typing import Any

from nipype.interfaces.base.specs import BaseTraitedSpec
from nipype.interfaces.base.support import Bunch
from nipype.pipeline.engine import utils as engine_utils
from nipype.utils import provenance as nipype_provenance

from .. import image_label
from .resolving import resolve_image
from .traits import is_image, iter_images

__all__ = ['install']


def _unhashable_image(spec: BaseTraitedSpec) -> tuple[str, Any] | None:
    """The first input of ``spec`` holding an image that cannot become a file, if any."""
    for name, value in sorted(spec.trait_get().items()):
        for img in iter_images(value):
            try:
                resolve_image(img)
            except (ValueError, TypeError):
                return name, img
    return None


# get_hashval hashes every value twice (with and without file hashes): resolve each
# image once per call. Keyed by id(): the spec keeps the images alive during the call.
_resolved_in_call: ContextVar[dict[int, str] | None] = ContextVar('resolved', default=None)


def _path_of(img: Any) -> str:
    memo = _resolved_in_call.get()
    if memo is None:
        return resolve_image(img).path
    if id(img) not in memo:
        memo[id(img)] = resolve_image(img).path
    return memo[id(img)]


@functools.singledispatch
def _walkable(value: Any) -> Any:
    """``value`` as the dicts and lists nipype's hash walks, or None to leave it to nipype.

    nipype walks lists, tuples and dicts, and hashes anything else by its text: an image
    in a set or a ``Bunch`` entered the hash as ``<Nifti1Image object at 0x...>``, which
    an edit leaves as it was (a stale cached result). Walked, it hashes as its file.
    """
    return None


@_walkable.register(set)
@_walkable.register(frozenset)
def _(value: set | frozenset) -> dict:
    # in the order of what the items stand for: a set's own order follows the hash seed
    def key(item: Any) -> str:
        return _path_of(item) if is_image(item) else repr(item)

    return {f'__{type(value).__name__}__': sorted(value, key=key)}


@_walkable.register
def _(value: Bunch) -> dict:
    return {'__Bunch__': dict(value.__dict__)}


@_walkable.register
def _(value: dict) -> dict | None:
    # nipype walks a dict's values and enters each key as its text: an image key as its
    # address. Keys holding images become items: [key, value] pairs in the order of
    # what the keys stand for, and each key hashes as its file
    if not any(next(iter_images(key), None) is not None for key in value):
        return None

    def key(pair: tuple) -> str:
        return repr([_path_of(img) for img in iter_images(pair[0])]) + repr(pair[0])

    return {f'__{type(value).__name__}__': sorted(value.items(), key=key)}


def install() -> None:
    """Install the hashing hooks; calling it again changes nothing."""
    if getattr(BaseTraitedSpec._get_sorteddict, '_nibtrack', False):
        return
    sorteddict = BaseTraitedSpec._get_sorteddict
    pathstr = engine_utils._get_valid_pathstr

    def _get_sorteddict(
        self: BaseTraitedSpec,
        objekt: Any,
        dictwithhash: bool = False,
        hash_method: str | None = None,
        hash_files: bool = True,
    ) -> Any:
        if is_image(objekt):
            objekt = _path_of(objekt)
        else:
            walkable = _walkable(objekt)
            if walkable is not None and (
                isinstance(objekt, dict) or next(iter_images(objekt), None) is not None
            ):
                objekt = walkable
        return sorteddict(self, objekt, dictwithhash, hash_method, hash_files)

    def _get_valid_pathstr(value: Any) -> Any:
        return pathstr(image_label(value) if is_image(value) else value)

    spec_hashval = BaseTraitedSpec.get_hashval

    def get_hashval(self: BaseTraitedSpec, hash_method: str | None = None) -> Any:
        token = _resolved_in_call.set({})
        try:
            return spec_hashval(self, hash_method=hash_method)
        except (ValueError, TypeError) as err:
            # _get_sorteddict sees values only: name the input holding the bad image
            # (a Function input takes anything) instead of failing inside nipype
            culprit = _unhashable_image(self)
            if culprit is None:
                raise
            name, img = culprit
            raise ValueError(
                f'the {name!r} input of {type(self).__name__} holds a '
                f'{type(img).__name__} that cannot be passed on as a file: {err}'
            ) from err
        finally:
            _resolved_in_call.reset(token)

    safe_encode = nipype_provenance.safe_encode
    prov_encode = nipype_provenance.prov_encode

    def _safe_encode(x: Any, as_literal: bool = True) -> Any:
        return safe_encode(_path_of(x) if is_image(x) else x, as_literal=as_literal)

    def _prov_encode(graph: Any, value: Any, create_container: bool = True) -> Any:
        # a path becomes a file entity (with its hash) in nipype's provenance graph
        value = _path_of(value) if is_image(value) else value
        return prov_encode(graph, value, create_container=create_container)

    _get_sorteddict._nibtrack = True
    BaseTraitedSpec._get_sorteddict = _get_sorteddict
    BaseTraitedSpec.get_hashval = get_hashval
    engine_utils._get_valid_pathstr = _get_valid_pathstr
    nipype_provenance.safe_encode = _safe_encode
    nipype_provenance.prov_encode = _prov_encode
