"""The compiled data plane (gateway/fastloop.pyx), built by Cython 3 whenever the package is installed.

Everything else is in pyproject.toml. The build needs gcc, the Python headers and OpenSSL's (libssl-dev
on Debian: the record's SHA-256 is OpenSSL's); scripts/setup.sh installs them.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

fastloop = Extension(
    "gateway.fastloop", ["gateway/fastloop.pyx"], include_dirs=["gateway"], libraries=["crypto"]
)
setup(ext_modules=cythonize([fastloop], compiler_directives={"language_level": "3"}))
