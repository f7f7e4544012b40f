"""The optional compiled kernels; everything else is declared in pyproject.toml.

``della_cli.backends.cpu._weighted_sum`` makes task arithmetic and linear merges a single pass over
the inputs, and ``della_cli.io._streamed_sum`` feeds it pieces read straight from the input
files. Both are optional: where they cannot be built (no C compiler), the install still
succeeds and those methods run in the numba kernels, producing the same bytes, only slower.
"""

import sys

from setuptools import Extension, setup

# No floating-point contraction (an FMA rounds once where the reference rounds twice) and no
# fast-math: the kernel must give the torch reference's bytes.
if sys.platform == "win32":
    FLAGS = ["/O2", "/fp:precise"]
else:
    FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math"]

# The kernel's math is in one header, shared by both extensions (so their bytes cannot differ).
KERNEL = [
    "della_cli/backends/cpu/weighted_sum_kernel.h",
    "della_cli/backends/cpu/weighted_sum_call.h",
]
EXTENSIONS = [
    Extension(
        "della_cli.backends.cpu._weighted_sum",
        ["della_cli/backends/cpu/_weighted_sum.c"],
        depends=KERNEL,
        extra_compile_args=FLAGS,
        optional=True,
    )
]
if sys.platform != "win32":  # positioned reads (pread) are POSIX
    EXTENSIONS.append(
        Extension(
            "della_cli.io._streamed_sum",
            ["della_cli/io/_streamed_sum.c"],
            include_dirs=["della_cli/backends/cpu"],
            depends=KERNEL,
            extra_compile_args=FLAGS,
            optional=True,
        )
    )

setup(ext_modules=EXTENSIONS)
