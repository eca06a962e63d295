"""Hand nibabel images straight to nipype interfaces.

The core (:mod:`.provenance`, :mod:`.rules`, :mod:`.digest`, :mod:`.store`,
:mod:`.resolve`) knows only nibabel; the nipype layer (:mod:`.traits`,
:mod:`.interfaces`, :mod:`.hashing`, :mod:`.pickling`) builds on it.
"""

from . import hashing, pickling
from .digest import image_digest
from .interfaces import accept_images
from .provenance import load, mark_clean, mark_dirty
from .resolve import ImageReadError, Resolution, as_filename, resolve
from .rules import cleanliness_rule, dirty_reason, is_dirty
from .store import Store, StoreError, get_store, set_store
from .traits import ImageFile, InputMultiImage

hashing.install()
pickling.install()

__version__ = '0.1.0'

__all__ = [
    'ImageFile',
    'ImageReadError',
    'InputMultiImage',
    'Resolution',
    'Store',
    'StoreError',
    'accept_images',
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
