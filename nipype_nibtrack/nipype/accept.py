"""Make any nipype interface accept nibabel images.

:func:`accept_images` returns a subclass of an interface whose input spec takes images
wherever it took files. Images become file names at the last moment: when the
interface runs or its ``cmdline`` is read, and inside a node when the node is hashed,
just before it runs; so the command line, ``copyfile`` handling, derived output names
and the recorded inputs all see plain paths.

Classes made here live in this module under names that encode the original class
(``FLIRT@nipype:interfaces:fsl:preprocess``); the module's ``__getattr__`` rebuilds
them on demand, so pickles of nodes using them load in a fresh batch worker that has
only imported ``nipype_nibtrack``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from nipype.interfaces.base import BaseInterface
from nipype.interfaces.base.traits_extension import File
from traits.api import List

from .. import normalise_formats, resolve
from .traits import ImageFile, contains_image, is_image, iter_images

__all__ = ['FAMILY_FORMATS', 'accept_images', 'formats_for', 'resolve_spec_images']

logger = logging.getLogger('nipype.workflow')

#: Extensions each interface family reads, by module prefix; the longest prefix wins.
FAMILY_FORMATS: dict[str, tuple[str, ...]] = {
    'nipype.interfaces.fsl': ('.nii', '.nii.gz', '.hdr', '.img', '.img.gz'),
    'nipype.interfaces.elastix': ('.nii', '.nii.gz', '.mhd', '.nrrd'),
    'nipype.interfaces.ants': ('.nii', '.nii.gz', '.nrrd', '.mha', '.mhd'),
    'nipype.interfaces.mrtrix3': ('.mif', '.mif.gz', '.nii', '.nii.gz', '.mgh', '.mgz'),
    'nipype.interfaces.mrtrix': ('.mif', '.nii', '.nii.gz'),
    'nipype.interfaces.freesurfer': ('.mgz', '.mgh', '.nii', '.nii.gz'),
    'nipype.interfaces.afni': ('.nii', '.nii.gz', '.head', '.brik', '.brik.gz'),
    'nipype.interfaces.spm': ('.nii', '.img', '.hdr'),
}
_DEFAULT = ('.nii', '.nii.gz')
_SEP = '@'


def formats_for(interface_class: type) -> tuple[str, ...]:
    """Extensions an interface family reads (NIfTI when the family is unknown).

    >>> from nipype.interfaces import fsl, elastix
    >>> formats_for(fsl.FLIRT)[:2], formats_for(elastix.Registration)[-1]
    (('.nii', '.nii.gz'), '.nrrd')
    """
    original = getattr(interface_class, '_nibtrack_original', interface_class)
    module = original.__module__
    best = max((p for p in FAMILY_FORMATS if module.startswith(p)), key=len, default=None)
    return FAMILY_FORMATS[best] if best else _DEFAULT


def _copy_trait_type(old: Any, klass: type, formats: tuple[str, ...]) -> Any:
    # TraitType.clone() keeps the original class; copying __dict__ keeps all metadata
    new = klass.__new__(klass)
    new.__dict__.update(old.__dict__)
    new._metadata = dict(old._metadata)
    new._metadata.setdefault('image_formats', formats)
    return new


def _image_trait(trait_type: Any, formats: tuple[str, ...]) -> Any | None:
    """An image-accepting copy of a File trait type or list of them; None otherwise."""
    if isinstance(trait_type, File):
        klass = trait_type.__class__ if isinstance(trait_type, ImageFile) else ImageFile
        return _copy_trait_type(trait_type, klass, formats)
    if isinstance(trait_type, List):
        inner = _image_trait(trait_type.item_trait.trait_type, formats)
        if inner is None:
            return None
        new = _copy_trait_type(trait_type, type(trait_type), formats)
        new.item_trait = inner.as_ctrait()
        return new
    return None


class _ImageAwareSpec:
    """Mixed into generated input specs: resolves images before hashing, shares them
    between deep copies."""

    _nibtrack_formats: tuple[str, ...] = _DEFAULT

    def __deepcopy__(self, memo: dict) -> Any:
        # nipype deep-copies the graph several times per run. A plain spec copies a
        # single image input by reference, but a list input is a TraitListObject that
        # traits deep-copies item by item, arrays included: seed the memo so every copy
        # shares the image objects. They are only ever read, never modified, here.
        # The seeds are removed afterwards: the memo is shared by the whole graph copy,
        # and other nodes (Function inputs) keep nipype's own copying.
        seeded = {}
        for value in self.trait_get().values():
            for img in iter_images(value):
                if id(img) not in memo:
                    seeded[id(img)] = memo[id(img)] = img
        try:
            return super().__deepcopy__(memo)
        finally:
            for key, img in seeded.items():
                if memo.get(key) is img:
                    del memo[key]

    def get_hashval(self, hash_method: str | None = None) -> Any:
        # Inside a node: this runs just before the interface does; the node's copy of
        # the interface then holds paths for copyfile, cmdline and its pickles.
        resolve_spec_images(self)
        return super().get_hashval(hash_method=hash_method)


def trait_formats(spec: Any, name: str) -> tuple[str, ...] | None:
    """Extensions the input ``name`` of ``spec`` reads (None: any, as for ``traits.Any``).

    >>> from nipype.interfaces import fsl
    >>> spec = accept_images(fsl.FLIRT)().inputs
    >>> trait_formats(spec, 'in_file')[:2], trait_formats(spec, 'dof')
    (('.nii', '.nii.gz'), None)
    """
    trait = spec.trait(name)
    trait_type = trait.trait_type if trait is not None else None
    while isinstance(trait_type, List):
        trait_type = trait_type.item_trait.trait_type
    if isinstance(trait_type, ImageFile):
        return trait_type.formats(getattr(spec, '_nibtrack_formats', None))
    if isinstance(trait_type, File) and trait_type._exts:
        return normalise_formats(trait_type._exts)
    return None


def _resolve_value(value: Any, formats: tuple[str, ...] | None, label: str) -> Any:
    if is_image(value):
        resolution = resolve(value, formats=formats)
        logger.info('[nibtrack] %s: %s', label, resolution.describe())
        return resolution.path
    # A list input holds a TraitListObject, whose constructor needs its trait: build
    # plain lists and tuples, which the trait validates again when they are set
    if isinstance(value, list):
        return [_resolve_value(v, formats, label) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve_value(v, formats, label) for v in value)
    if isinstance(value, dict):
        return {k: _resolve_value(v, formats, label) for k, v in value.items()}
    return value


def resolve_spec_images(spec: Any) -> dict[str, Any]:
    """Replace every image in ``spec`` by a file name, in place.

    Returns
    -------
    dict
        The replaced values by input name, to put back with ``spec.trait_set``.

    Examples
    --------
    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> from nipype.interfaces import fsl
    >>> path = os.path.join(data_path, 'anatomical.nii')
    >>> spec = accept_images(fsl.FLIRT)(in_file=nib.load(path)).inputs
    >>> replaced = resolve_spec_images(spec)
    >>> spec.in_file == path, type(replaced['in_file']).__name__
    (True, 'Nifti1Image')
    """
    replaced = {}
    label = type(spec).__name__.removesuffix('InputSpec') or type(spec).__name__
    for name in spec.copyable_trait_names():
        value = getattr(spec, name)
        if not contains_image(value):
            continue
        new = _resolve_value(value, trait_formats(spec, name), f'{label}.{name}')
        replaced[name] = value
        spec.trait_set(trait_change_notify=False, **{name: new})
    return replaced


@contextlib.contextmanager
def _resolved(interface: Any) -> Iterator[None]:
    replaced = resolve_spec_images(interface.inputs)
    try:
        yield
    finally:
        if replaced:
            interface.inputs.trait_set(trait_change_notify=False, **replaced)


class _ImageAware:
    """Mixed into generated interfaces: resolves images around ``run`` and ``cmdline``."""

    _nibtrack_original: type

    def run(self, cwd: str | None = None, ignore_exception: bool | None = None, **inputs: Any):
        if inputs:
            self.inputs.trait_set(**inputs)
        with _resolved(self):
            return super().run(cwd=cwd, ignore_exception=ignore_exception)

    @property
    def cmdline(self) -> str:
        with _resolved(self):
            return super().cmdline


_made: dict[type, type] = {}
_made_lock = threading.RLock()


def _output_names(interface_class: type) -> set[str]:
    spec = getattr(interface_class, 'output_spec', None)
    return set(spec.class_trait_names()) if spec is not None else set()


def _names_an_output(name: str, trait: Any, outputs: set[str]) -> bool:
    """True for a File input that names a file the tool writes.

    An image there would resolve to its own file or a store entry, which the tool would
    then overwrite: such inputs stay plain ``File`` inputs.
    """
    return bool(trait.genfile or trait.name_source or name in outputs)


def _encode(klass: type) -> str:
    return f'{klass.__qualname__}{_SEP}{klass.__module__}'.replace('.', ':')


def accept_images(interface_class: type) -> type:
    """A subclass of ``interface_class`` whose file inputs also take nibabel images.

    Every ``File`` input and every list of them becomes an :class:`ImageFile` input
    with the same metadata, except inputs that name a file the tool writes
    (``genfile``, ``name_source``, or the name of an output): the tool would overwrite
    the image's file there. Works for ``CommandLine`` interfaces (FSL, elastix, ANTs,
    mrtrix3...) and for ``BaseInterface`` subclasses written in Python. Calling it
    again returns the same class.

    Parameters
    ----------
    interface_class : type
        A nipype interface class.

    Returns
    -------
    type

    Examples
    --------
    >>> import os, nibabel as nib
    >>> from nipype.interfaces import fsl
    >>> from nibabel.testing import data_path
    >>> FLIRT = accept_images(fsl.FLIRT)
    >>> anat = os.path.join(data_path, 'anatomical.nii')
    >>> flirt = FLIRT(in_file=nib.load(anat), reference=anat, out_file='out.nii.gz')
    >>> flirt.cmdline == f'flirt -in {anat} -ref {anat} -out out.nii.gz -omat anatomical_flirt.mat'
    True
    >>> accept_images(fsl.FLIRT) is FLIRT
    True
    """
    if not (isinstance(interface_class, type) and issubclass(interface_class, BaseInterface)):
        raise TypeError(f'accept_images takes a nipype interface class, got {interface_class!r}')
    if issubclass(interface_class, _ImageAware):
        return interface_class
    with _made_lock:
        if interface_class in _made:
            return _made[interface_class]
        formats = formats_for(interface_class)
        qualname = _encode(interface_class)
        spec = interface_class.input_spec
        outputs = _output_names(interface_class)
        replaced = {
            name: new
            for name, trait in spec.class_traits().items()
            if trait.trait_type is not None
            and not _names_an_output(name, trait, outputs)
            and (new := _image_trait(trait.trait_type, formats)) is not None
        }
        spec_class = type(
            spec.__name__,
            (_ImageAwareSpec, spec),
            {
                **replaced,
                '__module__': __name__,
                '__qualname__': f'{qualname}.input_spec',
                '_nibtrack_formats': formats,
            },
        )
        aware = type(
            interface_class.__name__,
            (_ImageAware, interface_class),
            {
                'input_spec': spec_class,
                '__module__': __name__,
                '__qualname__': qualname,
                '__doc__': interface_class.__doc__,
                '_nibtrack_original': interface_class,
            },
        )
        _made[interface_class] = aware
        return aware


def __getattr__(name: str) -> Any:
    """Rebuild an image-aware class named by :func:`accept_images` (for unpickling)."""
    qualname, sep, module = name.partition(_SEP)
    if not sep:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    target: Any = importlib.import_module(module.replace(':', '.'))
    for part in qualname.split(':'):
        target = getattr(target, part)
    return accept_images(target)
