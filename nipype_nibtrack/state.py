"""The state of an image, and answers remembered for as long as that state holds.

A workflow engine asks the same questions about the same image many times per run:
nipype validates an input at every deep copy of the graph, then resolves it to hash the
node, then again to know whether a memoised hash still holds. Each answer costs a
cleanliness check, and for a dirty image a digest, a plan and a store lookup. The
answers depend only on what the image holds and on the files it reads, so they are
remembered per image *and its state*:

- the image's side, :func:`~nipype_nibtrack.recheck.image_key` (the same one a
  remembered clean verdict rests on) and the cleanliness rule registered for the
  image's class, read from the image in about a microsecond: class, header bytes (byte
  order and NIfTI extensions included), affine bytes, dtype alias, the data object
  itself (an identity: a new proxy is a new state) with every read parameter, the file
  map's names and file objects; and the provenance record
  (binding, load keywords, ``mark_clean`` baseline, ``mark_dirty``);
- the files' side, :func:`~nipype_nibtrack.recheck.read_files`: the identity of every
  file the image depends on and the raw bytes holding its header (a header rewritten
  through a shared memory map moves neither size nor timestamps), read again at each
  check by :func:`~nipype_nibtrack.recheck.files_unchanged` with one ``open``,
  ``fstat`` and ``pread`` per file.

A state is only given for an image that holds no data cache and reads its voxels by
absolute name from NIfTI/Analyze files whose identities have *settled* (see
:mod:`.fileid`): then equal identities mean equal voxels, as for every identity-keyed
memo of the package, and everything else it holds is in the image's side. Any other
image (an in-memory array, a filled ``get_fdata()`` cache, which can be edited in place
without a trace, a held file, another format, a file younger than the racy window) has
no state, and each question is answered in full every time.

Answers live beside the image in a table keyed by the object itself (a weak reference,
never the class's ``__eq__``/``__hash__``): a copy, a pickle, an equal image, or a new
image that happens to get a freed image's ``id()`` starts with none. An answer is
computed on a private copy of the image (:mod:`.frozen`) and kept under the state read
from that copy, so another thread editing and restoring the image meanwhile (A -> B ->
A) cannot file B's answer under A; threads alive or not, the memo works the same. Only
for images judged by the package's own rule: a rule a user registered is given the
image itself, and its answers are not kept. An answer is kept only when the files'
side was the same before and after, and the image's own file only when it is handed
out by a name the state reads. A store file handed out is checked again (a ``stat`` of
each file of its entry, which must be the settled identities it had when looked up) and
looked up in full at least every :data:`REFRESH_SECONDS`, which also refreshes its last
use for :meth:`Store.gc`.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .fileid import FileId, path_id
from .frozen import freeze
from .locks import renew_after_fork
from .provenance import binding_of, file_paths, record_of, source_files
from .recheck import files_unchanged, image_key, read_files
from .resolve import Resolution, check_image, normalise_formats, resolve
from .rules import cleanliness_rule, compares_with_file, is_dirty
from .store import ENV_VAR, Store, chosen_store

__all__ = [
    'REFRESH_SECONDS',
    'ImageState',
    'check_image_memoised',
    'image_state',
    'is_dirty_memoised',
    'resolve_memoised',
]

#: A store file remembered for an image is looked up in full again after this long
#: (seconds): far below the grace period of :meth:`Store.gc`, which the lookup renews.
REFRESH_SECONDS = 60.0


def _image_side(img: Any) -> tuple | None:
    """The image's side of a state: the rule deciding clean or dirty for its class (one
    registered later must win over remembered answers) and :func:`image_key`."""
    key = image_key(img)
    return None if key is None else (cleanliness_rule.dispatch(type(img)), key)


def _record_side(img: Any) -> tuple | None:
    record = record_of(img)
    if record is None:
        return None
    return (
        record.forced_dirty,
        record.origin,
        record.baseline,
        record.binding,
        tuple(record.ids.items()),
        record.file_bytes,
        tuple(sorted(record.caches.items())),
        tuple(sorted(record.kwargs.items(), key=lambda item: item[0])),
        None if record.dataobj is None else record.dataobj(),
    )


@dataclass(frozen=True, eq=False)
class ImageState:
    """One state of an image: see the module docstring.

    ``image`` is the rule for the image's class and
    :func:`~nipype_nibtrack.recheck.image_key`, ``files`` the files' side
    as :func:`~nipype_nibtrack.recheck.read_files` gives it: per file ``(path,
    identity, number of header bytes, those bytes)``.
    """

    image: tuple
    record: tuple | None
    files: tuple

    def holds(self, img: Any) -> bool:
        """True when ``img`` is still in this state: about a microsecond, and one
        ``open``, ``fstat`` and ``pread`` per file.

        Examples
        --------
        >>> import os, nibabel as nib
        >>> from nibabel.testing import data_path
        >>> img = nib.load(os.path.join(data_path, 'anatomical.nii'))  # a settled file
        >>> state = image_state(img)
        >>> state.holds(img)
        True
        >>> img.header['descrip'] = b'edited'
        >>> state.holds(img)
        False
        """
        if _image_side(img) != self.image or _record_side(img) != self.record:
            return False
        return files_unchanged(self.files)


def image_state(img: Any) -> ImageState | None:
    """The state of ``img`` now, or None when it cannot be told cheaply (module docstring).

    Parameters
    ----------
    img : nibabel image

    Returns
    -------
    ImageState or None

    Examples
    --------
    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> img = nib.load(os.path.join(data_path, 'anatomical.nii'))  # a settled file
    >>> image_state(img) is not None
    True
    >>> _ = img.get_fdata()  # a cache, which could be edited in place
    >>> image_state(img) is None
    True
    """
    try:
        if binding_of(img) is None:  # binds a first-seen image, as a check would
            return None
    except (AttributeError, TypeError):
        return None
    image = _image_side(img)
    if image is None:
        return None
    keys = {path: key for key, path in (file_paths(img) or {}).items()}
    files = read_files(img, [(keys.get(path, 'image'), path) for path in source_files(img)])
    if files is None:
        return None
    for _, ident, _, _ in files:
        if ident is not None and not FileId(*ident).settled():
            return None  # young: a same-size rewrite of the data could hide in a tick
    return ImageState(image, _record_side(img), files)


# ------------------------------------------------------------ remembered answers


@dataclass(frozen=True, eq=False)
class _Answer:
    state: ImageState
    value: Any
    valid: Callable[[], bool]


# id(image) -> (weak reference to it, {question: answer}). By identity, never by the
# image's own __eq__/__hash__ (a WeakKeyDictionary uses them: an image class comparing
# by content would share, overwrite or fail to look up another image's answers).
_answers: dict[int, tuple[weakref.ref, dict]] = {}
# reentrant: a weak reference's callback may run (garbage collection) while it is held
_lock = threading.RLock()
renew_after_fork(globals(), '_lock')
_MISSING = object()


def _forget(key: int, ref: weakref.ref) -> None:
    with _lock:
        if _answers.get(key, (None,))[0] is ref:
            del _answers[key]


def _answers_of(img: Any, create: bool = False) -> dict | None:
    """The answers kept for this very object (call with the lock held)."""
    key = id(img)
    entry = _answers.get(key)
    if entry is not None and entry[0]() is img:
        return entry[1]
    if not create:
        return None
    try:
        ref = weakref.ref(img, lambda ref, key=key: _forget(key, ref))
    except TypeError:  # not weakly referable: nothing is remembered
        return None
    answers: dict = {}
    _answers[key] = (ref, answers)
    return answers


def _recall(img: Any, question: tuple) -> Any:
    with _lock:
        answer = (_answers_of(img) or {}).get(question)
    if answer is None or not answer.state.holds(img) or not answer.valid():
        return _MISSING
    return answer.value


def _remember(
    img: Any,
    question: tuple,
    compute: Callable[[Any], Any],
    valid: Callable[[Any, ImageState], Callable[[], bool] | None] = (
        lambda value, state: lambda: True
    ),
) -> Any:
    """``compute(img)``, remembered for ``img`` under ``question`` while its state holds.

    Computed on a private copy of the image (see :mod:`.frozen`), whose state is the one
    the answer is kept under: whatever another thread does to the image meanwhile (edit
    it, restore it), the answer is the one for that state. The files' side is read
    before and checked again after. An image with no state is answered in full, on
    itself, and nothing is kept; so is an image judged by a rule a user registered.
    """
    known = _recall(img, question)
    if known is not _MISSING:
        return known
    # a user's rule is given the image itself (it may look the object up): not kept
    frozen = freeze(img) if compares_with_file(type(img)) else None
    if frozen is None:
        return compute(img)
    copy = frozen.image
    before = image_state(copy)
    value = compute(copy)
    check = valid(value, before) if before is not None else None
    if check is not None and before.holds(copy):  # the files unchanged since read
        with _lock:
            answers = _answers_of(img, create=True)
            if answers is not None:
                answers[question] = _Answer(before, value, check)
    return value


def check_image_memoised(img: Any, formats: Iterable[str] | str | None = None) -> None:
    """:func:`~nipype_nibtrack.check_image`, remembered per image and state.

    Only a success is remembered; a refusal is computed again (and raised) every time.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> img = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4))
    >>> check_image_memoised(img, ['.nii'])
    """
    accepted = normalise_formats(formats)
    _remember(img, ('check', accepted), lambda subject: check_image(subject, accepted))


def is_dirty_memoised(img: Any) -> bool:
    """:func:`~nipype_nibtrack.is_dirty`, remembered per image and state.

    Examples
    --------
    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> is_dirty_memoised(nib.load(os.path.join(data_path, 'anatomical.nii')))
    False
    """
    return _remember(img, ('dirty',), is_dirty)


def _store_marker(store: Store | None) -> tuple:
    """What decides the store a resolution writes to."""
    if store is not None:
        return ('given', store)
    chosen = chosen_store()
    if chosen is not None:
        return ('chosen', chosen)
    env = os.environ.get(ENV_VAR)
    if env and os.path.isabs(env):
        return ('default', env)
    # a relative or ~ name, or the user's cache: what default_store_path reads
    return ('default', env, os.getcwd(), os.environ.get('XDG_CACHE_HOME'), os.environ.get('HOME'))


def _entry_check(resolution: Resolution, state: ImageState) -> Callable[[], bool] | None:
    """How to tell that a file handed out is still the one looked up."""
    if resolution.action in ('path', 'original'):
        # the image's own file: its state vouches for the paths it reads, and only for
        # them (a path handed out under another name, e.g. a ``..`` folded by the
        # kernel, can come to name another file while those keep theirs)
        read = {path for path, *_ in state.files}
        return (lambda: True) if resolution.path in read else None
    folder = os.path.dirname(resolution.path)
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    ids = {name: path_id(os.path.join(folder, name)) for name in names}
    if not ids or any(ident is None or not ident.settled() for ident in ids.values()):
        return None  # young entries are re-hashed by every lookup: no memo
    until = time.monotonic() + REFRESH_SECONDS

    def valid() -> bool:
        if time.monotonic() > until:
            return False
        return all(path_id(os.path.join(folder, n)) == ident for n, ident in ids.items())

    return valid


def resolve_memoised(
    value: Any, *, formats: Iterable[str] | str | None = None, store: Store | None = None
) -> Resolution:
    """:func:`~nipype_nibtrack.resolve`, remembered per image, state, formats and store.

    A path is resolved every time (a ``stat``). For an image with a state (see
    :func:`image_state`) a remembered resolution is handed out again while the state
    holds, and, for a store file, while each file of its entry keeps the settled identity
    it had when it was looked up, for at most :data:`REFRESH_SECONDS`.

    Examples
    --------
    >>> import os, tempfile, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> path = os.path.join(data_path, 'anatomical.nii')
    >>> img = nib.load(path)
    >>> resolve_memoised(img).path == resolve_memoised(img).path == path
    True
    >>> img.affine[0, 3] += 1
    >>> resolve_memoised(img, store=Store(tempfile.mkdtemp())).action
    'written'
    """
    if isinstance(value, (str, os.PathLike)):
        return resolve(value, formats=formats, store=store)
    accepted = normalise_formats(formats)
    marker = _store_marker(store)
    # the store the answer is kept under is the one written to, not one chosen meanwhile
    # by another thread (a default store is looked up by resolve: clean images need none)
    target = marker[1] if marker[0] != 'default' else None
    return _remember(
        value,
        ('resolve', accepted, marker),
        lambda subject: resolve(subject, formats=accepted, store=target),
        _entry_check,
    )
