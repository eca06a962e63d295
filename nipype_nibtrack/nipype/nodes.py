"""A node's memoised hash is dropped when an image behind its inputs has changed since.

nipype computes a node's hash once and keeps it on the node (``Node._hashvalue``), so a
node run a second time (``node.run()`` again, ``node.is_cached()``) is looked up under
the first hash. With paths that is nipype's own behaviour. With an image it would hand
the tool the file an earlier state of the image was written to, after the user edited
the image: a false clean. The node is hashed again only when an image its inputs were
hashed with now resolves to another file.
"""

from __future__ import annotations

from typing import Any

from nipype.pipeline.engine.nodes import Node

from .. import resolve

__all__ = ['install']


def _hashed_with(spec: Any) -> dict[str, Any]:
    """The file names the images of ``spec`` were hashed as, by input name."""
    sources = spec.__dict__.get('_nibtrack_sources') or {}
    return {name: path for name, (_, path) in sources.items()}


def _stale(node: Node, spec: Any) -> bool:
    hashed = node.__dict__.get('_nibtrack_hashed_with') or {}
    sources = spec.__dict__.get('_nibtrack_sources') or {}
    for name, (image, path) in sources.items():
        if getattr(spec, name) != path:
            continue  # set to something else since: nipype's memo is kept, as for paths
        if name in hashed and _resolved(image) != hashed[name]:
            return True
    return False


def _resolved(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_resolved(v) for v in value]
    if isinstance(value, dict):
        return {k: _resolved(v) for k, v in value.items()}
    try:
        return resolve(value).path
    except (TypeError, ValueError):
        return value  # not an image


def install() -> None:
    """Install the hook; calling it again changes nothing."""
    get_hashval = Node._get_hashval
    if getattr(get_hashval, '_nibtrack', False):
        return

    def _get_hashval(self: Node) -> Any:
        inputs = getattr(self._interface, 'inputs', None)
        if inputs is None:
            return get_hashval(self)
        if self._hashvalue is not None and _stale(self, inputs):
            self._hashvalue = self._hashed_inputs = None
        fresh = self._hashvalue is None
        hashed = get_hashval(self)
        if fresh:
            self.__dict__['_nibtrack_hashed_with'] = _hashed_with(inputs)
        return hashed

    _get_hashval._nibtrack = True
    Node._get_hashval = _get_hashval
