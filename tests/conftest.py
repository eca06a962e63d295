"""Real image files of every format nibabel reads, built or copied into ``tmp_path``.

Each format case is a :class:`FormatCase`: the path to load, every file of the image
(hashed before the test and checked byte-identical after it, unless the test declares
that it edits the files on disk) and the class nibabel gives it.

Formats nibabel can write (NIfTI-1/2 single and pair, plain and gzipped; Analyze;
SPM99/SPM2 with and without ``.mat``; MGH/MGZ; GIFTI) are built from the data of
``anatomical.nii`` and ``example4d.nii.gz``; nibabel's data directory has no
``nifti1.img``/``nifti2.img``/``analyze.img``, so its ``.hdr`` files cannot be used.
MINC1, MINC2, PAR/REC, AFNI and CIFTI-2 files are copied from nibabel's test data.

Notes on nibabel's behaviour that the builders rely on (checked by
``test_rules.py::test_spm_mat_written_whenever_affine_set``):

- ``Spm99AnalyzeImage``/``Spm2AnalyzeImage`` write a ``.mat`` whenever the image has an
  affine, rotations or not; a case "without ``.mat``" deletes it after saving.
- ``nibabel.load`` of a plain Analyze or SPM99 pair returns a ``Spm2AnalyzeImage``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from nibabel.brikhead import AFNIImage
from nibabel.parrec import PARRECImage
from nibabel.testing import data_path

import nipype_nibtrack as nt
from nipype_nibtrack.store import Store

DATA = Path(data_path)


# --------------------------------------------------------------------------- sources


def file_hashes(paths: list[Path] | tuple[Path, ...]) -> dict[str, str]:
    """sha256 of each existing file."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.exists()}


@dataclass
class FormatCase:
    """One image on disk.

    ``path`` is what is handed to ``load``; ``files`` every file of the image;
    ``klass`` the class ``nibabel.load`` returns; ``own_class`` the class that wrote
    the file when ``nibabel.load`` picks another (plain Analyze and SPM99 load as SPM2).
    """

    name: str
    path: Path
    files: tuple[Path, ...]
    klass: type
    own_class: type | None = None
    family: str = ''
    hashes: dict[str, str] = field(default_factory=dict)
    disk_edits: bool = False

    def __post_init__(self) -> None:
        self.hashes = file_hashes(self.files)

    def allow_disk_edits(self) -> None:
        """The test edits the source files on purpose: skip the unchanged check."""
        self.disk_edits = True

    def assert_unchanged(self) -> None:
        now = file_hashes(self.files)
        changed = sorted(k for k in self.hashes if now.get(k) != self.hashes[k])
        assert not changed, f'source files of {self.name} modified: {changed}'

    def load(self, plain: bool = False, **kwargs: Any) -> Any:
        return load_format(self.path, plain=plain, **kwargs)


def load_format(path: str | os.PathLike, plain: bool = False, **kwargs: Any) -> Any:
    """Load ``path`` with ``nipype_nibtrack.load`` (or plain ``nibabel.load``)."""
    return (nib.load if plain else nt.load)(path, **kwargs)


# --------------------------------------------------------------------------- data


def _rotated_affine() -> np.ndarray:
    # example4d's affine: zooms 2, a 10 degree rotation about x, an x flip
    return nib.load(DATA / 'example4d.nii.gz').affine.copy()


def _anat_int16() -> np.ndarray:
    data = np.asarray(nib.load(DATA / 'anatomical.nii').dataobj).astype(np.int16)
    data[:2] = 0  # some exact zeros, for -0.0 edits
    return data


def _anat_float32() -> np.ndarray:
    data = (_anat_int16() / np.float32(7)).astype(np.float32)
    data[5, 5, 5] = np.nan  # a NaN already in the file, for payload edits
    return data


def _anat_scaled() -> np.ndarray:
    # float values saved as int16: nibabel picks a slope and an intercept
    return _anat_int16() * 0.37 + 1.5


def _example4d() -> tuple[np.ndarray, Any]:
    img = nib.load(DATA / 'example4d.nii.gz')
    data = np.asarray(img.dataobj)[:24, :20, :8].copy()
    data[:1] = 0
    return data, img.header


def _comment(text: bytes) -> nib.nifti1.Nifti1Extension:
    return nib.nifti1.Nifti1Extension('comment', text)


# --------------------------------------------------------------------------- builders


def _save(img: Any, path: Path, *others: str) -> tuple[Path, ...]:
    nib.save(img, path)
    return (path, *(path.with_name(name) for name in others))


def _nifti(klass: type, ext: str, kind: str) -> Callable[[Path], FormatCase]:
    """A NIfTI single file or pair built in ``tmp``."""

    def build(tmp: Path) -> FormatCase:
        if kind == 'scaled':
            img = klass(_anat_scaled(), nib.load(DATA / 'anatomical.nii').affine, dtype=np.int16)
            img.header.extensions.append(_comment(b'built by tests/conftest.py'))
        elif kind == 'float':
            img = klass(_anat_float32(), _rotated_affine())
        elif kind == '4d':
            data, hdr = _example4d()
            img = klass(data, hdr.get_best_affine(), klass.header_class.from_header(hdr))
            if not img.header.extensions:
                img.header.extensions.extend(hdr.extensions)
        else:
            img = klass(_anat_int16(), nib.load(DATA / 'anatomical.nii').affine)
        img.header['descrip'] = b'nibtrack test ' + kind.encode()
        stem = f'{klass.__name__.lower()}_{kind}'
        path = tmp / f'{stem}{ext}'
        nib.save(img, path)
        if ext.startswith('.img'):  # a pair: the header beside it
            files = (path, tmp / f'{stem}{ext.replace(".img", ".hdr")}')
        else:
            files = (path,)
        return FormatCase('', path, files, klass)

    return build


def _analyze(klass: type, mat: bool, kind: str) -> Callable[[Path], FormatCase]:
    def build(tmp: Path) -> FormatCase:
        if kind == 'scaled':
            img = klass(_anat_scaled(), _rotated_affine(), dtype=np.int16)
        elif kind == 'float':
            img = klass(_anat_float32(), np.diag([-2.0, 2.0, 2.0, 1.0]))
        else:
            img = klass(_anat_int16(), np.diag([2.0, 2.0, 2.0, 1.0]))
        stem = f'{klass.__name__.lower()}_{kind}_{"mat" if mat else "nomat"}'
        path = tmp / f'{stem}.img'
        nib.save(img, path)
        files = [path, tmp / f'{stem}.hdr']
        if hasattr(klass, 'files_types') and ('mat', '.mat') in klass.files_types:
            matfile = tmp / f'{stem}.mat'
            assert matfile.exists(), 'nibabel writes a .mat for every SPM image with an affine'
            if mat:
                files.append(matfile)
            else:
                matfile.unlink()
        return FormatCase('', path, tuple(files), nib.Spm2AnalyzeImage, own_class=klass)

    return build


def _mgh(ext: str) -> Callable[[Path], FormatCase]:
    def build(tmp: Path) -> FormatCase:
        if ext == '.mgh':
            img = nib.MGHImage(_anat_float32(), _rotated_affine())
        else:
            data, _ = _example4d()
            img = nib.MGHImage(data, _rotated_affine())
        img.header['tr'] = 2000.0
        path = tmp / f'mgh_image{ext}'
        nib.save(img, path)
        return FormatCase('', path, (path,), nib.MGHImage)

    return build


def _copy(names: tuple[str, ...], klass: type) -> Callable[[Path], FormatCase]:
    def build(tmp: Path) -> FormatCase:
        files = tuple(Path(shutil.copy(DATA / name, tmp / name)) for name in names)
        return FormatCase('', files[0], files, klass)

    return build


def _gifti(tmp: Path) -> FormatCase:
    coords = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    faces = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]], np.int32)
    img = nib.GiftiImage(
        darrays=[
            nib.gifti.GiftiDataArray(coords, intent='NIFTI_INTENT_POINTSET'),
            nib.gifti.GiftiDataArray(faces, intent='NIFTI_INTENT_TRIANGLE'),
        ]
    )
    path = tmp / 'surface.gii'
    nib.save(img, path)
    return FormatCase('', path, (path,), nib.GiftiImage)


BUILDERS: dict[str, tuple[str, Callable[[Path], FormatCase]]] = {
    'nifti1': ('nifti1', _nifti(nib.Nifti1Image, '.nii', 'scaled')),
    'nifti1_gz': ('nifti1', _nifti(nib.Nifti1Image, '.nii.gz', '4d')),
    'nifti1_pair': ('nifti1', _nifti(nib.Nifti1Pair, '.img', 'float')),
    'nifti1_pair_gz': ('nifti1', _nifti(nib.Nifti1Pair, '.img.gz', 'int')),
    'nifti2': ('nifti2', _nifti(nib.Nifti2Image, '.nii', '4d')),
    'nifti2_gz': ('nifti2', _nifti(nib.Nifti2Image, '.nii.gz', 'float')),
    'nifti2_pair': ('nifti2', _nifti(nib.Nifti2Pair, '.img', 'scaled')),
    'analyze': ('analyze', _analyze(nib.AnalyzeImage, False, 'int')),
    'spm99': ('analyze', _analyze(nib.Spm99AnalyzeImage, False, 'float')),
    'spm99_mat': ('analyze', _analyze(nib.Spm99AnalyzeImage, True, 'scaled')),
    'spm2': ('analyze', _analyze(nib.Spm2AnalyzeImage, False, 'int')),
    'spm2_mat': ('analyze', _analyze(nib.Spm2AnalyzeImage, True, 'scaled')),
    'mgh': ('mgh', _mgh('.mgh')),
    'mgz': ('mgh', _mgh('.mgz')),
    'minc1': ('minc1', _copy(('minc1_1_scale.mnc',), nib.Minc1Image)),
    'minc1_4d': ('minc1', _copy(('minc1_4d.mnc',), nib.Minc1Image)),
    'minc2': ('minc2', _copy(('minc2_1_scale.mnc',), nib.Minc2Image)),
    'minc2_small': ('minc2', _copy(('small.mnc',), nib.Minc2Image)),
    'parrec': (
        'parrec',
        _copy(('phantom_EPI_asc_CLEAR_2_1.PAR', 'phantom_EPI_asc_CLEAR_2_1.REC'), PARRECImage),
    ),
    'parrec_varscale': (
        'parrec',
        _copy(('phantom_varscale.PAR', 'phantom_varscale.REC'), PARRECImage),
    ),
    'afni': ('afni', _copy(('example4d+orig.HEAD', 'example4d+orig.BRIK.gz'), AFNIImage)),
    'afni_scaled': ('afni', _copy(('scaled+tlrc.HEAD', 'scaled+tlrc.BRIK'), AFNIImage)),
    'cifti2': ('cifti2', _copy(('row_major.dconn.nii',), nib.Cifti2Image)),
    'gifti': ('gifti', _gifti),
}

FORMATS = tuple(BUILDERS)
#: Formats with a file link after load (everything but GIFTI).
SPATIAL_FORMATS = tuple(name for name in FORMATS if name != 'gifti')
NIFTI_FORMATS = tuple(n for n, (fam, _) in BUILDERS.items() if fam in ('nifti1', 'nifti2'))


def build_format(name: str, tmp: Path) -> FormatCase:
    """Write (or copy) the files of format ``name`` into ``tmp``."""
    family, builder = BUILDERS[name]
    tmp.mkdir(parents=True, exist_ok=True)
    case = builder(tmp)
    case.name, case.family = name, family
    return case


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=FORMATS)
def format_case(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Every format; the source files are checked byte-identical after the test."""
    case = build_format(request.param, tmp_path / 'src')
    yield case
    if not case.disk_edits:
        case.assert_unchanged()


@pytest.fixture
def format_file(format_case: FormatCase) -> Path:
    """Path of a real file of each format nibabel reads (id = format name)."""
    return format_case.path


@pytest.fixture
def store(tmp_path: Path) -> Any:
    """A fresh store for this test, in use as the default store."""
    fresh = nt.set_store(Store(tmp_path / 'store'))
    yield fresh
    nt.set_store(None)


def store_files(store: Store) -> list[Path]:
    """Every file under the store's objects directory."""
    return (
        sorted(p for p in store.objects.rglob('*') if p.is_file())
        if store.objects.exists()
        else []
    )


# --------------------------------------------------------------------------- content


#: Header fields that say how the file stores the image rather than what it holds:
#: compared through the data, the affine and the zooms instead.
REPRESENTATION_FIELDS = frozenset(
    {
        'sizeof_hdr', 'magic', 'vox_offset', 'scl_slope', 'scl_inter', 'datatype', 'bitpix',
        'quatern_b', 'quatern_c', 'quatern_d', 'qoffset_x', 'qoffset_y', 'qoffset_z',
        'srow_x', 'srow_y', 'srow_z', 'qform_code', 'sform_code', 'pixdim',
        'type', 'delta', 'Mdc', 'Pxyz_c', 'dims', 'dim', 'funused1', 'funused2', 'funused3',
        'origin', 'glmax', 'glmin',
    }
)  # fmt: skip


def visible_data(img: Any) -> np.ndarray:
    """The voxel values the user sees: a filled ``get_fdata()`` cache, else the data object.

    When the header asks for another float dtype than the data object gives, the values
    are those after the cast a writer makes (the user chose that precision).
    """
    cache = getattr(img, '_fdata_cache', None)
    if cache is not None:
        return np.asarray(cache)
    data = np.asanyarray(img.dataobj)
    dtype = getattr(img, 'nifti_header', img.header).get_data_dtype()
    if dtype.kind == 'f' and data.dtype != dtype and getattr(img, '_dtype_alias', None) is None:
        data = data.astype(dtype)
    return np.asarray(data)


def value_bits(arr: Any) -> np.ndarray:
    """Values as float64 bit patterns: equal iff equal values, with -0.0 and NaN payloads."""
    arr = np.asarray(arr)
    assert arr.dtype.kind in 'biuf', arr.dtype
    assert arr.dtype.itemsize <= 4 or arr.dtype.kind == 'f', 'int64 would not fit float64'
    return np.ascontiguousarray(arr.astype(np.float64)).view(np.uint64)


def assert_same_bits(got: Any, want: Any, what: str = 'data') -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f'{what}: shape {got.shape} != {want.shape}'
    bad = value_bits(got) != value_bits(want)
    assert not bad.any(), (
        f'{what}: {int(bad.sum())} values differ bitwise, first at '
        f'{np.argwhere(bad)[0].tolist()}: {got[bad][0]!r} != {want[bad][0]!r}'
    )


def extension_list(header: Any) -> list[tuple[int, bytes]]:
    return [(int(e.get_code()), bytes(e.content)) for e in getattr(header, 'extensions', [])]


def _same_field(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == 'f' or b.dtype.kind == 'f':
        return a.shape == b.shape and np.array_equal(
            a.astype(np.float32), b.astype(np.float32), equal_nan=True
        )
    return a.shape == b.shape and bool(np.all(a == b))


def assert_same_affine(out: Any, img: Any) -> None:
    """The affine survives exactly where the format stores float64, else to float32.

    NIfTI-2 stores the sform as float64: exact. NIfTI-1 stores float32: the reloaded
    affine is the float32 rounding of the image's. MGH stores float32 voxel sizes,
    direction cosines and centre, and the affine is recomposed from them: equal to
    within float32 precision of those parts.
    """
    want = getattr(img, 'affine', None)
    if want is None:
        assert getattr(out, 'affine', None) is None
        return
    got = out.affine
    if isinstance(out, (nib.Nifti2Image, nib.Nifti2Pair)):
        assert np.array_equal(got, want), f'affine not exact:\n{got}\n!=\n{want}'
    elif isinstance(out, nib.MGHImage):
        # float32 parts: ~1e-7 relative on rotations and zooms; the centre is float32 too,
        # so the translation is good to ~1e-7 of the largest coordinate it is built from
        rzs = float(np.abs(got[:3, :3] - want[:3, :3]).max())
        shift = float(np.abs(got[:3, 3] - want[:3, 3]).max())
        reach = max(1.0, float(np.abs(want[:3, 3]).max()) + float(np.abs(want[:3, :3]).sum()))
        size = max(1.0, float(np.abs(want[:3, :3]).max()))
        assert rzs <= 5e-7 * size and shift <= 5e-7 * reach * max(out.shape[:3]), (
            f'MGH affine off by {rzs} (rotation/zoom), {shift} (shift):\n{got}\n!=\n{want}'
        )
    else:
        assert np.array_equal(got.astype(np.float32), want.astype(np.float32)), (
            f'affine differs beyond float32 rounding:\n{got}\n!=\n{want}'
        )


def assert_same_content(out: Any, img: Any) -> None:
    """``out`` (a written file, reloaded) holds exactly what ``img`` holds.

    Data bitwise (through float64 bit patterns), shape, affine (see
    :func:`assert_same_affine`), zooms and every header field both headers share
    except those that only say how the file stores the image; NIfTI extensions and
    the CIFTI-2 XML exactly.
    """
    if isinstance(img, nib.GiftiImage):
        assert out.to_xml() == img.to_xml()
        return
    assert tuple(out.shape) == tuple(img.shape)
    assert_same_bits(np.asanyarray(out.dataobj), visible_data(img))
    assert_same_affine(out, img)
    if isinstance(img, nib.Cifti2Image):
        assert out.header.to_xml() == img.header.to_xml()
        cifti = nib.nifti1.extension_codes['cifti']
        got = [e for e in extension_list(out.nifti_header) if e[0] != cifti]
        assert got == [e for e in extension_list(img.nifti_header) if e[0] != cifti]
        return
    got_zooms = np.asarray(out.header.get_zooms(), np.float32)
    want_zooms = np.asarray(img.header.get_zooms(), np.float32)
    assert got_zooms.shape == want_zooms.shape
    # Beyond space, zooms are header content; in space a writer may take them from the
    # affine's voxel sizes (NIfTI pixdim follows the qform) when header and affine disagree
    assert np.array_equal(got_zooms[3:], want_zooms[3:]), f'zooms {got_zooms} != {want_zooms}'
    voxel = np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(axis=0)).astype(np.float32)
    n = min(3, len(want_zooms))
    assert np.array_equal(got_zooms[:n], want_zooms[:n]) or np.allclose(
        got_zooms[:n], voxel[:n], rtol=1e-6
    ), f'zooms {got_zooms} match neither the header {want_zooms} nor the affine {voxel}'
    if hasattr(img.header, 'extensions'):
        assert extension_list(out.header) == extension_list(img.header)
    if hasattr(img.header, 'keys') and hasattr(out.header, 'keys'):
        shared = (set(out.header.keys()) & set(img.header.keys())) - REPRESENTATION_FIELDS
        differ = sorted(k for k in shared if not _same_field(out.header[k], img.header[k]))
        assert not differ, {k: (out.header[k], img.header[k]) for k in differ}


def reload_exact(path: str | os.PathLike) -> Any:
    """Load a written file back, with nothing cached and no memory map."""
    return nib.load(path, mmap=False)


# --------------------------------------------------------------------------- disk edits


def _gzipped(path: Path) -> bool:
    return path.suffix in ('.gz', '.mgz')


def _read_plain(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if _gzipped(path) else raw


def _encode(path: Path, plain: bytes) -> bytes:
    # nibabel's own gzip settings: level 1, mtime 0
    return gzip.compress(plain, compresslevel=1, mtime=0) if _gzipped(path) else plain


def rewrite_in_place(path: Path, transform: Callable[[bytes], bytes]) -> None:
    """Rewrite ``path`` through ``transform`` keeping its inode (same size if plain)."""
    new = _encode(path, transform(_read_plain(path)))
    with open(path, 'r+b') as f:
        f.write(new)
        f.truncate()


def replace_file(path: Path, transform: Callable[[bytes], bytes]) -> None:
    """Replace ``path`` by a new file (new inode) holding ``transform`` of its content."""
    tmp = path.with_name(path.name + '.new')
    tmp.write_bytes(_encode(path, transform(_read_plain(path))))
    os.replace(tmp, path)


def flip_byte(offset: int) -> Callable[[bytes], bytes]:
    def transform(raw: bytes) -> bytes:
        return raw[:offset] + bytes([raw[offset] ^ 0x5A]) + raw[offset + 1 :]

    return transform


def header_patch(header_class: type, **fields: Any) -> Callable[[bytes], bytes]:
    """Set fields of an Analyze/NIfTI header held at the start of the bytes."""

    def transform(raw: bytes) -> bytes:
        hdr = header_class.from_fileobj(io.BytesIO(raw), check=False)
        size = len(hdr.binaryblock)
        for key, value in fields.items():
            hdr[key] = value
        return hdr.binaryblock + raw[size:]

    return transform


def data_offset(case: FormatCase) -> tuple[Path, int]:
    """The file holding the voxels of ``case`` and the offset of its first voxel."""
    if case.family in ('nifti1', 'nifti2', 'analyze'):
        img = nib.load(case.path)
        data_file = Path(img.file_map['image'].filename)
        return data_file, int(img.dataobj.offset)
    if case.family == 'mgh':
        return case.path, 284
    if case.family in ('parrec', 'afni'):
        return case.files[1], 0
    raise ValueError(f'no data offset for {case.name}')


def touch(path: Path) -> None:
    """Move mtime (and atime) one minute on: content unchanged."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns + 60 * 10**9, st.st_mtime_ns + 60 * 10**9))
