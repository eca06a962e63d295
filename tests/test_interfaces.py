"""accept_images: run-time resolution, formats, output names, real tools, bad input."""

import importlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces import ants, elastix, fsl, mrtrix3
from nipype.interfaces.base import (
    CommandLine,
    CommandLineInputSpec,
    File,
    TraitedSpec,
    traits,
)
from nipype.pipeline import engine as pe
from traits.api import TraitError

import nipype_nibtrack as nt
from nipype_nibtrack.nipype import accept as nt_interfaces
from nipype_nibtrack.nipype.traits import is_image

sys.path.insert(0, os.path.dirname(__file__))
import nipype_fixtures as nf
from nipype_fixtures import VoxelSum

from tests.nipype_interfaces import interface_classes

FLIRT = nt.accept_images(fsl.FLIRT)
MRConvert = nt.accept_images(mrtrix3.MRConvert)
ElastixRegistration = nt.accept_images(elastix.Registration)
ApplyTransforms = nt.accept_images(ants.ApplyTransforms)


# ---------------------------------------------------------------- interfaces of our own


class ByteCountInputSpec(CommandLineInputSpec):
    in_file = File(exists=True, mandatory=True, argstr='%s', position=0, desc='file')


class ByteCount(CommandLine):
    """``wc -c <file>``: a plain CommandLine subclass."""

    _cmd = 'wc -c'
    input_spec = ByteCountInputSpec

    def _list_outputs(self):
        return {}


class CopyingInputSpec(CommandLineInputSpec):
    copied = File(exists=True, mandatory=True, copyfile=True, argstr='%s', position=0)
    linked = File(exists=True, mandatory=True, copyfile=False, argstr='%s', position=1)


class CopyingOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class Copying(CommandLine):
    """``wc -c copied linked`` with nipype copying/linking the inputs first."""

    _cmd = 'wc -c'
    input_spec = CopyingInputSpec
    output_spec = CopyingOutputSpec

    def _list_outputs(self):
        return {}


class GzOnlyInputSpec(CommandLineInputSpec):
    in_file = File(exists=True, mandatory=True, argstr='%s', extensions=['.nii.gz'])


class GzOnly(CommandLine):
    """A tool that reads gzipped NIfTI only (the trait says so)."""

    _cmd = 'true'
    input_spec = GzOnlyInputSpec


class SurfaceInputSpec(CommandLineInputSpec):
    in_file = File(exists=True, mandatory=True, argstr='%s', extensions=['.gii'])


class Surface(CommandLine):
    """A tool that reads GIFTI surfaces."""

    _cmd = 'true'
    input_spec = SurfaceInputSpec


def _store_files() -> set:
    return set(nf.image_file_states(nf.store_root()))


def _saved_copy(tmp_path: Path, img: nib.Nifti1Image, name: str) -> str:
    path = str(tmp_path / name)
    nib.save(img, path)
    return path


# ---------------------------------------------------------------- accept_images itself


def test_accept_images_returns_one_class_per_interface():
    assert nt.accept_images(fsl.FLIRT) is FLIRT
    assert nt.accept_images(FLIRT) is FLIRT
    assert issubclass(FLIRT, fsl.FLIRT) and FLIRT.__name__ == 'FLIRT'
    assert FLIRT.__module__ == 'nipype_nibtrack.interfaces.fsl.preprocess'
    assert FLIRT.__qualname__ == 'FLIRT'
    assert FLIRT.input_spec.__qualname__ == 'FLIRT.input_spec'
    assert FLIRT.output_spec is fsl.FLIRT.output_spec


def test_a_class_without_file_inputs_comes_back_unchanged():
    from nipype.interfaces.utility import IdentityInterface

    assert nt.accept_images(IdentityInterface) is IdentityInterface
    assert nt.accept_images(CommandLine) is CommandLine


def test_accept_images_refuses_non_interfaces():
    for bad in (fsl.FLIRT(), 'FLIRT', int):
        with pytest.raises(TypeError, match='nipype interface class'):
            nt.accept_images(bad)


def test_users_classes_live_in_a_mirror_of_their_module():
    aware = nt.accept_images(ByteCount)
    assert aware.__module__ == f'nipype_nibtrack.nipype.accepted.{__name__}'
    mirror = importlib.import_module(aware.__module__)
    assert mirror.ByteCount is aware and mirror.VoxelSum is nt.accept_images(VoxelSum)
    assert mirror.CommandLine is CommandLine and mirror.os is os
    with pytest.raises(AttributeError, match='no_such_thing'):
        mirror.no_such_thing  # noqa: B018


def test_aware_class_and_instance_pickle_in_a_fresh_interpreter(tmp_path):
    flirt = FLIRT(in_file=nf.ANAT, reference=nf.ANAT, dof=6)
    payload = tmp_path / 'flirt.pkl'
    payload.write_bytes(pickle.dumps((FLIRT, flirt, nt.accept_images(nf.Scale))))
    proc = nf.run_python(
        """
        import pickle, sys
        klass, flirt, scale = pickle.load(open(sys.argv[1], 'rb'))
        assert klass.__module__ == 'nipype_nibtrack.interfaces.fsl.preprocess', klass
        assert type(flirt) is klass and flirt.inputs.dof == 6
        assert scale.__module__ == 'nipype_nibtrack.nipype.accepted.nipype_fixtures', scale
        from nipype_nibtrack.interfaces import fsl
        assert fsl.FLIRT is klass
        print(klass.__qualname__, scale.__name__, flirt.cmdline.split()[0])
        """,
        str(payload),
    )
    assert proc.stdout.split() == ['FLIRT', 'Scale', 'flirt']


# ---------------------------------------------------------------- run-time resolution


def test_clean_image_is_its_original_path_never_copied():
    img = nt.load(nf.ANAT)
    before = _store_files()
    flirt = FLIRT(in_file=img, reference=nib.load(nf.ANAT))
    cmd = flirt.cmdline
    assert cmd.startswith(f'flirt -in {nf.ANAT} -ref {nf.ANAT} -out anatomical_flirt')
    assert _store_files() == before
    # the spec holds the images again afterwards
    assert flirt.inputs.in_file is img


def test_dirty_image_output_names_use_the_source_stem(tmp_path):
    src = nf.copy_anat(tmp_path)
    img = nt.load(src)
    img.header['descrip'] = b'edited'  # dirty now
    assert nt.is_dirty(img)
    cmd = FLIRT(in_file=img, reference=nf.ANAT).cmdline
    in_path = cmd.split()[2]
    assert in_path.startswith(str(nf.store_root())) and in_path.endswith('/anatomical.nii')
    assert '-out anatomical_flirt.nii' in cmd and '-omat anatomical_flirt.mat' in cmd
    digest = nt.image_digest(img)
    assert digest not in cmd.replace(in_path, '')


def test_image_without_file_is_named_image():
    img = nf.random_image(seed=11)
    cmd = FLIRT(in_file=img, reference=nf.ANAT).cmdline
    assert '-out image_flirt.nii' in cmd and '-omat image_flirt.mat' in cmd
    assert '<' not in cmd and 'Nifti1' not in cmd and 'object at' not in cmd
    assert nt.image_digest(img) not in cmd.split('-out')[1]


def test_header_text_never_enters_an_output_name():
    img = nf.random_image(seed=12)
    img.header['descrip'] = b'sub 01; rm -rf /'
    cmd = ApplyTransforms(
        input_image=img, reference_image=nf.ANAT, transforms=['identity']
    ).cmdline
    assert '--output image_trans.nii' in cmd
    assert 'rm -rf' not in cmd and 'descrip' not in cmd


def test_unsafe_source_name_is_sanitised(tmp_path):
    folder = tmp_path / 'sub 01'
    folder.mkdir()
    path = str(folder / 'my brain;x.nii')
    shutil.copy(nf.ANAT, path)
    img = nt.load(path)
    clean_cmd = FLIRT(in_file=img, reference=nf.ANAT).cmdline
    assert f"-in '{path}'" in clean_cmd  # clean: the user's own file, quoted by nipype
    img.affine[0, 3] += 1
    cmd = FLIRT(in_file=img, reference=nf.ANAT).cmdline
    assert '-out my_brain_x_flirt.nii' in cmd


def test_name_source_outputs_in_a_node_see_paths(tmp_path):
    img = nf.random_image(seed=13)
    img.set_filename(str(tmp_path / 'subject.nii'))  # no such file: dirty, stem known
    node = pe.Node(FLIRT(in_file=img, reference=nf.ANAT), name='flirt', base_dir=str(tmp_path))
    nf.node_hash(node)  # a copy: the node itself keeps the image
    assert node.inputs.in_file is img
    node.config = nf.deepcopy(nf.nipype_config._sections)
    node._get_hashval()  # what nipype does before running: resolves in place
    assert isinstance(node.inputs.in_file, str)
    outputs = node.interface._list_outputs()
    assert os.path.basename(outputs['out_file']) == 'subject_flirt.nii'
    assert os.path.basename(outputs['out_matrix_file']) == 'subject_flirt.mat'


def test_mgh_is_converted_for_fsl_and_passed_as_is_to_mrtrix():
    mgh = nt.load(nf.MGZ)
    assert not nt.is_dirty(mgh)
    flirt_in = FLIRT(in_file=mgh, reference=nf.ANAT).cmdline.split()[2]
    assert flirt_in.endswith('/test.nii') and flirt_in.startswith(str(nf.store_root()))
    assert nib.load(flirt_in).shape == mgh.shape
    np.testing.assert_array_equal(nib.load(flirt_in).get_fdata(), mgh.get_fdata())
    mr_cmd = MRConvert(in_file=mgh, out_file='out.nii').cmdline
    assert mr_cmd == f'mrconvert {nf.MGZ} out.nii'


def test_elastix_family_formats():
    assert nt_interfaces.formats_for(elastix.Registration) == ('.nii', '.nii.gz', '.mhd', '.nrrd')
    assert nt_interfaces.formats_for(fsl.FLIRT)[:2] == ('.nii', '.nii.gz')
    assert nt_interfaces.formats_for(nf.Scale) == ('.nii', '.nii.gz')
    reg = ElastixRegistration(
        fixed_image=nt.load(nf.ANAT), moving_image=nt.load(nf.MGZ), parameters=[nf.ANAT]
    )
    cmd = reg.cmdline
    assert f'-f {nf.ANAT}' in cmd
    moving = cmd.split(' -m ')[1].split()[0]
    assert moving.endswith('/test.nii')


def test_trait_extensions_take_precedence(tmp_path):
    aware = nt.accept_images(GzOnly)
    img = nf.random_image(seed=14)
    cmd = aware(in_file=img).cmdline
    assert cmd.startswith('true ') and cmd.endswith('/image.nii.gz')
    clean = aware(in_file=nt.load(nf.ANAT)).cmdline
    assert clean.endswith('/anatomical.nii.gz') and nf.ANAT not in clean
    assert nib.load(clean.split()[1]).shape == (33, 41, 25)


def test_gifti_goes_to_a_surface_tool_as_gii():
    from nibabel.gifti import GiftiDataArray, GiftiImage

    data = np.arange(12, dtype='f4')
    img = GiftiImage(darrays=[GiftiDataArray(data)])
    cmd = nt.accept_images(Surface)(in_file=img).cmdline
    path = cmd.split()[1]
    assert path.startswith(str(nf.store_root())) and path.endswith('/image.gii')
    np.testing.assert_array_equal(nib.load(path).darrays[0].data, data)


def test_relative_file_name_becomes_absolute(monkeypatch):
    monkeypatch.chdir(os.path.dirname(nf.ANAT))
    img = nt.load('anatomical.nii')  # opened, and so named, by its cwd-joined path
    assert img.get_filename() == os.path.join(os.getcwd(), 'anatomical.nii')
    cmd = FLIRT(in_file=img, reference=nf.ANAT).cmdline
    assert cmd.startswith(f'flirt -in {nf.ANAT} ')


def test_any_commandline_subclass_runs_with_an_image(tmp_path):
    aware = nt.accept_images(ByteCount)
    img = nf.random_image(seed=15)
    result = aware(in_file=img).run(cwd=str(tmp_path))
    path = result.inputs['in_file']
    assert isinstance(path, str) and path.startswith(str(nf.store_root()))
    assert result.runtime.stdout.split() == [str(os.path.getsize(path)), path]
    np.testing.assert_array_equal(nib.load(path).get_fdata(), img.get_fdata())


def test_copyfile_true_and_false_in_a_node(tmp_path):
    aware = nt.accept_images(Copying)
    dirty = nf.random_image(seed=16)
    clean = nt.load(nf.ANAT)
    node = pe.Node(aware(copied=dirty, linked=clean), name='copying', base_dir=str(tmp_path))
    node.config = {'execution': {'keep_inputs': True}}  # keep the copies to look at them
    result = node.run()
    outdir = Path(node.output_dir())
    copied, linked = result.inputs['copied'], result.inputs['linked']
    assert Path(copied).parent == outdir and Path(linked).parent == outdir
    assert not os.path.islink(copied) and os.path.islink(linked)
    assert os.path.realpath(linked) == nf.ANAT  # the clean image, linked, never copied
    assert np.array_equal(nib.load(copied).get_fdata(), dirty.get_fdata())
    assert result.runtime.cmdline == f'wc -c {copied} {linked}'
    # the store file that was copied is untouched
    stored = nt.as_filename(dirty)
    assert os.path.getsize(stored) == os.path.getsize(copied)


def test_python_base_interface(tmp_path):
    aware = nt.accept_images(VoxelSum)
    img = nf.random_image(seed=17)
    iface = aware(in_file=img)
    result = iface.run(cwd=str(tmp_path))
    assert result.outputs.total == pytest.approx(float(img.get_fdata(dtype='f4').sum()), 1e-5)
    assert result.outputs.seen == result.inputs['in_file']
    assert result.inputs['in_file'].startswith(str(nf.store_root()))
    assert iface.inputs.in_file is img
    clean = aware(in_file=nt.load(nf.ANAT)).run(cwd=str(tmp_path))
    assert clean.outputs.seen == nf.ANAT


def test_python_interface_in_a_node_records_paths(tmp_path):
    img = nf.random_image(seed=18)
    node = pe.Node(nt.accept_images(VoxelSum)(in_file=img), name='vsum', base_dir=str(tmp_path))
    result = node.run()
    assert isinstance(result.inputs['in_file'], str)
    assert result.outputs.seen == result.inputs['in_file']
    loaded = nf.loadpkl(Path(node.output_dir()) / 'result_vsum.pklz')
    assert loaded.inputs['in_file'] == result.inputs['in_file']


# ---------------------------------------------------------------- real tools


def test_missing_tool_fails_under_ci_and_skips_outside(monkeypatch):
    monkeypatch.setenv('CI', 'true')
    with pytest.raises(pytest.fail.Exception, match='CI=true'):
        nf.require_tool('no-such-tool-nibtrack')
    monkeypatch.setenv('CI', 'false')
    with pytest.raises(pytest.skip.Exception):
        nf.require_tool('no-such-tool-nibtrack')
    assert nf.require_tool('sh').endswith('/sh')


@pytest.mark.slow
def test_mrconvert_really_runs(tmp_path):
    nf.require_tool('mrconvert')
    dirty = nf.random_image(seed=19)
    node = pe.Node(
        MRConvert(in_file=dirty, out_file='converted.nii', args='-quiet'),
        name='mrconvert',
        base_dir=str(tmp_path),
    )
    result = node.run()
    out = nib.load(result.outputs.out_file)
    np.testing.assert_allclose(out.get_fdata(), dirty.get_fdata(), rtol=1e-6)
    # a clean MGH goes to mrconvert as is
    mgh = nt.load(nf.MGZ)
    iface = MRConvert(in_file=mgh, out_file=str(tmp_path / 'from_mgh.nii'), args='-quiet')
    result = iface.run(cwd=str(tmp_path))
    assert result.inputs['in_file'] == nf.MGZ
    np.testing.assert_allclose(
        nib.load(str(tmp_path / 'from_mgh.nii')).get_fdata(), mgh.get_fdata(), rtol=1e-6
    )


@pytest.mark.slow
def test_elastix_registration_really_runs(tmp_path):
    nf.require_tool('elastix')
    params = tmp_path / 'rigid.txt'
    params.write_text(nf.ELASTIX_RIGID)
    fixed = nt.load(nf.ANAT)
    data = np.asanyarray(fixed.dataobj).astype('f4')
    moving = nib.Nifti1Image(np.roll(data, 2, axis=0), fixed.affine)  # in memory: dirty
    node = pe.Node(
        ElastixRegistration(fixed_image=fixed, moving_image=moving, parameters=[str(params)]),
        name='elastix',
        base_dir=str(tmp_path),
    )
    result = node.run()
    assert result.inputs['fixed_image'] == nf.ANAT
    assert result.inputs['moving_image'].startswith(str(nf.store_root()))
    warped = nib.load(result.outputs.warped_file)
    assert warped.shape == fixed.shape
    transform = Path(result.outputs.transform[0]).read_text()
    assert 'EulerTransform' in transform
    # the registration undid most of the shift
    err_before = np.abs(np.roll(data, 2, axis=0) - data).mean()
    err_after = np.abs(warped.get_fdata() - data).mean()
    assert err_after < 0.8 * err_before


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize('interface', [FLIRT, MRConvert, nt.accept_images(VoxelSum)])
def test_bad_values_name_interface_input_and_type(interface):
    with pytest.raises(TraitError) as info:
        interface(in_file=[1, 2])
    message = str(info.value)
    assert interface.__name__ in message and "'in_file'" in message and 'list' in message


def test_bad_values_through_a_node(tmp_path):
    node = pe.Node(FLIRT(reference=nf.ANAT), name='flirt', base_dir=str(tmp_path))
    with pytest.raises(TraitError, match=r"'in_file' input of FLIRT.*not ndarray"):
        node.inputs.in_file = np.zeros((3, 3, 3))
    bytes_img = nib.Nifti1Image.from_bytes(nf.random_image(seed=20).to_bytes())
    with pytest.raises(TraitError, match=r"'in_file' input of FLIRT.*Nifti1Image.*BytesIO"):
        node.inputs.in_file = bytes_img
    gifti = nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(np.zeros(4, 'f4'))])
    with pytest.raises(TraitError, match=r"'in_file' input of FLIRT.*GiftiImage"):
        node.inputs.in_file = gifti


def test_unwritable_image_in_a_function_node_names_the_input(tmp_path):
    from nipype.interfaces.utility import Function

    bytes_img = nib.Nifti1Image.from_bytes(nf.random_image(seed=22).to_bytes())
    node = pe.Node(
        Function(input_names=['img', 'counter'], output_names=['out'], function=nf.image_sum),
        name='fsum',
    )
    node.inputs.img = bytes_img  # traits.Any: nothing to validate at assignment
    node.inputs.counter = str(tmp_path / 'runs')
    wf = pe.Workflow('bad', base_dir=str(tmp_path))
    wf.add_nodes([node])
    with pytest.raises(ValueError) as info:
        wf.run()
    message = str(info.value)
    assert "the 'img' input of FunctionInputSpec" in message
    assert 'Nifti1Image' in message and 'BytesIO' in message
    assert nf.count_runs(tmp_path / 'runs') == 0


# ---------------------------------------------------------------- a drop-in for paths
# Each test runs the original class and the image-aware one on the same path-only calls.
# The one intended difference: help text saying which inputs take an image.

IMAGE_PHRASE = ' or a nibabel image'


def _outcome(call) -> str:
    try:
        return repr(call())
    except Exception as err:
        return f'{type(err).__name__}: {err}'.replace(IMAGE_PHRASE, '')


def _cmdline_outcome(iface) -> str:
    return _outcome(lambda: iface.cmdline)


def test_every_nipype_interface_behaves_the_same_for_paths(capsys, tmp_path, monkeypatch):
    """Inputs, their order, defaults, metadata, help, the first missing input."""
    monkeypatch.chdir(tmp_path)  # some cmdlines write a file (niftyreg's reg_average_cmd)
    wrapped = 0
    for original in interface_classes():
        aware = nt.accept_images(original)
        if aware is original:
            continue
        wrapped += 1
        name = f'{original.__module__}.{original.__name__}'
        assert aware.__name__ == original.__name__ and aware.__doc__ == original.__doc__, name
        old_traits, new_traits = (c.input_spec.class_traits() for c in (original, aware))
        assert list(old_traits) == list(new_traits), name
        for key, trait in old_traits.items():
            new = new_traits[key]
            assert new.default_value() == trait.default_value(), (name, key)
            metadata = {k: v for k, v in (new.__dict__ or {}).items() if k != 'image_formats'}
            assert metadata == (trait.__dict__ or {}), (name, key)
        try:
            old = original()
        except Exception as err:  # needs arguments, or a missing tool: the same for both
            with pytest.raises(type(err)):
                aware()
            continue
        new = aware()
        assert list(new.inputs.traits()) == list(old.inputs.traits()), name
        assert new.inputs.copyable_trait_names() == old.inputs.copyable_trait_names(), name
        assert repr(new.inputs.trait_get()) == repr(old.inputs.trait_get()), name
        assert repr(new.inputs) == repr(old.inputs), name
        if isinstance(getattr(original, 'cmdline', None), property):
            assert _cmdline_outcome(new) == _cmdline_outcome(old), name
        # the same words; lines wrap differently where the phrase was added
        help_old = ' '.join(original.help(returnhelp=True).split())
        help_new = ' '.join(aware.help(returnhelp=True).split())
        assert help_new.replace(IMAGE_PHRASE, '') == help_old, name
        assert IMAGE_PHRASE in help_new, name  # says which inputs take an image
    assert wrapped > 700
    capsys.readouterr()


def test_input_order_decides_which_missing_input_is_reported():
    from nipype_nibtrack.interfaces import ants as nt_ants

    for klass in (ants.ImageMath, nt_ants.ImageMath):
        with pytest.raises(ValueError, match="requires a value for input 'operation'"):
            klass().cmdline  # noqa: B018
    assert (
        list(nt_ants.ImageMath().inputs.trait_get())[:4]
        == list(ants.ImageMath().inputs.trait_get())[:4]
    )


def test_a_default_given_as_metadata_is_kept():
    from nipype.interfaces.freesurfer.petsurfer import GTMSeg
    from nipype_nibtrack.interfaces.freesurfer.petsurfer import GTMSeg as AwareGTMSeg

    old, new = GTMSeg().inputs, AwareGTMSeg().inputs
    assert new.trait('subsegwm').default == old.trait('subsegwm').default
    assert new.trait('subsegwm').trait_type._metadata == old.trait('subsegwm').trait_type._metadata
    assert repr(new.trait_get()) == repr(old.trait_get())


def test_run_sets_relative_inputs_inside_cwd(tmp_path, monkeypatch):
    from nipype.interfaces import image

    from nipype_nibtrack.interfaces import image as nt_image

    results = {}
    for label, klass in (('original', image.Reorient), ('aware', nt_image.Reorient)):
        work = tmp_path / label
        work.mkdir()
        shutil.copy(nf.ANAT, work / 'x.nii')
        monkeypatch.chdir(tmp_path)  # not the folder holding x.nii
        result = klass().run(cwd=str(work), in_file='x.nii')
        results[label] = (result.inputs['in_file'], result.outputs.out_file)
        assert result.outputs.out_file == str(work / 'x_ras.nii')
    assert [os.path.basename(p) for p in results['aware']] == [
        os.path.basename(p) for p in results['original']
    ]
    # an image given to run() resolves as well, and the interface holds it again after
    iface = nt_image.Reorient()
    result = iface.run(cwd=str(tmp_path / 'aware'), in_file=nt.load(nf.ANAT))
    assert result.inputs['in_file'] == nf.ANAT and is_image(iface.inputs.in_file)


def test_an_interface_overriding_run_sees_its_inputs_as_nipype_sets_them(tmp_path, monkeypatch):
    """MRIsCALabel.run reads copy_inputs before nipype sets run()'s arguments."""
    from nipype.interfaces import freesurfer

    from nipype_nibtrack.interfaces import freesurfer as nt_freesurfer

    outcomes = {}
    for label, klass in (
        ('original', freesurfer.MRIsCALabel),
        ('aware', nt_freesurfer.MRIsCALabel),
    ):
        root = tmp_path / label
        (root / 'subjects').mkdir(parents=True)
        for name in ('lh.pial', 'im1.nii'):
            (root / name).write_text('x')
        monkeypatch.chdir(root)
        iface = klass(
            subject_id='test',
            hemisphere='lh',
            canonsurf='lh.pial',
            curv='lh.pial',
            sulc='lh.pial',
            smoothwm='lh.pial',
            classifier='im1.nii',
            subjects_dir=str(root / 'subjects'),
        )
        error = _outcome(lambda iface=iface: iface.run(copy_inputs=True))
        tree = sorted(str(p.relative_to(root)) for p in root.rglob('*'))
        outcomes[label] = (error.replace(str(root), '<root>'), tree)
    assert outcomes['aware'] == outcomes['original']
    assert 'subjects/test/label' in outcomes['original'][1]


def test_compound_file_inputs_take_images():
    from nipype.interfaces import spm

    from nipype_nibtrack.interfaces import ants as nt_ants
    from nipype_nibtrack.interfaces import spm as nt_spm

    img = nf.random_image(seed=30)
    # InputMultiObject(Either(File, List(File))): SPM's realignment
    realign = nt_spm.Realign(in_files=img)
    assert realign.inputs.in_files[0] is img
    realign.inputs.in_files = [[img, nf.ANAT], img]
    assert realign.inputs.in_files[0][0] is img
    with pytest.raises(TraitError, match='pathlike'):
        spm.Realign(in_files=img)  # nipype's own class refuses it
    # Either(File, Float)
    multiply = nt_ants.MultiplyImages(
        dimension=3, first_input=nf.ANAT, second_input=img, output_product_image='o.nii.gz'
    )
    stored = multiply.cmdline.split()[3]
    assert stored.startswith(str(nf.store_root())) and nib.load(stored).shape == img.shape
    assert multiply.inputs.second_input is img
    multiply.inputs.second_input = 2.0
    assert multiply.cmdline.split()[3] == '2.0'
    # the same refusals as nipype for values that are neither
    for klass in (ants.MultiplyImages, nt_ants.MultiplyImages):
        with pytest.raises(TraitError):
            klass(second_input=[1, 2])


def test_tuple_and_union_of_files_take_images(tmp_path):
    from nipype.interfaces.base import Tuple

    class PairInputSpec(CommandLineInputSpec):
        pair = Tuple(File(exists=True), File(exists=True), argstr='%s %s')
        either = traits.Union(File(exists=True), traits.Int, argstr='-e %s')
        named = traits.Dict(traits.Str, File(exists=True))

    class Pair(CommandLine):
        _cmd = 'true'
        input_spec = PairInputSpec

    aware = nt.accept_images(Pair)
    img = nf.random_image(seed=31)
    iface = aware(pair=(img, nf.ANAT), either=img, named={'a': img})
    cmd = iface.cmdline.split()
    either, first, second = cmd[cmd.index('-e') + 1], cmd[-2], cmd[-1]
    assert first.startswith(str(nf.store_root())) and second == nf.ANAT
    assert either == first  # the same image, the same store file
    assert iface.inputs.pair[0] is img and iface.inputs.named['a'] is img
    iface.inputs.either = 3
    assert '-e 3' in iface.cmdline
    for klass in (Pair, aware):
        with pytest.raises(TraitError):
            klass(pair=(nf.ANAT,))


def _two_node_workflow(package, base_dir):
    wf = pe.Workflow('wf', base_dir=str(base_dir))
    bet = pe.Node(package.BET(in_file=nf.ANAT, frac=0.3), name='bet')
    flirt = pe.Node(package.FLIRT(reference=nf.ANAT, dof=6), name='flirt')
    wf.connect(bet, 'out_file', flirt, 'in_file')
    return wf


def test_export_writes_a_script_that_runs(tmp_path):
    from nipype_nibtrack.interfaces import fsl as nt_fsl

    scripts = {}
    for label, package in (('original', fsl), ('aware', nt_fsl)):
        wf = _two_node_workflow(package, tmp_path / label)
        path = tmp_path / f'{label}.py'
        wf.export(str(path))
        scripts[label] = path.read_text()
    assert 'from nipype_nibtrack.interfaces.fsl.preprocess import BET' in scripts['aware']
    assert scripts['aware'].replace('nipype_nibtrack.interfaces', 'nipype.interfaces') == scripts[
        'original'
    ].replace(str(tmp_path / 'original'), str(tmp_path / 'aware'))
    proc = nf.run_python(
        """
        import runpy, sys
        space = runpy.run_path(sys.argv[1])
        bet = space['wf'].get_node('wf_bet')
        print(type(bet.interface).__module__, bet.inputs.frac)
        """,
        str(tmp_path / 'aware.py'),
    )
    assert proc.stdout.split()[-2:] == ['nipype_nibtrack.interfaces.fsl.preprocess', '0.3']


def test_package_labels_in_logs_and_graphs_are_nipypes(tmp_path):
    from nipype.pipeline.engine.utils import _write_detailed_dot, get_print_name

    from nipype_nibtrack.interfaces import fsl as nt_fsl

    dots = {}
    for label, package in (('original', fsl), ('aware', nt_fsl)):
        wf = _two_node_workflow(package, tmp_path)
        names = [get_print_name(n, simple_form=False) for n in wf._graph.nodes()]
        assert sorted(names) == ['wf.bet.BET.fsl', 'wf.flirt.FLIRT.fsl'], label
        dot = tmp_path / f'{label}.dot'
        _write_detailed_dot(wf._create_flat_graph(), str(dot))
        dots[label] = dot.read_text()
    assert dots['aware'] == dots['original']


def test_crash_file_of_a_wrapped_interface_loads_in_a_fresh_interpreter(tmp_path):
    from nipype_nibtrack.interfaces import fsl as nt_fsl

    node = pe.Node(nt_fsl.BET(in_file=nt.load(nf.ANAT)), name='bet', base_dir=str(tmp_path))
    crashfile = nf.crash_file(node, tmp_path)
    proc = nf.run_python(
        """
        import sys
        from nipype.utils.filemanip import loadpkl
        node = loadpkl(sys.argv[1])['node']
        print(type(node.interface).__module__, node.inputs.in_file)
        """,
        str(crashfile),
    )
    module, in_file = proc.stdout.split()[-2:]
    assert module == 'nipype_nibtrack.interfaces.fsl.preprocess'
    assert os.path.basename(in_file) == 'anatomical.nii'  # a path, as nipype left it


def test_nipype_suite_plugin_runs_wrapped_classes_without_recursion(tmp_path):
    """The plugin's rebinding: FILMGLS and JointFusion call super(TheirName, self)."""
    import nipype

    nipype_dir = Path(nipype.__file__).parent
    repo = Path(__file__).resolve().parent.parent
    code = """
        import sys, pytest
        sys.exit(pytest.main(sys.argv[1:]))
    """
    args = [
        '-c',
        str(nipype_dir / 'pytest.ini'),
        '-q',
        '-p',
        'no:cacheprovider',
        '-p',
        'tests.nipype_suite.plugin',
        str(nipype_dir / 'interfaces/fsl/model.py'),
        str(nipype_dir / 'interfaces/ants/segmentation.py'),
        str(nipype_dir / 'interfaces/fsl/tests/test_FILMGLS.py'),
        str(nipype_dir / 'interfaces/ants/tests/test_auto_JointFusion.py'),
    ]
    env = nf.subprocess_env(FSLOUTPUTTYPE='NIFTI_GZ', TMPDIR=str(tmp_path))
    env['PYTHONPATH'] = os.pathsep.join([str(repo), env['PYTHONPATH']])
    proc = nf.run_python(code, *args, env=env, check=False, cwd=str(repo))
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert ' passed' in summary and 'failed' not in summary
    # the doctests of the replaced classes were collected and ran
    assert int(summary.split(' passed')[0].split()[-1]) >= 20


class _WithMaskInputSpec(nt.accept_images(fsl.BET).input_spec):
    extra_mask = File(exists=True, argstr='-A2 %s', desc='a File input of our own')


class BETWithMask(nt.accept_images(fsl.BET)):
    """A user's subclass of a drop-in class, with a File input of its own."""

    input_spec = _WithMaskInputSpec


def test_a_subclass_of_a_drop_in_class_with_file_inputs_of_its_own():
    img = nf.random_image(seed=32)
    with pytest.raises(TraitError):
        BETWithMask(extra_mask=img)  # plain File: nipype's refusal
    aware = nt.accept_images(BETWithMask)
    assert aware is not BETWithMask and issubclass(aware, BETWithMask)
    assert nt.accept_images(aware) is aware
    iface = aware(in_file=nf.ANAT, extra_mask=img, out_file='brain.nii.gz')
    assert iface.inputs.extra_mask is img
    mask = iface.cmdline.split('-A2 ')[1].split()[0]
    assert mask.startswith(str(nf.store_root()))
    assert list(aware.input_spec.class_traits()) == list(_WithMaskInputSpec.class_traits())


def test_star_import_takes_the_same_names():
    space, nt_space = {}, {}
    exec('from nipype.interfaces.fsl import *', space)
    exec('from nipype_nibtrack.interfaces.fsl import *', nt_space)
    assert set(nt_space) == set(space)
    assert nt_space['BET'] is nt.accept_images(fsl.BET) and nt_space['Info'] is fsl.Info


MAIN_SCRIPT = """
import sys, tempfile
import numpy as np, nibabel as nib
import nipype_nibtrack as nt
from nipype import Node, Workflow
from nipype.interfaces.base import BaseInterface, BaseInterfaceInputSpec, File, TraitedSpec
from nipype.interfaces.base import traits


class SumInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)


class SumOutputSpec(TraitedSpec):
    total = traits.Float()


class VoxelSum(BaseInterface):
    input_spec = SumInputSpec
    output_spec = SumOutputSpec

    def _run_interface(self, runtime):
        self._total = float(np.asanyarray(nib.load(self.inputs.in_file).dataobj).sum())
        return runtime

    def _list_outputs(self):
        return {'total': self._total}


if __name__ == '__main__':
    img = nib.Nifti1Image(np.ones((4, 4, 4), 'f4'), np.eye(4))
    wf = Workflow('m', base_dir=sys.argv[1])
    wf.add_nodes([Node(nt.accept_images(VoxelSum)(in_file=img), name='vsum')])
    args = {'n_procs': 2, 'mp_context': 'spawn'}
    (done,) = wf.run(plugin='MultiProc', plugin_args=args).nodes()
    print(type(done.interface).__module__, done.result.outputs.total)
"""


@pytest.mark.slow
def test_a_class_defined_in_a_script_runs_in_spawned_workers(tmp_path):
    script = tmp_path / 'pipeline.py'
    script.write_text(MAIN_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=nf.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ['nipype_nibtrack.nipype.accepted.__main__', '64.0']


def test_an_input_given_to_run_keeps_its_value_afterwards(tmp_path):
    """nipype's run(**inputs) sets them for good: the image set before does not come back."""
    from nipype.interfaces import image

    from nipype_nibtrack.interfaces import image as nt_image

    shutil.copy(nf.ANAT, tmp_path / 'x.nii')
    img = nt.load(nf.ANAT)
    for klass in (image.Reorient, nt_image.Reorient):
        iface = klass(in_file=nf.ANAT)
        iface.run(cwd=str(tmp_path), in_file='x.nii')
        assert iface.inputs.in_file == 'x.nii', klass
    aware = nt_image.Reorient(in_file=img)
    aware.run(cwd=str(tmp_path), in_file='x.nii')
    assert aware.inputs.in_file == 'x.nii'
    aware.inputs.in_file = img
    aware.run(cwd=str(tmp_path))
    assert aware.inputs.in_file is img  # untouched by run: the image again
