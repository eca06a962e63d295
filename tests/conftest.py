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

import hashlib
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
    return sorted(p for p in store.objects.rglob('*') if p.is_file()) if store.objects.exists() else []
