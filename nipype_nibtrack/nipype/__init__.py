"""The nipype 1.x front-end: image-aware traits and interfaces, hashing and pickling hooks.

Importing this package installs the hooks and the finder of mirror modules
(:mod:`.mirror`, idempotent). ``import nipype_nibtrack`` does
so by itself as soon as nipype is imported in the same process, and every node pickled
by a process that has them carries what installs them in the process that unpickles it.
Built only on the core's public API (:mod:`nipype_nibtrack`).
"""

from . import binding, exporting, hashing, mirror, nodes, pickling
from .accept import (
    accept_images,
    formats_for,
    image_trait,
    resolve_spec_images,
    takes_images,
    trait_formats,
)
from .traits import ImageFile, InputMultiImage, contains_image, is_image, iter_images

binding.install()
exporting.install()
hashing.install()
mirror.install()
nodes.install()
pickling.install()

__all__ = [
    'ImageFile',
    'InputMultiImage',
    'accept_images',
    'contains_image',
    'formats_for',
    'image_trait',
    'is_image',
    'iter_images',
    'resolve_spec_images',
    'takes_images',
    'trait_formats',
]
