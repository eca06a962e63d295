#!/usr/bin/env python
"""Realign a functional series held in memory, check the motion found, rerun what changed.

The main job as users run it, end to end (the README's first command):

1. a functional series is made in memory from the brain nilearn ships, with a known
   rigid head motion per volume and a known offset from the anatomical image
   (``simulate.py``); every volume is an in-memory (dirty) image;
2. a MapNode registers every volume to the reference volume (volume 0): elastix
   rigid, or FSL FLIRT when FSL is installed; same workflow code;
3. a Function node averages the realigned series in Python and returns an image
   object, handed straight to the next node;
4. the mean is registered to the anatomical image, which is clean and goes to the tool
   by its own path;
5. the estimated motion is compared with the truth (``motion.py``), and two pictures
   are drawn: the motion traces and the mean functional over the anatomical image,
   before and after (``pictures.py``).

Run again, nothing runs and no file is written. With ``--perturb K`` one voxel of
volume K changes in memory before the last run: only volume K's registration and the
nodes that depend on it run again.

Usage::

    python workflows/realign.py [--tool auto|flirt|elastix]
        [--plugin Linear|MultiProc|SLURM|SLURMGraph] [--base-dir DIR] [--runs N]
        [--volumes N] [--perturb K] [--summary FILE]
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nipype import Function, MapNode, Node, Workflow

import nipype_nibtrack as nt
from nipype_nibtrack.interfaces import elastix, fsl  # nipype's, taking images too

try:
    import motion
    import simulate
except ImportError:  # imported as workflows.realign
    from . import motion, simulate

HERE = Path(__file__).resolve().parent
REALIGN_PARAMETERS = HERE / 'elastix_realign.txt'
COREGISTER_PARAMETERS = HERE / 'elastix_rigid.txt'
TOOLS = ('auto', 'flirt', 'elastix')
PLUGINS = ('Linear', 'MultiProc', 'SLURM', 'SLURMGraph')
#: The largest accepted motion error of any volume
TOLERANCE_MM = 0.3
TOLERANCE_DEG = 0.3
# Function nodes run their source in a bare namespace, in a worker too (SLURM jobs are
# fresh interpreters): this statement lets them import the modules beside this file.
_IMPORTS = ['import sys', f'sys.path[:0] = [] if {str(HERE)!r} in sys.path else [{str(HERE)!r}]']


@dataclass(frozen=True)
class Tool:
    """A registration tool: its input and output names in nipype."""

    name: str
    moving: str
    fixed: str
    warped: str
    transform: str


ELASTIX = Tool('elastix', 'moving_image', 'fixed_image', 'warped_file', 'transform')
FLIRT = Tool('flirt', 'in_file', 'reference', 'out_file', 'out_matrix_file')


def pick_tool(tool: str = 'auto') -> str:
    """``flirt`` when FSL's ``flirt`` is on the PATH (for ``auto``), else ``elastix``."""
    if tool not in TOOLS:
        raise ValueError(f'tool must be one of {TOOLS}, not {tool!r}')
    if tool == 'auto':
        return 'flirt' if shutil.which('flirt') else 'elastix'
    return tool


def registration(tool: str, step: str) -> tuple[Any, Tool]:
    """The image-aware interface for ``step`` (``realign`` or ``coregister``) of ``tool``.

    Tool output goes to files in the node folder (``terminal_output='file_split'``:
    ``stdout.nipype`` and ``stderr.nipype``), never to the terminal.

    >>> interface, names = registration('flirt', 'coregister')
    >>> interface.inputs.cost, names.moving, interface.terminal_output
    ('mutualinfo', 'in_file', 'file_split')
    """
    if step not in ('realign', 'coregister'):
        raise ValueError(f'step must be realign or coregister, not {step!r}')
    if tool == 'flirt':
        cost = 'normcorr' if step == 'realign' else 'mutualinfo'
        interface = fsl.FLIRT(dof=6, cost=cost, output_type='NIFTI', terminal_output='file_split')
        return interface, FLIRT
    if tool != 'elastix':
        raise ValueError(f'tool must be elastix or flirt, not {tool!r}')
    parameters = REALIGN_PARAMETERS if step == 'realign' else COREGISTER_PARAMETERS
    interface = elastix.Registration(
        parameters=[str(parameters)],
        num_threads=1 if step == 'realign' else 2,
        terminal_output='file_split',
    )
    return interface, ELASTIX


# --- Function nodes: each runs as source in a bare namespace (see _IMPORTS) -------------


def mean_image(in_files):
    """The mean of the realigned volumes, computed in Python, returned as an image."""
    import nibabel as nib
    import numpy as np

    import nipype_nibtrack  # noqa: F401  (a fresh worker pickles the image as a reference)

    first = nib.load(in_files[0])
    total = np.zeros(first.shape, dtype=np.float64)
    for path in in_files:
        total += np.asanyarray(nib.load(path).dataobj, dtype=np.float64)
    return nib.Nifti1Image((total / len(in_files)).astype(np.float32), first.affine)


def motion_parameters(transforms, tool, reference, centre):
    """Each volume's estimated motion, six parameters in ``motion.CONVENTION``."""
    import motion

    return [
        motion.parameters(motion.read_transform(tool, t, reference, reference), centre).tolist()
        for t in transforms
    ]


def motion_picture(estimated, truth, tool):
    """The PNG of the motion traces, estimated against true."""
    import os

    import pictures

    return pictures.motion_png(estimated, truth, os.path.abspath('motion.png'), tool)


def coregistration_picture(mean, anatomical, transform, tool):
    """The PNG of the mean functional on the anatomical image, before and after."""
    import os

    import motion
    import nibabel as nib
    import pictures

    to_functional = motion.read_transform(tool, transform, nib.load(anatomical), mean)
    out = os.path.abspath('coregistration.png')
    return pictures.coregistration_png(mean, anatomical, to_functional, out, tool)


def _function(function: Any, inputs: list[str], output: str) -> Function:
    return Function(inputs, [output], function, imports=_IMPORTS)


def build_workflow(
    series: simulate.Series,
    anatomical: Any,
    *,
    tool: str = 'auto',
    base_dir: str | os.PathLike | None = None,
    name: str = 'realign',
) -> Workflow:
    """The realignment workflow for an in-memory ``series`` and an ``anatomical`` image.

    Examples
    --------
    >>> series = simulate.functional_series(2)
    >>> wf = build_workflow(series, simulate.anatomical_path(), tool='flirt')
    >>> sorted(n.name for n in wf._graph.nodes())  # doctest: +NORMALIZE_WHITESPACE
    ['coregister', 'coregistration_picture', 'mean', 'motion', 'motion_picture',
     'realign']
    """
    tool = pick_tool(tool)
    interface, names = registration(tool, 'realign')
    realign = MapNode(interface, iterfield=[names.moving], name='realign')
    setattr(realign.inputs, names.moving, list(series.volumes))
    setattr(realign.inputs, names.fixed, series.volumes[0])

    mean = Node(_function(mean_image, ['in_files'], 'mean'), name='mean')
    interface, names = registration(tool, 'coregister')
    coregister = Node(interface, name='coregister')
    setattr(coregister.inputs, names.fixed, anatomical)

    estimates = Node(
        _function(motion_parameters, ['transforms', 'tool', 'reference', 'centre'], 'parameters'),
        name='motion',
    )
    estimates.inputs.tool = tool
    estimates.inputs.reference = series.volumes[0]
    estimates.inputs.centre = series.centre.tolist()
    traces = Node(
        _function(motion_picture, ['estimated', 'truth', 'tool'], 'picture'),
        name='motion_picture',
    )
    traces.inputs.truth = series.trace.tolist()
    traces.inputs.tool = tool
    overlay = Node(
        _function(coregistration_picture, ['mean', 'anatomical', 'transform', 'tool'], 'picture'),
        name='coregistration_picture',
    )
    overlay.inputs.anatomical = str(
        anatomical.get_filename() if hasattr(anatomical, 'get_filename') else anatomical
    )
    overlay.inputs.tool = tool

    workflow = Workflow(name=name, base_dir=str(base_dir) if base_dir else None)
    # keep every file a tool wrote (its log included) where the user can read it, and
    # write no report files: a cached run must write nothing at all
    workflow.config['execution'] = {
        'create_report': 'false',
        'remove_unnecessary_outputs': 'false',
    }
    workflow.connect(
        [
            (realign, mean, [(names.warped, 'in_files')]),
            (realign, estimates, [(names.transform, 'transforms')]),
            (mean, coregister, [('mean', names.moving)]),
            (estimates, traces, [('parameters', 'estimated')]),
            (mean, overlay, [('mean', 'mean')]),
            (coregister, overlay, [(names.transform, 'transform')]),
        ]
    )
    return workflow


def plugin_args(plugin: str) -> dict:
    """Arguments for nipype's plugins; SLURM jobs go to the ``debug`` partition."""
    if plugin.startswith('SLURM'):
        # nipype's SLURM plugin names jobs after $LOGNAME, unset in many batch shells
        os.environ.setdefault('LOGNAME', getpass.getuser())
        args = {'sbatch_args': os.environ.get('NIBTRACK_SBATCH_ARGS', '-p debug -t 10')}
        if plugin == 'SLURMGraph':
            args['dont_resubmit_completed_jobs'] = True
        return args
    if plugin == 'MultiProc':
        return {'n_procs': os.cpu_count() or 1}
    return {}


def poll_seconds(plugin: str) -> float:
    """How often nipype's scheduler looks for finished jobs: its 2 s default would
    make a cached MultiProc run last seconds; a batch system is not polled faster."""
    return 2.0 if plugin.startswith('SLURM') else 0.02


def quiet_nipype() -> None:
    """Keep nipype's own log lines off the terminal: warnings and errors only."""
    from nipype import config, logging

    level = 'WARNING'
    config.update_config(
        {'logging': {'workflow_level': level, 'interface_level': level, 'utils_level': level}}
    )
    logging.update_logging(config)


def _files(*roots: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (st.st_mtime_ns, st.st_size)
        for root in roots
        if root.exists()
        for p in root.rglob('*')
        if (st := p.lstat()) and p.is_file()
    }


def _volume(node_dir: str) -> int | None:
    """The volume index of a realign sub-node's folder (``.../mapflow/_realign3``)."""
    name = Path(node_dir).name
    if Path(node_dir).parent.name == 'mapflow' and name.startswith('_realign'):
        return int(name[len('_realign') :])
    return None


class Progress:
    """One line per node as it finishes, ran (with its time) or found cached.

    Used as nipype's ``status_callback``; for graph plugins, which take no callback,
    :meth:`finish` prints the same lines after the run.
    """

    def __init__(self, root: Path, echo: bool = True):
        self.root = root
        self.echo = echo
        self.before = {p: s for p, s in _files(root).items() if '/result_' in p}
        self.started = time.perf_counter()
        self.reported: dict[str, tuple[str, float | None]] = {}

    def __reduce__(self) -> tuple:
        # nipype pickles a MapNode's plugin arguments, this callback included, into
        # its batch job; there it has nothing to print to: it unpickles as None
        return type(None), ()

    def __call__(self, node: Any, status: str) -> None:
        if status in ('end', 'exception'):
            # a MapNode run in one piece (Linear) reports its volumes first
            for sub in sorted(Path(node.output_dir()).glob('mapflow/_*'), key=_natural):
                self.report(str(sub), f'{node.fullname}.{sub.name}')
            self.report(node.output_dir(), node.fullname, failed=status == 'exception')

    def report(self, node_dir: str, name: str, failed: bool = False) -> None:
        if node_dir in self.reported:
            return
        results = list(Path(node_dir).glob('result_*.pklz'))
        ran = failed or not results
        ran = ran or any(self.before.get(str(r)) != _stat(r) for r in results)
        seconds = _duration(results[0]) if ran and results else None
        state = 'failed' if failed else 'ran' if ran else 'cached'
        self.reported[node_dir] = (state, seconds)
        if self.echo:
            volume = _volume(node_dir)
            label = f'register volume {volume}' if volume is not None else name.split('.')[-1]
            took = f'{seconds:6.1f} s' if seconds is not None else ''
            clock = time.perf_counter() - self.started
            print(f'  [{clock:5.1f} s] {label:<24} {state:<7}{took}', flush=True)

    def finish(self, graph: Any) -> None:
        for node in graph.nodes():
            for sub in sorted(Path(node.output_dir()).glob('mapflow/_*'), key=_natural):
                self.report(str(sub), f'{node.fullname}.{sub.name}')
            self.report(node.output_dir(), node.fullname)


def _natural(path: Path) -> tuple:
    volume = _volume(str(path))
    return (volume if volume is not None else -1, path.name)


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def _duration(result_file: Path) -> float | None:
    from nipype.utils.filemanip import loadpkl

    runtime = getattr(loadpkl(result_file), 'runtime', None)
    return getattr(runtime, 'duration', None)


def wait_for_batch_jobs(graph: Any, timeout: float = 3600.0) -> None:
    """Wait until every node of ``graph`` has a result, or no job of ours is queued.

    Graph plugins (``SLURMGraph``) submit every job with its dependencies and return.
    """
    deadline = time.monotonic() + timeout
    user = getpass.getuser()
    while not all(list(Path(n.output_dir()).glob('result_*.pklz')) for n in graph.nodes()):
        queue = subprocess.run(['squeue', '-h', '-u', user], capture_output=True, text=True)
        if queue.returncode == 0 and not queue.stdout.strip():
            return  # nothing left to run: a node whose job failed has no result
        if time.monotonic() > deadline:
            raise TimeoutError(f'batch jobs still running after {timeout:.0f} s')
        time.sleep(1.0)


def run(workflow: Workflow, plugin: str = 'Linear', echo: bool = False) -> dict:
    """Run ``workflow`` once; what ran, what was cached, what was written, and its graph."""
    root = Path(workflow.base_dir) / workflow.name
    store = nt.get_store()
    files_before = _files(root, Path(store.root))
    store_before = store.info().files
    progress = Progress(root, echo=echo)
    args = plugin_args(plugin)
    if not plugin.endswith('Graph'):
        args['status_callback'] = progress
    workflow.config['execution']['poll_sleep_duration'] = str(poll_seconds(plugin))
    start = time.perf_counter()
    graph = workflow.run(plugin=plugin, plugin_args=args)
    if plugin.endswith('Graph'):
        wait_for_batch_jobs(graph)
    seconds = time.perf_counter() - start
    progress.finish(graph)
    files_after = _files(root, Path(store.root))
    states = progress.reported
    return {
        'seconds': seconds,
        'volumes_registered': sorted(
            v for d, (s, _) in states.items() if (v := _volume(d)) is not None and s == 'ran'
        ),
        'nodes_run': sum(s == 'ran' for s, _ in states.values()),
        'nodes_cached': sum(s == 'cached' for s, _ in states.values()),
        'store_files_written': store.info().files - store_before,
        'files_written': sorted(p for p, s in files_after.items() if files_before.get(p) != s),
        'progress': states,
        'graph': graph,
    }


def node_result(graph: Any, name: str) -> Any:
    """The result of the node called ``name`` in an executed graph."""
    (node,) = [n for n in graph.nodes() if n.name == name]
    return node.result


@dataclass(frozen=True)
class Findings:
    """The motion found per volume against the truth, and the coregistration's error."""

    estimated: np.ndarray
    errors: np.ndarray  # (volumes, 2): mm, degrees
    coregistration_error: tuple[float, float]
    pictures: list[str]

    @property
    def max_mm(self) -> float:
        return float(self.errors[:, 0].max())

    @property
    def max_deg(self) -> float:
        return float(self.errors[:, 1].max())

    @property
    def ok(self) -> bool:
        return self.max_mm <= TOLERANCE_MM and self.max_deg <= TOLERANCE_DEG


def findings(graph: Any, series: simulate.Series, tool: str, anatomical: Any) -> Findings:
    """Compare what the workflow found with the truth ``series`` was made with."""
    estimated = np.array(node_result(graph, 'motion').outputs.parameters)
    errors = np.array(
        [
            motion.residual(motion.rigid(p, series.centre), true, series.brain)
            for p, true in zip(estimated, series.motion, strict=True)
        ]
    )
    coregister = node_result(graph, 'coregister')
    mean = node_result(graph, 'mean').outputs.mean
    transform = getattr(coregister.outputs, (ELASTIX if tool == 'elastix' else FLIRT).transform)
    found = motion.read_transform(tool, transform, anatomical, mean)
    # the registration maps anatomical points to functional ones: the offset's inverse
    coregistration = motion.residual(
        found, np.linalg.inv(series.offset), series.brain @ series.offset[:3, :3].T
    )
    pictures = [
        node_result(graph, name).outputs.picture
        for name in ('motion_picture', 'coregistration_picture')
    ]
    return Findings(estimated, errors, coregistration, pictures)


def table(found: Findings, series: simulate.Series) -> str:
    """The motion per volume, estimated and true, and its error."""
    names = ' '.join(f'{n:>6}' for n in ('tx', 'ty', 'tz', 'rx', 'ry', 'rz'))
    lines = [
        f'motion per volume: {motion.CONVENTION}',
        f'      | {"estimated":^41} | {"true":^41} |      error',
        f'  vol | {names} | {names} |       mm    deg',
    ]
    for v, (est, true, (mm, deg)) in enumerate(
        zip(found.estimated, series.trace, found.errors, strict=True)
    ):
        e, t = (' '.join(f'{x if abs(x) >= 0.005 else 0:6.2f}' for x in p) for p in (est, true))
        lines.append(f'  {v:3d} | {e} | {t} | {mm:8.3f} {deg:6.3f}')
    verdict = 'within' if found.ok else 'OUTSIDE'
    lines.append(
        f'largest error: {found.max_mm:.3f} mm, {found.max_deg:.3f} deg '
        f'({verdict} {TOLERANCE_MM} mm, {TOLERANCE_DEG} deg; the error is the largest '
        f'displacement of any brain voxel under inv(estimated) @ true)'
    )
    mm, deg = found.coregistration_error
    lines.append(f'mean functional to anatomical: {mm:.3f} mm, {deg:.3f} deg from the truth')
    return '\n'.join(lines)


def perturb_note(volume: int, registered: list[int], volumes: int) -> str:
    """What the run after ``--perturb`` shows, in one sentence.

    >>> perturb_note(5, [5], 8)[:50]
    '  only volume 5 changed, so only its registration '
    >>> perturb_note(5, [], 8)[:40]
    '  volume 5 with this change was already '
    """
    if registered == [volume]:
        return (
            f'  only volume {volume} changed, so only its registration and what depends on '
            f'it ran; the other {volumes - 1} stayed cached: the cache follows the content '
            'of images held in memory'
        )
    if not registered:
        return (
            f'  volume {volume} with this change was already in the cache (an earlier run '
            'saw the same content): nothing ran'
        )
    if volume == 0:
        return '  volume 0 is the reference volume: every registration depends on it'
    return f'  volumes registered again: {registered}'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--tool', choices=TOOLS, default='auto')
    parser.add_argument('--plugin', choices=PLUGINS, default='MultiProc')
    parser.add_argument('--base-dir', help='work directory (default: a new temporary one)')
    parser.add_argument('--runs', type=int, default=2, help='how many times to run (2)')
    parser.add_argument('--volumes', type=int, default=8, help='volumes in the series (8)')
    parser.add_argument(
        '--perturb',
        type=int,
        metavar='K',
        help='before the last run, change one voxel of volume K in memory',
    )
    parser.add_argument('--summary', metavar='FILE', help='write the runs as JSON to FILE')
    args = parser.parse_args(argv)
    if args.volumes < 2:
        parser.error(f'--volumes needs at least 2, not {args.volumes}')
    if args.perturb is not None and not 0 <= args.perturb < args.volumes:
        parser.error(f'--perturb K needs 0 <= K < {args.volumes} (--volumes), not {args.perturb}')
    if args.runs < 1:
        parser.error(f'--runs needs at least 1, not {args.runs}')

    tool = pick_tool(args.tool)
    if tool == 'elastix' and not shutil.which('elastix'):
        print(
            'elastix is not installed: run `sudo apt-get install elastix` (Debian/Ubuntu), '
            'or install FSL and use --tool flirt',
            file=sys.stderr,
        )
        return 1
    if tool == 'flirt' and not shutil.which('flirt'):
        print('FSL is not installed (no flirt on the PATH): use --tool elastix', file=sys.stderr)
        return 1
    quiet_nipype()
    base_dir = Path(args.base_dir or tempfile.mkdtemp(prefix='nibtrack-realign-')).absolute()
    series = simulate.functional_series(args.volumes)
    anatomical = nt.load(simulate.anatomical_path())
    print(f'tool: {tool}; plugin: {args.plugin}; work directory: {base_dir}')
    print(f'store: {nt.get_store().root}')
    print(
        f'functional: {len(series.volumes)} volumes of {series.volumes[0].shape}, in memory '
        f'({nt.dirty_reason(series.volumes[0])}: they go through the store)'
    )
    print(
        f'anatomical: {anatomical.get_filename()} '
        f'({nt.dirty_reason(anatomical) or "clean: it goes by its own path"})'
    )
    workflow = build_workflow(series, anatomical, tool=tool, base_dir=base_dir)
    runs = []
    for index in range(1, args.runs + 1):
        if args.perturb is not None and index == args.runs:
            volume = series.volumes[args.perturb]
            voxel = tuple(int(n) // 2 for n in volume.shape)
            np.asarray(volume.dataobj)[voxel] += 1.0
            print(f'perturb: voxel {voxel} of volume {args.perturb} + 1, in memory')
        print(f'run {index}:', flush=True)
        outcome = run(workflow, args.plugin, echo=True)
        runs.append(outcome)
        registered = ', '.join(map(str, outcome['volumes_registered'])) or 'none'
        print(
            f'run {index}: {outcome["seconds"]:.1f} s; nodes run {outcome["nodes_run"]}, '
            f'cached {outcome["nodes_cached"]}; volumes registered: {registered}; '
            f'files written: {len(outcome["files_written"])} '
            f'({outcome["store_files_written"]} images to the store)',
            flush=True,
        )
        if args.perturb is not None and index == args.runs:
            print(perturb_note(args.perturb, outcome['volumes_registered'], args.volumes))
    found = findings(runs[-1]['graph'], series, tool, anatomical)
    print(table(found, series))
    for picture in found.pictures:
        print(f'picture: {picture}')
    if args.summary:
        summary = {
            'runs': [
                {k: r[k] for k in ('seconds', 'volumes_registered', 'nodes_run', 'nodes_cached')}
                | {'store_files_written': r['store_files_written']}
                for r in runs
            ],
            'motion_error': {'max_mm': found.max_mm, 'max_deg': found.max_deg},
            'pictures': found.pictures,
        }
        Path(args.summary).write_text(json.dumps(summary, indent=2) + '\n')
        print(f'summary: {Path(args.summary).absolute()}')
    return 0 if found.ok else 2


if __name__ == '__main__':
    sys.exit(main())
