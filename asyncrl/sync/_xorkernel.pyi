"""Types of the optional C kernel (``_xorkernel.c``; its header comment says more). It takes
any contiguous buffer; asyncrl passes numpy arrays."""

import numpy as np

_Buf = np.ndarray | memoryview | bytes

SIMD: str
SLACK: int

def encode_f32_bf16(
    src: _Buf, prev: _Buf, owned: _Buf, gaps: _Buf, values: _Buf, cap: int, portable: bool = ...
) -> int: ...
def encode_copy16(
    src: _Buf, prev: _Buf, owned: _Buf, gaps: _Buf, values: _Buf, cap: int, portable: bool = ...
) -> int: ...
def sparse_planes16(gaps: _Buf, values: _Buf, count: int, out: _Buf) -> int: ...
def xor_scatter16(
    target: _Buf, planes: _Buf, count: int, width: int, source: _Buf = ...
) -> None: ...
def sparse_codes16(gaps: _Buf, values: _Buf, count: int, out: _Buf) -> tuple[int, int, int]: ...
def xor_codes16(
    target: _Buf,
    payload: _Buf,
    count: int,
    long_gaps: int,
    big_values: int,
    width: int,
    source: _Buf = ...,
) -> None: ...
