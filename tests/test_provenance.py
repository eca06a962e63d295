"""load keeps a weak record; mark_clean re-baselines; mark_dirty forces dirty."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import nipype_nibtrack as nt
from nipype_nibtrack.provenance import record_of
from tests.conftest import (
    FORMATS,
    build_format,
    flip_byte,
    header_patch,
    rewrite_in_place,
    store_files,
    touch,
)


@pytest.mark.parametrize('fmt', FORMATS)
def test_load_returns_what_nibabel_returns(fmt, tmp_path):
    case = build_format(fmt, tmp_path)
    img = nt.load(case.path)
    plain = nib.load(case.path)
    assert type(img) is type(plain) is case.klass
    assert nt.image_digest(img) == nt.image_digest(plain)
    assert record_of(img).origin == 'load'
    assert record_of(plain) is None


def test_load_passes_keywords_and_records_the_rest(tmp_path):
    case = build_format('nifti1', tmp_path)
    img = nt.load(case.path, mmap=False, keep_file_open=False)
    assert not isinstance(np.asanyarray(img.dataobj), np.memmap)
    assert record_of(img).kwargs == {}  # only keywords that change what is read are kept


def test_record_is_weak(tmp_path):
    case = build_format('nifti1', tmp_path)
    img = nt.load(case.path)
    assert record_of(img) is not None
    from nipype_nibtrack import provenance

    key = id(img)
    del img
    gc.collect()
    assert key not in provenance._records


def test_records_do_not_leak_to_a_new_object_at_the_same_address(tmp_path):
    case = build_format('nifti1', tmp_path)
    for _ in range(20):
        img = nt.load(case.path)
        mark = record_of(img)
        del img
        other = nib.load(case.path)
        assert record_of(other) is None or record_of(other) is not mark
        del other


# --------------------------------------------------------------------------- mark_clean


def _edited(tmp_path, fmt='nifti1'):
    case = build_format(fmt, tmp_path)
    img = nt.load(case.path)
    img.header['descrip'] = b'cosmetic'
    assert nt.is_dirty(img)
    return case, img


def test_mark_clean_rebaselines(tmp_path):
    case, img = _edited(tmp_path)
    nt.mark_clean(img)
    assert nt.dirty_reason(img) is None
    assert nt.as_filename(img) == str(case.path)
    case.assert_unchanged()


@pytest.mark.parametrize(
    'edit',
    ['header', 'extension', 'affine', 'alias', 'cache', 'cache_filled_edited', 'dataobj'],
)
def test_edits_after_mark_clean_are_detected(edit, tmp_path):
    _, img = _edited(tmp_path)
    if edit == 'cache':
        img.get_fdata()
    nt.mark_clean(img)
    assert not nt.is_dirty(img)
    if edit == 'header':
        img.header['descrip'] = b'again'
    elif edit == 'extension':
        img.header.extensions[0]._raw = b'edited after mark_clean'
    elif edit == 'affine':
        img.affine[2, 3] += 1e-9
    elif edit == 'alias':
        img.set_data_dtype('compat')
    elif edit == 'cache':
        img.get_fdata()[5, 5, 5] += 1  # the cache was filled at mark_clean
    elif edit == 'cache_filled_edited':
        img.get_fdata()[5, 5, 5] += 1  # filled after mark_clean
    elif edit == 'dataobj':
        img._dataobj = np.asanyarray(img.dataobj)
    assert nt.is_dirty(img), edit


def test_mark_clean_of_an_array_image_tracks_in_place_edits(tmp_path):
    data = np.arange(24, dtype='f4').reshape(2, 3, 4)
    img = nib.Nifti1Image(data, np.eye(4))
    path = tmp_path / 'saved.nii'
    nib.save(img, path)  # the file now holds exactly the array: provably clean
    assert nt.dirty_reason(img) is None
    nt.mark_clean(img)
    assert nt.as_filename(img) == str(path)
    img.dataobj[1, 1, 1] = -1
    assert nt.dirty_reason(img) == 'data edited since marked clean'


@pytest.mark.parametrize('change', ['header', 'data', 'touch'])
def test_file_changes_after_mark_clean_are_detected(change, tmp_path):
    case, img = _edited(tmp_path, 'nifti1_pair')
    nt.mark_clean(img)
    if change == 'header':
        rewrite_in_place(case.files[1], header_patch(nib.nifti1.Nifti1PairHeader, descrip=b'disk'))
    elif change == 'data':
        rewrite_in_place(case.path, flip_byte(10))
    else:
        touch(case.path)  # a baseline declares the file as it was: any change of it counts
    assert 'since marked clean' in nt.dirty_reason(img)


def test_mark_clean_without_a_file_raises_clearly():
    img = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4))
    with pytest.raises(ValueError, match='has no file'):
        nt.mark_clean(img)


def test_mark_clean_of_a_missing_file_raises_clearly(tmp_path):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4))
    img.set_filename(str(tmp_path / 'nowhere.nii'))
    with pytest.raises(ValueError, match='does not exist'):
        nt.mark_clean(img)


def test_mark_clean_of_bytes_image_raises_clearly(tmp_path):
    img = nib.Nifti1Image.from_bytes(build_format('nifti1', tmp_path).load().to_bytes())
    with pytest.raises(ValueError, match='has no file'):
        nt.mark_clean(img)


@pytest.mark.parametrize('value', [None, 3, 'a.nii', np.zeros(3)])
def test_overrides_reject_non_images(value):
    for override in (nt.mark_clean, nt.mark_dirty):
        with pytest.raises(TypeError, match=type(value).__name__):
            override(value)


# --------------------------------------------------------------------------- mark_dirty


@pytest.mark.parametrize('fmt', ['nifti1', 'mgz', 'parrec', 'minc1', 'cifti2'])
def test_mark_dirty_forces_dirty_until_mark_clean(fmt, tmp_path, store):
    case = build_format(fmt, tmp_path)
    img = nt.load(case.path)
    assert not nt.is_dirty(img)
    nt.mark_dirty(img)
    assert nt.dirty_reason(img) == 'marked dirty by the user'
    res = nt.resolve(img)
    assert res.action == 'written' and res.reason == 'marked dirty by the user'
    nt.mark_clean(img)
    assert not nt.is_dirty(img)
    assert nt.as_filename(img) == os.path.abspath(img.get_filename())


def test_mark_dirty_on_an_image_without_record():
    img = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4))
    nt.mark_dirty(img)
    assert nt.dirty_reason(img) == 'marked dirty by the user'


# --------------------------------------------------------------------------- load options


def _image_classes() -> list[type]:
    from nibabel.filebasedimages import FileBasedImage

    found, todo = [], [FileBasedImage]
    while todo:
        klass = todo.pop()
        found.append(klass)
        todo.extend(klass.__subclasses__())
    return found


def _keywords(klass: type) -> set[str]:
    import inspect

    skip = {'klass', 'filename', 'file_map'}
    return {
        name
        for method in ('from_filename', 'from_file_map')
        for name in inspect.signature(getattr(klass, method)).parameters
        if name not in skip
    }


@pytest.mark.parametrize('klass', _image_classes(), ids=lambda k: k.__name__)
def test_every_loader_keyword_is_in_the_registry(klass):
    from nipype_nibtrack.provenance import LOAD_OPTIONS

    for name in _keywords(klass):
        assert name in LOAD_OPTIONS, f'{klass.__name__}.from_filename({name}=...) not covered'
        default = inspect_default(klass, name)
        assert LOAD_OPTIONS[name].default == default, (klass.__name__, name)


def inspect_default(klass: type, name: str):
    import inspect

    return inspect.signature(klass.from_filename).parameters[name].default


NEUTRAL = [
    ('nifti1', {'mmap': False}),
    ('nifti1', {'mmap': 'r'}),
    ('nifti1_gz', {'keep_file_open': True}),
    ('nifti2_pair', {'keep_file_open': False, 'mmap': 'c'}),
    ('mgz', {'mmap': False}),
    ('minc1', {'mmap': False}),
    ('minc2', {'keep_file_open': True}),
    ('parrec', {'mmap': False}),
    ('parrec', {'scaling': 'dv', 'strict_sort': False, 'permit_truncated': False}),
    ('afni', {'keep_file_open': True}),
    ('cifti2', {'mmap': False}),
]


@pytest.mark.parametrize(('fmt', 'kwargs'), NEUTRAL, ids=lambda v: str(v))
def test_neutral_load_keywords_keep_the_image_clean(fmt, kwargs, tmp_path, store):
    case = build_format(fmt, tmp_path)
    img = nt.load(case.path, **kwargs)
    assert nt.dirty_reason(img) is None
    assert nt.resolve(img).action == 'original'
    assert store_files(store) == []


CONTENT = [
    ('parrec_varscale', {'scaling': 'fp'}),
    ('parrec', {'strict_sort': True}),
    ('parrec', {'permit_truncated': True}),
]


@pytest.mark.parametrize(('fmt', 'kwargs'), CONTENT, ids=lambda v: str(v))
@pytest.mark.parametrize('plain', [False, True], ids=['nt.load', 'nib.load'])
def test_content_load_keywords_make_the_image_dirty(fmt, kwargs, plain, tmp_path, store):
    from tests.conftest import assert_same_content, reload_exact

    case = build_format(fmt, tmp_path)
    img = (nib.load if plain else nt.load)(case.path, **kwargs)
    reason = nt.dirty_reason(img)
    assert reason is not None, f'{kwargs} called clean'
    if not plain:
        assert f'{next(iter(kwargs))}=' in reason
    res = nt.resolve(img)
    assert res.action == 'written'
    out = res.path
    assert_same_content(reload_exact(out), img)


def test_fp_scaling_is_written_with_fp_values(tmp_path, store):
    case = build_format('parrec_varscale', tmp_path)
    img = nt.load(case.path, scaling='fp')
    written = nib.load(nt.as_filename(img)).get_fdata()
    assert np.array_equal(written, img.get_fdata())
    assert not np.array_equal(written, nib.load(case.path).get_fdata())


def test_unknown_load_keyword_is_dirty():
    from nipype_nibtrack.provenance import load_options_reason

    assert 'unknown' in load_options_reason({'new_in_nibabel_6': 1})


# --------------------------------------------------------------------------- copies


def _copy(img, how):
    import copy
    import pickle

    return {
        'copy': copy.copy,
        'deepcopy': copy.deepcopy,
        'pickle': lambda i: pickle.loads(pickle.dumps(i)),
    }[how](img)


COPIES = ['copy', 'deepcopy', 'pickle']


@pytest.mark.parametrize('how', COPIES)
@pytest.mark.parametrize('fmt', FORMATS)
def test_copies_of_every_format_work_and_keep_the_verdict(fmt, how, tmp_path, store):
    case = build_format(fmt, tmp_path)
    img = nt.load(case.path)
    img.dataobj[(0,) * len(img.dataobj.shape)] if hasattr(img, 'dataobj') else None
    twin = _copy(img, how)
    assert nt.dirty_reason(twin) == nt.dirty_reason(img)
    nt.mark_dirty(img)
    assert nt.dirty_reason(_copy(img, how)) == 'marked dirty by the user'


@pytest.mark.parametrize('how', COPIES)
@pytest.mark.parametrize('fmt', ['nifti1', 'nifti1_gz', 'nifti2_gz', 'mgz', 'afni'])
def test_copies_of_held_open_images_work(fmt, how, tmp_path, store):
    case = build_format(fmt, tmp_path)
    img = nt.load(case.path, keep_file_open=True)
    img.dataobj[(0,) * img.ndim]  # opens the file and keeps it
    twin = _copy(img, how)
    assert nt.dirty_reason(twin) is None
    assert np.array_equal(twin.get_fdata(), img.get_fdata(), equal_nan=True)


@pytest.mark.parametrize('how', COPIES)
def test_mark_clean_baseline_follows_copies(how, tmp_path, store):
    case = build_format('nifti1', tmp_path)
    img = nib.load(case.path)
    img.header['descrip'] = b'a comment the tool ignores'
    assert nt.is_dirty(img)
    nt.mark_clean(img)
    twin = _copy(img, how)
    assert nt.dirty_reason(twin) is None
    assert nt.as_filename(twin) == str(case.path)
    twin.affine[0, 3] += 1
    assert nt.dirty_reason(twin) == 'affine changed since marked clean'


@pytest.mark.parametrize('how', COPIES)
def test_a_copy_is_never_cleaner_than_its_original(how, tmp_path, store):
    case = build_format('nifti1', tmp_path)
    img = nt.load(case.path)
    nt.mark_clean(img)
    img._dataobj = np.asanyarray(img.dataobj) + 1  # replaced after mark_clean: dirty
    assert nt.is_dirty(img)
    assert nt.is_dirty(_copy(img, how))


@pytest.mark.parametrize('how', ['deepcopy', 'pickle'])
def test_a_copy_made_before_chdir_reads_the_file_opened(how, tmp_path, monkeypatch, store):
    first, second = tmp_path / 'first', tmp_path / 'second'
    for folder, value in ((first, 1), (second, 99)):
        folder.mkdir()
        nib.save(nib.Nifti1Image(np.full((3, 3, 3), value, np.int16), np.eye(4)), folder / 'a.nii')
    monkeypatch.chdir(first)
    img = nib.load('a.nii')  # relative, never seen: the copy binds it
    twin = _copy(img, how)
    monkeypatch.chdir(second)  # as nipype does, into the node folder
    assert np.all(twin.get_fdata() == 1)
    assert nt.as_filename(twin) == str(first / 'a.nii')


def test_copy_of_a_class_defined_later_keeps_the_record(tmp_path):
    case = build_format('nifti1', tmp_path)

    class Later(nib.Nifti1Image):
        pass

    img = Later.from_filename(case.path)
    nt.mark_dirty(img)
    assert nt.dirty_reason(_copy(img, 'deepcopy')) == 'marked dirty by the user'


def test_copy_of_a_held_file_that_was_replaced_refuses_clearly(tmp_path):
    import copy

    from tests.conftest import replace_file

    case = build_format('parrec', tmp_path)
    img = nt.load(case.path)
    replace_file(
        case.files[0] if str(case.files[0]).lower().endswith('.rec') else case.path, bytes
    )
    rec = next(p for p in case.files if str(p).lower().endswith('.rec'))
    replace_file(rec, lambda raw: raw)
    with pytest.raises(OSError, match='no longer the file it holds open'):
        copy.deepcopy(img)


def test_a_front_end_reducer_override_wins(tmp_path):
    import io
    import pickle

    case = build_format('nifti1', tmp_path)
    img = nt.load(case.path)

    class ByReference(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, nib.Nifti1Image):
                return nt.load, (obj.get_filename(),)
            return NotImplemented

    buffer = io.BytesIO()
    ByReference(buffer).dump(img)
    assert len(buffer.getvalue()) < 500
    assert nt.as_filename(pickle.loads(buffer.getvalue())) == str(case.path)


TRIED_VALUES = {
    'mmap': [False, 'r', 'c'],
    'keep_file_open': [True, False],
    'buffer_size': [1000],
    'scaling': ['fp'],
    'strict_sort': [True],
    'permit_truncated': [True],
}


def _keyword_cases():
    from nipype_nibtrack.provenance import LOAD_OPTIONS

    for fmt in FORMATS:
        klass = BUILDER_CLASSES[fmt]
        for name in sorted(_keywords(klass)):
            for value in TRIED_VALUES[name]:
                changes = LOAD_OPTIONS[name].changes_content
                yield pytest.param(fmt, name, value, changes, id=f'{fmt}-{name}={value!r}')


def _builder_classes() -> dict[str, type]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return {fmt: build_format(fmt, Path(tmp) / fmt).klass for fmt in FORMATS}


BUILDER_CLASSES = _builder_classes()


@pytest.mark.parametrize(('fmt', 'name', 'value', 'changes'), list(_keyword_cases()))
def test_every_keyword_of_every_format(fmt, name, value, changes, tmp_path, store):
    """Neutral keywords leave the verdict of a default load; the others make it dirty."""
    case = build_format(fmt, tmp_path)
    default = nt.dirty_reason(nt.load(case.path))
    img = nt.load(case.path, **{name: value})
    reason = nt.dirty_reason(img)
    if changes:
        assert reason is not None and f'{name}=' in reason
    else:
        assert reason == default
