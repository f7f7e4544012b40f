"""The optional compiled kernel; everything else is declared in pyproject.toml.

``della_cli.methods._weighted_sum`` makes task arithmetic and linear merges a single pass over
the inputs. It is optional: where it cannot be built (no C compiler), the install still
succeeds and those methods run in numpy, producing the same bytes, only slower.
"""

import sys

from setuptools import Extension, setup

# No floating-point contraction (an FMA rounds once where the reference rounds twice) and no
# fast-math: the kernel must give the torch reference's bytes.
if sys.platform == "win32":
    FLAGS = ["/O2", "/fp:precise"]
else:
    FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math"]

setup(
    ext_modules=[
        Extension(
            "della_cli.methods._weighted_sum",
            ["della_cli/methods/_weighted_sum.c"],
            extra_compile_args=FLAGS,
            optional=True,
        )
    ]
)
