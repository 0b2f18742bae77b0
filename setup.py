"""Build the optional C kernel of the snapshot delta codec (``asyncrl/sync/_xorkernel.c``).

Everything else is in pyproject.toml. The extension is optional: without a C compiler the
install still succeeds and ``asyncrl.sync.snapshot`` uses its numpy path, which reads and
writes the same bytes, ~3x slower per delta (see benchmarks/hotload_latency.py)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "asyncrl.sync._xorkernel",
            ["asyncrl/sync/_xorkernel.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
