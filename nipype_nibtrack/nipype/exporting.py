"""``Workflow.export()`` writes file names where a wrapped interface's input holds an image.

nipype writes each input of a node as ``f'{node}.inputs.{name} = {value}'``, so an image
came out as its header dump (``str(img)``), and the exported script was not Python. A
node of an image-aware interface gets the file each image resolves to instead (its own
file when clean, its store file otherwise): what the tool would read, and what the node
hashes as, so the exported script computes, and caches, as the workflow does.

Nodes of other interfaces (``Function`` nodes, whose inputs take any object) are left to
nipype: a path there is not what the function was given.
"""

from __future__ import annotations

from typing import Any

from nipype.pipeline.engine import utils as engine_utils

from .accept import _ImageAware, _resolve_value, trait_formats
from .traits import contains_image

__all__ = ['install']


def install() -> None:
    """Install the export hook; calling it again changes nothing."""
    write_inputs = engine_utils._write_inputs
    if getattr(write_inputs, '_nibtrack', False):
        return

    def _write_inputs(node: Any) -> list[str]:
        interface = getattr(node, '_interface', None)
        if not isinstance(interface, _ImageAware):
            return write_inputs(node)
        spec = node.inputs  # a MapNode has its own spec: formats come from the interface's
        label = type(interface).__name__
        replaced = {}
        for name, value in spec.trait_get().items():
            if contains_image(value):
                formats = trait_formats(interface.inputs, name)
                replaced[name] = value
                path = _resolve_value(value, formats, f'{label}.{name}')
                spec.trait_set(trait_change_notify=False, **{name: path})
        try:
            return write_inputs(node)
        finally:
            if replaced:
                spec.trait_set(trait_change_notify=False, **replaced)

    _write_inputs._nibtrack = True
    engine_utils._write_inputs = _write_inputs
