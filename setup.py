"""Build the optional C kernel; every other piece of metadata is in setup.cfg.

``nipype_nibtrack._gather`` (a blocked strided copy into Fortran order) makes digests
and dirty writes of C-ordered arrays about ten times faster. It is optional: without a
C compiler the install still succeeds and ``digest.f_blocks`` falls back to numpy.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            'nipype_nibtrack._gather',
            ['nipype_nibtrack/_gather.c'],
            extra_compile_args=['-O3'],
            optional=True,
        )
    ]
)
