"""Hand nibabel images straight to nipype interfaces.

The core (:mod:`.provenance`, :mod:`.rules`, :mod:`.digest`, :mod:`.store`,
:mod:`.resolve`) knows only nibabel; the nipype layer (:mod:`.traits`,
:mod:`.interfaces`, :mod:`.hashing`, :mod:`.pickling`) builds on it.
"""

from .digest import image_digest
from .provenance import load, mark_clean, mark_dirty
from .resolve import Resolution, as_filename, resolve
from .rules import cleanliness_rule, dirty_reason, is_dirty
from .store import Store, StoreError, get_store, set_store

__version__ = '0.1.0'

__all__ = [
    'Resolution',
    'Store',
    'StoreError',
    'as_filename',
    'cleanliness_rule',
    'dirty_reason',
    'get_store',
    'image_digest',
    'is_dirty',
    'load',
    'mark_clean',
    'mark_dirty',
    'resolve',
    'set_store',
]
