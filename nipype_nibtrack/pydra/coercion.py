"""Task fields typed with fileformats classes take nibabel images, and the reverse.

pydra checks and converts every field value with a ``TypeParser`` built per field when
the task class is defined. In pydra 1.0a12 its conversions are fixed: the pairs it may
convert between are a default argument (``COERCIBLE_DEFAULT``), bound before any task
is defined, and there is no registry to add one (pydra#662). :func:`install` therefore
wraps two of its methods, here and nowhere else, and only for values or types pydra
would have refused:

- ``TypeParser.coerce``: an image given to a field whose type names fileformats
  classes (``Nifti1``, mrtrix3's ``ImageIn`` union, ``File``) becomes the path it
  resolves to, with the extensions those classes accept (:func:`formats_of`), before
  pydra converts that path as it converts any path; a path or file given to a field
  typed with a nibabel image class is loaded with :func:`nipype_nibtrack.load`; an
  image a field takes as it is (typed with an image class, ``Any``) is replaced by a
  clean image of the file it resolves to, as a worker would get it.
- ``TypeParser.check_type_coercible``: the same pairs, for the types of lazy fields
  (a shell task's ``ImageOut`` output connected to a python task's ``Nifti1Image``
  input).

A field is a value in pydra: the image is resolved when it is assigned, as a list is
copied when assigned. Edit an image after assigning it and assign it again; the task
never changes the image it was given.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import typing as ty
from typing import Any

from fileformats.core import FileSet
from fileformats.generic import File
from nibabel.filebasedimages import FileBasedImage, ImageFileError
from pydra.utils.typing import UNION_TYPES, TypeParser

from .. import load
from .resolving import image_path

__all__ = ['formats_of', 'image_classes', 'install']


def _classes(tp: Any) -> list[Any]:
    """Every class in a (possibly nested, possibly union) type, in order."""
    tp = _strip_annotated(tp)
    args = ty.get_args(tp)
    if not args:
        return [tp] if inspect.isclass(tp) else []
    out = []
    origin = ty.get_origin(tp)
    if inspect.isclass(origin) and origin not in UNION_TYPES:
        out.append(origin)
    for arg in args:
        out.extend(_classes(arg))
    return out


def _strip_annotated(tp: Any) -> Any:
    while ty.get_origin(tp) is ty.Annotated:
        tp = ty.get_args(tp)[0]
    return tp


def _filesets(tp: Any) -> list[type]:
    return [c for c in _classes(tp) if issubclass(c, FileSet)]


def image_classes(tp: Any) -> list[type]:
    """The nibabel image classes a type names, at any depth.

    >>> import typing as ty, nibabel as nib
    >>> image_classes(ty.Optional[list[nib.Nifti1Image]])
    [<class 'nibabel.nifti1.Nifti1Image'>]
    """
    return [c for c in _classes(tp) if issubclass(c, FileBasedImage)]


def formats_of(tp: Any) -> tuple[str, ...] | None:
    """The extensions the fileformats classes in a field type accept, in order.

    ``None`` when one of them takes any file (``File`` and its generic parents).

    Examples
    --------
    >>> import typing as ty
    >>> from fileformats.generic import File
    >>> from fileformats.medimage import Nifti1, NiftiGz
    >>> formats_of(Nifti1), formats_of(ty.Union[NiftiGz, Nifti1]), formats_of(File)
    (('.nii',), ('.nii.gz', '.nii'), None)
    >>> from fileformats.vendor.mrtrix3.medimage import ImageIn
    >>> formats_of(ImageIn)[:3]
    ('.dcm', '.mif', '.mif.gz')
    """
    exts: list[str] = []
    for klass in _filesets(tp):
        if issubclass(File, klass):  # File or one of its parents: any file will do
            return None
        for ext in (getattr(klass, 'ext', None), *getattr(klass, 'alternate_exts', ())):
            if ext and ext.lower() not in exts:
                exts.append(ext.lower())
    return tuple(exts) or None


def _is_image(value: Any) -> bool:
    return isinstance(value, FileBasedImage)


def _is_file(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and not isinstance(value, FileBasedImage)


def _map(value: Any, fn: ty.Callable[[Any], Any]) -> Any:
    """``value`` with ``fn`` applied to every item at any depth of lists, tuples, dicts
    and sets.

    Containers keep their type (pydra validates the value again): a named tuple, a list
    or dict subclass (an ``OrderedDict``, a ``defaultdict`` with its factory) comes back
    as one.

    >>> import collections
    >>> Pair = collections.namedtuple('Pair', 'a b')
    >>> _map(Pair(1, [2, {'x': 3}]), lambda v: v * 10)
    Pair(a=10, b=[20, {'x': 30}])
    """
    if isinstance(value, tuple):
        return _rebuilt_tuple(value, [_map(v, fn) for v in value])
    if isinstance(value, list):
        new = copy.copy(value)  # a subclass keeps its class and attributes
        new[:] = [_map(v, fn) for v in value]
        return new
    if isinstance(value, dict):
        new = copy.copy(value)  # a defaultdict keeps its factory, an OrderedDict its order
        for k, v in value.items():
            new[k] = _map(v, fn)
        return new
    if isinstance(value, (set, frozenset)):
        return type(value)(_map(v, fn) for v in value)
    return fn(value)


def _rebuilt_tuple(value: tuple, items: list) -> tuple:
    """A tuple of ``value``'s type holding ``items``: a named tuple by its fields."""
    klass = type(value)
    if klass is tuple:
        return tuple(items)
    make = getattr(klass, '_make', None)  # collections.namedtuple, typing.NamedTuple
    try:
        return make(items) if callable(make) else klass(items)
    except TypeError:  # a subclass whose constructor takes other arguments
        return tuple(items)


def _leaves(value: Any) -> ty.Iterator[Any]:
    """The items :func:`_map` applies its function to, in the same order."""
    if isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


def _unusable(value: Any, label: str, err: Exception) -> TypeError:
    kind = type(value).__name__
    return TypeError(f'the {kind} given to {label or "a field"} cannot be used: {err}')


def _convert(value: Any, to_file: bool, formats: tuple[str, ...] | None, label: str) -> Any:
    """``value`` with its images made paths (``to_file``), or its paths made images."""

    def convert(item: Any) -> Any:
        try:
            if to_file and _is_image(item):
                return _ImagePath(image_path(item, formats))
            if not to_file and _is_file(item):
                return load(os.fspath(item))
        except (OSError, ValueError, TypeError, ImageFileError) as err:
            raise _unusable(item, label, err) from err
        return item

    return _map(value, convert)


class _ImagePath(str):
    """A path an image was resolved to (so a refusal can name its extension)."""


def _extensions(value: Any, formats: tuple[str, ...]) -> set[str]:
    """The extensions, among ``formats``, of the paths images became in ``value``."""
    return {
        max((f for f in formats if path.lower().endswith(f)), key=len, default='')
        for path in _leaves(value)
        if isinstance(path, _ImagePath)
    }


def _to_files(coerce: ty.Callable, parser: TypeParser, obj: Any) -> Any:
    """Coerce ``obj`` with its images as files, in another accepted format if refused.

    fileformats' classes check a file's content, and some refuse files nibabel writes
    correctly (``Nifti2`` looks for its magic at NIfTI-1's offset, ``Mgh`` fails to parse
    MGH headers): then the image is written in the next format the field accepts.
    """
    formats = formats_of(parser.tp)
    while True:
        converted = _convert(obj, True, formats, parser.label)
        try:
            return coerce(parser, converted)
        except TypeError:
            if formats is None:
                raise
            refused = _extensions(converted, formats)
            if not refused or not set(formats) - refused:
                raise
            formats = tuple(f for f in formats if f not in refused)


def _detach(value: Any, label: str) -> Any:
    """``value`` with each image replaced by a clean image of the file it resolves to.

    What a worker unpickles, given in-process too: a task run by the ``debug`` worker
    cannot change the caller's image, nor compute on other voxels than were hashed
    (``get_fdata(dtype=...)`` of another dtype drops an edited data cache and reads the
    file). An image whose class its file does not load back as is kept.
    """

    def detach(item: Any) -> Any:
        if not _is_image(item):
            return item
        try:
            fresh = load(image_path(item))
        except (OSError, ValueError, TypeError, ImageFileError) as err:
            raise _unusable(item, label, err) from err
        return fresh if type(fresh) is type(item) else item

    return _map(value, detach)


def _contains(value: Any, test: ty.Callable[[Any], bool]) -> bool:
    return any(test(item) for item in _leaves(value))


def _wrap_coerce(coerce: ty.Callable) -> ty.Callable:
    @functools.wraps(coerce)
    def wrapper(self: TypeParser, obj: Any) -> Any:
        try:
            coerced = coerce(self, obj)
        except TypeError:
            if _filesets(self.tp) and _contains(obj, _is_image):
                return _to_files(coerce, self, obj)
            if image_classes(self.tp) and _contains(obj, _is_file):
                return coerce(self, _convert(obj, False, None, self.label))
            raise
        return _detach(coerced, self.label) if _contains(coerced, _is_image) else coerced

    wrapper._nibtrack = True
    return wrapper


def _wrap_check_type_coercible(check: ty.Callable) -> ty.Callable:
    @functools.wraps(check)
    def wrapper(self: TypeParser, source: Any, target: Any, source_repr: Any = None) -> Any:
        try:
            return check(self, source, target, source_repr)
        except TypeError:
            source, target = _strip_annotated(source), _strip_annotated(target)
            if not (inspect.isclass(source) and inspect.isclass(target)):
                raise
            image_to_file = issubclass(source, FileBasedImage) and issubclass(target, FileSet)
            file_to_image = issubclass(target, FileBasedImage) and (
                issubclass(source, (FileSet, os.PathLike, str))
            )
            if not (image_to_file or file_to_image):
                raise
        return None

    wrapper._nibtrack = True
    return wrapper


def install() -> None:
    """Wrap ``TypeParser.coerce`` and ``check_type_coercible``; again changes nothing."""
    if getattr(TypeParser.coerce, '_nibtrack', False):
        return
    TypeParser.coerce = _wrap_coerce(TypeParser.coerce)
    TypeParser.check_type_coercible = _wrap_check_type_coercible(TypeParser.check_type_coercible)
