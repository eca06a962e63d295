"""Write what an image holds, exactly, to a new file of a chosen format.

``nib.save(img, path)`` is not enough: it writes from ``dataobj`` and so drops edits to
the ``get_fdata()`` array, it re-derives int scaling (values move by ~1e-3), ignores
affine edits within ``allclose`` tolerance, and it re-points the image's ``file_map`` at
the new file. :func:`export_image` builds a new image object and writes that instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.brikhead import AFNIArrayProxy
from nibabel.cifti2 import Cifti2Image
from nibabel.freesurfer.mghformat import MGHImage
from nibabel.gifti import GiftiImage
from nibabel.nifti1 import Nifti1Pair

from .digest import edited_cache

__all__ = ['Target', 'choose_target', 'export_image']


@dataclass(frozen=True)
class Target:
    """An image class and the extension it is written with."""

    klass: type
    ext: str


_NIFTI2 = (nib.Nifti2Image, nib.Nifti2Pair)
_BY_EXT = {
    '.nii': nib.Nifti1Image,
    '.nii.gz': nib.Nifti1Image,
    '.hdr': nib.Nifti1Pair,
    '.img': nib.Nifti1Pair,
    '.img.gz': nib.Nifti1Pair,
    '.mgh': MGHImage,
    '.mgz': MGHImage,
}


def _family(img: Any) -> tuple[type, tuple[str, ...]]:
    """The class a dirty image keeps when written, and its extensions, fastest first."""
    if isinstance(img, Cifti2Image):
        return Cifti2Image, ('.nii',)
    if isinstance(img, GiftiImage):
        return GiftiImage, ('.gii',)
    if isinstance(img, _NIFTI2):
        return nib.Nifti2Image, ('.nii', '.nii.gz')
    if isinstance(img, MGHImage):
        if _mgh_holds(img):
            return MGHImage, ('.mgh', '.mgz')
        return nib.Nifti1Image, ('.nii', '.nii.gz')  # values that need float64
    return nib.Nifti1Image, ('.nii', '.nii.gz')


def choose_target(img: Any, formats: tuple[str, ...] | None) -> Target:
    """Pick the format a dirty image is written in.

    The image's own family (NIfTI-2, CIFTI-2, MGH) when the caller accepts one of its
    extensions, else NIfTI-1; uncompressed before compressed (writing ``.nii`` is ~10x
    faster than ``.nii.gz``); else the first accepted extension nibabel can write.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> img = nib.Nifti2Image(np.zeros((2, 2, 2), 'f4'), np.eye(4))
    >>> choose_target(img, None)
    Target(klass=<class 'nibabel.nifti2.Nifti2Image'>, ext='.nii')
    >>> choose_target(img, ('.nii.gz', '.mgz')).ext
    '.nii.gz'
    >>> choose_target(nib.MGHImage(np.zeros((2, 2, 2), 'f4'), np.eye(4)), ('.nii',)).klass
    <class 'nibabel.nifti1.Nifti1Image'>
    """
    family, exts = _family(img)
    for ext in exts:
        if formats is None or ext in formats:
            return Target(family, ext)
    if family is GiftiImage:  # a surface has no volume format to be converted to
        raise ValueError(f'a GiftiImage can only be written as .gii, not as any of {formats}')
    for ext in ('.nii', '.nii.gz'):
        if ext in formats:
            klass = family if family in _NIFTI2 else nib.Nifti1Image
            return Target(klass, ext)
    for ext in formats:
        if ext in _BY_EXT:
            klass = _BY_EXT[ext]
            if family is nib.Nifti2Image and klass is nib.Nifti1Pair:
                klass = nib.Nifti2Pair
            return Target(klass, ext)
    raise ValueError(
        f'cannot write a {type(img).__name__} in any of the accepted formats {formats}; '
        f'nibabel writes {sorted(_BY_EXT)}'
    )


def _survives(values: np.ndarray, dtype: np.dtype) -> bool:
    """True when every value comes back from ``dtype`` bit for bit.

    Bytes are compared, not values: ``-0.0`` and NaN payloads count (``equal_nan``
    would take a NaN whose payload float32 drops for the same NaN).

    >>> f4 = np.dtype('f4')
    >>> _survives(np.array([0.5, -0.0]), f4), _survives(np.array([0.1]), f4)
    (True, False)
    """
    if dtype == values.dtype:
        return True
    with np.errstate(all='ignore'):
        back = values.astype(dtype).astype(values.dtype)
    return np.array_equal(_raw_bytes(back), _raw_bytes(values))


def _raw_bytes(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


def _supports(header: Any, dtype: np.dtype) -> bool:
    try:
        header.copy().set_data_dtype(dtype)
    except Exception:  # every format raises its own error for a dtype it cannot store
        return False
    return True


def _exact_dtype(values: np.ndarray, header: Any) -> np.dtype:
    """The header's dtype when every value survives it bit for bit, else the values' own,
    else float32 when exact (MGH stores no float64).

    Raises
    ------
    ValueError
        When the header's format can hold the values in none of these.
    """
    for dtype in (header.get_data_dtype(), values.dtype, np.dtype(np.float32)):
        if _supports(header, dtype) and _survives(values, dtype):
            return dtype
    raise ValueError(
        f'a {type(header).__name__} cannot store these {values.dtype} values exactly; '
        'accept .nii or .nii.gz'
    )


def _float_values(img: Any, header: Any) -> np.ndarray | None:
    """The values of a data object giving floats that the header would store as integers."""
    if header.get_data_dtype().kind not in 'iu' or getattr(img, '_dtype_alias', None):
        return None
    dataobj = img.dataobj
    if isinstance(dataobj, ArrayProxy) and not isinstance(dataobj, AFNIArrayProxy):
        if (dataobj.slope, dataobj.inter) == (1.0, 0.0) and dataobj.dtype.kind in 'iub':
            return None  # the file's own integers
    elif isinstance(dataobj, np.ndarray) and dataobj.dtype.kind in 'iub':
        return None
    values = np.asanyarray(dataobj)
    return values if values.dtype.kind == 'f' else None


def _data_and_header(img: Any, target: type) -> tuple[Any, Any, tuple[float, float] | None]:
    """Data to write, header to start from, and scaling to keep (None: let nibabel pick)."""
    header = target.header_class.from_header(img.header)
    dataobj = img.dataobj
    scaled = isinstance(dataobj, ArrayProxy) and (dataobj.slope, dataobj.inter) != (1.0, 0.0)
    cache = edited_cache(img)
    if cache is not None:
        header.set_data_dtype(_exact_dtype(np.asarray(cache), header))
        return cache, header, (1.0, 0.0)
    if (
        scaled
        and not isinstance(dataobj, AFNIArrayProxy)
        and header.get_data_dtype() == dataobj.dtype
        and hasattr(header, 'set_slope_inter')
    ):
        # Write the stored integers with their own scaling: re-deriving it moves values
        return dataobj.get_unscaled(), header, (float(dataobj.slope), float(dataobj.inter))
    values = _float_values(img, header)
    if values is not None:
        # Per-slice or per-volume scaling (PAR/REC, MINC, AFNI) or floats in memory under
        # an integer dtype: one slope re-derived by nibabel would move the values
        header.set_data_dtype(_exact_dtype(values, header))
        return values, header, (1.0, 0.0)
    return dataobj, header, None


def _mgh_holds(img: Any) -> bool:
    """True when MGH (at most float32) can hold exactly what ``img`` would write."""
    try:
        _data_and_header(img, MGHImage)
    except ValueError:
        return False
    return True


def export_image(img: Any, target: Target, path: str | os.PathLike) -> Any:
    """Write exactly what ``img`` holds to ``path`` as ``target``; ``img`` is untouched.

    Parameters
    ----------
    img : nibabel image
    target : Target
        Class and extension, usually from :func:`choose_target`.
    path : path-like
        New file name, ending with ``target.ext``.

    Returns
    -------
    image
        The new image object that was written.

    Examples
    --------
    >>> import os, tempfile, numpy as np, nibabel as nib
    >>> img = nib.Nifti1Image(np.zeros((2, 2, 2), 'i2'), np.eye(4))
    >>> img.get_fdata()[0, 0, 0] = 0.5
    >>> out = os.path.join(tempfile.mkdtemp(), 'edited.nii')
    >>> _ = export_image(img, Target(nib.Nifti1Image, '.nii'), out)
    >>> nib.load(out).get_fdata()[0, 0, 0]
    np.float64(0.5)
    >>> img.get_filename() is None
    True
    """
    klass = target.klass
    if klass is GiftiImage:
        # to_file_map with a new map leaves img.file_map alone, unlike to_filename
        img.to_file_map(img.filespec_to_file_map(os.fspath(path)))
        return img
    if klass is Cifti2Image:
        cache = edited_cache(img)
        out = Cifti2Image(
            img.dataobj if cache is None else cache,
            header=img.header,
            nifti_header=img.nifti_header,
            extra=img.extra,
            dtype=None if cache is None else _exact_dtype(np.asarray(cache), img.nifti_header),
        )
        out.to_filename(os.fspath(path))
        return out
    data, header, scaling = _data_and_header(img, klass)
    out = klass(data, img.affine, header)
    if scaling is not None and hasattr(out.header, 'set_slope_inter'):  # MGH has no scaling
        out.header.set_slope_inter(*scaling)
    _carry_exact_affine(out, img.affine)
    alias = getattr(img, '_dtype_alias', None)
    if alias is not None and hasattr(out, '_dtype_alias'):
        out.set_data_dtype(alias)
    out.to_filename(os.fspath(path))
    return out


def _carry_exact_affine(out: Any, affine: np.ndarray | None) -> None:
    """Put the affine in the sform when nibabel's ``allclose`` test would drop an edit."""
    hdr = out.header
    if affine is None:
        return
    if isinstance(out, MGHImage):
        if not np.array_equal(hdr.get_affine(), affine):
            out._affine2header()  # MGH keeps no sform: recompute centre, cosines, zooms
        return
    if not hasattr(hdr, 'set_sform'):
        return
    stored = np.float32 if isinstance(out, (nib.Nifti1Image, Nifti1Pair)) else np.float64
    if isinstance(out, _NIFTI2):
        stored = np.float64
    if np.array_equal(hdr.get_best_affine().astype(stored), np.asarray(affine).astype(stored)):
        return
    hdr.set_sform(affine, code=int(hdr['sform_code']) or 'aligned')
