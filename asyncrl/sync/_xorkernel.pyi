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
def xor_scatter16(target: _Buf, gaps: _Buf, width: int, values: _Buf) -> None: ...
