"""Many arrays into one numba kernel, as their addresses (``block``, ``weighted_sum``).

numba compiles a function once per type of its arguments, and a tuple's type includes its
length and each element's type: a tuple of expert arrays made every expert count, and every mix
of dtypes, a compilation of its own (13 s here for the block kernel). Stacking the experts into
one array would copy them. So a kernel takes the experts' addresses as one uint64 array and
sees each as an array again (``numba.carray(pointer_like(address, like), shape)``); the caller
keeps the arrays alive for the call, which only reads them.
"""

from __future__ import annotations

import numpy as np

try:
    from numba.core import types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    intrinsic = None


def addresses(arrays: list[np.ndarray]) -> np.ndarray:
    """Where each array's data starts, as the kernels take them."""
    return np.array([array.ctypes.data for array in arrays], dtype=np.uint64)


if intrinsic is not None:

    @intrinsic
    def pointer_like(typingctx, address, like):
        """The integer ``address`` as a pointer to elements of ``like``'s dtype."""
        pointer = types.CPointer(like.dtype)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(pointer))

        return pointer(address, like), codegen
