"""accept_images: run-time resolution, formats, output names, real tools, bad input."""

import os
import pickle
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces import ants, elastix, fsl, mrtrix3
from nipype.interfaces.base import (
    BaseInterface,
    BaseInterfaceInputSpec,
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

sys.path.insert(0, os.path.dirname(__file__))
import nipype_fixtures as nf

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


class VoxelSumInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc='image')


class VoxelSumOutputSpec(TraitedSpec):
    total = traits.Float()
    seen = traits.Str(desc='what the interface body received')


class VoxelSum(BaseInterface):
    """A BaseInterface written in Python."""

    input_spec = VoxelSumInputSpec
    output_spec = VoxelSumOutputSpec

    def _run_interface(self, runtime):
        self._seen = self.inputs.in_file
        self._total = float(np.asanyarray(nib.load(self.inputs.in_file).dataobj).sum())
        return runtime

    def _list_outputs(self):
        return {'total': self._total, 'seen': self._seen}


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
    assert FLIRT.__module__ == 'nipype_nibtrack.nipype.accept'
    assert getattr(nt_interfaces, FLIRT.__qualname__) is FLIRT
    assert FLIRT.input_spec.__qualname__ == f'{FLIRT.__qualname__}.input_spec'
    assert FLIRT.output_spec is fsl.FLIRT.output_spec


def test_accept_images_refuses_non_interfaces():
    for bad in (fsl.FLIRT(), 'FLIRT', int):
        with pytest.raises(TypeError, match='nipype interface class'):
            nt.accept_images(bad)
    with pytest.raises(AttributeError):
        nt_interfaces.no_such_thing  # noqa: B018


def test_aware_class_and_instance_pickle_in_a_fresh_interpreter(tmp_path):
    flirt = FLIRT(in_file=nf.ANAT, reference=nf.ANAT, dof=6)
    payload = tmp_path / 'flirt.pkl'
    payload.write_bytes(pickle.dumps((FLIRT, flirt, nt.accept_images(nf.Scale))))
    proc = nf.run_python(
        """
        import pickle, sys
        klass, flirt, scale = pickle.load(open(sys.argv[1], 'rb'))
        import nipype_nibtrack.nipype.accept as m
        assert klass.__module__ == 'nipype_nibtrack.nipype.accept', klass
        assert type(flirt) is klass and flirt.inputs.dof == 6
        assert scale.__name__ == 'Scale'
        print(klass.__qualname__, flirt.cmdline.split()[0])
        """,
        str(payload),
    )
    assert proc.stdout.split() == [FLIRT.__qualname__, 'flirt']


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
