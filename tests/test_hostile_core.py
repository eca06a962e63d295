"""Hostile tests of the core: what a reader of the handed-out path sees is what the image holds.

Each test is an attack a user's environment makes (odd shapes and dtypes, conversions
forced by ``formats``, header edits, copies, rewrites of files behind the package's back,
tools writing over their inputs in the store). The rule checked is always the same: the
file handed out, read back by nibabel, holds exactly the image's voxels, affine and the
header fields that matter, or a clear error is raised; the user's files are untouched.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import shutil
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nibabel.testing import data_path

import nipype_nibtrack as nt
from nipype_nibtrack import Store
from tests.conftest import assert_same_content, build_format


def _held(img):
    """What the image holds: a filled ``get_fdata()`` cache, else its data object."""
    cache = getattr(img, '_fdata_cache', None)
    return np.asarray(cache) if cache is not None else np.asanyarray(img.dataobj)


def _assert_values(path, img):
    """The values nibabel reads from ``path`` equal ``img``'s, bit for bit."""
    got, want = np.asanyarray(nib.load(path).dataobj), _held(img)
    assert got.shape == want.shape
    if want.dtype.kind in 'iub' and got.dtype.kind in 'iub':
        assert np.array_equal(got.astype(object), want.astype(object))
    elif want.dtype.kind == 'c' or got.dtype.kind == 'c':
        assert np.array_equal(got.astype(np.complex128), want.astype(np.complex128))
        same = np.ascontiguousarray(got.astype(want.dtype)).view(np.uint8)
        assert np.array_equal(same, np.ascontiguousarray(want).view(np.uint8))
    else:
        bits = np.ascontiguousarray(got.astype(np.float64)).view(np.uint64)
        assert np.array_equal(bits, np.ascontiguousarray(want.astype(np.float64)).view(np.uint64))


def _sha(paths):
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize('shape', [(0, 3, 4), (2, 0, 4), (2, 3, 4, 0)])
@pytest.mark.parametrize('formats', [['.mgz'], ['.mgh'], ['.img'], ['.hdr'], ['.nii.gz']])
def test_an_empty_axis_is_refused_where_nibabel_cannot_read_it_back(shape, formats, store):
    # nibabel writes these, then cannot load them (MGH, the empty .img of a pair) or
    # loads a compressed one with the shape (0,): never hand such a file out
    img = nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4))
    with pytest.raises(ValueError, match='empty axis'):
        nt.as_filename(img, formats=formats)


@pytest.mark.parametrize('shape', [(0, 3, 4), (2, 3, 4, 0)])
def test_an_empty_axis_is_written_as_plain_nifti(shape, store):
    img = nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4))
    path = nt.as_filename(img, formats=['.mgz', '.nii.gz', '.nii'])
    assert path.endswith('.nii')
    assert nib.load(path).shape == shape
    _assert_values(path, img)


# --------------------------------------------------------------------------- conversions


def _nifti_4d(tmp_path, unit, tr=2000.0, ext='.nii'):
    img = nib.Nifti1Image(np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5), None)
    img.header.set_xyzt_units('mm', unit)
    img.header.set_zooms((2.0, 2.0, 2.0, tr))
    path = tmp_path / f'bold_{unit}{ext}'
    nib.save(img, path)
    return path


@pytest.mark.parametrize('unit', ['msec', 'unknown'])
@pytest.mark.parametrize('ext', ['.mgz', '.mgh'])
def test_tr_survives_conversion_to_mgh(unit, ext, tmp_path, store):
    # nibabel's MGH conversion drops TR (its MGHHeader.from_header keeps nothing)
    img = nt.load(_nifti_4d(tmp_path, unit))
    out = nib.load(nt.as_filename(img, formats=[ext]))
    assert isinstance(out, nib.MGHImage)
    assert float(out.header.get_zooms()[3]) == 2000.0
    assert_same_content(out, img)


def test_tr_in_seconds_is_not_silently_carried_to_mgh(tmp_path, store):
    # MGH holds TR in ms: a TR in seconds would change value or meaning
    img = nt.load(_nifti_4d(tmp_path, 'sec', tr=2.0))
    with pytest.raises(ValueError, match='beyond space'):
        nt.as_filename(img, formats=['.mgz'])
    assert nt.as_filename(img, formats=['.mgz', '.nii.gz']).endswith('.nii.gz')


def test_nifti_extensions_are_never_dropped_by_a_conversion(tmp_path, store):
    img = nib.Nifti1Image(np.ones((2, 3, 4), np.float32), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension('comment', b'provenance'))
    path = tmp_path / 'with_ext.nii'
    nib.save(img, path)
    loaded = nt.load(path)
    with pytest.raises(ValueError, match='extensions'):
        nt.as_filename(loaded, formats=['.mgz'])
    for formats in (['.img'], ['.hdr.gz'], ['.nii.gz']):
        out = nib.load(nt.as_filename(loaded, formats=formats))
        assert_same_content(out, loaded)


def test_a_float_dtype_set_on_a_proxy_image_is_written_as_for_an_array(tmp_path, store):
    # the same content, once as a scaled int16 file and once in memory: written alike
    path = tmp_path / 'scaled.nii'
    values = np.arange(120).reshape(4, 5, 6) * 0.37 + 1.5
    nib.save(nib.Nifti1Image(values, np.eye(4), dtype=np.int16), path)
    img = nt.load(path)
    img.set_data_dtype(np.float32)
    array = nib.Nifti1Image(np.asanyarray(img.dataobj), np.eye(4))
    array.set_data_dtype(np.float32)
    for one in (img, array):
        out = nib.load(nt.as_filename(one))
        assert out.get_data_dtype() == np.float32  # what the user asked, as nib.save
        assert_same_content(out, one)


def test_ecat_is_written_with_its_values(tmp_path, store):
    # EcatImage.get_data_dtype() takes a frame: the writer used to crash with TypeError
    path = shutil.copy(os.path.join(data_path, 'tinypet.v'), tmp_path)
    before = _sha([path])
    img = nib.ecat.load(path)
    _assert_values(nt.as_filename(img), img)
    img.get_fdata()[0, 0, 0] = 1.25
    _assert_values(nt.as_filename(img, formats=['.nii.gz']), img)
    assert _sha([path]) == before


def test_a_gzipped_pair_may_be_asked_for_by_its_header(tmp_path, store):
    path = tmp_path / 'pair.img.gz'
    nib.save(nib.Nifti1Pair(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4)), path)
    img = nt.load(path)
    img.header['descrip'] = b'edited'
    got = nt.as_filename(img, formats=['.hdr.gz'])
    assert got.endswith('.hdr.gz') and os.path.exists(got[: -len('.hdr.gz')] + '.img.gz')
    assert_same_content(nib.load(got), img)


# --------------------------------------------------------------------------- store


@pytest.mark.parametrize('how', ['in place', 'replaced'])
def test_a_large_store_entry_a_tool_wrote_over_is_never_reused(how, tmp_path):
    # entries above verify_max_bytes are checked by size; a tool writing its output
    # over its input (same size) must not make the next consumer read its output
    store = Store(tmp_path / 'store', verify_max_bytes=1024)
    img = nib.Nifti1Image(np.arange(4000, dtype=np.float32).reshape(10, 20, 20), np.eye(4))
    path = Path(nt.as_filename(img, store=store))
    raw = bytearray(path.read_bytes())
    raw[-4:] = np.float32(np.inf).tobytes()
    if how == 'in place':
        st_before = path.stat()
        with open(path, 'r+b') as f:
            f.write(raw)
        os.utime(path, ns=(st_before.st_atime_ns, st_before.st_mtime_ns + 10**9))
    else:
        tmp = path.with_name('by_the_tool')
        tmp.write_bytes(raw)
        os.replace(tmp, path)
    _assert_values(nt.as_filename(img, store=store), img)


# --------------------------------------------------------------------------- files


def _rewrite_keeping_size_and_mtime(path, offset, data):
    st = os.stat(path)
    with open(path, 'r+b') as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize('via', ['the path', 'a hard link'])
@pytest.mark.parametrize('where', ['header', 'voxels'])
@pytest.mark.parametrize('cached', [False, True])
def test_same_size_same_mtime_rewrites_between_load_and_resolve(
    via, where, cached, tmp_path, store
):
    path = tmp_path / 'anat.nii'
    nib.save(nib.Nifti1Image(np.arange(120, dtype=np.float32).reshape(4, 5, 6), np.eye(4)), path)
    img = nt.load(path)
    nt.as_filename(img)  # a remembered clean verdict, to be seen through
    if cached:
        img.get_fdata()
    target = path
    if via == 'a hard link':
        target = tmp_path / 'other_name.nii'
        os.link(path, target)
    if where == 'header':
        _rewrite_keeping_size_and_mtime(target, 148, b'EVIL')  # descrip
    else:
        _rewrite_keeping_size_and_mtime(target, 352 + 4 * 7, np.float32(np.nan).tobytes())
    handed = nt.as_filename(img)
    out = nib.load(handed)
    assert bytes(out.header['descrip']) == bytes(img.header['descrip'])
    _assert_values(handed, img)


# --------------------------------------------------------------------------- copies


_ROUND_TRIPS = {
    'copy': copy.copy,
    'deepcopy': copy.deepcopy,
    'pickle': lambda img: pickle.loads(pickle.dumps(img)),
}


def _edit_cache(img):
    img.get_fdata()[0, 0, 1] = -0.0


def _edit_f32_cache(img):
    img.get_fdata(dtype=np.float32)[1, 1, 1] = np.float32(0.1)


def _edit_affine(img):
    img.affine[0, 3] = 5


def _edit_header(img):
    img.header['descrip'] = b'copy'


def _swap_dataobj(img):
    img._dataobj = np.zeros(img.shape, np.float32)


@pytest.mark.parametrize('how', list(_ROUND_TRIPS))
@pytest.mark.parametrize(
    'before', ['nothing', 'mark_clean', 'mark_dirty', 'cache', 'uncache', 'resolved']
)
@pytest.mark.parametrize(
    'after', [None, _edit_cache, _edit_f32_cache, _edit_affine, _edit_header, _swap_dataobj]
)
def test_copies_then_edits_hand_out_what_each_image_holds(how, before, after, tmp_path, store):
    path = tmp_path / 'src.nii'
    nib.save(nib.Nifti1Image(np.arange(120, dtype=np.float32).reshape(4, 5, 6), np.eye(4)), path)
    sha = _sha([path])
    img = nt.load(path)
    if before == 'mark_clean':
        img.header['descrip'] = b'declared'
        nt.mark_clean(img)
    elif before == 'mark_dirty':
        nt.mark_dirty(img)
    elif before == 'cache':
        img.get_fdata()[2, 2, 2] = 42
    elif before == 'uncache':
        img.get_fdata()[2, 2, 2] = 42
        img.uncache()
    elif before == 'resolved':
        nt.as_filename(img)
    dup = _ROUND_TRIPS[how](img)
    if before == 'mark_dirty':
        assert nt.is_dirty(dup)
    if after is not None:
        after(dup)
    for one in (dup, img):
        handed = nt.as_filename(one)
        if before == 'mark_clean' and not nt.is_dirty(one):
            continue  # the user declared the header clean: the file is what they said
        _assert_values(handed, one)
        out = nib.load(handed)
        assert np.array_equal(out.affine.astype(np.float32), one.affine.astype(np.float32))
        assert bytes(out.header['descrip']) == bytes(one.header['descrip'])
    assert _sha([path]) == sha


# --------------------------------------------------------------------------- property


_DTYPES = ['u1', 'i1', 'i2', 'u2', 'i4', 'u4', 'i8', 'u8', 'f4', 'f8', 'c8', 'c16']
_FORMAT_LISTS = [
    None,
    ['.nii'],
    ['.nii.gz'],
    ['.mgz'],
    ['.mgh'],
    ['.img'],
    ['.hdr.gz'],
    ['.mgz', '.nii'],
]


@st.composite
def _arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 3), min_size=3, max_size=6)))
    raw = draw(st.binary(min_size=dtype.itemsize, max_size=dtype.itemsize * 4))
    count = int(np.prod(shape))
    pool = np.frombuffer(raw[: len(raw) - len(raw) % dtype.itemsize], dtype)
    return np.resize(pool, count).reshape(shape) if count else np.zeros(shape, dtype)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=_arrays(),
    klass=st.sampled_from([nib.Nifti1Image, nib.Nifti2Image, nib.Nifti1Pair]),
    formats=st.sampled_from(_FORMAT_LISTS),
    saved=st.booleans(),
)
def test_any_array_is_written_exactly_or_refused(data, klass, formats, saved, tmp_path_factory):
    """Random bytes as any dtype (NaN payloads, -0.0, extremes), any shape (empty axes,
    up to 6D), in memory or loaded from a file then edited: exact or a ValueError."""
    tmp = tmp_path_factory.mktemp('prop')
    store = Store(tmp / 'store')
    img = klass(data, np.diag([2.0, 3.0, 4.0, 1.0]), dtype=data.dtype)
    if saved:
        path = tmp / f'src{klass.files_types[0][1]}'
        nib.save(img, path)
        if 0 in data.shape and klass is nib.Nifti1Pair:
            return  # nibabel cannot load its own empty .img
        img = nt.load(path)
        if data.size:
            cache = img.get_fdata()
            cache.flat[0] = -0.0
    try:
        nt.check_image(img, formats)  # what an input checks: refuses what export refuses
        checked = None
    except ValueError as err:
        checked = err
    try:
        handed = nt.as_filename(img, formats=formats, store=store)
    except ValueError as err:
        assert 'exactly' in str(err) or 'cannot' in str(err)
        assert checked is not None, f'accepted at check time, refused when resolved: {err}'
        return
    assert checked is None, f'refused at check time, written when resolved: {checked}'
    if 0 in data.shape and not handed.endswith('.nii'):
        pytest.fail(f'an empty image handed out as {handed}')
    out = nib.load(handed)
    assert tuple(out.shape) == tuple(img.shape)
    if data.size:
        _assert_values(handed, img)


def test_every_format_file_is_untouched_by_conversions(tmp_path, store):
    for name in ('minc2', 'parrec', 'afni', 'spm2_mat', 'mgz', 'nifti1_pair_gz'):
        case = build_format(name, tmp_path / name)
        img = nt.load(case.path)
        for formats in (None, ['.nii'], ['.nii.gz'], ['.img']):
            try:
                handed = nt.as_filename(img, formats=formats)
            except ValueError:
                continue
            assert_same_content(nib.load(handed), img)
        case.assert_unchanged()


def test_conversions_leave_nibabels_logger_as_they_found_it(capfd, store):
    # nibabel's LoggingOutputSuppressor drops the logger's handlers for good when
    # nested (NIfTI-1 -> NIfTI-2 header fixes are logged inside two of them)
    from nibabel.imageglobals import logger

    handlers, filters = list(logger.handlers), list(logger.filters)
    img = nib.Nifti1Image(np.full((2, 2, 2), 1 + 2j, np.complex64), np.eye(4))
    with pytest.raises(ValueError):
        nt.as_filename(img, formats=['.mgz'])
    nt.as_filename(nib.Nifti1Image(np.zeros((2, 2, 2), np.complex64), np.eye(4)), formats='.mgz')
    assert logger.handlers == handlers and logger.filters == filters
    assert 'sizeof_hdr' not in capfd.readouterr().err


def test_an_image_edited_by_a_thread_without_pause_is_refused_blaming_the_image(tmp_path, store):
    # the file never changes: the error must not say it does
    path = tmp_path / 'src.nii'
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 32), np.float32), np.eye(4)), path)
    img = nt.load(path)
    cache = img.get_fdata()
    stop = threading.Event()

    def edit():
        k = 0
        while not stop.is_set():
            k += 1
            cache[:] = k

    thread = threading.Thread(target=edit)
    thread.start()
    try:
        outcomes = []
        for _ in range(5):
            try:
                outcomes.append(nt.as_filename(img))
            except nt.ImageReadError as err:
                outcomes.append(err)
    finally:
        stop.set()
        thread.join()
    for got in outcomes:
        if isinstance(got, Exception):
            assert 'in memory' in str(got) and 'on disk' not in str(got)
        else:
            # A write that won the race holds a state the image passed through (perhaps
            # half of one fill: numpy releases the GIL while it fills). Its bytes are its
            # key: the image holding exactly those values resolves to that very entry
            cache[:] = np.asanyarray(nib.load(got).dataobj)
            assert nt.as_filename(img) == got


@pytest.mark.parametrize('alias', ['smallest', 'compat'])
@pytest.mark.parametrize('edited', [False, True])
def test_dtype_aliases_are_written_exactly_or_refused_clearly(alias, edited, tmp_path, store):
    path = tmp_path / 'ints.nii'
    nib.save(nib.Nifti1Image(np.array([[[0, 300]]] * 2, np.int16), np.eye(4)), path)
    img = nt.load(path)
    if edited:
        img.get_fdata()[0, 0, 0] = 0.5  # float values: 'smallest' has no integer for them
    img.set_data_dtype(alias)
    try:
        handed = nt.as_filename(img)
    except ValueError as err:
        assert alias == 'smallest' and edited
        assert "alias 'smallest'" in str(err) and 'set_data_dtype' in str(err)
        with pytest.raises(ValueError, match='smallest'):
            nt.check_image(img)
        return
    _assert_values(handed, img)


@pytest.mark.parametrize(
    ('formats', 'want'), [(' .nii ', ('.nii',)), (['NII.GZ ', '', '.mgz'], ('.nii.gz', '.mgz'))]
)
def test_formats_from_a_config_file_are_read_as_meant(formats, want):
    assert nt.normalise_formats(formats) == want
    with pytest.raises(ValueError, match='at least one extension'):
        nt.normalise_formats(['', ' '])


@pytest.mark.parametrize('name', [b'caf\xe9.nii', b'new\nline.nii', b'\xff\xfe.img'])
def test_file_names_in_no_encoding_are_handed_over_as_given(name, tmp_path, store):
    raw = os.path.join(os.fsencode(tmp_path), name)
    klass = nib.Nifti1Pair if name.endswith(b'.img') else nib.Nifti1Image
    nib.save(klass(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4)), os.fsdecode(raw))
    for spelled in (raw, os.fsdecode(raw), Path(os.fsdecode(raw))):
        img = nt.load(spelled)
        assert nt.as_filename(img) == os.fsdecode(raw)
        img.header['descrip'] = b'edited'
        handed = nt.as_filename(img)
        assert os.path.basename(handed).isascii()
        _assert_values(handed, img)


@pytest.mark.parametrize(
    ('name', 'unit'),
    [
        ('nifti1_gz', 'sec'),  # example4d says sec
        ('mgz', 'msec'),
        ('parrec', 'sec'),  # nibabel gives the PAR repetition time in seconds
        ('afni', 'sec'),  # TAXIS_NUMS says 77002
        ('minc1_4d', None),  # no unit: a time zoom is never carried to MGH as ms
    ],
)
def test_the_time_unit_of_each_format_is_known_or_none(name, unit, tmp_path):
    from nipype_nibtrack.export import time_unit

    assert time_unit(nt.load(build_format(name, tmp_path).path).header) == unit
