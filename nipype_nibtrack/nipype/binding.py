"""Images stay tied to the files they hold, whatever directory nipype works in.

nipype changes directory all the time: an interface runs inside its node folder, a
result is pickled from the workflow's directory and loaded wherever the next node runs.
A nibabel image names its files as they were given, and its data proxy re-opens that
name at every read, so an image opened by a relative name follows the current
directory to whatever file has that name there. And nipype deletes, after a node ran,
every file of the node folder that no *string* output names.

Three hooks, installed by :func:`install`, close both at the points where nipype moves
values between directories. Each one replaces an image by a *bound copy*: the image
loaded, by an absolute name, from the file it resolves to in the directory where it
was made (its own file when clean, a store file holding its content otherwise), which
is what a pickled reference gives too.

- ``DynamicTraitedSpec.__deepcopy__`` (Function, IdentityInterface, MapNode and
  JoinNode inputs; ``Workflow.run`` deep-copies the graph in the user's directory
  before anything runs): the copy of an image named relatively, or of one that holds
  an open file and cannot be copied (PAR/REC, MINC2, ``keep_file_open``), is its
  bound copy.
- ``BaseInterface.run``: an image named relatively (in the spec, or given to ``run``)
  is bound in the caller's directory for the duration of the run, which happens in
  ``cwd`` (a node's folder); the inputs hold the user's images again afterwards.
- ``clean_working_directory`` (after a node ran): every image output that the node
  keeps is bound in the node folder, where it was made (``nib.load('out.nii')`` there
  names the node's own ``out.nii``), and the files it resolves to are kept like the
  files a string output names. A dirty image whose data lives there is written to
  the store first, so the removal of its source file loses nothing. Outputs that
  nipype drops (``remove_unnecessary_outputs``) are dropped as before.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from copy import deepcopy
from typing import Any

from nipype.interfaces.base.core import BaseInterface
from nipype.interfaces.base.specs import BaseTraitedSpec, DynamicTraitedSpec
from nipype.pipeline.engine import nodes as engine_nodes
from nipype.pipeline.engine import utils as engine_utils
from nipype.utils.filemanip import ensure_list, indirectory
from nipype.utils.misc import str2bool
from traits.api import TraitError

from .. import is_dirty_memoised, load, source_files
from .resolving import resolve_image
from .traits import contains_image, iter_images, map_images

__all__ = ['bound_copy', 'depends_on_cwd', 'install']


def depends_on_cwd(img: Any) -> bool:
    """True when ``img`` names one of its files relatively (its reads follow ``os.chdir``).

    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> path = os.path.join(data_path, 'anatomical.nii')
    >>> depends_on_cwd(nib.load(path)), depends_on_cwd(nib.load(os.path.relpath(path)))
    (False, True)
    """
    names = [holder.filename for holder in img.file_map.values()]
    names.append(getattr(getattr(img, 'dataobj', None), 'file_like', None))
    return any(isinstance(n, (str, os.PathLike)) and not os.path.isabs(n) for n in names)


def bound_copy(img: Any) -> Any:
    """``img`` loaded by an absolute name from the file it resolves to here and now.

    Clean: its own file (nothing written). Dirty: the store file holding its content.

    Raises
    ------
    ValueError, TypeError
        When the image cannot become a file (see :func:`nipype_nibtrack.resolve`).

    Examples
    --------
    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> path = os.path.join(data_path, 'anatomical.nii')
    >>> bound_copy(nib.load(os.path.relpath(path))).get_filename() == path
    True
    """
    return load(resolve_image(img).path)


def _bound_if_relative(img: Any) -> Any:
    return bound_copy(img) if depends_on_cwd(img) else img


# ---------------------------------------------------------------- deep copies


def _seed_bound_copies(spec: BaseTraitedSpec, memo: dict) -> dict[int, Any]:
    """Put the bound copy of some images of ``spec`` in a deepcopy ``memo``.

    Those named relatively (a copy would follow the directory of whoever reads it),
    dirty ones (what a copy shows can depend on how it is asked: ``get_fdata(dtype=...)``
    of another dtype than an edited cache's reads the file, not the edit, while the node
    is hashed by the edit; a worker gets the bound copy anyway), and those that cannot be
    copied (a PAR/REC or MINC2 image, or one loaded with ``keep_file_open``, holds an
    open file); every other image is copied as nipype copies it, which costs less than
    a load. Returns the bound copies, which the caller
    removes from the memo after copying ``spec``: the memo is shared by the whole graph
    copy, and other holders of the same image (an iterables list, whose folder names
    follow the image's content) keep nipype's own copying. An image that cannot
    become a file is left to the hash, which names the input and says why.
    """
    seeded = {}
    for value in spec.trait_get().values():
        for img in iter_images(value):
            if id(img) in memo:
                continue
            if not depends_on_cwd(img) and not is_dirty_memoised(img):
                known = len(memo)
                try:
                    deepcopy(img, memo)
                    continue
                except (TypeError, pickle.PicklingError):
                    # holds an open file: a bound copy re-opens it by name. The failed
                    # copy left half-built objects in the memo (deepcopy records an
                    # object before filling it): forget them, they were added last
                    for key in list(memo)[known:]:
                        del memo[key]
            try:
                seeded[id(img)] = memo[id(img)] = bound_copy(img)
            except (ValueError, TypeError, OSError):
                continue
    return seeded


# ---------------------------------------------------------------- runs


@contextlib.contextmanager
def _bound_inputs(spec: BaseTraitedSpec) -> Iterator[None]:
    """Images of ``spec`` named relatively, bound here until the block ends."""
    replaced = {}
    for name in spec.copyable_trait_names():
        value = getattr(spec, name)
        if any(depends_on_cwd(img) for img in iter_images(value)):
            try:
                new = map_images(value, _bound_if_relative)
                spec.trait_set(trait_change_notify=False, **{name: new})
            except (ValueError, TypeError, TraitError):
                continue  # cannot become a file: the hash names the input and the cause
            replaced[name] = value
    try:
        yield
    finally:
        if replaced:
            spec.trait_set(trait_change_notify=False, **replaced)


# ---------------------------------------------------------------- node folders


def _kept_outputs(outputs: Any, needed_outputs: Any, config: dict) -> list[str]:
    # the same choice as nipype's clean_working_directory
    if needed_outputs and str2bool(config['execution']['remove_unnecessary_outputs']):
        return list(needed_outputs)
    return list(outputs.trait_get())


def bind_outputs(outputs: Any, cwd: str | os.PathLike, names: list[str]) -> list[str]:
    """Bind the images of ``outputs`` (those named ``names``) in ``cwd``, in place.

    Returns
    -------
    list of str
        The files the bound images read, as found under ``cwd`` by walking it (nipype
        compares names as text; a symlinked work directory spells them otherwise).
    """
    files = []
    with indirectory(cwd):
        for name in names:
            value = getattr(outputs, name, None)
            if not contains_image(value):
                continue
            try:
                new = map_images(value, bound_copy)
                outputs.trait_set(trait_change_notify=False, **{name: new})
            except (ValueError, TypeError, TraitError):
                continue  # pickled whole, as plain nipype does (see pickling)
            files.extend(f for img in iter_images(new) for f in source_files(img))
    wanted = {_identity(f) for f in files} - {None}
    if not wanted:
        return []
    return [f for f in engine_utils.walk_files(cwd) if _identity(f) in wanted]


def _identity(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def install() -> None:
    """Install the three hooks; calling it again changes nothing."""
    if getattr(BaseInterface.run, '_nibtrack', False):
        return
    dynamic_deepcopy = DynamicTraitedSpec.__deepcopy__
    interface_run = BaseInterface.run
    clean = engine_utils.clean_working_directory

    def __deepcopy__(self: DynamicTraitedSpec, memo: dict) -> Any:
        if id(self) in memo:
            return memo[id(self)]
        seeded = _seed_bound_copies(self, memo)
        try:
            return dynamic_deepcopy(self, memo)
        finally:
            for key, dup in seeded.items():
                if memo.get(key) is dup:
                    del memo[key]

    def run(self: BaseInterface, cwd: Any = None, ignore_exception: Any = None, **inputs: Any):
        # nipype sets these inside `cwd`; images are named here: set them first, as given
        images = {name: v for name, v in inputs.items() if contains_image(v)}
        if images:
            self.inputs.trait_set(**images)
        rest = {name: v for name, v in inputs.items() if name not in images}
        with _bound_inputs(self.inputs):
            return interface_run(self, cwd, ignore_exception, **rest)

    def clean_working_directory(
        outputs: Any,
        cwd: Any,
        inputs: Any,
        needed_outputs: Any,
        config: dict,
        files2keep: Any = None,
        dirs2keep: Any = None,
    ) -> Any:
        if outputs:
            kept = bind_outputs(outputs, cwd, _kept_outputs(outputs, needed_outputs, config))
            if kept:
                files2keep = [*ensure_list(files2keep or []), *kept]
        return clean(outputs, cwd, inputs, needed_outputs, config, files2keep, dirs2keep)

    for hook, original in (
        (__deepcopy__, dynamic_deepcopy),
        (run, interface_run),
        (clean_working_directory, clean),
    ):
        hook.__doc__ = original.__doc__
    run._nibtrack = True
    DynamicTraitedSpec.__deepcopy__ = __deepcopy__
    BaseInterface.run = run
    engine_utils.clean_working_directory = clean_working_directory
    engine_nodes.clean_working_directory = clean_working_directory
