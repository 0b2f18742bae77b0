/* Fused inner loops of the delta codec in snapshot.py, for 2-byte elements (bf16 / fp16).
 *
 * The numpy path makes 5-7 passes over every 4 MiB chunk (convert, XOR, compare, find the
 * changed words, find the changed elements inside them, gather); here one pass converts (or
 * copies) the chunk into the snapshot's bytes, XORs it with the previous bytes and writes the
 * gaps + values of the changed elements, and one pass applies them. The output is exactly what
 * the numpy path produces (tests/test_snapshot_kernel.py compares them), so a machine without
 * a C compiler reads and writes the same snapshots, only slower.
 *
 *   encode_f32_bf16(src, prev, owned, gaps, values, cap, loop=0) -> changed, or -1
 *   encode_copy16(src, prev, owned, gaps, values, cap, loop=0)   -> changed, or -1
 *       owned[i] = bf16(src[i]) (or src[i]); d = prev[i] ^ owned[i]; for each d != 0, in order:
 *       gaps[k] = unchanged elements since the last changed one, values[k] = d. More than ``cap``
 *       changed: -1 (owned is still written whole; gaps/values then hold garbage). gaps and
 *       values must hold cap + SLACK entries (whole vectors are stored). bf16 rounding is
 *       round-to-nearest-even and a NaN becomes 0xFFFF, as torch converts on the CPU.
 *       ``owned`` may be ``prev`` itself (the same buffer): prev then becomes the new bytes in
 *       place, the AVX-512 loop writing only the vectors that changed (a few % of the elements
 *       change after a small step, so most cache lines are only read), and more than ``cap``
 *       changed answers -1 with prev restored as it was. Any other overlap of owned with prev
 *       or src is a ValueError.
 *       ``loop``: 0 the fastest this CPU runs (``SIMD`` names it: avx512, avx2 or portable),
 *       1 the portable loop, 2 the AVX2 one (``LOOPS`` lists those this CPU runs besides 0;
 *       another is a ValueError). Every loop writes the same bytes (tests compare them).
 *   sparse_planes16(gaps, values, count, out) -> width
 *       what a sparse frame stores of the first ``count`` gaps (uint32) and values (uint16):
 *       the gaps' byte planes, narrowed to the ``width`` (1, 2 or 4 bytes) of the largest, then
 *       the values' two byte planes; written to ``out`` (at least 6 * count bytes).
 *   xor_scatter16(target, planes, count, width, source=None) -> None
 *       the inverse: target[pos_k] ^= values[k], reading a sparse frame's payload as it is
 *       stored: the byte planes of ``count`` gaps of ``width`` bytes, then the two byte planes
 *       of the ``count`` values. With ``source``, target = source first (one copy per chunk,
 *       which then stays in cache for the scatter). ValueError (target untouched) when a
 *       position falls past the end of target.
 *
 *   sparse_codes16(gaps, values, count, out, loop=0) -> (long_gaps, big_values, width)
 *       the payload of a dense-ish sparse frame: one code byte per changed element, its gap in
 *       the high nibble (15: the gap is among the ``long_gaps`` that follow) and its value in
 *       the low one (0: the value is among the ``big_values``), then the byte planes of the
 *       long gaps (narrowed to ``width`` bytes) and the two byte planes of the big values;
 *       written to ``out`` (at least 7 * count bytes). gaps and values are scratch: the long
 *       gaps and big values are gathered to their fronts. ``loop`` as for the encoders.
 *   xor_codes16(target, payload, count, long_gaps, big_values, width, source=None) -> None
 *       the inverse, like xor_scatter16. ValueError (target untouched) when a position falls
 *       past the end or the codes do not use exactly the long gaps and big values given.
 *   codes_sums16(codes, loop=0) -> (short gaps summed, long-gap codes, big-value codes)
 *       what xor_codes16 checks the codes by before it writes (exposed for the tests).
 *
 * Buffers are anything with the buffer protocol (numpy arrays); the GIL is released while a
 * loop runs, so the encoder's threads (one per core) run in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define BLOCK 16 /* elements per step: one 16-bit mask of changed elements */

static inline uint16_t bf16_of(uint32_t bits)
{
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
        return 0xFFFF; /* NaN, as torch converts it on the CPU */
    }
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* Element i of the source in the snapshot's dtype: bf16 of an fp32, or a 2-byte copy. */
static inline uint16_t converted(const void *src, int f32, Py_ssize_t i)
{
    return f32 ? bf16_of(((const uint32_t *)src)[i]) : ((const uint16_t *)src)[i];
}

#if defined(__SSE2__)
/* 8 fp32 -> 8 bf16 (round to nearest even, NaN -> 0xFFFF), as one vector of 16-bit lanes. */
static inline __m128i bf16x8(const uint32_t *src)
{
    const __m128i bias = _mm_set1_epi32(0x7FFF), one = _mm_set1_epi32(1);
    const __m128i nan_bits = _mm_set1_epi32(0xFFFF);
    __m128i parts[2];
    for (int q = 0; q < 2; q++) {
        __m128i x = _mm_loadu_si128((const __m128i *)(src + 4 * q));
        __m128i lsb = _mm_and_si128(_mm_srli_epi32(x, 16), one);
        __m128i r = _mm_srli_epi32(_mm_add_epi32(_mm_add_epi32(x, bias), lsb), 16);
        __m128 f = _mm_castsi128_ps(x);
        __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(f, f));
        r = _mm_or_si128(_mm_and_si128(nan, nan_bits), _mm_andnot_si128(nan, r));
        /* sign-extend the low 16 bits so the signed saturating pack keeps them exactly */
        parts[q] = _mm_srai_epi32(_mm_slli_epi32(r, 16), 16);
    }
    return _mm_packs_epi32(parts[0], parts[1]);
}
#endif

/* Convert (or copy) source elements [i, i + BLOCK) into owned[0..BLOCK), their XOR with prev
 * into diff, and return the mask of the elements that changed. prev is read before owned is
 * written: owned may be prev. */
static inline uint32_t block16(const void *src, int f32, Py_ssize_t i, const uint16_t *prev,
                               uint16_t *owned, uint16_t *diff)
{
#if defined(__SSE2__)
    __m128i a0, a1;
    if (f32) {
        a0 = bf16x8((const uint32_t *)src + i);
        a1 = bf16x8((const uint32_t *)src + i + 8);
    } else {
        a0 = _mm_loadu_si128((const __m128i *)((const uint16_t *)src + i));
        a1 = _mm_loadu_si128((const __m128i *)((const uint16_t *)src + i + 8));
    }
    const __m128i zero = _mm_setzero_si128();
    __m128i d0 = _mm_xor_si128(a0, _mm_loadu_si128((const __m128i *)prev));
    __m128i d1 = _mm_xor_si128(a1, _mm_loadu_si128((const __m128i *)(prev + 8)));
    _mm_storeu_si128((__m128i *)owned, a0);
    _mm_storeu_si128((__m128i *)(owned + 8), a1);
    _mm_storeu_si128((__m128i *)diff, d0);
    _mm_storeu_si128((__m128i *)(diff + 8), d1);
    __m128i same = _mm_packs_epi16(_mm_cmpeq_epi16(d0, zero), _mm_cmpeq_epi16(d1, zero));
    return (~(uint32_t)_mm_movemask_epi8(same)) & 0xFFFFu;
#else
    uint32_t mask = 0;
    for (int j = 0; j < BLOCK; j++) {
        uint16_t o = converted(src, f32, i + j);
        diff[j] = (uint16_t)(o ^ prev[j]); /* read before owned (maybe prev) is written */
        owned[j] = o;
        mask |= (uint32_t)(diff[j] != 0) << j;
    }
    return mask;
#endif
}

/* Each encoder writes the POSITIONS of the changed elements into `gaps` (turned into gaps at
 * the end, see to_gaps) and their diffs into `values`, and returns how many, or -1 once more
 * than `cap` changed. Both may store up to SLACK entries past `cap` (whole vectors). */
#define SLACK 64
#define GROUP 64

/* In place (owned is prev), a chunk with more than cap changed: put back the previous bytes
 * of the `count` changed elements recorded so far (every element written since the start
 * differs from its previous value by exactly the recorded diff, or was written unchanged). */
static Py_ssize_t undo(uint16_t *prev, const uint32_t *pos, const uint16_t *values,
                       Py_ssize_t count)
{
    for (Py_ssize_t k = 0; k < count; k++) {
        prev[pos[k]] ^= values[k];
    }
    return -1;
}

static void to_gaps(uint32_t *gaps, Py_ssize_t count)
{
    for (Py_ssize_t k = count - 1; k > 0; k--) {
        gaps[k] = gaps[k] - gaps[k - 1] - 1;
    }
}

/* The portable loop (SSE2 on x86-64, plain C elsewhere). Masks of GROUP elements are gathered
 * before any is emitted: at a few % changed nearly every group has one, so the branch "anything
 * changed here?" is predictable, which it is not per block of 16 (half of them changed). */
static Py_ssize_t encode_portable(const void *src, int f32, const uint16_t *prev, uint16_t *owned,
                                  Py_ssize_t n, uint32_t *pos, uint16_t *values, Py_ssize_t cap)
{
    Py_ssize_t count = 0;
    const int in_place = owned == prev;
    uint16_t diff[GROUP];
    for (Py_ssize_t i = 0; i < n; i += GROUP) {
        uint64_t mask = 0;
        if (i + GROUP <= n) {
            for (int b = 0; b < GROUP; b += BLOCK) {
                uint64_t m = block16(src, f32, i + b, prev + i + b, owned + i + b, diff + b);
                mask |= m << b;
            }
        } else { /* the tail, one element at a time */
            for (Py_ssize_t j = 0; i + j < n; j++) {
                uint16_t o = converted(src, f32, i + j);
                diff[j] = (uint16_t)(o ^ prev[i + j]);
                owned[i + j] = o;
                mask |= (uint64_t)(diff[j] != 0) << j;
            }
        }
        if (count > cap) {
            continue; /* dense: only convert the rest */
        }
        while (mask) {
            int j = __builtin_ctzll(mask);
            pos[count] = (uint32_t)(i + j);
            values[count++] = diff[j];
            mask &= mask - 1;
        }
        if (in_place && count > cap) {
            return undo(owned, pos, values, count);
        }
    }
    return count > cap ? -1 : count;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX512_PATH 1

/* The vector encoders' tail, elements [i, n) one at a time, after ``count`` changed so far. */
static Py_ssize_t encode_tail(const void *src, int f32, const uint16_t *prev, uint16_t *owned,
                              Py_ssize_t i, Py_ssize_t n, uint32_t *pos, uint16_t *values,
                              Py_ssize_t count, Py_ssize_t cap)
{
    const int in_place = owned == prev;
    for (; i < n; i++) {
        uint16_t o = converted(src, f32, i);
        uint16_t d = (uint16_t)(o ^ prev[i]);
        owned[i] = o;
        if (d && count <= cap) {
            pos[count] = (uint32_t)i;
            values[count++] = d;
        }
        if (in_place && count > cap) {
            return undo(owned, pos, values, count);
        }
    }
    return count > cap ? -1 : count;
}

/* AVX-512 (F, BW, VBMI2): 32 elements per step, the changed ones stored with vpcompress, no
 * data-dependent branch. ~3.5x the portable loop (0.55 vs 1.8 ms per 4 MiB chunk, Zen 4). */
__attribute__((target("avx512f,avx512bw,avx512vbmi2,popcnt"))) static Py_ssize_t
encode_avx512(const void *src, int f32, const uint16_t *prev, uint16_t *owned, Py_ssize_t n,
              uint32_t *pos, uint16_t *values, Py_ssize_t cap)
{
    const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    const __m512i nan_bits = _mm512_set1_epi32(0xFFFF), sixteen = _mm512_set1_epi32(16);
    const __m512i thirty_two = _mm512_set1_epi32(32);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    Py_ssize_t count = 0, i = 0;
    const int in_place = owned == prev;
    for (; i + 32 <= n; i += 32, idx = _mm512_add_epi32(idx, thirty_two)) {
        __m512i o;
        if (f32) {
            __m256i half[2];
            for (int q = 0; q < 2; q++) {
                __m512i x = _mm512_loadu_si512((const uint32_t *)src + i + 16 * q);
                __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), one);
                __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, bias), lsb), 16);
                __m512 f = _mm512_castsi512_ps(x);
                r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), nan_bits);
                half[q] = _mm512_cvtepi32_epi16(r);
            }
            o = _mm512_inserti64x4(_mm512_castsi256_si512(half[0]), half[1], 1);
        } else {
            o = _mm512_loadu_si512((const uint16_t *)src + i);
        }
        __m512i d = _mm512_xor_si512(o, _mm512_loadu_si512(prev + i));
        __mmask32 k = _mm512_test_epi16_mask(d, d);
        if (k || !in_place) { /* in place, an unchanged vector is not written */
            _mm512_storeu_si512(owned + i, o);
        }
        if (count > cap) {
            continue; /* dense: only convert the rest */
        }
        __mmask16 lo = (__mmask16)k, hi = (__mmask16)(k >> 16);
        _mm512_storeu_si512(values + count, _mm512_maskz_compress_epi16(k, d));
        _mm512_storeu_si512(pos + count, _mm512_maskz_compress_epi32(lo, idx));
        count += _mm_popcnt_u32(lo);
        _mm512_storeu_si512(pos + count,
                            _mm512_maskz_compress_epi32(hi, _mm512_add_epi32(idx, sixteen)));
        count += _mm_popcnt_u32(hi);
        if (in_place && count > cap) {
            return undo(owned, pos, values, count);
        }
    }
    return encode_tail(src, f32, prev, owned, i, n, pos, values, count, cap);
}

static int avx512_usable(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("popcnt");
}

/* AVX2 (no compress instruction): 16 elements per step; the changed ones are left-packed by a
 * table lookup and a byte shuffle, 8 at a time, with no data-dependent branch. For CPUs without
 * AVX-512 (Zen 2/3 hosts, many GPU servers among them). 0.5B shape in place, one thread, Zen 3:
 * 0.41 -> 0.34 s per GB of bf16 at lr 1e-6 (4% changed; mostly memory-bound) and 0.50 -> 0.37 s
 * at lr 1e-5 (25% changed). The first version branched on "any change in this vector?" to skip
 * writing unchanged ones, like the AVX-512 loop: 60% slower than the portable loop at 4% changed,
 * where that branch is a coin flip. */
#define AVX2_TARGET __attribute__((target("avx2,popcnt")))

/* 8 fp32 -> 8 bf16 (round to nearest even, NaN -> 0xFFFF) in the low halves of 32-bit lanes. */
AVX2_TARGET static inline __m256i bf16x8_avx2(const uint32_t *src)
{
    const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
    const __m256i nan_bits = _mm256_set1_epi32(0xFFFF);
    __m256i x = _mm256_loadu_si256((const __m256i *)src);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), one);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, bias), lsb), 16);
    __m256 f = _mm256_castsi256_ps(x);
    return _mm256_blendv_epi8(r, nan_bits, _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
}

/* Source elements [i, i + 16) in the snapshot's dtype, in order. */
AVX2_TARGET static inline __m256i converted16_avx2(const void *src, int f32, Py_ssize_t i)
{
    if (!f32) {
        return _mm256_loadu_si256((const __m256i *)((const uint16_t *)src + i));
    }
    __m256i a = bf16x8_avx2((const uint32_t *)src + i);
    __m256i b = bf16x8_avx2((const uint32_t *)src + i + 8);
    /* the pack works within 128-bit halves (a0-3 b0-3 a4-7 b4-7); the permute orders them */
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
}

/* Left-packing without a compress instruction: for an 8-bit mask m of changed lanes, the
 * indices of its set bits in order (pack_lanes) and the byte shuffle that gathers those 16-bit
 * lanes to the front (pack_words, 0x80: zero). Filled at import. */
static uint8_t pack_lanes[256][8];
static uint8_t pack_words[256][16];

static void fill_pack_tables(void)
{
    for (int m = 0; m < 256; m++) {
        int k = 0;
        memset(pack_words[m], 0x80, sizeof(pack_words[m]));
        for (int j = 0; j < 8; j++) {
            if (m >> j & 1) {
                pack_lanes[m][k] = (uint8_t)j;
                pack_words[m][2 * k] = (uint8_t)(2 * j);
                pack_words[m][2 * k + 1] = (uint8_t)(2 * j + 1);
                k++;
            }
        }
    }
}

/* Store the positions (first + lane) and diffs of the changed lanes of 8 elements at
 * pos / values + count (whole vectors: up to 8 entries past the new count); the new count. */
AVX2_TARGET static inline Py_ssize_t pack8_avx2(__m128i d, uint32_t m, uint32_t first,
                                                uint32_t *pos, uint16_t *values,
                                                Py_ssize_t count)
{
    __m128i lanes = _mm_loadl_epi64((const __m128i *)pack_lanes[m]);
    __m256i at = _mm256_add_epi32(_mm256_set1_epi32((int)first), _mm256_cvtepu8_epi32(lanes));
    _mm256_storeu_si256((__m256i *)(pos + count), at);
    __m128i picks = _mm_loadu_si128((const __m128i *)pack_words[m]);
    _mm_storeu_si128((__m128i *)(values + count), _mm_shuffle_epi8(d, picks));
    return count + __builtin_popcount(m);
}

AVX2_TARGET static Py_ssize_t encode_avx2(const void *src, int f32, const uint16_t *prev,
                                          uint16_t *owned, Py_ssize_t n, uint32_t *pos,
                                          uint16_t *values, Py_ssize_t cap)
{
    Py_ssize_t count = 0, i = 0;
    const int in_place = owned == prev;
    for (; i + 16 <= n; i += 16) {
        __m256i o = converted16_avx2(src, f32, i);
        __m256i d = _mm256_xor_si256(o, _mm256_loadu_si256((const __m256i *)(prev + i)));
        __m256i same = _mm256_cmpeq_epi16(d, _mm256_setzero_si256());
        __m128i same8 = _mm_packs_epi16(_mm256_castsi256_si128(same),
                                        _mm256_extracti128_si256(same, 1));
        uint32_t m = ~(uint32_t)_mm_movemask_epi8(same8) & 0xFFFFu;
        /* written whole, also in place: a branch on "changed?" is a coin flip at a few % of
         * the elements changed (about half the vectors), and mispredicting it cost more
         * (+60%, Zen 3) than writing the unchanged vectors back */
        _mm256_storeu_si256((__m256i *)(owned + i), o);
        if (count > cap) {
            continue; /* dense: only convert the rest */
        }
        count = pack8_avx2(_mm256_castsi256_si128(d), m & 0xFF, (uint32_t)i, pos, values, count);
        count = pack8_avx2(_mm256_extracti128_si256(d, 1), m >> 8, (uint32_t)i + 8, pos, values,
                           count);
        if (in_place && count > cap) {
            return undo(owned, pos, values, count);
        }
    }
    return encode_tail(src, f32, prev, owned, i, n, pos, values, count, cap);
}

static int avx2_usable(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
}
#else
#define HAVE_AVX512_PATH 0
static int avx512_usable(void) { return 0; }
static int avx2_usable(void) { return 0; }
#endif

/* The loops a caller may ask for (``loop`` argument): the fastest this CPU runs, the portable
 * one, or the AVX2 one (tests run each where the CPU has it). */
#define LOOP_BEST 0
#define LOOP_PORTABLE 1
#define LOOP_AVX2 2

static int use_avx512, use_avx2; /* set once at import */

/* Whether ``loop`` is one of the above that this CPU can run; a ValueError if not. */
static int loop_ok(int loop)
{
    if (loop == LOOP_BEST || loop == LOOP_PORTABLE || (loop == LOOP_AVX2 && use_avx2)) {
        return 1;
    }
    PyErr_Format(PyExc_ValueError, "loop %d: 0 (the fastest here), 1 (portable)%s", loop,
                 use_avx2 ? " or 2 (AVX2)" : "; this CPU has no AVX2");
    return 0;
}

/* Which loop runs for a ``loop`` that loop_ok accepted: one decision for every kernel. */
enum run { RUN_PORTABLE, RUN_AVX2, RUN_AVX512 };

static enum run loop_to_run(int loop)
{
    if (use_avx512 && loop == LOOP_BEST) {
        return RUN_AVX512;
    }
    if (use_avx2 && loop != LOOP_PORTABLE) {
        return RUN_AVX2;
    }
    return RUN_PORTABLE;
}

static Py_ssize_t encode16(const void *src, int f32, const uint16_t *prev, uint16_t *owned,
                           Py_ssize_t n, uint32_t *gaps, uint16_t *values, Py_ssize_t cap,
                           int loop)
{
    Py_ssize_t count;
    enum run run = loop_to_run(loop);
#if HAVE_AVX512_PATH
    if (run == RUN_AVX512) {
        count = encode_avx512(src, f32, prev, owned, n, gaps, values, cap);
    } else if (run == RUN_AVX2) {
        count = encode_avx2(src, f32, prev, owned, n, gaps, values, cap);
    } else
#endif
    {
        (void)run;
        count = encode_portable(src, f32, prev, owned, n, gaps, values, cap);
    }
    if (count > 0) {
        to_gaps(gaps, count);
    }
    return count;
}

/* ---- Python bindings ---------------------------------------------------------------------- */

/* Whether ``b`` holds ``elements`` entries of ``itemsize`` bytes (a division, not a product: an
 * absurd count must not wrap around and let a small buffer through). */
static inline int holds(const Py_buffer *b, Py_ssize_t elements, Py_ssize_t itemsize)
{
    return elements >= 0 && elements <= b->len / itemsize;
}

static int check_size(const Py_buffer *b, Py_ssize_t elements, Py_ssize_t itemsize,
                      const char *what)
{
    if (!holds(b, elements, itemsize)) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, needs %zd entries of %zd bytes",
                     what, b->len, elements, itemsize);
        return 0;
    }
    return 1;
}

/* Whether two buffers share any byte. */
static int overlap(const Py_buffer *a, const Py_buffer *b)
{
    uintptr_t p = (uintptr_t)a->buf, q = (uintptr_t)b->buf;
    return a->len > 0 && b->len > 0 && p < q + (uintptr_t)b->len && q < p + (uintptr_t)a->len;
}

static PyObject *encode_common(PyObject *args, int f32)
{
    Py_buffer src, prev, owned, gaps, values;
    Py_ssize_t cap, changed = 0;
    int loop = LOOP_BEST;
    if (!PyArg_ParseTuple(args, "y*y*w*w*w*n|i", &src, &prev, &owned, &gaps, &values, &cap,
                          &loop)) {
        return NULL;
    }
    Py_ssize_t n = prev.len / 2;
    /* positions are 32-bit (and a chunk's gaps at most 4 bytes wide) */
    int ok = prev.len % 2 == 0 && cap >= 0 && cap <= PY_SSIZE_T_MAX - SLACK &&
             (uint64_t)n <= UINT32_MAX &&
             check_size(&src, n, f32 ? 4 : 2, "src") &&
             check_size(&owned, n, 2, "owned") && check_size(&gaps, cap + SLACK, 4, "gaps") &&
             check_size(&values, cap + SLACK, 2, "values") && loop_ok(loop);
    if (ok && ((owned.buf != prev.buf && overlap(&owned, &prev)) || overlap(&owned, &src))) {
        PyErr_SetString(PyExc_ValueError, "owned must be prev itself (in place) or share no "
                                          "byte with prev and src");
        ok = 0;
    }
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        changed = encode16(src.buf, f32, prev.buf, owned.buf, n, gaps.buf, values.buf, cap,
                           loop);
        Py_END_ALLOW_THREADS
    } else if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError,
                        "prev must hold whole 2-byte elements (at most 2^32), cap >= 0");
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&prev);
    PyBuffer_Release(&owned);
    PyBuffer_Release(&gaps);
    PyBuffer_Release(&values);
    return ok ? PyLong_FromSsize_t(changed) : NULL;
}

static PyObject *encode_f32_bf16(PyObject *self, PyObject *args)
{
    (void)self;
    return encode_common(args, 1);
}

static PyObject *encode_copy16(PyObject *self, PyObject *args)
{
    (void)self;
    return encode_common(args, 0);
}

/* The k-th of ``count`` unsigned integers of ``width`` bytes stored as byte planes (plane b
 * holds byte b of every integer, little-endian order). */
static inline uint32_t planed_at(const uint8_t *planes, int width, Py_ssize_t count, Py_ssize_t k)
{
    uint32_t v = planes[k];
    for (int b = 1; b < width; b++) {
        v |= (uint32_t)planes[b * count + k] << (8 * b);
    }
    return v;
}

/* target[pos_k] ^= value_k; inline, so each call below with a literal width is its own loop
 * with the plane reads unrolled. */
static inline void scatter_width(uint16_t *t, const uint8_t *g, int width, const uint8_t *v,
                                 Py_ssize_t count)
{
    Py_ssize_t pos = -1;
    for (Py_ssize_t k = 0; k < count; k++) {
        pos += (Py_ssize_t)planed_at(g, width, count, k) + 1;
        t[pos] ^= (uint16_t)(v[k] | v[count + k] << 8);
    }
}

static void scatter(uint16_t *t, const uint8_t *g, int width, const uint8_t *v, Py_ssize_t count)
{
    switch (width) {
    case 1:
        scatter_width(t, g, 1, v, count);
        break;
    case 2:
        scatter_width(t, g, 2, v, count);
        break;
    default:
        scatter_width(t, g, 4, v, count);
    }
}

/* target = source (when one is given and it is not target itself), before a scatter. */
static inline void copy_source(const Py_buffer *target, const Py_buffer *source)
{
    if (source->buf != NULL && source->buf != target->buf) {
        memmove(target->buf, source->buf, (size_t)target->len);
    }
}

#define END_UNUSED (-2) /* the codes do not use exactly the long gaps / big values given */
#define END_NO_MEMORY (-3)

/* Release a scatter's buffers and answer: None, or the error of ``bad_args`` (arguments that
 * do not fit together) or of ``end`` (the last position written, see above). */
static PyObject *scatter_reply(Py_buffer *target, Py_buffer *input, Py_buffer *source,
                               const char *bad_args, Py_ssize_t end, Py_ssize_t n)
{
    PyBuffer_Release(target);
    PyBuffer_Release(input);
    if (source->buf != NULL) {
        PyBuffer_Release(source);
    }
    if (bad_args != NULL) {
        PyErr_SetString(PyExc_ValueError, bad_args);
        return NULL;
    }
    if (end == END_UNUSED) {
        PyErr_SetString(PyExc_ValueError,
                        "the codes do not use exactly the long gaps and big values given");
        return NULL;
    }
    if (end == END_NO_MEMORY) {
        return PyErr_NoMemory();
    }
    if (end >= n) {
        PyErr_Format(PyExc_ValueError, "position %zd past the %zd elements", end, n);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *xor_scatter16(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer target, planes, source = {0};
    Py_ssize_t count;
    int width;
    if (!PyArg_ParseTuple(args, "w*y*ni|y*", &target, &planes, &count, &width, &source)) {
        return NULL;
    }
    Py_ssize_t n = target.len / 2, end = -1;
    int ok = (width == 1 || width == 2 || width == 4) && count >= 0 && count <= planes.len &&
             target.len % 2 == 0 && planes.len == count * (width + 2) &&
             (source.buf == NULL || source.len == target.len);
    if (ok) {
        const uint8_t *g = planes.buf, *v = g + count * width;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t k = 0; k < count && end < n; k++) { /* checked before any write */
            end += (Py_ssize_t)planed_at(g, width, count, k) + 1; /* < n + 2^32: no overflow */
        }
        if (end < n) {
            copy_source(&target, &source);
            scatter(target.buf, g, width, v, count);
        }
        Py_END_ALLOW_THREADS
    }
    return scatter_reply(&target, &planes, &source,
                         ok ? NULL : "planes must hold count gaps of width 1, 2 or 4 bytes and "
                                     "count 2-byte values; source (if given) the size of target",
                         end, n);
}

/* The fewest bytes (1, 2 or 4) that hold ``largest``. */
static inline int width_of(uint32_t largest)
{
    return largest >> 16 ? 4 : largest >> 8 ? 2 : 1;
}

/* The two byte planes of ``count`` 2-byte values (low bytes, then high bytes). */
static void value_planes(uint8_t *to, const uint16_t *from, Py_ssize_t count)
{
    for (Py_ssize_t k = 0; k < count; k++) {
        to[k] = (uint8_t)from[k];
        to[count + k] = (uint8_t)(from[k] >> 8);
    }
}

/* The ``width`` low byte planes of ``count`` integers (plane b: byte b of each, in order). */
static void planes_of(uint8_t *to, const uint32_t *from, Py_ssize_t count, int width)
{
    for (int b = 0; b < width; b++) {
        for (Py_ssize_t k = 0; k < count; k++) {
            to[b * count + k] = (uint8_t)(from[k] >> (8 * b));
        }
    }
}

/* Release the buffers of a payload writer; false (ValueError set) when they were too small. */
static int payload_done(Py_buffer *gaps, Py_buffer *values, Py_buffer *out, int ok)
{
    PyBuffer_Release(gaps);
    PyBuffer_Release(values);
    PyBuffer_Release(out);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "gaps, values or out hold fewer than count entries");
    }
    return ok;
}

/* A sparse chunk's payload as stored: the byte planes of the gaps, narrowed to the fewest bytes
 * (1, 2 or 4) that hold the largest, then the two byte planes of the values. */
static PyObject *sparse_planes16(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer gaps, values, out;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "y*y*nw*", &gaps, &values, &count, &out)) {
        return NULL;
    }
    int ok = holds(&gaps, count, 4) && holds(&values, count, 2) && holds(&out, count, 6),
        width = 1;
    if (ok) {
        const uint32_t *g = gaps.buf;
        const uint16_t *v = values.buf;
        uint8_t *o = out.buf;
        Py_BEGIN_ALLOW_THREADS
        uint32_t largest = 0;
        for (Py_ssize_t k = 0; k < count; k++) {
            largest = g[k] > largest ? g[k] : largest;
        }
        width = width_of(largest);
        planes_of(o, g, count, width);
        value_planes(o + width * count, v, count);
        Py_END_ALLOW_THREADS
    }
    if (!payload_done(&gaps, &values, &out, ok)) {
        return NULL;
    }
    return PyLong_FromLong(width);
}

/* Packed codes: one byte per changed element, gap (0-14, 15 = long) << 4 | value (1-15, 0 =
 * big). Long gaps and big values follow as byte planes, in the order of their codes. */
#define CODE_LONG 15

#if HAVE_AVX512_PATH
/* sparse_codes16's loop over whole vectors of 16 elements; returns where the tail starts. The
 * gathered long gaps / big values are stored as whole vectors at slot longs / bigs <= k: they
 * only overwrite elements of the vector just loaded. ~6x the scalar loop (Zen 4). */
__attribute__((target("avx512f,avx512bw,popcnt"))) static Py_ssize_t
codes_avx512(uint32_t *g, uint16_t *v, uint8_t *o, Py_ssize_t count, Py_ssize_t *longs,
             Py_ssize_t *bigs, uint32_t *largest)
{
    const __m512i code_long = _mm512_set1_epi32(CODE_LONG), sixteen = _mm512_set1_epi32(16);
    __m512i top = _mm512_setzero_si512();
    Py_ssize_t nl = *longs, nb = *bigs, k = 0;
    for (; k + 16 <= count; k += 16) {
        __m512i gap = _mm512_loadu_si512(g + k);
        __m512i value = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + k)));
        __mmask16 is_long = _mm512_cmpge_epu32_mask(gap, code_long);
        __mmask16 is_big = _mm512_cmpge_epu32_mask(value, sixteen);
        __m512i code = _mm512_or_si512(_mm512_slli_epi32(_mm512_min_epu32(gap, code_long), 4),
                                       _mm512_maskz_mov_epi32((__mmask16)~is_big, value));
        _mm_storeu_si128((__m128i *)(o + k), _mm512_cvtepi32_epi8(code));
        top = _mm512_mask_max_epu32(top, is_long, top, gap);
        _mm512_storeu_si512(g + nl, _mm512_maskz_compress_epi32(is_long, gap));
        nl += _mm_popcnt_u32(is_long);
        _mm256_storeu_si256((__m256i *)(v + nb),
                            _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(is_big, value)));
        nb += _mm_popcnt_u32(is_big);
    }
    uint32_t vector_top = _mm512_reduce_max_epu32(top);
    *largest = vector_top > *largest ? vector_top : *largest;
    *longs = nl;
    *bigs = nb;
    return k;
}

/* The same over vectors of 8 elements with AVX2: the long gaps and big values are left-packed
 * with the encoder's tables (8 lanes of 32 bits, stored whole at slot longs / bigs <= k). ~4x
 * the scalar loop (2.0 -> 0.5 ms per 500k codes, Zen 3). */
AVX2_TARGET static Py_ssize_t codes_avx2(uint32_t *g, uint16_t *v, uint8_t *o, Py_ssize_t count,
                                         Py_ssize_t *longs, Py_ssize_t *bigs, uint32_t *largest)
{
    const __m256i code_long = _mm256_set1_epi32(CODE_LONG), fifteen = _mm256_set1_epi32(15);
    /* byte 0 of each 32-bit lane to the front of its 128-bit half, then both halves together */
    const __m256i low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                               -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1,
                                               -1, -1, -1, -1, -1, -1);
    const __m256i halves = _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1);
    /* the low 16 bits of each 32-bit lane, in order, in the low 128 bits */
    const __m256i low_words = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1,
                                               -1, -1, 0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1,
                                               -1, -1, -1, -1);
    const __m256i quads = _mm256_setr_epi32(0, 1, 4, 5, 2, 2, 2, 2);
    __m256i top = _mm256_setzero_si256();
    Py_ssize_t nl = *longs, nb = *bigs, k = 0;
    for (; k + 8 <= count; k += 8) {
        __m256i gap = _mm256_loadu_si256((const __m256i *)(g + k));
        __m256i value = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(v + k)));
        __m256i is_long = _mm256_cmpeq_epi32(_mm256_max_epu32(gap, code_long), gap);
        __m256i is_big = _mm256_cmpgt_epi32(value, fifteen);
        __m256i code = _mm256_or_si256(_mm256_slli_epi32(_mm256_min_epu32(gap, code_long), 4),
                                       _mm256_andnot_si256(is_big, value));
        __m256i packed = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(code, low_bytes), halves);
        _mm_storel_epi64((__m128i *)(o + k), _mm256_castsi256_si128(packed));
        top = _mm256_max_epu32(top, _mm256_and_si256(gap, is_long));
        uint32_t ml = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(is_long));
        uint32_t mb = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(is_big));
        __m256i pick = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)pack_lanes[ml]));
        _mm256_storeu_si256((__m256i *)(g + nl), _mm256_permutevar8x32_epi32(gap, pick));
        nl += __builtin_popcount(ml);
        pick = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)pack_lanes[mb]));
        __m256i bigs8 = _mm256_permutevar8x32_epi32(value, pick);
        bigs8 = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(bigs8, low_words), quads);
        _mm_storeu_si128((__m128i *)(v + nb), _mm256_castsi256_si128(bigs8));
        nb += __builtin_popcount(mb);
    }
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, top);
    for (int j = 0; j < 8; j++) {
        *largest = lanes[j] > *largest ? lanes[j] : *largest;
    }
    *longs = nl;
    *bigs = nb;
    return k;
}
#endif

static PyObject *sparse_codes16(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer gaps, values, out;
    Py_ssize_t count, longs = 0, bigs = 0;
    int loop = LOOP_BEST;
    if (!PyArg_ParseTuple(args, "w*w*nw*|i", &gaps, &values, &count, &out, &loop)) {
        return NULL;
    }
    int ok = holds(&gaps, count, 4) && holds(&values, count, 2) && holds(&out, count, 7),
        width = 1;
    if (!loop_ok(loop)) {
        PyBuffer_Release(&gaps);
        PyBuffer_Release(&values);
        PyBuffer_Release(&out);
        return NULL;
    }
    if (ok) {
        uint32_t *g = gaps.buf;
        uint16_t *v = values.buf;
        uint8_t *o = out.buf;
        Py_BEGIN_ALLOW_THREADS
        uint32_t largest = 0;
        Py_ssize_t k = 0;
        enum run run = loop_to_run(loop);
#if HAVE_AVX512_PATH
        if (run == RUN_AVX512) {
            k = codes_avx512(g, v, o, count, &longs, &bigs, &largest);
        } else if (run == RUN_AVX2) {
            k = codes_avx2(g, v, o, count, &longs, &bigs, &largest);
        }
#endif
        (void)run;
        /* no branches: the long gaps and big values are gathered to the fronts of the input
         * arrays (slot longs / bigs <= k was read already) */
        for (; k < count; k++) {
            uint32_t gap = g[k], value = v[k];
            uint32_t is_long = gap >= CODE_LONG, is_big = value >= 16;
            o[k] = (uint8_t)((is_long ? CODE_LONG : gap) << 4 | (is_big ? 0 : value));
            g[longs] = gap;
            longs += is_long;
            v[bigs] = (uint16_t)value;
            bigs += is_big;
            largest = is_long && gap > largest ? gap : largest;
        }
        width = width_of(largest);
        planes_of(o + count, g, longs, width);
        value_planes(o + count + longs * width, v, bigs);
        Py_END_ALLOW_THREADS
    }
    if (!payload_done(&gaps, &values, &out, ok)) {
        return NULL;
    }
    return Py_BuildValue("nni", longs, bigs, width);
}

#if HAVE_AVX512_PATH
/* codes_end's sums over whole vectors of 64 codes (the scalar loop, mixing 8- and 64-bit sums,
 * is not vectorized by gcc): ~9x. Returns where the tail starts. */
__attribute__((target("avx512f,avx512bw,popcnt"))) static Py_ssize_t
codes_sums_avx512(const uint8_t *c, Py_ssize_t count, uint64_t *short_gaps,
                  Py_ssize_t *long_codes, Py_ssize_t *big_codes)
{
    const __m512i nibble = _mm512_set1_epi8(CODE_LONG), zero = _mm512_setzero_si512();
    __m512i sums = zero;
    Py_ssize_t k = 0;
    for (; k + 64 <= count; k += 64) {
        __m512i code = _mm512_loadu_si512(c + k);
        __m512i gap = _mm512_and_si512(_mm512_srli_epi16(code, 4), nibble);
        __mmask64 is_long = _mm512_cmpeq_epi8_mask(gap, nibble);
        *long_codes += (Py_ssize_t)_mm_popcnt_u64(is_long);
        *big_codes += (Py_ssize_t)_mm_popcnt_u64(_mm512_testn_epi8_mask(code, nibble));
        sums = _mm512_add_epi64(sums, _mm512_sad_epu8(_mm512_maskz_mov_epi8(~is_long, gap), zero));
    }
    *short_gaps += (uint64_t)_mm512_reduce_add_epi64(sums);
    return k;
}

/* The same with AVX2, 32 codes per step: ~30x the scalar loop (Zen 3). */
AVX2_TARGET static Py_ssize_t codes_sums_avx2(const uint8_t *c, Py_ssize_t count,
                                              uint64_t *short_gaps, Py_ssize_t *long_codes,
                                              Py_ssize_t *big_codes)
{
    const __m256i nibble = _mm256_set1_epi8(CODE_LONG), zero = _mm256_setzero_si256();
    __m256i sums = zero;
    Py_ssize_t k = 0;
    for (; k + 32 <= count; k += 32) {
        __m256i code = _mm256_loadu_si256((const __m256i *)(c + k));
        __m256i gap = _mm256_and_si256(_mm256_srli_epi16(code, 4), nibble);
        __m256i is_long = _mm256_cmpeq_epi8(gap, nibble);
        __m256i is_big = _mm256_cmpeq_epi8(_mm256_and_si256(code, nibble), zero);
        *long_codes += __builtin_popcount((uint32_t)_mm256_movemask_epi8(is_long));
        *big_codes += __builtin_popcount((uint32_t)_mm256_movemask_epi8(is_big));
        sums = _mm256_add_epi64(sums, _mm256_sad_epu8(_mm256_andnot_si256(is_long, gap), zero));
    }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, sums);
    *short_gaps += lanes[0] + lanes[1] + lanes[2] + lanes[3];
    return k;
}
#endif

/* codes_end's sums of ``count`` codes: the short gaps, the long-gap codes, the big-value codes. */
static void code_sums(const uint8_t *c, Py_ssize_t count, int loop, uint64_t *short_gaps,
                      Py_ssize_t *long_codes, Py_ssize_t *big_codes)
{
    Py_ssize_t k = 0;
    *short_gaps = 0;
    *long_codes = *big_codes = 0;
    enum run run = loop_to_run(loop);
#if HAVE_AVX512_PATH
    if (run == RUN_AVX512) {
        k = codes_sums_avx512(c, count, short_gaps, long_codes, big_codes);
    } else if (run == RUN_AVX2) {
        k = codes_sums_avx2(c, count, short_gaps, long_codes, big_codes);
    }
#endif
    (void)run;
    for (; k < count; k++) {
        uint32_t gap = c[k] >> 4;
        *short_gaps += gap == CODE_LONG ? 0 : gap;
        *long_codes += gap == CODE_LONG;
        *big_codes += (c[k] & 15) == 0;
    }
}

/* The last position the codes reach (>= n when past the end), or END_UNUSED when they do not
 * use exactly ``longs`` long gaps and ``bigs`` big values. Sums without an early exit (they cannot
 * overflow: at most 15 per code and 2^32 per long gap); the scalar loop takes the tail. */
static Py_ssize_t codes_end(const uint8_t *c, Py_ssize_t count, const uint8_t *lg, int width,
                            Py_ssize_t longs, Py_ssize_t bigs)
{
    uint64_t short_gaps, long_gaps = 0;
    Py_ssize_t long_codes, big_codes;
    code_sums(c, count, LOOP_BEST, &short_gaps, &long_codes, &big_codes);
    if (long_codes != longs || big_codes != bigs) {
        return END_UNUSED;
    }
    for (Py_ssize_t j = 0; j < longs; j++) {
        long_gaps += planed_at(lg, width, longs, j);
    }
    return (Py_ssize_t)(short_gaps + long_gaps) + count - 1;
}

/* target[pos_k] ^= value_k in two passes: the codes' own values first, recording where the
 * big values go (``at``, ``bigs`` entries), then those (no branch on the ~1 in 10 big values,
 * which come at random). */
static inline void codes_width(uint16_t *t, const uint8_t *c, Py_ssize_t count,
                               const uint8_t *lg, int width, Py_ssize_t longs,
                               const uint8_t *bv, Py_ssize_t bigs, Py_ssize_t *at)
{
    Py_ssize_t pos = -1, j = 0, i = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        uint32_t gap = c[k] >> 4, small = c[k] & 15;
        if (gap == CODE_LONG) { /* rare: predicted */
            gap = planed_at(lg, width, longs, j++);
        }
        pos += (Py_ssize_t)gap + 1;
        t[pos] ^= (uint16_t)small;
        at[i] = pos; /* at holds bigs + 1 entries: the last store of a run is overwritten */
        i += small == 0;
    }
    for (i = 0; i < bigs; i++) {
        t[at[i]] ^= (uint16_t)(bv[i] | bv[bigs + i] << 8);
    }
}

static PyObject *xor_codes16(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer target, payload, source = {0};
    Py_ssize_t count, longs, bigs, n, end = -1;
    int width;
    if (!PyArg_ParseTuple(args, "w*y*nnni|y*", &target, &payload, &count, &longs, &bigs, &width,
                          &source)) {
        return NULL;
    }
    n = target.len / 2;
    int ok = (width == 1 || width == 2 || width == 4) && count >= 0 && count <= payload.len &&
             longs >= 0 && bigs >= 0 && longs <= count && bigs <= count && target.len % 2 == 0 &&
             payload.len == count + longs * width + bigs * 2 &&
             (source.buf == NULL || source.len == target.len);
    if (ok) {
        const uint8_t *c = payload.buf, *lg = c + count, *bv = lg + longs * width;
        Py_ssize_t *at = NULL;
        Py_BEGIN_ALLOW_THREADS
        end = codes_end(c, count, lg, width, longs, bigs); /* checked before any write */
        if (end >= -1 && end < n && (at = malloc(sizeof(*at) * (size_t)(bigs + 1))) == NULL) {
            end = END_NO_MEMORY;
        }
        if (end >= -1 && end < n) {
            copy_source(&target, &source);
            switch (width) {
            case 1:
                codes_width(target.buf, c, count, lg, 1, longs, bv, bigs, at);
                break;
            case 2:
                codes_width(target.buf, c, count, lg, 2, longs, bv, bigs, at);
                break;
            default:
                codes_width(target.buf, c, count, lg, 4, longs, bv, bigs, at);
            }
        }
        free(at);
        Py_END_ALLOW_THREADS
    }
    return scatter_reply(&target, &payload, &source,
                         ok ? NULL : "payload must hold count codes, long_gaps gaps of width 1, "
                                     "2 or 4 bytes and big_values 2-byte values; source (if "
                                     "given) the size of target",
                         end, n);
}

static PyObject *codes_sums16(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer codes;
    int loop = LOOP_BEST;
    if (!PyArg_ParseTuple(args, "y*|i", &codes, &loop)) {
        return NULL;
    }
    if (!loop_ok(loop)) {
        PyBuffer_Release(&codes);
        return NULL;
    }
    uint64_t short_gaps;
    Py_ssize_t long_codes, big_codes;
    Py_BEGIN_ALLOW_THREADS
    code_sums(codes.buf, codes.len, loop, &short_gaps, &long_codes, &big_codes);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&codes);
    return Py_BuildValue("Knn", (unsigned long long)short_gaps, long_codes, big_codes);
}

static PyMethodDef methods[] = {
    {"encode_f32_bf16", encode_f32_bf16, METH_VARARGS,
     "encode_f32_bf16(src, prev, owned, gaps, values, cap, loop=0) -> changed or -1"},
    {"encode_copy16", encode_copy16, METH_VARARGS,
     "encode_copy16(src, prev, owned, gaps, values, cap, loop=0) -> changed or -1"},
    {"sparse_planes16", sparse_planes16, METH_VARARGS,
     "sparse_planes16(gaps, values, count, out) -> gap width"},
    {"sparse_codes16", sparse_codes16, METH_VARARGS,
     "sparse_codes16(gaps, values, count, out, loop=0) -> (long_gaps, big_values, "
     "gap width)"},
    {"xor_codes16", xor_codes16, METH_VARARGS,
     "xor_codes16(target, payload, count, long_gaps, big_values, width, source=None)"},
    {"xor_scatter16", xor_scatter16, METH_VARARGS,
     "xor_scatter16(target, planes, count, width, source=None): target[positions] ^= values"},
    {"codes_sums16", codes_sums16, METH_VARARGS,
     "codes_sums16(codes, loop=0) -> (sum of the short gaps, long-gap codes, big-value codes): "
     "what xor_codes16 checks a payload's codes by"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_xorkernel", "Fused delta codec loops (see snapshot.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__xorkernel(void)
{
    use_avx512 = avx512_usable();
    use_avx2 = avx2_usable();
#if HAVE_AVX512_PATH
    fill_pack_tables();
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    /* the ``loop`` values this CPU runs besides the fastest (0) */
    PyObject *loops = use_avx2 ? Py_BuildValue("(ii)", LOOP_PORTABLE, LOOP_AVX2)
                               : Py_BuildValue("(i)", LOOP_PORTABLE);
    if (loops == NULL || PyModule_AddIntConstant(m, "SLACK", SLACK) < 0 ||
        PyModule_AddStringConstant(m, "SIMD",
                                   use_avx512 ? "avx512" : use_avx2 ? "avx2" : "portable") < 0 ||
        PyModule_AddObject(m, "LOOPS", loops) < 0) {
        Py_XDECREF(loops);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
