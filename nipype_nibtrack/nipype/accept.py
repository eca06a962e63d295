"""Make any nipype interface accept nibabel images.

:func:`accept_images` returns a subclass of an interface whose input spec takes images
wherever it took files, at any depth of ``Either``, ``List``, ``InputMultiPath``,
``Tuple``, ``Union`` and ``Dict`` traits. For paths it behaves exactly as the original
class: same inputs in the same order with the same metadata and defaults, same
``run`` (nipype sets its inputs, in its own order of operations), same command lines.
Images become file names at the last moment: when ``run`` starts or nipype checks the
mandatory inputs, when ``cmdline`` is read, and inside a node when the node is hashed,
just before it runs; so the command line, ``copyfile`` handling, derived output names
and the recorded inputs all see plain paths.

A wrapped class lives in the mirror of its original's module
(:mod:`nipype_nibtrack.nipype.mirror`): ``fsl.FLIRT`` becomes
``nipype_nibtrack.interfaces.fsl.preprocess.FLIRT``, so pickles, ``Workflow.export()``
and nipype's package labels find it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from nipype.interfaces.base import BaseInterface
from nipype.interfaces.base.traits_extension import File
from traits.api import BaseTuple, CTrait, Dict, List, Union
from traits.trait_handlers import TraitCompound

from .. import normalise_formats, renew_after_fork
from .mirror import mirror_name
from .resolving import resolve_image
from .traits import ImageFile, contains_image, copying, iter_images, map_images

__all__ = [
    'FAMILY_FORMATS',
    'accept_images',
    'formats_for',
    'image_trait',
    'resolve_spec_images',
    'takes_images',
    'trait_formats',
]

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


# ------------------------------------------------------------ image-accepting trait types


def _copy(old: Any, klass: type | None = None) -> Any:
    # TraitType.clone() keeps the original class; copying __dict__ keeps all metadata
    new = (klass or type(old)).__new__(klass or type(old))
    new.__dict__.update(old.__dict__)
    if '_metadata' in old.__dict__:
        new._metadata = dict(old._metadata)
    return new


#: The members directly inside a compound trait type (CTraits, or handlers for
#: ``Either``), and how to build a copy of it around new members
_Inner = tuple[list[Any], Callable[[list[Any]], Any]]


@functools.singledispatch
def _inner(handler: Any) -> _Inner | None:
    """What ``handler`` holds and how to rebuild it; None when it is not compound.

    A registry: one function per kind of trait that can hold a ``File``. Both the
    image-accepting copies (:func:`image_trait`) and the search for the image inputs
    of a trait (:func:`trait_formats`) walk traits through it.
    """
    return None


def _with(handler: Any, **members: Any) -> Any:
    """A copy of ``handler`` (see :func:`_copy`) holding other members."""
    new = _copy(handler)
    for name, value in members.items():
        setattr(new, name, value)
    return new


@_inner.register
def _(handler: List) -> _Inner:
    # List and nipype's InputMultiObject / InputMultiPath, a List subclass
    return [handler.item_trait], lambda new: _with(handler, item_trait=new[0])


@_inner.register
def _(handler: BaseTuple) -> _Inner:
    def build(new: list[Any]) -> Any:
        types = tuple(new)
        if 'fast_validate' not in handler.__dict__:
            return _with(handler, types=types)
        fast = handler.fast_validate
        return _with(handler, types=types, fast_validate=(fast[0], types, *fast[2:]))

    return list(handler.types), build


@_inner.register
def _(handler: Union) -> _Inner:
    return list(handler.list_ctrait_instances), lambda new: _with(
        handler, list_ctrait_instances=new
    )


@_inner.register
def _(handler: Dict) -> _Inner:
    return [handler.value_trait], lambda new: _with(
        handler, value_trait=new[0], value_handler=new[0].handler
    )


@_inner.register
def _(handler: TraitCompound) -> _Inner:
    # traits.Either(...): a compound handler over trait types (handlers, not CTraits)
    return list(handler.handlers), TraitCompound


def _handler_of(member: Any) -> Any:
    return member.handler if isinstance(member, CTrait) else member


def _image_type(handler: Any, formats: tuple[str, ...]) -> Any | None:
    """An image-accepting copy of a trait type or handler; None if no File sits inside."""
    if isinstance(handler, File):
        if isinstance(handler, ImageFile):
            return None  # takes images already
        new = _copy(handler, ImageFile)
        new._metadata.setdefault('image_formats', formats)
        return new
    inner = _inner(handler)
    if inner is None:
        return None
    members, build = inner
    new = [
        image_trait(m, formats) if isinstance(m, CTrait) else _image_type(m, formats)
        for m in members
    ]
    if all(n is None for n in new):
        return None
    return build([n if n is not None else m for n, m in zip(new, members, strict=True)])


def image_trait(trait: CTrait, formats: tuple[str, ...] = _DEFAULT) -> CTrait | None:
    """An image-accepting copy of ``trait``, or None when no ``File`` sits inside it.

    Every ``File`` at any depth becomes an :class:`ImageFile`; everything else about the
    trait (metadata, default, comparison mode, item and member traits) is kept.

    >>> from nipype.interfaces import spm
    >>> trait = spm.Realign.input_spec.class_traits()['in_files']
    >>> new = image_trait(trait)
    >>> new.argstr == trait.argstr, new.default_value() == trait.default_value()
    (True, True)
    >>> image_trait(spm.Realign.input_spec.class_traits()['quality']) is None
    True
    """
    handler = trait.handler
    new_handler = _image_type(handler, formats) if handler is not None else None
    if new_handler is None:
        return None
    new = CTrait(0)
    new.clone(trait)
    if trait.__dict__:
        new.__dict__ = dict(trait.__dict__)
    new.handler = new_handler
    new.set_validate(getattr(new_handler, 'fast_validate', None) or new_handler.validate)
    post_setattr = getattr(new_handler, 'post_setattr', None)
    if post_setattr is not None:
        new.post_setattr = post_setattr
    return new


def _image_files(handler: Any) -> Iterator[ImageFile]:
    """Every :class:`ImageFile` inside a trait type or handler, outermost first."""
    if isinstance(handler, ImageFile):
        yield handler
        return
    inner = _inner(handler)
    for member in inner[0] if inner is not None else ():
        yield from _image_files(_handler_of(member))


def trait_formats(spec: Any, name: str) -> tuple[str, ...] | None:
    """Extensions the input ``name`` of ``spec`` reads (None: any, as for ``traits.Any``).

    >>> from nipype.interfaces import fsl
    >>> spec = accept_images(fsl.FLIRT)().inputs
    >>> trait_formats(spec, 'in_file')[:2], trait_formats(spec, 'dof')
    (('.nii', '.nii.gz'), None)
    """
    trait = spec.trait(name)
    if trait is None:
        return None
    found = next(_image_files(trait.handler), None)
    if found is not None:
        return found.formats(getattr(spec, '_nibtrack_formats', None))
    while isinstance(trait.handler, List):
        trait = trait.handler.item_trait
    if isinstance(trait.handler, File) and trait.handler._exts:
        return normalise_formats(trait.handler._exts)
    return None


# ------------------------------------------------------------ resolution


def _resolve_value(value: Any, formats: tuple[str, ...] | None, label: str) -> Any:
    """``value`` with every image a file name (plain containers: the trait validates them)."""

    def path_of(img: Any) -> str:
        resolution = resolve_image(img, formats)
        if logger.isEnabledFor(logging.INFO):
            logger.info('[nibtrack] %s: %s', label, resolution.describe())
        return resolution.path

    return map_images(value, path_of)


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
    # the values set are in the instance dict (an image is never a default); a value
    # there that is no input (an event, a transient trait, our own records) is skipped
    for name, value in list(vars(spec).items()):
        if not contains_image(value):
            continue
        trait = spec.trait(name)
        if trait is None or trait.type == 'event' or trait.transient is True:
            continue
        try:
            new = _resolve_value(value, trait_formats(spec, name), f'{label}.{name}')
        except (ValueError, TypeError) as err:
            # edited since it was set (deep copies take it unchecked): name the input
            raise type(err)(
                f'the {name!r} input of {label} holds an image that cannot be passed on '
                f'as a file: {err}'
            ) from err
        replaced[name] = value
        spec.trait_set(trait_change_notify=False, **{name: new})
    return replaced


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
        # and other nodes (Function inputs) keep nipype's own copying. The copy takes
        # them unchecked: they are checked when resolved (see traits.copying).
        seeded = {}
        # the instance dict holds every value set (trait_get costs 20x more to list them)
        images = list(iter_images(list(vars(self).values())))
        for img in images:
            if id(img) not in memo:
                seeded[id(img)] = memo[id(img)] = img
        try:
            with copying(images):
                return super().__deepcopy__(memo)
        finally:
            for key, img in seeded.items():
                if memo.get(key) is img:
                    del memo[key]

    def get_hashval(self, hash_method: str | None = None) -> Any:
        # Inside a node: this runs just before the interface does; the node's copy of
        # the interface then holds paths for copyfile, cmdline, its report and pickles.
        # The images behind those paths are remembered: a node run again (``node.run()``
        # twice, the user's own node, not a graph copy) hashes and runs what its images
        # hold then, not the file an earlier, since edited, state was written to.
        self._nibtrack_rebind()
        replaced = resolve_spec_images(self)
        paths = {name: getattr(self, name) for name in replaced}
        self._nibtrack_sources().update(
            {name: (image, paths[name], paths[name]) for name, image in replaced.items()}
        )
        return super().get_hashval(hash_method=hash_method)

    def _nibtrack_sources(self) -> dict[str, tuple[Any, Any, Any]]:
        # by input name: (image, the file name in its place now, what it resolved to)
        return self.__dict__.setdefault('_nibtrack_hashed', {})

    def _nibtrack_rebind(self) -> dict[str, tuple[Any, Any, Any]]:
        """Put back the images whose content changed since hashing left their file names.

        A name that still stands for what its image holds stays (nipype's copy of it in
        the working directory included); an input set to something else since keeps it.
        """
        sources = self.__dict__.get('_nibtrack_hashed') or {}
        label = f'{type(self).__name__}.'
        back = {
            name: entry
            for name, entry in sources.items()
            if getattr(self, name) == entry[1]
            and _resolve_value(entry[0], trait_formats(self, name), label + name) != entry[2]
        }
        for name in back:
            del sources[name]
        if back:
            self.trait_set(trait_change_notify=False, **{n: e[0] for n, e in back.items()})
        return back


class _ImageAware:
    """Mixed into generated interfaces: images are file names while nipype runs or
    formats the interface, and images again afterwards.

    ``run`` passes its arguments through untouched: nipype (or the interface's own
    ``run``) sets them, relative paths inside ``cwd``. Images already set are resolved
    when ``run`` starts, images passed to ``run`` when nipype checks the mandatory
    inputs, right after setting them.
    """

    _nibtrack_original: type

    @contextlib.contextmanager
    def _nibtrack_resolving(self) -> Iterator[None]:
        frames = self.__dict__.setdefault('_nibtrack_frames', [])
        # file names a node's hashing left (the interface of a node run before): their
        # images are resolved again, as they are now, and the names put back afterwards
        rebind = getattr(self.inputs, '_nibtrack_rebind', None)
        rebound = rebind() if rebind is not None and len(frames) == 0 else {}
        frames.append({})
        try:
            self._nibtrack_resolve()
            yield
        finally:
            replaced = frames.pop()
            if not frames:
                del self.__dict__['_nibtrack_frames']
            # an input set meanwhile (run(in_file=...), or by the interface itself) keeps
            # its new value, as in nipype; the others hold their images again
            restore = {
                name: image
                for name, (image, path) in replaced.items()
                if getattr(self.inputs, name) == path
            }
            if restore:
                self.inputs.trait_set(trait_change_notify=False, **restore)
            self._nibtrack_unbind({n: replaced[n] for n in rebound if n in restore})

    def _nibtrack_unbind(self, resolved: dict[str, tuple[Any, Any]]) -> None:
        # inputs that held file names before the call hold the (new) names again
        if resolved:
            self.inputs.trait_set(
                trait_change_notify=False, **{n: path for n, (_, path) in resolved.items()}
            )
            self.inputs._nibtrack_sources().update(
                {n: (image, path, path) for n, (image, path) in resolved.items()}
            )

    def _nibtrack_resolve(self) -> None:
        frames = self.__dict__.get('_nibtrack_frames')
        if frames:
            for name, value in resolve_spec_images(self.inputs).items():
                frames[-1].setdefault(name, (value, getattr(self.inputs, name)))

    def run(self, *args: Any, **kwargs: Any) -> Any:
        with self._nibtrack_resolving():
            return super().run(*args, **kwargs)

    def _check_mandatory_inputs(self) -> Any:
        self._nibtrack_resolve()
        return super()._check_mandatory_inputs()

    # Methods that derive file names from the inputs: run and cmdline call them inside a
    # resolution already, but users call them directly too (``bet._list_outputs()`` to
    # know the output names before running), and nipype's own code takes the inputs
    # for paths there (split_filename of an image raises TypeError).
    def _list_outputs(self) -> Any:
        with self._nibtrack_resolving():
            return super()._list_outputs()

    def _gen_filename(self, name: str) -> Any:
        with self._nibtrack_resolving():
            return super()._gen_filename(name)

    def aggregate_outputs(self, *args: Any, **kwargs: Any) -> Any:
        with self._nibtrack_resolving():
            return super().aggregate_outputs(*args, **kwargs)

    def __getstate__(self) -> dict:
        # a pickle taken while running (a crash file) holds no resolution frames
        state = super().__getstate__()
        if isinstance(state, dict) and '_nibtrack_frames' in state:
            state = {k: v for k, v in state.items() if k != '_nibtrack_frames'}
        return state


def _cmdline(self: Any) -> str:
    with self._nibtrack_resolving():
        return super(_ImageAware, self).cmdline


# ------------------------------------------------------------ the classes


_made: dict[type, type] = {}
_made_lock = threading.RLock()
renew_after_fork(globals(), '_made_lock')


def _output_names(interface_class: type) -> set[str]:
    spec = getattr(interface_class, 'output_spec', None)
    return set(spec.class_trait_names()) if spec is not None else set()


def _names_an_output(name: str, trait: Any, outputs: set[str]) -> bool:
    """True for a File input that names a file the tool writes.

    An image there would resolve to its own file or a store entry, which the tool would
    then overwrite: such inputs stay plain ``File`` inputs.
    """
    return bool(trait.genfile or trait.name_source or name in outputs)


def _image_traits(interface_class: type) -> dict[str, CTrait]:
    """The image-accepting replacement of each input of ``interface_class`` that has one."""
    formats = formats_for(interface_class)
    outputs = _output_names(interface_class)
    spec = interface_class.input_spec
    if spec is None:
        return {}
    return {
        name: new
        for name, trait in spec.class_traits().items()
        if not _names_an_output(name, trait, outputs)
        and (new := image_trait(trait, formats)) is not None
    }


def takes_images(interface_class: type) -> bool:
    """True when :func:`accept_images` changes something: a file input an image can fill.

    >>> from nipype.interfaces import fsl, utility
    >>> takes_images(fsl.BET), takes_images(utility.IdentityInterface)
    (True, False)
    """
    return (
        isinstance(interface_class, type)
        and issubclass(interface_class, BaseInterface)
        and (issubclass(interface_class, _ImageAware) or bool(_image_traits(interface_class)))
    )


def _build(interface_class: type, replaced: dict[str, CTrait]) -> type:
    formats = formats_for(interface_class)
    module = mirror_name(interface_class.__module__)
    qualname = interface_class.__qualname__
    spec = interface_class.input_spec
    # every input declared again, in the original order: traits lists the inputs of a
    # class before the inherited ones, and nipype reports the first missing input
    inputs = {name: replaced.get(name, trait) for name, trait in spec.class_traits().items()}
    spec_class = type(
        spec.__name__,
        (spec,) if issubclass(spec, _ImageAwareSpec) else (_ImageAwareSpec, spec),
        {
            **inputs,
            '__module__': module,
            '__qualname__': f'{qualname}.input_spec',
            '__doc__': spec.__doc__,
            '_nibtrack_formats': formats,
        },
    )
    namespace = {
        'input_spec': spec_class,
        '__module__': module,
        '__qualname__': qualname,
        '__doc__': interface_class.__doc__,
        '_nibtrack_original': interface_class,
    }
    # a subclass of an image-aware class (with file inputs of its own) has the mixins
    aware = issubclass(interface_class, _ImageAware)
    if not aware and isinstance(getattr(interface_class, 'cmdline', None), property):
        namespace['cmdline'] = property(_cmdline, doc=interface_class.cmdline.__doc__)
    bases = (interface_class,) if aware else (_ImageAware, interface_class)
    return type(interface_class.__name__, bases, namespace)


def accept_images(interface_class: type) -> type:
    """A subclass of ``interface_class`` whose file inputs also take nibabel images.

    Every ``File`` input, at any depth of ``Either``/``List``/``InputMultiPath``/
    ``Tuple``/``Union``/``Dict``, becomes an :class:`ImageFile` with the same
    metadata, except inputs that name a file the tool writes (``genfile``,
    ``name_source``, or the name of an output): the tool would overwrite the image's
    file there. For paths the class behaves exactly as the original; its help says
    which inputs take an image. Works for ``CommandLine`` interfaces (FSL, elastix,
    ANTs, mrtrix3...) and for ``BaseInterface`` subclasses written in Python. Calling
    it again returns the same class; a class with no such input comes back unchanged.

    The class lives in the mirror of its original's module (see
    :mod:`nipype_nibtrack.nipype.mirror`), so pickles of it load in a fresh worker.

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
    >>> FLIRT.__module__
    'nipype_nibtrack.interfaces.fsl.preprocess'
    >>> anat = os.path.join(data_path, 'anatomical.nii')
    >>> flirt = FLIRT(in_file=nib.load(anat), reference=anat, out_file='out.nii.gz')
    >>> flirt.cmdline == f'flirt -in {anat} -ref {anat} -out out.nii.gz -omat anatomical_flirt.mat'
    True
    >>> accept_images(fsl.FLIRT) is FLIRT
    True
    """
    if not (isinstance(interface_class, type) and issubclass(interface_class, BaseInterface)):
        raise TypeError(f'accept_images takes a nipype interface class, got {interface_class!r}')
    if '_nibtrack_original' in vars(interface_class):
        return interface_class
    with _made_lock:
        if interface_class not in _made:
            replaced = _image_traits(interface_class)
            _made[interface_class] = (
                _build(interface_class, replaced) if replaced else interface_class
            )
        return _made[interface_class]
