"""Pytest setup for the kernel tests.

Triton kernels run in the Triton interpreter unless the environment already
says otherwise (set ``TRITON_INTERPRET=0`` on a GPU machine to compile them).
The variable must be set before any ``@triton.jit`` decorator runs, that is
before the kernel modules are imported; conftest.py is imported first.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
