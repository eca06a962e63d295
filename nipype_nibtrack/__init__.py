"""Hand nibabel images straight to workflow engines' tools.

The core (:mod:`.provenance`, :mod:`.rules`, :mod:`.digest`, :mod:`.store`,
:mod:`.resolve`) knows only nibabel and imports no workflow engine. Front-ends live
beside it and use only this public API: :mod:`nipype_nibtrack.nipype` (nipype 1.x:
traits, image-aware interfaces, hashing and pickling hooks) switches itself on as
soon as nipype is imported; ``accept_images``, ``ImageFile`` and ``InputMultiImage``
are loaded from it on first use. :mod:`nipype_nibtrack.pydra` (pydra >= 1.0a12: task
fields, hashing, workers) switches itself on as soon as pydra is (``pydra.utils.typing``).
"""

from typing import Any

from .digest import image_digest
from .frontends import import_later, when_imported
from .locks import renew_after_fork
from .provenance import load, mark_clean, mark_dirty, source_files
from .resolve import (
    ImageReadError,
    Resolution,
    as_filename,
    check_image,
    image_label,
    load_reference,
    normalise_formats,
    resolve,
)
from .rules import cleanliness_rule, dirty_reason, is_dirty
from .state import (
    ImageState,
    check_image_memoised,
    image_state,
    is_dirty_memoised,
    resolve_memoised,
)
from .store import ENV_VAR, Store, StoreError, chosen_store, get_store, set_store

__version__ = '0.1.0'

#: Front-ends, by the engine module whose import switches them on. pydra's is the
#: module of its type checks (``pydra`` and ``pydra.compose`` are namespace packages,
#: which no finder sees loading): every task definition and every worker imports it.
FRONT_ENDS = {'nipype': 'nipype_nibtrack.nipype', 'pydra.utils.typing': 'nipype_nibtrack.pydra'}
_FROM_NIPYPE = ('ImageFile', 'InputMultiImage', 'accept_images')

for _engine, _front_end in FRONT_ENDS.items():
    when_imported(_engine, import_later(_front_end))


def __getattr__(name: str) -> Any:
    if name in _FROM_NIPYPE:
        from . import nipype as front_end

        return getattr(front_end, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    'ENV_VAR',
    'ImageFile',
    'ImageReadError',
    'ImageState',
    'InputMultiImage',
    'Resolution',
    'Store',
    'StoreError',
    'accept_images',
    'as_filename',
    'check_image',
    'check_image_memoised',
    'chosen_store',
    'cleanliness_rule',
    'dirty_reason',
    'get_store',
    'image_digest',
    'image_label',
    'image_state',
    'is_dirty',
    'is_dirty_memoised',
    'load',
    'load_reference',
    'mark_clean',
    'mark_dirty',
    'normalise_formats',
    'renew_after_fork',
    'resolve',
    'resolve_memoised',
    'set_store',
    'source_files',
]
