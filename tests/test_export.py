"""export_image writes exactly what an image holds; choose_target picks the format."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import nipype_nibtrack as nt
from nipype_nibtrack.export import Target, choose_target, export_image
from tests.conftest import (
    assert_same_bits,
    assert_same_content,
    build_format,
    reload_exact,
    value_bits,
)

NII = Target(nib.Nifti1Image, '.nii')


def _write(img, tmp_path, target=None, name='out'):
    target = choose_target(img, ('.nii',)) if target is None else target
    path = tmp_path / f'{name}{target.ext}'
    export_image(img, target, path)
    return reload_exact(path)


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ('fmt', 'formats', 'klass', 'ext'),
    [
        ('nifti1_pair', None, nib.Nifti1Image, '.nii'),
        ('nifti2_pair', None, nib.Nifti2Image, '.nii'),
        ('nifti2', ('.nii.gz',), nib.Nifti2Image, '.nii.gz'),
        ('nifti2', ('.hdr',), nib.Nifti2Pair, '.hdr'),
        ('mgz', None, nib.MGHImage, '.mgh'),
        ('mgz', ('.mgz', '.nii'), nib.MGHImage, '.mgz'),
        ('mgz', ('.nii.gz',), nib.Nifti1Image, '.nii.gz'),
        ('minc2', None, nib.Nifti1Image, '.nii'),
        # float64 values: not MGH; an affine from angulations: NIfTI-1 holds it in float32
        ('parrec', ('.mgz', '.nii.gz'), nib.Nifti1Image, '.nii.gz'),
        ('cifti2', None, nib.Cifti2Image, '.nii'),
        ('gifti', None, nib.GiftiImage, '.gii'),
    ],
)
def test_choose_target(fmt, formats, klass, ext, tmp_path):
    img = build_format(fmt, tmp_path).load()
    assert choose_target(img, formats) == Target(klass, ext)


def test_mgh_edits_needing_float64_go_to_nifti(tmp_path):
    img = build_format('mgh', tmp_path).load()
    img.get_fdata()[3, 3, 3] += 1 / 3  # a float64 value float32 cannot hold
    assert choose_target(img, None) == Target(nib.Nifti1Image, '.nii')
    out = _write(img, tmp_path)
    assert out.get_data_dtype() == np.float64
    assert_same_content(out, img)
    with pytest.raises(ValueError, match='exactly'):
        export_image(img, choose_target(img, ('.mgz',)), tmp_path / 'x.mgz')


def test_mgh_edits_float32_can_hold_stay_mgh(tmp_path):
    img = build_format('mgz', tmp_path).load()  # int16 data
    img.get_fdata()[3, 3, 3] = 0.5
    assert choose_target(img, None) == Target(nib.MGHImage, '.mgh')
    out = _write(img, tmp_path, Target(nib.MGHImage, '.mgh'))
    assert out.get_data_dtype().str[1:] == 'f4'
    assert_same_content(out, img)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    ('value', 'dtype'),
    [(7.0, 'i2'), (-0.0, 'f8'), (0.5, 'f8'), (np.nan, 'f8'), (1e6, 'f8')],
)
def test_cache_keeps_the_stored_dtype_only_when_exact(value, dtype, tmp_path):
    img = build_format('nifti1_pair_gz', tmp_path).load()  # int16, unscaled, has zeros
    data = img.get_fdata()
    zero = tuple(np.argwhere(data == 0)[0])
    data[zero] = value
    out = _write(img, tmp_path)
    assert out.get_data_dtype().str[1:] == dtype
    assert_same_content(out, img)


def test_nan_payload_survives(tmp_path):
    img = build_format('nifti2_gz', tmp_path).load()  # float32 with a NaN
    data = img.get_fdata()
    nan = tuple(np.argwhere(np.isnan(data))[0])
    payload = np.array([0x7FF8000000000ABC], np.uint64).view(np.float64)[0]
    data[nan] = payload
    out = _write(img, tmp_path, Target(nib.Nifti2Image, '.nii'))
    assert np.asanyarray(out.dataobj)[nan].view(np.uint64) == 0x7FF8000000000ABC


def test_scaled_proxy_keeps_its_stored_integers_and_scaling(tmp_path):
    img = build_format('nifti1', tmp_path).load()
    img.header['descrip'] = b'edited'
    out = _write(img, tmp_path)
    assert (out.dataobj.slope, out.dataobj.inter) == (img.dataobj.slope, img.dataobj.inter)
    assert np.array_equal(out.dataobj.get_unscaled(), img.dataobj.get_unscaled())


@pytest.mark.parametrize('fmt', ['parrec_varscale', 'minc1', 'minc2_small', 'afni_scaled'])
def test_per_slice_scaling_is_written_exactly(fmt, tmp_path):
    """One NIfTI slope cannot hold per-slice (per-volume) scaled values: floats are written."""
    img = build_format(fmt, tmp_path).load()
    out = _write(img, tmp_path)
    assert out.get_data_dtype().kind == 'f'
    assert_same_bits(np.asanyarray(out.dataobj), np.asanyarray(img.dataobj))


def test_unscaled_integer_formats_keep_their_dtype(tmp_path):
    img = build_format('afni', tmp_path).load()  # int16, no brick factors
    out = _write(img, tmp_path)
    assert out.get_data_dtype().str[1:] == 'i2'
    assert_same_content(out, img)


def test_float_array_under_an_integer_header_is_not_rescaled(tmp_path):
    data = np.linspace(0, 1, 24).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, np.eye(4), dtype=np.int16)
    out = _write(img, tmp_path)
    assert_same_bits(out.get_fdata(), data)


def test_float_header_narrower_than_the_array_is_the_users_choice(tmp_path):
    data = np.linspace(0, 1, 24).reshape(2, 3, 4)  # float64 values, float32 asked for
    img = nib.Nifti1Image(data, np.eye(4), dtype=np.float32)
    out = _write(img, tmp_path)
    assert out.get_data_dtype().str[1:] == 'f4'
    assert_same_bits(out.get_fdata(), data.astype(np.float32))


# --------------------------------------------------------------------------- affines


@pytest.mark.parametrize(
    'target', [NII, Target(nib.Nifti2Image, '.nii'), Target(nib.MGHImage, '.mgh')]
)
def test_affine_edits_nibabel_would_drop_are_written(target, tmp_path):
    img = build_format('nifti2', tmp_path).load()
    img.affine[1, 1] *= 1 + 3e-6  # within np.allclose: nib.save would ignore it
    if target.klass is nib.MGHImage:  # MGH holds no extensions and TR only in ms
        img = nib.Nifti2Image(np.asanyarray(img.dataobj)[..., 0], img.affine)
    out = _write(img, tmp_path, target)
    if target.klass is nib.Nifti2Image:
        assert np.array_equal(out.affine, img.affine)
    else:  # float32 formats: the edit is kept, at float32 precision
        assert out.affine[1, 1] != np.float32(img.affine[1, 1] / (1 + 3e-6))
        np.testing.assert_allclose(out.affine, img.affine, rtol=0, atol=1e-5)


def test_a_float64_affine_stays_nifti1_rounded_to_float32(tmp_path):
    # NIfTI-1 is what tools read (elastix cannot read NIfTI-2); its affine is float32
    img = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4))
    img.affine[0, 3] = 0.1  # not a float32
    assert choose_target(img, ('.nii',)) == Target(nib.Nifti1Image, '.nii')
    out = _write(img, tmp_path, choose_target(img, ('.nii',)))
    assert out.affine[0, 3] == np.float32(0.1)


def test_nib_save_alone_would_lose_these_edits(tmp_path):
    """The traps export_image exists for, checked against nibabel itself."""
    img = build_format('nifti1', tmp_path).load()
    img.get_fdata()[5, 5, 5] += 1
    img.affine[1, 1] *= 1 + 3e-6
    nib.save(img, tmp_path / 'naive.nii')
    naive = reload_exact(tmp_path / 'naive.nii')
    assert naive.get_fdata()[5, 5, 5] != img.get_fdata()[5, 5, 5]
    assert naive.affine[1, 1] != np.float32(img.affine[1, 1])
    assert_same_content(_write(img, tmp_path), img)


# --------------------------------------------------------------------------- property

_INT = st.sampled_from(['u1', 'i2', 'i4'])


@settings(deadline=None, max_examples=60)
@given(
    stored=_INT,
    slope=st.sampled_from([1.0, 0.5, 3.0]),
    values=hnp.arrays(
        np.float64,
        (2, 3, 4),
        elements=st.one_of(
            st.integers(-300, 300).map(float),
            st.floats(-1e3, 1e3, width=32),
            st.floats(allow_nan=True, allow_infinity=True),
            st.just(-0.0),
        ),
    ),
)
def test_written_values_are_bitwise_equal_whatever_the_edit(
    tmp_path_factory, stored, slope, values
):
    """Any edited cache of any integer image (scaled or not) is written bit for bit."""
    tmp = tmp_path_factory.mktemp('prop')
    raw = np.arange(24, dtype=stored).reshape(2, 3, 4)
    src = nib.Nifti1Image(raw, np.eye(4))
    src.header.set_slope_inter(slope, 0.0)
    nib.save(src, tmp / 'src.nii')
    img = nib.load(tmp / 'src.nii')
    img.get_fdata()[...] = values
    out = _write(img, tmp)
    assert np.array_equal(value_bits(out.get_fdata()), value_bits(values))


# --------------------------------------------------------------------------- issue 9 / 12


@pytest.mark.parametrize('ext', ['.nii', '.nii.gz', '.img', '.mgh', '.mgz'])
@pytest.mark.parametrize('order', ['C', 'F'])
def test_written_files_are_byte_identical_to_nib_save(ext, order, tmp_path):
    data = np.asarray(np.random.default_rng(0).random((5, 6, 7, 2)), 'f4', order=order)
    img = nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0]))
    target = choose_target(img, (ext,))
    ours, theirs = tmp_path / f'ours{ext}', tmp_path / f'theirs{ext}'
    export_image(img, target, ours)
    header = target.klass.header_class.from_header(img.header)
    if target.klass is nib.MGHImage:  # nibabel's conversion drops TR; ours carries it
        header['tr'] = img.header.get_zooms()[3]
    nib.save(target.klass(data, img.affine, header), theirs)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize(
    ('values', 'formats'),
    [
        (np.full((2, 2, 2), 1e300), ['.mgz']),  # float64 -> inf in float32
        (np.full((2, 2, 2), 2**24 + 1, 'i4'), ['.mgh']),  # no int32 above 2**24 in f4...
        (np.full((2, 2, 2), 1 + 1j, 'c8'), ['.mgz']),
        (np.full((2, 2, 2), 2**40 + 1, 'i8'), ['.mgz']),
        (np.zeros((2, 2, 2, 2, 2), 'f4'), ['.mgh']),  # 5D
    ],
)
def test_inexact_conversions_are_refused_naming_dtype_formats_and_holders(values, formats):
    img = nib.Nifti1Image(values, np.eye(4), dtype=values.dtype)
    if values.dtype == 'i4':
        img = nib.Nifti1Image(values.astype('u4'), np.eye(4))  # MGH stores i4, not u4
    with pytest.raises(ValueError) as err:
        choose_target(img, tuple(formats))
    text = str(err.value)
    assert str(img.get_data_dtype()) in text and formats[0] in text
    assert 'would hold it: .nii' in text


def test_cifti2_is_refused_at_check_time_in_formats_export_cannot_write(tmp_path):
    img = build_format('cifti2', tmp_path).load()
    with pytest.raises(ValueError, match=r'Cifti2Image'):
        nt.check_image(img, ['.nii.gz'])
    nt.check_image(img, ['.nii'])


def test_data_in_memory_is_written_when_the_file_is_gone(tmp_path):
    path = tmp_path / 'gone.nii'
    nib.save(nib.Nifti1Image(np.arange(24, dtype='i2').reshape(2, 3, 4), np.eye(4)), path)
    img = nt.load(path)
    shown = img.get_fdata().copy()
    path.unlink()
    out = nt.as_filename(img, store=nt.Store(tmp_path / 'store'))
    assert_same_bits(nib.load(out).get_fdata(), shown)


def test_data_in_memory_not_the_replacing_file_is_what_is_written(tmp_path):
    path = tmp_path / 'replaced.nii'
    nib.save(nib.Nifti1Image(np.ones((2, 3, 4), 'f4'), np.eye(4)), path)
    img = nt.load(path)
    shown = img.get_fdata().copy()
    nib.save(nib.Nifti1Image(np.full((2, 3, 4), 7, 'f4'), np.eye(4)), tmp_path / 'other.nii')
    os.replace(tmp_path / 'other.nii', path)
    out = nt.as_filename(img, store=nt.Store(tmp_path / 'store'))
    assert_same_bits(nib.load(out).get_fdata(), shown)


@pytest.mark.parametrize('ext', ['.nii', '.img', '.mgh'])
@pytest.mark.parametrize(('stored', 'slope'), [('>f4', 1.0), ('<i2', 0.5), ('>i2', 2.0)])
def test_dirty_files_are_written_byte_identical_to_nib_save(ext, stored, slope, tmp_path):
    """Raw stored values streamed from the file, with their scaling, as nib.save writes."""
    source = tmp_path / 'source.nii'
    img = nib.Nifti1Image(np.arange(120).reshape(4, 5, 6).astype(stored), np.eye(4))
    img.header.set_slope_inter(slope, 0.0)
    nib.save(img, source)
    img = nib.load(source)
    img.header['descrip'] = b'edited'
    target = choose_target(img, (ext,))
    ours = tmp_path / f'ours{ext}'
    export_image(img, target, ours)
    assert_same_content(reload_exact(ours), img)
    if target.klass is nib.MGHImage:
        return  # MGH has no scaling: scaled values were written (content checked above)
    header = target.klass.header_class.from_header(img.header)
    out = target.klass(img.dataobj.get_unscaled(), img.affine, header)
    out.header.set_slope_inter(slope, 0.0)
    theirs = tmp_path / f'theirs{ext}'
    nib.save(out, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    if ext == '.img':
        assert ours.with_suffix('.hdr').read_bytes() == theirs.with_suffix('.hdr').read_bytes()


_RGB = np.dtype([('R', 'u1'), ('G', 'u1'), ('B', 'u1')])


def _extreme(dtype: np.dtype) -> np.ndarray:
    rng = np.random.default_rng(0)
    if dtype == _RGB:
        out = np.zeros((3, 4, 5), _RGB)
        out['R'] = rng.integers(0, 256, (3, 4, 5))
        return out
    if dtype.kind in 'iu':
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, (3, 4, 5), dtype=dtype, endpoint=True)
    if dtype.kind == 'f':
        return (rng.uniform(-1, 1, (3, 4, 5)) * (np.finfo(dtype).max / 2)).astype(dtype)
    return (rng.standard_normal((3, 4, 5)) + 1j * rng.standard_normal((3, 4, 5))).astype(dtype)


@pytest.mark.parametrize('ext', ['.nii', '.nii.gz', '.img', '.mgh', '.mgz'])
@pytest.mark.parametrize(
    'dtype', ['u1', 'i1', 'u2', 'i2', 'u4', 'i4', 'u8', 'i8', 'f4', 'f8', 'c8', 'c16', _RGB]
)
def test_every_conversion_is_exact_or_refused(dtype, ext, tmp_path):
    """Extreme values of every dtype nibabel writes, to every format: exact, or refused."""
    values = _extreme(np.dtype(dtype))
    img = nib.Nifti1Image(values, np.eye(4), dtype=values.dtype)
    try:
        path = nt.as_filename(img, formats=[ext], store=nt.Store(tmp_path))
    except ValueError as err:
        assert str(values.dtype) in str(err) and 'would hold it: .nii' in str(err)
        return
    got = np.asanyarray(nib.load(path).dataobj)
    if values.dtype.fields is not None:
        assert got.dtype == values.dtype and got.tobytes() == values.tobytes()
        return
    native = values.dtype.newbyteorder('=')
    assert np.ascontiguousarray(got.astype(native)).tobytes() == values.astype(native).tobytes()
    # and nothing was rounded on the way: the written dtype holds the values as they are
    assert np.ascontiguousarray(values.astype(got.dtype)).tobytes() == got.tobytes()


# --------------------------------------------------------------------------- bad headers


def _misread(img):
    """``img`` with its header's bytes read in the other byte order (every field garbage)."""
    hdr = img.header
    other = '>' if hdr.endianness == '<' else '<'
    img._header = type(hdr)(hdr.binaryblock, endianness=other, check=False)
    return img


def _unknown_code(img):
    field = 'type' if isinstance(img, nib.MGHImage) else 'datatype'
    img.header[field] = 9999
    return img


@pytest.mark.parametrize('edit', [_misread, _unknown_code])
@pytest.mark.parametrize('fmt', ['nifti1', 'nifti2', 'nifti1_pair', 'analyze', 'mgh'])
@pytest.mark.parametrize('in_memory', [False, True], ids=['proxy', 'array'])
def test_a_header_that_defines_nothing_is_a_clear_error(fmt, edit, in_memory, tmp_path, store):
    """A header read in the wrong byte order (every field garbage: float32's code reads
    4096, which nibabel's code tables answer with a bare KeyError, int16's reads int64's)
    or declaring a data type code nibabel does not know: every way into the core names
    the image, its file, what is wrong and what to do, and writes nothing."""
    case = build_format(fmt, tmp_path / 'src')
    img = case.load()
    if in_memory:
        img = type(img)(np.asarray(img.dataobj), img.affine, img.header)
    if edit is _misread and isinstance(img, nib.MGHImage):
        pytest.skip('MGH headers are big-endian whatever the machine: no other order')
    img = edit(img)
    want = 'wrong byte order' if edit is _misread else 'declares data type code 9999'
    for call in (nt.resolve, nt.as_filename, nt.check_image, nt.resolve_memoised):
        for formats in (None, ('.nii.gz',), ('.mgz',), ('.hdr',)):
            with pytest.raises(ValueError, match=want) as err:
                call(img, formats=formats)
            assert 'img.set_data_dtype' in str(err.value) or 'endianness=' in str(err.value)
            if not in_memory:
                assert str(case.path) in str(err.value)
    assert not store.objects.exists() or not any(store.objects.rglob('*.nii*'))
    case.assert_unchanged()


def test_a_misread_header_says_which_byte_order_it_holds(tmp_path, store):
    path = tmp_path / 'f4.nii'
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4)), path)
    img = _misread(nt.load(path))
    with pytest.raises(ValueError) as err:
        nt.as_filename(img)
    message = str(err.value)
    assert f'this Nifti1Image (of {path}) was read in the wrong byte order' in message
    assert "Nifti1Header(img.header.binaryblock, endianness='<')" in message


def test_a_byteswapped_header_is_written_with_its_values(tmp_path, store):
    """A header converted to the other byte order (``as_byteswapped``) holds the same
    values: the image is well defined and written with them."""
    path = tmp_path / 'i2.nii'
    data = np.arange(24, dtype='i2').reshape(2, 3, 4)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    img = nt.load(path)
    img._header = img.header.as_byteswapped()
    out = nib.load(nt.as_filename(img))
    assert np.array_equal(np.asanyarray(out.dataobj), data)
    assert out.get_data_dtype().newbyteorder('<') == np.dtype('<i2')


@pytest.mark.parametrize(
    ('field', 'value'),
    [('xyzt_units', 255), ('intent_code', 31337), ('slice_code', 99), ('sform_code', 77)],
)
@pytest.mark.parametrize('formats', [None, ('.mgz',), ('.hdr',)])
def test_codes_nibabel_does_not_know_are_written_or_refused_clearly(
    field, value, formats, tmp_path, store
):
    """Other code fields (units, intent, slice order, xform codes) are carried as they are
    where the format has the field, dropped where it has none (MGH keeps no units), and
    never escape as a bare KeyError."""
    path = tmp_path / 'f4.nii'
    data = np.arange(24, dtype='f4').reshape(2, 3, 4)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    img = nt.load(path)
    img.header[field] = value
    try:
        written = nt.as_filename(img, formats=formats)
    except ValueError as err:
        assert 'cannot write this Nifti1Image' in str(err)
        return
    out = nib.load(written)
    assert np.array_equal(np.asanyarray(out.dataobj), data)
    if field == 'sform_code':  # nibabel repairs an xform code it does not know
        assert np.array_equal(out.affine, img.affine)
    elif field in out.header:
        assert int(out.header[field]) == value


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from(['u1', 'i2', 'u2', 'i4', 'f4', 'f8', 'c8']),
    klass=st.sampled_from([nib.Nifti1Image, nib.Nifti2Image, nib.Nifti1Pair]),
    big=st.booleans(),
)
def test_any_header_read_in_the_other_byte_order_is_refused(dtype, klass, big):
    """Whatever the dtype (its code read the other way may be another valid code, or
    none) and the byte order it was written in, a header read the other way round is
    refused before any target is tried, naming the order to read it in."""
    img = klass(np.zeros((2, 2, 2), dtype), np.eye(4))
    if big:
        img._header = img.header.as_byteswapped('>')
    order = img.header.endianness
    _misread(img)
    with pytest.raises(ValueError, match='wrong byte order') as err:
        nt.check_image(img)
    assert f'endianness={order!r}' in str(err.value)
