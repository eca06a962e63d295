"""as_filename / resolve: own path when clean, the store otherwise, clear errors."""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import nipype_nibtrack as nt
from tests.conftest import (
    SPATIAL_FORMATS,
    assert_same_content,
    build_format,
    file_hashes,
    load_format,
    reload_exact,
    store_files,
)


def _bytes_read() -> int:
    """Bytes this process has read through read(2) and its kin, page-cache hits included."""
    with open('/proc/self/io') as f:
        return int(next(line for line in f if line.startswith('rchar:')).split()[1])


def test_clean_image_resolves_without_reading_data(tmp_path, store):
    """A clean image's own path comes back without its data being read: the bytes the
    process reads while resolving it stay far below the size of its voxels (loaded
    without a memory map, so that any read of them goes through read(2))."""
    path = tmp_path / 'big.img'
    data = np.zeros((128, 128, 128), 'f4')
    data[::7] = 1.5
    nib.save(nib.Nifti1Pair(data, np.eye(4)), path)
    img = nt.load(path, mmap=False)
    before = file_hashes([path, path.with_suffix('.hdr')]), os.stat(path).st_mtime_ns
    read = _bytes_read()
    res = nt.resolve(img)
    assert _bytes_read() - read < data.nbytes // 16
    assert (res.action, res.path) == ('original', str(path))
    assert store_files(store) == []
    assert (file_hashes([path, path.with_suffix('.hdr')]), os.stat(path).st_mtime_ns) == before


def _cut(path: Path, keep: int) -> None:
    """Truncate ``path`` to ``keep`` bytes fewer, its mtime put back."""
    st = os.stat(path)
    os.truncate(path, st.st_size - keep)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _settled_image_file(tmp_path: Path, ext: str) -> Path:
    path = tmp_path / f'cut{ext}'
    klass = {'.mgh': nib.MGHImage, '.img': nib.Nifti1Pair}.get(ext, nib.Nifti1Image)
    nib.save(klass(np.arange(4000, dtype='f4').reshape(10, 20, 20), np.eye(4)), path)
    os.utime(path, ns=(0, 0))  # settled: every memo of a clean verdict may be kept
    return path


RESOLVERS = {'resolve': nt.resolve, 'resolve_memoised': nt.resolve_memoised}


@pytest.mark.parametrize('resolver', list(RESOLVERS))
@pytest.mark.parametrize('when', ['before-load', 'after-load', 'after-remembered'])
@pytest.mark.parametrize('ext', ['.nii', '.nii.gz', '.img', '.mgh'])
def test_a_file_cut_short_under_a_matching_header_is_never_handed_out(
    ext, when, resolver, tmp_path, store
):
    """The header still matches and nibabel loads the file (voxels are read only when
    asked), but a tool given it fails: the image is not what its file holds. Without a
    copy of the data in memory nothing can be written either: a clear error names the
    file and the sizes, whether the clean verdict was computed now or remembered (a
    memo of the verdict, an answer of resolve_memoised)."""
    path = _settled_image_file(tmp_path, ext)
    if when == 'before-load':
        _cut(path, 100)
    img = nt.load(path)
    if when == 'after-remembered':
        for resolve in RESOLVERS.values():
            assert resolve(img).path == str(path)
        assert not nt.is_dirty_memoised(img)
    if when != 'before-load':
        _cut(path, 100)
    assert 'truncated' in nt.dirty_reason(img)
    with pytest.raises(nt.ImageReadError, match='truncated') as err:
        RESOLVERS[resolver](img)
    assert str(path) in str(err.value)
    if not ext.endswith('.gz'):
        proxy = img.dataobj
        need = proxy.offset + int(np.prod(proxy.shape)) * proxy.dtype.itemsize
        assert f'{os.path.getsize(path)} bytes, its header needs {need}' in str(err.value)
    assert store_files(store) == []


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ext=st.sampled_from(['.nii', '.img', '.mgh']),
    dtype=st.sampled_from(['u1', 'i2', 'i4', 'f4']),
    shape=st.tuples(*[st.integers(1, 6)] * 3),
    keep=st.floats(0, 1),
)
def test_any_cut_into_the_voxels_is_never_handed_out(ext, dtype, shape, keep, tmp_path_factory):
    """Whatever the format, dtype and shape, a file holding fewer bytes than its header
    needs is never handed out; one holding them all (a footer cut, for MGH) is."""
    folder = tmp_path_factory.mktemp('cut')
    path = folder / f'img{ext}'
    klass = {'.mgh': nib.MGHImage, '.img': nib.Nifti1Pair}.get(ext, nib.Nifti1Image)
    nib.save(klass(np.ones(shape, dtype), np.eye(4)), path)
    proxy = nib.load(path).dataobj
    voxels = int(np.prod(shape)) * np.dtype(dtype).itemsize
    need = proxy.offset + voxels
    size = proxy.offset + int(keep * voxels)  # the header kept: nibabel loads it
    assume(size > 0)  # nibabel refuses an empty .img itself
    os.truncate(path, size)
    img = nt.load(path)
    store = nt.Store(folder / 'store')
    if size >= need:
        assert nt.resolve(img, store=store).path == str(path)
        return
    assert nt.is_dirty(img)
    with pytest.raises(nt.ImageReadError, match=f'{size} bytes, its header needs {need}'):
        nt.resolve(img, store=store)
    assert store_files(store) == []


@pytest.mark.parametrize('layout', ['members', 'trailing bytes'])
def test_a_whole_gzip_file_whose_trailer_tells_another_size_is_clean(layout, tmp_path, store):
    """A gzip trailer gives only its last member's size (bgzip and pigz --independent write
    many members; a file may go on after its voxels): such a file, whole, is clean and is
    handed out; cut into its voxels, it is not."""
    raw = _settled_image_file(tmp_path, '.nii').read_bytes()
    path = tmp_path / 'img.nii.gz'
    if layout == 'members':
        members = (gzip.compress(raw[i : i + 1000]) for i in range(0, len(raw), 1000))
        path.write_bytes(b''.join(members))
    else:
        path.write_bytes(gzip.compress(raw + bytes(4096)))
    img = nt.load(path)
    assert not nt.is_dirty(img)
    assert nt.resolve(img).path == str(path)
    if layout == 'members':
        path.write_bytes(path.read_bytes()[:-3000])  # the voxels' last members cut
        img = nt.load(path)
        assert 'truncated' in nt.dirty_reason(img)
        with pytest.raises(nt.ImageReadError, match='truncated'):
            nt.resolve(img)
    assert store_files(store) == []


@pytest.mark.parametrize('ext', ['.nii', '.nii.gz', '.img', '.mgh'])
def test_a_file_cut_short_under_an_image_holding_its_data_writes_the_data(ext, tmp_path, store):
    """An image whose voxels are in memory (get_fdata) is well defined without its file:
    dirty, and written from memory."""
    path = _settled_image_file(tmp_path, ext)
    img = nt.load(path)
    want = img.get_fdata().copy()
    assert nt.resolve_memoised(img).path == str(path)
    _cut(path, 100)
    for resolve in RESOLVERS.values():
        res = resolve(img)
        assert res.action in ('written', 'reused') and 'truncated' in res.reason
        assert np.array_equal(nib.load(res.path).get_fdata(), want)


@pytest.mark.parametrize('fmt', SPATIAL_FORMATS)
def test_formats_restriction_converts_even_clean_images(fmt, tmp_path, store):
    case = build_format(fmt, tmp_path)
    img = case.load()
    assert not nt.is_dirty(img)
    res = nt.resolve(img, formats=('.nii',))
    own = os.path.abspath(img.get_filename())
    if own.endswith('.nii'):
        assert (res.action, res.path) == ('original', own)
        return
    assert res.action == 'written'
    assert 'not among the accepted' in res.reason
    assert res.path.endswith('.nii')
    assert_same_content(reload_exact(res.path), img)
    case.assert_unchanged()


@pytest.mark.parametrize(
    ('fmt', 'formats', 'ext'),
    [
        ('mgz', ['nii.gz', '.NII'], '.nii'),  # uncompressed first: ~10x faster to write
        ('mgz', 'NII.GZ', '.nii.gz'),
        ('mgz', 'mgh', '.mgh'),
        ('nifti2_gz', ['.nii', '.nii.gz'], '.nii.gz'),
        ('nifti1', ['.nii.gz'], '.nii.gz'),
        ('parrec', ('.img',), '.img'),
    ],
)
def test_formats_are_normalised(fmt, formats, ext, tmp_path, store):
    img = build_format(fmt, tmp_path).load()
    path = nt.as_filename(img, formats=formats)
    assert path.endswith(ext)
    assert_same_content(reload_exact(path), img)


def test_empty_formats_is_an_error(tmp_path):
    img = build_format('nifti1', tmp_path).load()
    with pytest.raises(ValueError, match='at least one extension'):
        nt.as_filename(img, formats=[])


def test_unwritable_format_is_a_clear_error(tmp_path, store):
    img = build_format('mgz', tmp_path).load()
    with pytest.raises(ValueError, match=r'\.mnc'):
        nt.as_filename(img, formats=('.mnc',))


def test_nifti2_stays_nifti2_when_written(tmp_path, store):
    img = build_format('nifti2', tmp_path).load()
    img.affine[0, 3] += 1e-12  # only float64 keeps this
    out = reload_exact(nt.as_filename(img))
    assert isinstance(out, nib.Nifti2Image)
    assert np.array_equal(out.affine, img.affine)


# --------------------------------------------------------------------------- paths


def test_str_and_pathlike_resolve_to_absolute_paths(tmp_path, monkeypatch):
    case = build_format('mgz', tmp_path)
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(case.path)
    assert not os.path.isabs(relative)
    for value in (relative, Path(relative), str(case.path)):
        res = nt.resolve(value)
        assert (res.action, res.path) == ('path', str(case.path))


def test_every_format_file_is_returned_as_given(format_file, monkeypatch):
    monkeypatch.chdir(format_file.parent)
    assert nt.as_filename(format_file.name) == str(format_file)
    assert nt.as_filename(format_file) == str(format_file)
    assert type(load_format(format_file)) is type(load_format(format_file, plain=True))


def test_a_path_is_returned_without_conversion(tmp_path):
    case = build_format('mgz', tmp_path)
    assert nt.as_filename(str(case.path), formats=('.nii',)) == str(case.path)


@pytest.mark.parametrize(
    ('value', 'error', 'names'),
    [
        (3, TypeError, 'int'),
        (None, TypeError, 'NoneType'),
        (['a.nii'], TypeError, 'list'),
        (np.zeros((2, 2, 2)), TypeError, 'ndarray'),
        ('/no/such/file.nii', FileNotFoundError, '/no/such/file.nii'),
        (Path('/no/such/file.nii'), FileNotFoundError, '/no/such/file.nii'),
    ],
)
def test_bad_values_are_named_in_the_error(value, error, names):
    with pytest.raises(error, match=names.replace('.', r'\.')):
        nt.as_filename(value)


def test_image_reading_from_bytes_is_a_clear_error(tmp_path, store):
    img = nib.Nifti1Image.from_bytes(build_format('nifti1', tmp_path).load().to_bytes())
    with pytest.raises(ValueError, match=r'in-memory file object \(BytesIO\)'):
        nt.as_filename(img)
    assert store_files(store) == []
    # the error's advice works
    detached = type(img)(np.asanyarray(img.dataobj), img.affine, img.header)
    assert_same_content(reload_exact(nt.as_filename(detached)), detached)


def test_fileobj_backed_image_is_a_clear_error(tmp_path, store):
    case = build_format('nifti1', tmp_path)
    with open(case.path, 'rb') as f:
        img = nib.Nifti1Image.from_stream(io.BytesIO(f.read()))
    with pytest.raises(ValueError, match='in-memory'):
        nt.as_filename(img)


# --------------------------------------------------------------------------- the store


def test_dirty_image_is_written_once_then_reused(tmp_path, store):
    img = build_format('nifti1_gz', tmp_path).load()
    img.header['descrip'] = b'edited'
    first = nt.resolve(img)
    assert first.action == 'written'
    assert first.reason == "header differs from the file's"
    st1 = os.stat(first.path)
    again = nt.resolve(img)
    assert (again.action, again.path, again.reason) == ('reused', first.path, first.reason)
    st2 = os.stat(again.path)
    assert (st1.st_ino, st1.st_mtime_ns) == (st2.st_ino, st2.st_mtime_ns)
    # the same content in another object lands on the same file
    other = build_format('nifti1_gz', tmp_path / 'other').load()
    other.header['descrip'] = b'edited'
    assert nt.as_filename(other) == first.path
    assert 'reused from the store' in again.describe()


def test_different_content_gets_different_files(tmp_path, store):
    img = build_format('mgh', tmp_path).load()
    img.header['flip_angle'] = 0.25
    first = nt.as_filename(img)
    img.header['flip_angle'] = 0.5
    second = nt.as_filename(img)
    assert first != second
    assert reload_exact(first).header['flip_angle'] == np.float32(0.25)
    assert reload_exact(second).header['flip_angle'] == np.float32(0.5)


@pytest.mark.parametrize(
    ('name', 'stem'),
    [
        ('sub-01_bold.nii.gz', 'sub-01_bold'),
        ('mean func;rm -rf.nii', 'mean_func_rm_-rf'),
        ('..hidden.nii', 'hidden'),
        ('...nii', 'image'),
    ],
)
def test_store_file_names_keep_the_source_stem(name, stem, tmp_path, store):
    img = nib.Nifti1Image(np.ones((2, 2, 2), 'f4'), np.eye(4))
    nib.save(img, tmp_path / name)
    img = nt.load(tmp_path / name)
    img.header['descrip'] = b'edited'
    path = Path(nt.as_filename(img))
    assert path.name == stem + '.nii'  # written as .nii whatever the source's extension
    assert path.is_relative_to(store.root)


def test_in_memory_image_is_named_image(store):
    path = nt.as_filename(nib.Nifti1Image(np.ones((2, 2, 2), 'f4'), np.eye(4)))
    assert os.path.basename(path) == 'image.nii'


def test_export_does_not_touch_the_image(tmp_path, store):
    case = build_format('spm2_mat', tmp_path)
    img = case.load()
    img.get_fdata()[3, 3, 3] = 0.5
    img.affine[0, 0] += 1e-9
    before = (
        img.get_filename(),
        img.header.binaryblock,
        img.affine.tobytes(),
        img.get_fdata().tobytes(),
        {k: v.filename for k, v in img.file_map.items()},
    )
    nt.as_filename(img)
    after = (
        img.get_filename(),
        img.header.binaryblock,
        img.affine.tobytes(),
        img.get_fdata().tobytes(),
        {k: v.filename for k, v in img.file_map.items()},
    )
    assert before == after
    case.assert_unchanged()


def test_explicit_store_argument_is_used(tmp_path, store):
    other = nt.Store(tmp_path / 'elsewhere')
    img = nib.Nifti1Image(np.ones((2, 2, 2), 'f4'), np.eye(4))
    path = nt.as_filename(img, store=other)
    assert Path(path).is_relative_to(other.root)
    assert store_files(store) == []


# ------------------------------------------------------- what ties an image to its file


def _twin_files(tmp_path: Path) -> tuple[Path, Path]:
    """Two folders, each with an ``anat.nii`` of different content."""
    first, second = tmp_path / 'first', tmp_path / 'second'
    for folder, value in ((first, 1), (second, 99)):
        folder.mkdir()
        nib.save(
            nib.Nifti1Image(np.full((4, 4, 4), value, np.int16), np.eye(4)), folder / 'anat.nii'
        )
    return first, second


def test_relative_name_then_chdir_hands_out_the_file_opened(tmp_path, monkeypatch, store):
    first, second = _twin_files(tmp_path)
    monkeypatch.chdir(first)
    img = nt.load('anat.nii')
    monkeypatch.chdir(second)
    assert nt.as_filename(img) == str(first / 'anat.nii')
    assert np.all(img.get_fdata() == 1)  # nibabel too reads the file opened
    assert store_files(store) == []


def test_plain_relative_image_after_chdir_is_never_the_other_file(tmp_path, monkeypatch, store):
    """nibabel's proxy re-opens the relative name: after a chdir it reads another file."""
    first, second = _twin_files(tmp_path)
    monkeypatch.chdir(first)
    img = nib.load('anat.nii')
    assert nt.as_filename(img) == str(first / 'anat.nii')  # seen here: bound now
    monkeypatch.chdir(second)
    assert nt.is_dirty(img)
    with pytest.raises(nt.ImageReadError, match='tied to'):
        nt.as_filename(img)
    monkeypatch.chdir(first)  # back where it reads its own file again
    assert nt.as_filename(img) == str(first / 'anat.nii')


def test_relative_name_then_chdir_dirty_image_refuses_the_other_file(tmp_path, monkeypatch, store):
    first, second = _twin_files(tmp_path)
    monkeypatch.chdir(first)
    img = nib.load('anat.nii')
    img.header['descrip'] = b'edited'
    assert nt.is_dirty(img)  # seen, and bound, here
    monkeypatch.chdir(second)
    # the proxy would read second/anat.nii (99s): never hand those out as this image's
    with pytest.raises(nt.ImageReadError, match='tied to'):
        nt.as_filename(img)
    assert store_files(store) == []


def test_relative_name_then_chdir_with_data_in_memory_writes_the_memory(
    tmp_path, monkeypatch, store
):
    first, second = _twin_files(tmp_path)
    monkeypatch.chdir(first)
    img = nib.load('anat.nii')
    nt.is_dirty(img)
    img.get_fdata()
    img.header['descrip'] = b'edited'
    monkeypatch.chdir(second)
    out = nib.load(nt.as_filename(img))
    assert np.all(out.get_fdata() == 1)


def test_replaced_file_is_another_file(tmp_path, store):
    first, second = _twin_files(tmp_path)
    img = nt.load(first / 'anat.nii')
    os.replace(second / 'anat.nii', first / 'anat.nii')  # same header, other voxels
    assert 'no longer the file' in nt.dirty_reason(img)
    with pytest.raises(nt.ImageReadError, match='no longer the file'):
        nt.as_filename(img)


def _dotdot_tree(tmp_path: Path) -> tuple[Path, Path]:
    """``a/link -> b/c``: ``a/link/../anat.nii`` is ``b/anat.nii`` for the kernel."""
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b' / 'c').mkdir(parents=True)
    os.symlink(tmp_path / 'b' / 'c', tmp_path / 'a' / 'link')
    for folder, value in ((tmp_path / 'a', 1), (tmp_path / 'b', 7)):
        nib.save(
            nib.Nifti1Image(np.full((3, 3, 3), value, np.int16), np.eye(4)), folder / 'anat.nii'
        )
    return tmp_path / 'a' / 'link' / '..' / 'anat.nii', tmp_path / 'b' / 'anat.nii'


@pytest.mark.parametrize('plain', [False, True])
def test_dotdot_after_a_symlinked_directory_is_the_kernels_file(plain, tmp_path, store):
    given, real = _dotdot_tree(tmp_path)
    img = load_format(given, plain=plain)
    assert np.all(img.get_fdata() == 7)
    out = nt.as_filename(img)
    assert os.path.samefile(out, real)
    assert np.all(nib.load(out).get_fdata() == 7)
    assert '..' not in out.split(os.sep)  # no '..' left for a reader to fold as text


def test_dotdot_path_string_resolves_to_the_kernels_file(tmp_path):
    given, real = _dotdot_tree(tmp_path)
    assert nt.as_filename(str(given)) == str(real)


@pytest.mark.parametrize('as_path', [False, True])
def test_annexed_file_keeps_the_name_the_user_gave(as_path, tmp_path, store):
    key = tmp_path / '.git' / 'annex' / 'objects' / 'Xy' / 'MD5E-s123--abc.nii.gz'
    key.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4)), key)
    link = tmp_path / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz'
    link.parent.mkdir(parents=True)
    os.symlink(os.path.relpath(key, link.parent), link)
    out = nt.as_filename(str(link) if as_path else nt.load(link))
    assert out == str(link)


def test_label_of_a_plain_relative_image_after_chdir_refuses(tmp_path, monkeypatch):
    first, second = _twin_files(tmp_path)
    monkeypatch.chdir(first)
    img = nib.load('anat.nii')
    img.header['descrip'] = b'edited'
    label = nt.image_label(img)
    monkeypatch.chdir(second)
    with pytest.raises(nt.ImageReadError, match='tied to'):
        nt.image_label(img)  # a digest of second/anat.nii would name other content
    monkeypatch.chdir(first)
    assert nt.image_label(img) == label


def test_load_reference_is_the_way_back_from_as_filename(tmp_path, store):
    img = nib.Nifti1Image(np.arange(8, dtype='f4').reshape(2, 2, 2), np.eye(4))
    back = nt.load_reference(nt.as_filename(img))
    assert np.array_equal(back.get_fdata(), img.get_fdata()) and not nt.is_dirty(back)


def test_a_missing_reference_raises_the_given_error_naming_file_and_remedy(tmp_path):
    class Missing(FileNotFoundError):
        pass

    gone = tmp_path / 'gone.nii'
    with pytest.raises(Missing) as info:
        nt.load_reference(gone, error=Missing, shared='the cache', note='Run it again.')
    message = str(info.value)
    assert str(gone) in message and nt.ENV_VAR in message
    assert 'the cache' in message and message.endswith('Run it again.')
