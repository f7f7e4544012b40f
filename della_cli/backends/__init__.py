"""The two backends that run the merge math (docs/BACKENDS.md).

- ``torch_backend``: the reference, the functions of ``methods`` on any torch device (CUDA,
  and the CPU where the CPU backend does not apply);
- ``cpu``: numba kernels and a C weighted-sum kernel on the inputs as stored, giving the
  reference's bytes.

The plan says which one runs each tensor job (``della_cli.kernels``).
"""
