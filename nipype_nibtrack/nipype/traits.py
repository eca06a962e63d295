"""Trait types for nipype input specs that accept a path or a nibabel image."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from nibabel.filebasedimages import FileBasedImage
from nipype.interfaces.base.support import Bunch
from nipype.interfaces.base.traits_extension import File, InputMultiObject
from traits.api import TraitError

from .. import check_image_memoised, normalise_formats

__all__ = [
    'ImageFile',
    'InputMultiImage',
    'contains_image',
    'is_image',
    'iter_images',
    'map_images',
]

#: Extensions read when neither the trait nor the interface family says otherwise
DEFAULT_FORMATS = ('.nii', '.nii.gz')

# The images of an input spec being deep-copied, by id() (the spec holds them while it is
# copied). nipype deep-copies the graph twice per run, and traits validates every value
# it copies: a copy holds the very objects the spec accepted, which are checked where
# it counts, when they are resolved (a check at copy time could not see a later edit).
_copied: ContextVar[dict[int, Any] | None] = ContextVar('copied', default=None)


@contextlib.contextmanager
def copying(images: Iterator[Any]) -> Iterator[None]:
    """While the block runs, :class:`ImageFile` takes these very images unchecked."""
    token = _copied.set({id(img): img for img in images})
    try:
        yield
    finally:
        _copied.reset(token)


def is_image(value: Any) -> bool:
    """True for a nibabel image object.

    >>> import numpy as np, nibabel as nib
    >>> is_image(nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4))), is_image('a.nii')
    (True, False)
    """
    return isinstance(value, FileBasedImage)


@functools.singledispatch
def _parts(value: Any) -> tuple[Iterable[Any], Callable[[list[Any]], Any]] | None:
    """The values a container holds, and how to build a container of new ones.

    A registry: the one place that says which containers hold images (None: not one).
    Lists and tuples come back plain: a list input's ``TraitListObject`` cannot be
    rebuilt by calling its type, and the trait validates a plain list again when set.
    """
    return None


#: Values that hold nothing: answered without asking the registry (walks are hot paths)
_SCALARS = (str, bytes, int, float, type(None))


@_parts.register
def _(value: list) -> tuple[Iterable[Any], Callable[[list[Any]], Any]]:
    return value, list


@_parts.register
def _(value: tuple) -> tuple[Iterable[Any], Callable[[list[Any]], Any]]:
    return value, tuple


@_parts.register
def _(value: dict) -> tuple[Iterable[Any], Callable[[list[Any]], Any]]:
    return value.values(), lambda new: dict(zip(value, new, strict=True))


@_parts.register(set)
@_parts.register(frozenset)
def _(value: set | frozenset) -> tuple[Iterable[Any], Callable[[list[Any]], Any]]:
    return value, frozenset if isinstance(value, frozenset) else set


@_parts.register
def _(value: Bunch) -> tuple[Iterable[Any], Callable[[list[Any]], Any]]:
    # nipype's attribute bag (SpecifyModel's subject_info, Function inputs)
    fields = dict(value.__dict__)
    return fields.values(), lambda new: Bunch(zip(fields, new, strict=True))


def map_images(value: Any, fn: Callable[[Any], Any]) -> Any:
    """``value`` with every image, at any depth of containers, replaced by ``fn(image)``.

    The containers: lists, tuples, dicts, sets, frozensets and nipype's ``Bunch``. They
    are rebuilt (a list input's ``TraitListObject`` as a plain list); anything else is
    kept as it is.

    >>> import numpy as np, nibabel as nib
    >>> img = nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4))
    >>> map_images(['a.nii', (3, {'mask': img})], lambda found: found.shape)
    ['a.nii', (3, {'mask': (2, 2, 2)})]
    """
    if is_image(value):
        return fn(value)
    parts = None if isinstance(value, _SCALARS) else _parts(value)
    if parts is None:
        return value
    items, build = parts
    return build([map_images(item, fn) for item in items])


def iter_images(value: Any) -> Iterator[Any]:
    """Every image in ``value``: itself, or held at any depth of containers.

    The containers :func:`map_images` walks, in the same order.

    >>> import numpy as np, nibabel as nib
    >>> img = nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4))
    >>> [found is img for found in iter_images(['a.nii', (3, {'mask': img})])]
    [True]
    """
    if is_image(value):
        yield value
        return
    parts = None if isinstance(value, _SCALARS) else _parts(value)
    if parts is not None:
        for item in parts[0]:
            yield from iter_images(item)


def contains_image(value: Any) -> bool:
    """True for an image, or a container (see :func:`map_images`) holding one at any depth.

    >>> import numpy as np, nibabel as nib
    >>> contains_image(['a.nii', [nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4))]])
    True
    """
    return next(iter_images(value), None) is not None


class ImageFile(File):
    """A ``File`` that also accepts a nibabel image.

    Paths are validated exactly as ``File`` validates them (existence, extensions) and
    keep every piece of metadata (``argstr``, ``position``, ``mandatory``, ``copyfile``,
    ``xor``...). An image is kept as is until the interface runs, when it becomes a
    file name (see :func:`nipype_nibtrack.as_filename`): its own file when clean, a
    store file otherwise. ``image_formats`` metadata lists the extensions the consuming
    tool reads; the trait's ``extensions`` take precedence.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> from nipype.interfaces.base import TraitedSpec
    >>> class Spec(TraitedSpec):
    ...     in_file = ImageFile(exists=True, argstr='-in %s', desc='input')
    >>> spec = Spec()
    >>> img = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4))
    >>> spec.in_file = img
    >>> spec.in_file is img
    True
    >>> try:
    ...     spec.in_file = 42
    ... except TraitError as err:
    ...     print(err)
    the 'in_file' input of Spec takes a path or a nibabel image, not int: 42
    """

    @property
    def info_text(self) -> str:
        return super().info_text + ' or a nibabel image'

    def formats(self, default: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """Extensions the consumer reads: the trait's, else ``image_formats``, else NIfTI."""
        exts = self._exts or self._metadata.get('image_formats') or default or DEFAULT_FORMATS
        return normalise_formats(exts)

    def validate(self, objekt: Any, name: str, value: Any, return_pathlike: bool = False) -> Any:
        where = f'the {name!r} input of {type(objekt).__name__}'
        if isinstance(value, (str, bytes, os.PathLike)):
            return super().validate(objekt, name, value, return_pathlike=return_pathlike)
        if not is_image(value):
            raise TraitError(
                f'{where} takes a path or a nibabel image, not {type(value).__name__}: '
                f'{value!r:.80}'
            )
        copied = _copied.get()
        if copied is not None and copied.get(id(value)) is value:
            return value  # a deep copy of a spec that accepted it (see ``copying``)
        try:
            # a surface is refused by a volume input and accepted where .gii is read
            check_image_memoised(value, self.formats())
        except (ValueError, TypeError) as err:
            raise TraitError(f'{where} cannot take this {type(value).__name__}: {err}') from err
        return value


class InputMultiImage(InputMultiObject):
    """A list input whose items may be paths or images (``InputMultiPath`` style).

    A single value is wrapped in a list, as ``InputMultiPath`` does.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> from nipype.interfaces.base import TraitedSpec
    >>> class Spec(TraitedSpec):
    ...     in_files = InputMultiImage(ImageFile(exists=True), argstr='%s')
    >>> spec = Spec()
    >>> spec.in_files = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4))
    >>> [type(item).__name__ for item in spec.in_files]
    ['Nifti1Image']
    """

    def __init__(self, trait: Any = None, value: Any = None, **metadata: Any):
        super().__init__(trait if trait is not None else ImageFile(exists=True), value, **metadata)
