"""A node's memoised hash is dropped when an image behind its inputs has changed since.

nipype computes a node's hash once and keeps it on the node (``Node._hashvalue``), so a
node run a second time (``node.run()`` again, ``node.is_cached()``) is looked up under
the first hash. With paths that is nipype's own behaviour. With an image it would hand
the tool (or a ``Function``) the file an earlier state of the image was written to, or
serve the result cached for it, after the user edited the image: a false clean. So the
file each image of the node's inputs resolved to is kept with the hash, and the node is
hashed again when one of them now resolves to another file. This holds for every kind
of node: an image-aware interface's inputs (where hashing left file names, and the
images behind them are remembered), a ``MapNode``'s own inputs, ``Function`` inputs.
What is kept is what the hash was computed from: the resolutions made while hashing
(:func:`.resolving.recording`), with the formats they were made for.
"""

from __future__ import annotations

import weakref
from typing import Any

from nipype.pipeline.engine.nodes import JoinNode, MapNode, Node

from .resolving import recording, resolve_image
from .traits import iter_images

__all__ = ['install']


def _images(spec: Any) -> list[Any]:
    """The images in ``spec``'s values, and those its hashing put file names in place of."""
    found = list(iter_images(list(spec.trait_get().values())))
    sources = spec.__dict__.get('_nibtrack_hashed') or {}
    found += [
        img
        for name, (image, path, _) in sources.items()
        if getattr(spec, name) == path  # else set to something else since
        for img in iter_images(image)
    ]
    return found


def _resolutions(spec: Any, seen: dict[int, tuple[Any, list]]) -> list[tuple[Any, Any, str]]:
    """(image, formats, file) for each image behind ``spec``: as resolved while hashing."""
    out = []
    for img in _images(spec):
        entry = seen.get(id(img))
        if entry is not None and entry[0] is img:
            out.extend((img, formats, path) for formats, path in entry[1])
            continue
        try:  # not resolved by the hash (an image hashing left behind a file name)
            out.append((img, None, resolve_image(img).path))
        except (TypeError, ValueError):
            continue  # cannot become a file: nipype's hashing reports it
    return out


#: By node: the images its memoised hash was computed with, the formats they were
#: resolved for and the files they were.
#: Beside the node, not in it: a node is pickled (MultiProc submissions) with plain
#: pickle, which would carry the images' arrays.
_hashed_with: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stale(node: Node) -> bool:
    for img, formats, path in _hashed_with.get(node, ()):
        try:
            if resolve_image(img, formats).path != path:
                return True
        except (TypeError, ValueError):
            return True
    return False


def _wrap(get_hashval: Any) -> Any:
    def _get_hashval(self: Node) -> Any:
        if self._hashvalue is not None and _stale(self):
            self._hashvalue = self._hashed_inputs = None
        if self._hashvalue is not None:
            return get_hashval(self)
        with recording() as seen:
            hashed = get_hashval(self)
            _hashed_with[self] = _resolutions(self.inputs, seen)
        return hashed

    _get_hashval._nibtrack = True
    return _get_hashval


def _wrap_copyfiles(copyfiles: Any) -> Any:
    # copyfile inputs: nipype puts the names of its copies in the working directory in
    # place of the file names hashing left; the images stay behind the copies' names
    def _copyfiles_to_wd(self: Node, *args: Any, **kwargs: Any) -> Any:
        spec = self._interface.inputs
        sources = spec.__dict__.get('_nibtrack_hashed') or {}
        before = {name: getattr(spec, name) for name in sources}
        try:
            return copyfiles(self, *args, **kwargs)
        finally:
            for name, (image, path, resolved) in list(sources.items()):
                now = getattr(spec, name)
                if before[name] == path and now != path:
                    sources[name] = (image, now, resolved)

    _copyfiles_to_wd._nibtrack = True
    return _copyfiles_to_wd


def install() -> None:
    """Install the hooks; calling it again changes nothing."""
    if not getattr(Node._copyfiles_to_wd, '_nibtrack', False):
        Node._copyfiles_to_wd = _wrap_copyfiles(Node._copyfiles_to_wd)
    # MapNode memoises in its own _get_hashval (over its iterfield inputs)
    for cls in (Node, MapNode, JoinNode):
        own = vars(cls).get('_get_hashval')
        if own is not None and not getattr(own, '_nibtrack', False):
            cls._get_hashval = _wrap(own)
