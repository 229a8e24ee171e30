"""Build script. Pure Python today; the C++/CUDA SVD extension (csrc/) hooks in here
with torch.utils.cpp_extension when it lands (see DESIGN.md section 4)."""

from setuptools import setup

setup()
