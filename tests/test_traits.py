"""ImageFile / InputMultiImage traits and the trait copies made by accept_images."""

import io
import os
import sys

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nibabel.gifti import GiftiDataArray, GiftiImage
from nipype.interfaces import afni, ants, elastix, fsl, mrtrix3, spm
from nipype.interfaces.base import File, TraitedSpec
from nipype.interfaces.base.traits_extension import BasePath
from traits.api import BaseTuple, Dict, List, TraitError, Union
from traits.trait_base import _Undefined
from traits.trait_handlers import TraitCompound

import nipype_nibtrack as nt
from nipype_nibtrack.nipype.traits import (
    ImageFile,
    InputMultiImage,
    contains_image,
    is_image,
    iter_images,
    map_images,
)

sys.path.insert(0, os.path.dirname(__file__))
import nipype_fixtures as nf

METADATA = (
    'argstr',
    'position',
    'mandatory',
    'copyfile',
    'xor',
    'requires',
    'name_source',
    'name_template',
    'keep_extension',
    'hash_files',
    'genfile',
    'usedefault',
    'sep',
    'desc',
    'extensions',
)

INTERFACES = [
    fsl.FLIRT,
    elastix.Registration,
    ants.Registration,  # InputMultiObject(Either(File, Tuple/List...)) masks, transforms
    ants.ApplyTransforms,
    ants.MultiplyImages,  # Either(File, Float)
    mrtrix3.MRConvert,  # Tuple(File, File) gradients
    spm.Realign,  # InputMultiObject(Either(ImageFileSPM, List(ImageFileSPM)))
    afni.Deconvolve,
]


class Spec(TraitedSpec):
    in_file = ImageFile(exists=True, argstr='-in %s', desc='input image')
    gz_only = ImageFile(exists=True, extensions=['.nii.gz'], desc='gzipped NIfTI')
    surface = ImageFile(exists=True, extensions=['.gii'], desc='a GIFTI surface')
    in_files = InputMultiImage(ImageFile(exists=True), argstr='%s', desc='several')


def test_path_is_validated_like_file(tmp_path):
    spec = Spec()
    spec.in_file = nf.ANAT
    assert spec.in_file == nf.ANAT and isinstance(spec.in_file, str)
    with pytest.raises(TraitError, match='pathlike object or string representing an existing'):
        spec.in_file = str(tmp_path / 'missing.nii')
    with pytest.raises(TraitError):
        spec.gz_only = nf.ANAT  # wrong extension for a path: File's own check


def test_image_is_kept_until_run():
    spec = Spec()
    img = nf.random_image(seed=1)
    spec.in_file = img
    assert spec.in_file is img
    # the trait is still a path trait for nipype (quoting, rebasing rely on it)
    trait_type = spec.trait('in_file').trait_type
    assert isinstance(trait_type, File) and isinstance(trait_type, BasePath)
    assert 'nibabel image' in trait_type.info_text


@pytest.mark.parametrize(
    'value, type_name',
    [
        (42, 'int'),
        (np.zeros((2, 2, 2)), 'ndarray'),
        ({'a': 1}, 'dict'),
        (object(), 'object'),
    ],
)
def test_non_image_object_is_refused_by_name(value, type_name):
    spec = Spec()
    with pytest.raises(TraitError) as info:
        spec.in_file = value
    message = str(info.value)
    assert "'in_file'" in message and 'Spec' in message and type_name in message


def test_bytesio_image_is_refused():
    data = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4)).to_bytes()
    img = nib.Nifti1Image.from_bytes(data)
    with pytest.raises(TraitError) as info:
        Spec().in_file = img
    message = str(info.value)
    assert "'in_file'" in message and 'Nifti1Image' in message
    assert 'BytesIO' in message and 'in-memory file object' in message


def test_in_memory_image_after_to_bytes_is_accepted():
    # to_bytes points file_map at a BytesIO, but the data stay in memory: still writable
    img = nf.random_image(seed=2)
    img.to_bytes()
    spec = Spec()
    spec.in_file = img
    assert spec.in_file is img


def _gifti() -> GiftiImage:
    return GiftiImage(darrays=[GiftiDataArray(np.arange(5, dtype='f4'))])


def test_gifti_to_a_volume_input_is_refused():
    with pytest.raises(TraitError) as info:
        Spec().in_file = _gifti()
    message = str(info.value)
    assert "'in_file'" in message and 'GiftiImage' in message and '.nii' in message


def test_gifti_to_a_surface_input_is_accepted():
    spec = Spec()
    img = _gifti()
    spec.surface = img
    assert spec.surface is img


def test_format_nibabel_cannot_write_is_refused():
    class OnlyMetaImage(TraitedSpec):
        in_file = ImageFile(exists=True, extensions=['.mhd'])

    with pytest.raises(TraitError) as info:
        OnlyMetaImage().in_file = nf.random_image(seed=3)
    assert "'in_file'" in str(info.value) and '.mhd' in str(info.value)
    # a path of another format is File's business, not ours
    with pytest.raises(TraitError):
        OnlyMetaImage().in_file = nf.ANAT


def test_formats_precedence():
    assert Spec().trait('gz_only').trait_type.formats() == ('.nii.gz',)
    plain = ImageFile(exists=True, image_formats=('.mgz',))
    assert plain.formats() == ('.mgz',)
    assert ImageFile(exists=True).formats(('nii',)) == ('.nii',)
    assert ImageFile(exists=True).formats() == ('.nii', '.nii.gz')


def test_multi_image_wraps_and_mixes():
    spec = Spec()
    img = nf.random_image(seed=4)
    spec.in_files = img
    assert spec.in_files == [img] and spec.in_files[0] is img
    spec.in_files = [nf.ANAT, img]
    assert spec.in_files[0] == nf.ANAT and spec.in_files[1] is img
    with pytest.raises(TraitError) as info:
        spec.in_files = [img, 3.5]
    assert 'float' in str(info.value)


def test_is_image_contains_image():
    img = nf.random_image(seed=5)
    assert is_image(img) and not is_image(nf.ANAT) and not is_image(np.zeros(3))
    assert contains_image([nf.ANAT, (1, [img])]) and not contains_image([nf.ANAT, 2])


_LEAF_IMAGES = [nf.random_image((2, 2, 2), seed=seed) for seed in (60, 61)]
_NESTED = st.recursive(
    st.sampled_from([*_LEAF_IMAGES, nf.ANAT, 3, None]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=2), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(value=_NESTED)
def test_map_images_and_iter_images_walk_the_same_places(value):
    seen = []

    def mark(img):
        seen.append(img)
        return f'image {len(seen)}'

    mapped = map_images(value, mark)
    assert [id(img) for img in iter_images(value)] == [id(img) for img in seen]
    assert contains_image(value) == bool(seen) and not contains_image(mapped)
    assert map_images(value, lambda img: img) == value  # same shape, same leaves


def _wrapped(kind, img):
    return {
        'list': lambda: [nf.ANAT, img],
        'tuple': lambda: (3, img),
        'dict': lambda: {'mask': img},
        'nested': lambda: [{'a': (img,)}],
    }[kind]()


@pytest.mark.parametrize('kind', ['list', 'tuple', 'dict', 'nested'])
def test_every_image_walker_reaches_images_in(kind, tmp_path, monkeypatch, store):
    # pickling, binding, resolution and the image checks walk the same containers: one
    # that reached images where another did not would pickle, bind or hash them wrongly
    from nipype_nibtrack.nipype import accept, binding, pickling

    monkeypatch.chdir(tmp_path)
    nib.save(nf.random_image((3, 3, 3), seed=62), 'rel.nii')
    img = nib.load('rel.nii')
    value = _wrapped(kind, img)
    assert list(iter_images(value)) == [img]
    refs = list(iter_images(pickling.references(value)))
    assert refs == [] and str(tmp_path / 'rel.nii') in repr(pickling.references(value))
    bound = list(iter_images(map_images(value, binding._bound_if_relative)))
    assert len(bound) == 1 and not binding.depends_on_cwd(bound[0])
    resolved = accept._resolve_value(value, None, 'walker')
    assert not contains_image(resolved) and str(tmp_path / 'rel.nii') in repr(resolved)


def test_a_list_input_value_comes_back_a_plain_list():
    class Spec(TraitedSpec):
        in_files = InputMultiImage(ImageFile(exists=True))

    spec = Spec(in_files=[nf.random_image(seed=63)])
    mapped = map_images(spec.in_files, lambda img: nf.ANAT)
    assert type(mapped) is list and mapped == [nf.ANAT]
    spec.in_files = mapped  # the trait takes it back


# ---------------------------------------------------------------- accept_images copies


def _trait_metadata(trait) -> dict:
    out = {}
    for key in METADATA:
        value = getattr(trait, key, None)
        if not isinstance(value, _Undefined):
            out[key] = value
    return out


def _type_attrs(trait_type) -> dict:
    return {
        key: getattr(trait_type, key, None) for key in ('exists', 'resolve', '_exts', 'pathlike')
    }


def _children(handler) -> list:
    """The handlers directly inside a compound trait type (Either, List, Tuple...)."""
    if isinstance(handler, TraitCompound):
        return list(handler.handlers)
    if isinstance(handler, Union):
        return [t.handler for t in handler.list_ctrait_instances]
    if isinstance(handler, Dict):
        return [handler.value_trait.handler]
    if isinstance(handler, BaseTuple):
        return [t.handler for t in handler.types]
    if isinstance(handler, List):
        return [handler.item_trait.handler]
    return []


def _check_same_shape(old, new, where: str, takes_images: bool) -> int:
    """Assert ``new`` is ``old`` with every File an ImageFile; returns how many."""
    if isinstance(old, File):
        if not takes_images:
            assert new is old, where  # names a file the tool writes: stays File
            return 0
        assert isinstance(new, ImageFile), where
        assert _type_attrs(new) == _type_attrs(old), where
        assert new._metadata.items() >= old._metadata.items(), where
        return 1
    assert type(new) is type(old), where
    old_kids, new_kids = _children(old), _children(new)
    assert len(old_kids) == len(new_kids), where
    files = sum(
        _check_same_shape(o, n, f'{where}[{i}]', takes_images)
        for i, (o, n) in enumerate(zip(old_kids, new_kids, strict=True))
    )
    if files == 0:
        assert new is old, where  # nothing inside takes an image: the very same trait
    return files


@pytest.mark.parametrize('interface', INTERFACES, ids=lambda c: f'{c.__module__}.{c.__name__}')
def test_accept_images_keeps_every_trait_and_its_metadata(interface):
    aware = nt.accept_images(interface)
    original = interface.input_spec.class_traits()
    copied = aware.input_spec.class_traits()
    assert list(original) == list(copied)  # same inputs, same order
    replaced = 0
    outputs = set(interface.output_spec.class_trait_names()) if interface.output_spec else set()
    for name, trait in original.items():
        new = copied[name]
        assert _trait_metadata(new) == _trait_metadata(trait), name
        assert new.default_value() == trait.default_value(), name
        writes = bool(trait.genfile or trait.name_source or name in outputs)
        replaced += _check_same_shape(trait.handler, new.handler, name, not writes) > 0
    assert replaced >= 2
    # the original interface is left alone
    assert not any(
        isinstance(t.trait_type, ImageFile) for t in interface.input_spec.class_traits().values()
    )


def test_flirt_metadata_spot_checks():
    spec = nt.accept_images(fsl.FLIRT)().inputs
    in_file = spec.trait('in_file')
    assert (in_file.argstr, in_file.position, in_file.mandatory) == ('-in %s', 0, True)
    out_file = spec.trait('out_file')
    assert out_file.name_source == ['in_file'] and out_file.hash_files is False
    assert spec.trait('reference').trait_type.exists is True
    assert spec.trait('in_matrix_file').trait_type.exists is False
    assert spec.trait('reference').copyfile is None
    assert spec.trait('in_file').trait_type.formats(spec._nibtrack_formats)[:2] == (
        '.nii',
        '.nii.gz',
    )


def test_elastix_parameters_list_accepts_paths_only_when_text(tmp_path):
    spec = nt.accept_images(elastix.Registration)().inputs
    params = tmp_path / 'rigid.txt'
    params.write_text(nf.ELASTIX_RIGID)
    spec.parameters = [str(params)]
    assert spec.parameters == [str(params)]
    img = nf.random_image(seed=6)
    spec.fixed_image = img
    assert spec.fixed_image is img


def test_bytes_io_image_to_interface_input_names_interface():
    data = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4)).to_bytes()
    img = nib.Nifti1Image.from_bytes(data)
    flirt = nt.accept_images(fsl.FLIRT)()
    with pytest.raises(TraitError) as info:
        flirt.inputs.in_file = img
    message = str(info.value)
    assert 'FLIRT' in message and "'in_file'" in message and 'Nifti1Image' in message


def test_io_objects_are_not_paths():
    with pytest.raises(TraitError) as info:
        Spec().in_file = io.BytesIO(b'abc')
    assert 'BytesIO' in str(info.value)


def test_inputs_naming_a_written_file_refuse_images():
    """The tool writes there: an image's own file or store entry would be overwritten."""
    from nipype.interfaces import mrtrix3
    from traits.api import TraitError

    img = nib.Nifti1Image(np.zeros((4, 4, 4), 'f4'), np.eye(4))
    for interface, name in ((mrtrix3.MRConvert, 'out_file'), (fsl.FLIRT, 'out_file')):
        spec = nt.accept_images(interface)().inputs
        with pytest.raises(TraitError):
            setattr(spec, name, img)


# ---------------------------------------------------------------- a property over trait shapes
# Any nesting of File in List, InputMultiObject, Either, Tuple: the image-aware copy
# validates every path-only value exactly as the original does, and takes an image at
# every place the original takes an existing file.

SHAPES = st.recursive(
    st.just('file'),
    lambda inner: st.one_of(
        st.tuples(st.just('list'), inner),
        st.tuples(st.just('multi'), inner),
        st.tuples(st.just('either'), inner),
        st.tuples(st.just('tuple'), inner, inner),
    ),
    max_leaves=4,
)


def _trait_of(shape):
    from nipype.interfaces.base import InputMultiObject
    from nipype.interfaces.base import Tuple as NipypeTuple
    from nipype.interfaces.base import traits as nipype_traits

    if shape == 'file':
        return File(exists=True)
    kind, *inner = shape
    parts = [_trait_of(s) for s in inner]
    return {
        'list': lambda: nipype_traits.List(parts[0]),
        'multi': lambda: InputMultiObject(parts[0]),
        'either': lambda: nipype_traits.Either(parts[0], nipype_traits.Int),
        'tuple': lambda: NipypeTuple(*parts),
    }[kind]()


def _values_of(shape, leaf):
    """Values of ``shape`` whose file places hold what ``leaf`` draws."""
    if shape == 'file':
        return leaf
    kind, *inner = shape
    if kind in ('list', 'multi'):
        return st.lists(_values_of(inner[0], leaf), max_size=3)
    if kind == 'either':
        return st.one_of(_values_of(inner[0], leaf), st.integers(-2, 2))
    return st.tuples(*(_values_of(s, leaf) for s in inner))


def _set(spec_class, value):
    try:
        spec = spec_class()
        spec.x = value
        return 'ok', repr(spec.x)
    except TraitError as err:
        return 'refused', type(err).__name__


@settings(max_examples=150, deadline=None)
@given(data=st.data(), shape=SHAPES)
def test_image_aware_copies_validate_paths_as_the_original(data, shape):
    class Original(TraitedSpec):
        x = _trait_of(shape)

    class Aware(TraitedSpec):
        x = nt.nipype.image_trait(Original.class_traits()['x'])

    paths = st.sampled_from([nf.ANAT, '/no/such/file.nii', 3.5, None])
    value = data.draw(_values_of(shape, paths), label='path-only value')
    assert _set(Aware, value) == _set(Original, value)
    # every file place holding an existing file: the original takes it, and so does the
    # copy with an image in any of those places
    with_files = data.draw(_values_of(shape, st.just(nf.ANAT)), label='existing files')
    img = nf.random_image(seed=40)
    with_images = data.draw(
        _values_of(shape, st.sampled_from([nf.ANAT, img])), label='images and files'
    )
    if _set(Original, with_files)[0] == 'ok':
        assert _set(Aware, with_files) == _set(Original, with_files)
    shape_ok = _set(Original, _as_paths(with_images, img))[0]
    assert _set(Aware, with_images)[0] == shape_ok


def _as_paths(value, img):
    if value is img:
        return nf.ANAT
    if isinstance(value, list):
        return [_as_paths(v, img) for v in value]
    if isinstance(value, tuple):
        return tuple(_as_paths(v, img) for v in value)
    return value


def test_a_file_in_a_nested_either_reads_the_formats_it_was_given():
    # the copy and the search for its ImageFile walk the same registry: an Either inside
    # an Either once got an ImageFile that trait_formats did not find (formats None: an
    # image would have been handed on in any format, its own file's included)
    from nipype.interfaces.base import traits

    class Spec(TraitedSpec):
        x = traits.Either(traits.Either(File(exists=True), traits.Int), traits.Str)

    formats = ('.mif', '.nii')

    class Aware(TraitedSpec):
        x = nt.nipype.image_trait(Spec.class_traits()['x'], formats)

    assert nt.nipype.accept.trait_formats(Aware(), 'x') == formats
    spec = Aware(x=nf.random_image(seed=64))
    assert is_image(spec.x)
