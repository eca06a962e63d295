"""The pydra front-end with real pydra tasks: mrtrix3's mrconvert, python tasks, a workflow.

Tasks live in :mod:`tests.pydra_tasks` (see there why). Runs of python tasks are
counted from the lines they append to a log, so a cached rerun is one that added none.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import typing as ty
from pathlib import Path

import cloudpickle
import nibabel as nib
import numpy as np
import pytest
from fileformats.generic import File
from fileformats.medimage import Analyze, Mgh, MghGz, Nifti1, NiftiGz
from fileformats.vendor.mrtrix3.medimage import ImageIn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nibabel.testing import data_path
from pydra.tasks.mrtrix3.v3_1 import MrConvert
from pydra.utils.hash import hash_function
from pydra.utils.typing import TypeParser

import nipype_nibtrack as nt
import nipype_nibtrack.pydra as ntp
from nipype_nibtrack.fileid import RACY_NS
from tests import pydra_tasks as tasks
from tests.conftest import SPATIAL_FORMATS, assert_same_content, build_format, store_files

DATA = Path(data_path)


def _require_mrconvert() -> None:
    if shutil.which('mrconvert'):
        return
    problem = 'mrconvert is not installed (sudo apt-get install mrtrix3)'
    if os.environ.get('CI') == 'true':
        pytest.fail(problem)
    pytest.skip(problem)


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """The names of the python tasks run so far (in any process)."""
    log = tmp_path / 'runs.log'
    monkeypatch.setenv(tasks.RUN_LOG, str(log))

    def read() -> list[str]:
        return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []

    return read


@pytest.fixture
def anat(tmp_path) -> Path:
    return Path(shutil.copy(DATA / 'anatomical.nii', tmp_path / 'anatomical.nii'))


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / 'cache'


def _dirty(path: Path) -> nib.Nifti1Image:
    img = nt.load(path)
    img.get_fdata()[10, 10, 10] += 7
    return img


# ------------------------------------------------------------------- fileformats fields


def test_formats_come_from_the_field_type():
    assert ntp.formats_of(Nifti1) == ('.nii',)
    assert ntp.formats_of(ty.Optional[NiftiGz]) == ('.nii.gz',)  # noqa: UP045
    assert ntp.formats_of(File) is None  # any file
    assert ntp.formats_of(list[Nifti1 | NiftiGz]) == ('.nii', '.nii.gz')
    union = ntp.formats_of(ImageIn)
    assert {'.mif', '.mif.gz', '.nii', '.nii.gz', '.mgh', '.mgz', '.img'} <= set(union)


def test_mrconvert_takes_a_clean_image_by_its_own_path(anat, store):
    task = MrConvert(in_file=nt.load(anat), out_file='out.nii')
    assert str(task.in_file) == str(anat)
    assert task.cmdline.split()[1] == str(anat)
    assert store_files(store) == []
    # the checksum is the path's: same task, same cache entry
    assert task._checksum == MrConvert(in_file=anat, out_file='out.nii')._checksum


def test_mrconvert_runs_on_a_dirty_image(anat, store, cache):
    _require_mrconvert()
    img = _dirty(anat)
    outputs = MrConvert(in_file=img, out_file='out.nii')(cache_root=cache)
    out = nib.load(outputs.out_file)  # mrconvert writes its own header: data and affine
    np.testing.assert_array_equal(out.get_fdata(), img.get_fdata())
    np.testing.assert_allclose(out.affine, img.affine, atol=1e-4)
    assert len(store_files(store)) == 2  # the image and its manifest


def _accepts_its_path(field_type, path) -> bool:
    try:
        TypeParser(field_type)(str(path))
    except TypeError:
        return False
    return True


@pytest.mark.parametrize('name', SPATIAL_FORMATS)
def test_every_format_reaches_an_image_in_field_as_a_file_it_accepts(name, tmp_path, store):
    """Clean: its own path whenever pydra takes that path; else a file pydra takes."""
    case = build_format(name, tmp_path / 'src')
    img = case.load()
    if name == 'cifti2':
        # written only as CIFTI-2 (.nii, a NIfTI-2 file), which fileformats refuses
        with pytest.raises(TypeError, match='in_file'):
            TypeParser(ImageIn, label='in_file')(img)
        case.assert_unchanged()
        return
    value = TypeParser(ImageIn, label='in_file')(img)
    assert str(value).lower().endswith(ntp.formats_of(ImageIn))
    if _accepts_its_path(ImageIn, case.path):
        assert str(value) == str(case.path)  # a file the tool reads: untouched
    else:  # pydra refuses the path itself (fileformats' Nifti2 and Mgh refuse real files)
        assert Path(str(value)).is_relative_to(store.root)
    assert_same_content(nib.load(str(value)), img)
    case.assert_unchanged()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    classes=st.lists(st.sampled_from([Nifti1, NiftiGz, MghGz, Analyze]), min_size=1, unique=True),
    edit=st.booleans(),
    shift=st.floats(-100, 100, allow_nan=False),
)
def test_any_fileformats_union_gets_a_file_in_one_of_its_formats(
    classes, edit, shift, anat, store
):
    """The rule for every field type: a file the type accepts, holding what the image does."""
    field_type = ty.Union[tuple(classes)] if len(classes) > 1 else classes[0]  # noqa: UP007
    img = nt.load(anat)
    if edit:
        img.affine[0, 3] += shift
    value = TypeParser(field_type, label='in_file')(img)
    assert isinstance(value, tuple(classes))
    assert str(value).lower().endswith(ntp.formats_of(field_type))
    assert_same_content(nib.load(str(value)), img)


def test_a_task_in_process_computes_on_the_voxels_hashed_and_leaves_the_image(anat, cache):
    """get_fdata(dtype='f4') of an image edited through get_fdata() (f8) reads its file."""
    img = _dirty(anat)
    want = float(img.get_fdata()[10, 10, 10])
    out = tasks.Scaled(img=img, factor=1.0)(cache_root=cache, worker='debug').out
    assert float(out.get_fdata()[10, 10, 10]) == want
    assert nt.is_dirty(img) and float(img.get_fdata()[10, 10, 10]) == want


def test_a_field_holds_the_image_as_it_was_when_assigned(anat, store):
    """pydra's fields are values (a list is copied when assigned): assign again after edits."""
    img = nt.load(anat)
    task = MrConvert(in_file=img, out_file='out.nii')
    assert str(task.in_file) == str(anat)
    img.get_fdata()[0, 0, 0] = 123
    assert str(task.in_file) == str(anat)  # unchanged until assigned again
    task.in_file = img
    assert float(nib.load(str(task.in_file)).get_fdata()[0, 0, 0]) == 123
    checksum = task._checksum
    task.in_file = anat
    assert task._checksum != checksum


def test_lists_of_images_for_a_list_of_files(anat, store):
    clean, dirty = nt.load(anat), _dirty(anat)
    value = TypeParser(list[Nifti1], label='in_files')([clean, dirty])
    assert [type(v) for v in value] == [Nifti1, Nifti1]
    assert str(value[0]) == str(anat)
    assert_same_content(nib.load(str(value[1])), dirty)


def test_a_file_that_is_no_image_given_to_an_image_field_names_the_field(tmp_path):
    text = tmp_path / 'notes.txt'
    text.write_text('not an image')
    with pytest.raises(TypeError, match=r'img.*notes\.txt|notes\.txt.*img'):
        tasks.VoxelSum(img=text)


def test_a_type_that_refuses_every_file_refuses_images_too(tmp_path, store):
    """fileformats 0.22's Mgh cannot parse real MGH headers: no image gets past it either."""
    path = tmp_path / 'a.mgh'
    nib.save(nib.MGHImage(np.zeros((2, 2, 2), 'f4'), np.eye(4)), path)
    assert not _accepts_its_path(Mgh, path)
    with pytest.raises(TypeError, match='in_file'):
        TypeParser(Mgh, label='in_file')(nt.load(path))


def test_an_image_that_cannot_be_a_file_is_refused_naming_the_field(tmp_path):
    surface = build_format('gifti', tmp_path / 'src').load()
    with pytest.raises(TypeError, match=r'in_file.*GiftiImage'):
        MrConvert(in_file=surface, out_file='out.nii')


def test_fields_that_take_images_get_a_clean_copy_of_their_file(anat, store):
    """In-process as in a worker: the task holds a clean image of the resolved file."""
    img = _dirty(anat)
    for held in (tasks.VoxelSum(img=img).img, TypeParser(ty.Any)(img)):
        assert held is not img and not nt.is_dirty(held)
        assert Path(held.get_filename()).is_relative_to(store.root)
        np.testing.assert_array_equal(held.get_fdata(), img.get_fdata())
    clean = nt.load(anat)
    assert tasks.VoxelSum(img=clean).img.get_filename() == str(anat)
    with pytest.raises(TypeError):
        TypeParser(int, label='x')(img)  # no file type, no image type: pydra's refusal


def test_images_in_a_named_tuple_reach_the_task_in_their_tuple(anat, cache, runs, store):
    """The walker rebuilds a named tuple by its fields (it called ``Pair(generator)``
    and failed); the task gets clean images of the files, and a voxel edit reruns it."""
    clean, dirty = nt.load(anat), _dirty(anat)
    want = float(clean.get_fdata().sum() + 10 * dirty.get_fdata().sum())
    task = tasks.PairSum(pair=tasks.ImagePair(clean, dirty))
    assert type(task.pair) is tasks.ImagePair
    assert task.pair.fixed.get_filename() == str(anat)
    assert Path(task.pair.moving.get_filename()).is_relative_to(store.root)
    assert task(cache_root=cache).out == want
    assert tasks.PairSum(pair=tasks.ImagePair(clean, _dirty(anat)))(cache_root=cache).out == want
    assert runs() == ['pair_sum']  # an equal pair: cached
    dirty.get_fdata()[0, 0, 0] += 1
    assert tasks.PairSum(pair=tasks.ImagePair(clean, dirty))(cache_root=cache).out == want + 10
    assert runs() == ['pair_sum', 'pair_sum']


def test_images_in_a_dict_subclass_keep_its_class(anat, cache, store):
    from collections import OrderedDict

    clean, dirty = nt.load(anat), _dirty(anat)
    imgs = OrderedDict([('b', dirty), ('a', clean)])
    out = tasks.NamedSums(imgs=imgs)(cache_root=cache, worker='debug').out
    assert out == [float(dirty.get_fdata().sum()), float(clean.get_fdata().sum())]


def test_images_in_a_set_are_detached_too(anat, store):
    dirty = _dirty(anat)
    (held,) = TypeParser(ty.Any, label='imgs')(frozenset([dirty]))
    assert held is not dirty and not nt.is_dirty(held)
    np.testing.assert_array_equal(held.get_fdata(), dirty.get_fdata())


# ------------------------------------------------------------------- hashing


def test_a_clean_image_hashes_as_its_file(anat):
    assert hash_function(nt.load(anat)) == hash_function(File(anat))
    assert hash_function(nib.load(anat)) == hash_function(File(anat))


def test_a_dirty_image_hashes_by_content(anat):
    a, b = _dirty(anat), _dirty(anat)
    assert hash_function(a) == hash_function(b)  # two objects, same content
    b.get_fdata()[0, 0, 0] += 1
    assert hash_function(a) != hash_function(b)
    assert hash_function(a) != hash_function(nt.load(anat))


_watched: list[tuple[str, list]] = []


def _audit(event: str, args: tuple) -> None:
    if event == 'open' and _watched and args[1] is not None:  # io.open: nibabel's reads
        path, seen = _watched[-1]
        if os.fspath(args[0]) == path:
            seen.append(args[1])


sys.addaudithook(_audit)


@contextlib.contextmanager
def _reads_of(path: Path) -> ty.Iterator[list]:
    """The modes ``path`` is opened with by ``open()`` (nibabel's reads) in the block."""
    seen: list = []
    _watched.append((str(path), seen))
    try:
        yield seen
    finally:
        _watched.pop()


def test_hashing_and_pickling_an_unchanged_image_again_reads_nothing_of_it(tmp_path, store):
    """pydra hashes and pickles the same inputs many times: the front-end resolves
    through the core's memo, so a dirty image read from its file (a header edit) is
    checked and digested once, then answered again for a few system calls while it and
    its file stay as they were; an edit, or a rewrite of the file, is seen."""
    path = tmp_path / 'big.nii'
    data = np.arange(32**3, dtype='f4').reshape(32, 32, 32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    os.utime(path, ns=(0, 0))  # settled: the memo may keep answers for it
    img = nt.load(path)
    img.header['descrip'] = b'edited'  # dirty, voxels still read from the file
    with _reads_of(path) as first_reads:
        first = hash_function(img)
    assert first_reads  # checked and digested: nibabel opened the file
    # a store file younger than the racy window is looked up in full each time: let the
    # new entry settle, then the next answer is kept (nt.state)
    time.sleep(RACY_NS / 1e9 + 0.1)
    assert hash_function(img) == first
    with _reads_of(path) as reads:
        assert hash_function(img) == first
        assert cloudpickle.loads(cloudpickle.dumps(img)).header['descrip'] == b'edited'
    assert reads == []
    img.header['descrip'] = b'edited again'
    assert hash_function(img) != first
    data[0, 0, 0] = -1
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    os.utime(path, ns=(0, 0))
    img.header['descrip'] = b'edited'  # back to the first header, over other voxels
    assert hash_function(img) != first


def test_image_types_hash_at_any_depth():
    optional = ty.Optional[nib.Nifti1Image]  # noqa: UP045  (typing's alias, not X | None)
    for tp in (nib.Nifti1Image, optional, nib.Nifti1Image | None, list[nib.Nifti1Image]):
        assert hash_function(tp) == hash_function(tp)
    assert hash_function(nib.Nifti1Image) != hash_function(nib.Nifti2Image)
    assert hash_function(list[int]) != hash_function(list[nib.Nifti1Image])


def test_unchanged_rerun_is_cached_and_one_voxel_reruns(anat, cache, runs, store):
    assert tasks.VoxelSum(img=_dirty(anat))(cache_root=cache).out > 0
    assert tasks.VoxelSum(img=_dirty(anat))(cache_root=cache).out > 0  # a new, equal image
    assert runs() == ['voxel_sum']
    img = _dirty(anat)
    img.get_fdata()[1, 2, 3] += 1
    before = tasks.VoxelSum(img=_dirty(anat))(cache_root=cache).out
    assert tasks.VoxelSum(img=img)(cache_root=cache).out == before + 1
    assert runs() == ['voxel_sum', 'voxel_sum']


def test_file_rewritten_on_disk_with_the_same_size_and_mtime_reruns(anat, cache, runs):
    """pydra alone hashes an image by its attributes: this rerun came back stale."""
    first = tasks.AnyImageSum(img=nt.load(anat))(cache_root=cache).out
    st_before = anat.stat()
    img = nib.load(anat)
    data = np.asanyarray(img.dataobj).copy()
    data[10, 10, 10] += 1
    nib.save(nib.Nifti1Image(data, img.affine, img.header), anat)
    assert anat.stat().st_size == st_before.st_size
    os.utime(anat, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    second = tasks.AnyImageSum(img=nt.load(anat))(cache_root=cache).out
    assert second == first + 1
    assert runs() == ['any_image_sum', 'any_image_sum']


# ------------------------------------------------------------------- python tasks


def test_python_task_returns_an_image_through_the_store(anat, cache, store):
    img = nt.load(anat)
    out = tasks.Scaled(img=img, factor=2.0)(cache_root=cache, worker='cf').out
    assert isinstance(out, nib.Nifti1Image)
    assert Path(out.get_filename()).is_relative_to(store.root)
    assert not nt.is_dirty(out)
    np.testing.assert_array_equal(out.get_fdata(), img.get_fdata().astype('f4') * 2)
    (result_pickle,) = cache.rglob('_result.pklz')
    # ~20 KB of pydra's own (the task class, by value); the voxels alone are 135 KB
    assert result_pickle.stat().st_size < out.get_fdata(dtype='f4').nbytes / 4


def test_python_tasks_typed_with_file_types_take_images(anat, cache, store):
    clean, dirty = nt.load(anat), _dirty(anat)
    assert tasks.NiftiPath(in_file=clean)(cache_root=cache, worker='cf').out == str(anat)
    stored = tasks.NiftiPath(in_file=dirty)(cache_root=cache, worker='cf').out
    assert Path(stored).is_relative_to(store.root) and stored.endswith('.nii')
    assert_same_content(nib.load(stored), dirty)
    assert tasks.FileSize(in_file=dirty)(cache_root=cache).out == os.path.getsize(stored)
    # the checksum is the path's
    assert tasks.FileSize(in_file=clean)._checksum == tasks.FileSize(in_file=anat)._checksum


def test_a_file_given_to_an_image_field_is_loaded(anat):
    assert tasks.VoxelSum(img=anat)(worker='debug').out == float(nib.load(anat).get_fdata().sum())
    assert tasks.VoxelSum(img=File(anat)).img.get_filename() == str(anat)


def test_lists_of_images(anat, cache):
    imgs = [nt.load(anat), _dirty(anat)]
    total = tasks.ImagesSum(imgs=imgs)(cache_root=cache).out
    assert total == pytest.approx(sum(float(i.get_fdata().sum()) for i in imgs))


def test_workflow_shell_task_then_python_task_typed_with_an_image(anat, cache, runs):
    _require_mrconvert()
    img = _dirty(anat)
    total = tasks.ConvertThenSum(in_file=img)(cache_root=cache, worker='cf').out
    assert total == pytest.approx(float(img.get_fdata().sum()))
    assert tasks.ConvertThenSum(in_file=_dirty(anat))(cache_root=cache, worker='cf').out == total
    assert runs() == ['voxel_sum']


def test_split_over_images(anat, cache):
    _require_mrconvert()
    imgs = [nt.load(anat), _dirty(anat)]
    sums = [float(i.get_fdata().sum()) for i in imgs]
    assert tasks.VoxelSum().split(img=imgs)(cache_root=cache, worker='cf').out == sums
    out = MrConvert(out_file='o.nii').split(in_file=imgs)(cache_root=cache, worker='cf')
    assert [float(nib.load(str(p)).get_fdata().sum()) for p in out.out_file] == sums


def test_workflow_python_task_returning_an_image_then_shell_task(anat, cache):
    _require_mrconvert()
    img = _dirty(anat)
    out = tasks.ScaleThenConvert(in_file=img, factor=2.0)(cache_root=cache, worker='cf').out
    want = (img.get_fdata() * 2).astype('f4')  # get_fdata(dtype='f4') would drop the edit
    np.testing.assert_array_equal(nib.load(str(out)).get_fdata(dtype='f4'), want)


# ------------------------------------------------------------------- workers


def test_cf_worker_receives_references_not_arrays(tmp_path, cache, monkeypatch, runs):
    """A 64 MiB image input: the job the cf worker unpickles stays under 20 KB."""
    import pydra.workers.cf as cf_worker

    sizes = []

    class Recording:
        def __getattr__(self, name):
            return getattr(cloudpickle, name)

        @staticmethod
        def dumps(obj, *args, **kwargs):
            data = cloudpickle.dumps(obj, *args, **kwargs)
            sizes.append(len(data))
            return data

    monkeypatch.setattr(cf_worker, 'cp', Recording())
    data = np.random.default_rng(0).random((256, 256, 256), dtype='f4')  # 64 MiB
    img = nib.Nifti1Image(data, np.eye(4))
    out = tasks.AnyImageSum(img=img)(cache_root=cache, worker='cf').out
    assert out == pytest.approx(float(data.astype('f8').sum()), rel=1e-6)
    assert sizes and max(sizes) < 20_000, sizes
    assert runs() == ['any_image_sum']


# ------------------------------------------------------------------- store gc


def test_gc_of_a_store_file_a_cached_result_refers_to_reruns(anat, cache, store, runs):
    """`nibtrack store gc` deleting an output a cached result names: a rerun, no error."""
    first = tasks.Scaled(img=nt.load(anat), factor=3.0)(cache_root=cache).out
    data = first.get_fdata()
    del first
    assert store.gc(max_bytes=0, keep_recent_seconds=0).removed >= 1
    assert store_files(store) == []
    again = tasks.Scaled(img=nt.load(anat), factor=3.0)(cache_root=cache).out
    np.testing.assert_array_equal(again.get_fdata(), data)
    assert runs() == ['scaled', 'scaled']


def test_gc_under_a_cached_workflow_reruns_what_lost_its_files(anat, cache, store, runs):
    want = (nt.load(anat).get_fdata(dtype='f4') * 6).astype('f4')
    out = tasks.ScaleTwice(in_file=nt.load(anat))(cache_root=cache, worker='cf').out
    np.testing.assert_array_equal(out.get_fdata(dtype='f4'), want)
    del out
    assert store.gc(max_bytes=0, keep_recent_seconds=0).removed == 2
    again = tasks.ScaleTwice(in_file=nt.load(anat))(cache_root=cache, worker='cf').out
    np.testing.assert_array_equal(again.get_fdata(dtype='f4'), want)
    # both returned images were deleted: both cached results are taken for none, both rerun
    assert runs() == ['scaled'] * 4


def test_gc_of_a_dirty_input_store_file_reruns_or_serves_equal_content(anat, cache, store, runs):
    img = _dirty(anat)
    first = tasks.AnyImageSum(img=img)(cache_root=cache).out
    assert store.gc(max_bytes=0, keep_recent_seconds=0).removed == 1
    again = tasks.AnyImageSum(img=_dirty(anat))(cache_root=cache).out
    assert again == first
    assert len(store_files(store)) == 2  # written again, same content, same name
    assert runs() == ['any_image_sum']  # same content, same checksum: the cache serves it


def test_a_missing_reference_is_a_clear_error(tmp_path):
    gone = tmp_path / 'gone.nii'
    with pytest.raises(ntp.MissingImageFile, match=str(gone)) as info:
        ntp.load_reference(str(gone))
    assert isinstance(info.value, FileNotFoundError)
