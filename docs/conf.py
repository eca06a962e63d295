"""Sphinx configuration: warnings are errors (scripts/test.sh builds with -W)."""

import datetime
import os
import sys

sys.path.insert(0, os.path.abspath('..'))

project = 'nipype_nibtrack'
author = 'nipype_nibtrack developers'
copyright = f'{datetime.date.today().year}, {author}'
extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.intersphinx',
    'sphinx.ext.viewcode',
    'numpydoc',
]
numpydoc_show_class_members = False
numpydoc_xref_param_type = False
numpydoc_validation_checks = set()
autodoc_typehints = 'none'
nitpicky = False
exclude_patterns = ['_build']
html_theme = 'alabaster'
html_static_path = ['_static']
html_css_files = ['custom.css']
html_theme_options = {
    'description': 'nibabel images straight into nipype',
    'page_width': '1180px',
    'code_font_size': '0.8em',
}
intersphinx_mapping = {}
