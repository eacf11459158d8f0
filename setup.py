"""Packaging that pyproject.toml cannot say on its own: ship the eBPF sources inside the package.

The one copy of the kernel program lives at the top level, in ``bpf/`` (the
project's layout, and what a checkout compiles).  A wheel carries the same two
files as package data of ``pyflow.bpf``, i.e. ``site-packages/pyflow/bpf/``,
where ``pyflow.kernel.abi.find_bpf_dir`` finds them when no checkout is around.
Everything else (name, version, dependencies, the ``pyflow`` command) is in
pyproject.toml; tests/unit/test_packaging.py builds, installs and checks the result.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["pyflow", "pyflow.*"]), "pyflow.bpf"],
    package_dir={"pyflow.bpf": "bpf"},
    package_data={"pyflow.bpf": ["flowmeter.c", "flowmeter.h"]},
)
