/* Pillow's horizontal resampling pass (Resample.c, ImagingResampleHorizontal_8bpc) over rows of
 * interleaved RGB, for pipelines/kernels.py's resample_window: the same 22-bit integer
 * coefficients, int32 sums started at 1 << 21, shifted and clipped to 0..255, so the output is
 * Pillow's bit for bit. Why C: numba (its SLP vectorizer is off) computes the three channels
 * one multiply-add at a time, which made this pass 80% of a RandomResizedCrop's geometry.
 *
 * The SIMD path takes two taps a step with 16-bit multiply-adds (pmaddwd), exactly: each
 * coefficient is split as k = hi * 2^15 + lo (lo in 0..32767, hi in -64..128), so pixel * k is
 * two int16 products and sum(p * k) = (sum(p * hi) << 15) + sum(p * lo) in int32: Pillow's sum.
 * A pixel's R, G, B are three lanes, so one step is one shuffle and two multiply-adds for two
 * taps of three channels; with AVX2, two output columns a step. The coefficient vectors depend
 * on the output column only: built once per call, shared by all its rows. Every column runs the
 * same number of tap pairs (zero coefficients past its own taps): a fixed trip count, unrolled.
 * Measured on a 500x375 photo's Resize(256)+CenterCrop(224) rows (2-3 taps): 0.24 ms with one
 * 32-bit multiply per tap and pixel (the previous kernel), 0.14 ms SSE4.1, see the AVX2 note below.
 * The plain C loop is the portable fallback and gives the same integers.
 */
#include <stdint.h>
#include <string.h>

#define PRECISION_BITS 22

static inline unsigned char clip8(int32_t s) {
    s >>= PRECISION_BITS;
    return s < 0 ? 0 : (s > 255 ? 255 : (unsigned char)s);
}

/* One output pixel the portable way (also where an 8-byte load would pass `readable`). */
static inline void pixel_scalar(const unsigned char *p, const int32_t *k, int taps, unsigned char *out) {
    int32_t s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
    for (int t = 0; t < taps; t++) {
        s0 += (int32_t)p[3 * t] * k[t];
        s1 += (int32_t)p[3 * t + 1] * k[t];
        s2 += (int32_t)p[3 * t + 2] * k[t];
    }
    out[0] = clip8(s0);
    out[1] = clip8(s1);
    out[2] = clip8(s2);
}

/* Output columns [from, to) of one row: `row` is the source row's byte 0 (column 0 of the box,
 * RGB); output pixel x reads taps bounds[2x+1] from column bounds[2x] with coefficients
 * coeffs[x * ksize ...]. */
static void columns_scalar(const unsigned char *row, const int32_t *bounds, const int32_t *coeffs, int ksize,
                           int from, int to, unsigned char *out) {
    for (int x = from; x < to; x++)
        pixel_scalar(row + 3 * (int64_t)bounds[2 * x], coeffs + (int64_t)x * ksize, bounds[2 * x + 1], out + 3 * x);
}

typedef struct {
    const unsigned char *src;
    int64_t readable, row_bytes, col_base;
    int rows, ksize, dw;
    const int32_t *bounds, *coeffs;
    unsigned char *out;
} pass_t;

static void rows_scalar(const pass_t *a) {
    for (int r = 0; r < a->rows; r++)
        columns_scalar(a->src + (int64_t)r * a->row_bytes + a->col_base, a->bounds, a->coeffs, a->ksize, 0, a->dw,
                       a->out + (int64_t)r * a->dw * 3);
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <stdlib.h>

/* Columns before the returned one may load 6 * used + 2 bytes from their first tap within
 * `room` bytes of the row start (first taps only grow with the column). */
static int safe_columns(const int32_t *bounds, int dw, int used, int64_t room) {
    int safe = dw;
    while (safe > 0 && 3 * (int64_t)bounds[2 * (safe - 1)] + 6 * (int64_t)used + 2 > room) safe--;
    return safe;
}

/* Per output column and pair of taps j: hi and lo vectors [k0, k1, k0, k1, k0, k1, 0, 0] (int16),
 * `lanes` columns side by side (1: SSE, 2: AVX2). Vector of (column x, pair j, part) at
 * (((x / lanes) * pairs + j) * 2 + part) * lanes + x % lanes. NULL when out of memory. */
__attribute__((target("sse4.1")))
static __m128i *coefficient_table(const pass_t *a, int pairs, int lanes) {
    int columns = (a->dw + lanes - 1) / lanes * lanes;
    __m128i *kv = aligned_alloc(32, (size_t)columns * (size_t)pairs * 2 * sizeof(__m128i));
    if (!kv) return NULL;
    for (int x = 0; x < columns; x++) {
        const int32_t *k = a->coeffs + (int64_t)x * a->ksize;
        int taps = x < a->dw ? a->bounds[2 * x + 1] : 0;
        for (int j = 0; j < pairs; j++) {
            int32_t k0 = 2 * j < taps ? k[2 * j] : 0, k1 = 2 * j + 1 < taps ? k[2 * j + 1] : 0;
            int16_t h0 = (int16_t)(k0 >> 15), h1 = (int16_t)(k1 >> 15);
            int16_t l0 = (int16_t)(k0 & 0x7fff), l1 = (int16_t)(k1 & 0x7fff);
            int64_t at = (((int64_t)(x / lanes) * pairs + j) * 2) * lanes + x % lanes;
            kv[at] = _mm_setr_epi16(h0, h1, h0, h1, h0, h1, 0, 0);
            kv[at + lanes] = _mm_setr_epi16(l0, l1, l0, l1, l0, l1, 0, 0);
        }
    }
    return kv;
}

/* bytes R0 G0 B0 R1 G1 B1 of two adjacent pixels -> int16 lanes R0 R1 G0 G1 B0 B1 0 0 */
#define SPREAD 0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1

__attribute__((target("ssse3,sse4.1"), always_inline))
static inline void rows_sse41(const pass_t *a, const __m128i *kv, int pairs, const int used) {
    const __m128i spread = _mm_setr_epi8(SPREAD);
    const __m128i start = _mm_set1_epi32(1 << (PRECISION_BITS - 1));
    for (int r = 0; r < a->rows; r++) {
        int64_t at = (int64_t)r * a->row_bytes + a->col_base;
        const unsigned char *row = a->src + at;
        unsigned char *o = a->out + (int64_t)r * a->dw * 3;
        int safe = safe_columns(a->bounds, a->dw, used, a->readable - at);
        columns_scalar(row, a->bounds, a->coeffs, a->ksize, safe, a->dw, o);
        for (int x = 0; x < safe; x++) {
            const unsigned char *p = row + 3 * (int64_t)a->bounds[2 * x];
            const __m128i *kx = kv + (int64_t)x * pairs * 2;
            __m128i hi = _mm_setzero_si128(), lo = start;
            for (int j = 0; j < used; j++) {
                __m128i v = _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i *)(p + 6 * j)), spread);
                hi = _mm_add_epi32(hi, _mm_madd_epi16(v, kx[2 * j]));
                lo = _mm_add_epi32(lo, _mm_madd_epi16(v, kx[2 * j + 1]));
            }
            __m128i acc = _mm_srai_epi32(_mm_add_epi32(_mm_slli_epi32(hi, 15), lo), PRECISION_BITS);
            /* saturating packs clip exactly to 0..255: int32 -> int16 -> uint8 */
            int32_t packed = _mm_cvtsi128_si32(_mm_packus_epi16(_mm_packs_epi32(acc, acc), acc));
            memcpy(o + 3 * x, &packed, x + 1 < safe ? 4 : 3); /* a 4th byte is the next pixel's: rewritten */
        }
    }
}

__attribute__((target("avx2"), always_inline))
static inline void rows_avx2(const pass_t *a, const __m128i *kv, int pairs, const int used) {
    const __m256i spread = _mm256_setr_epi8(SPREAD, SPREAD);
    const __m256i start = _mm256_set1_epi32(1 << (PRECISION_BITS - 1));
    /* R0 G0 B0 . R1 G1 B1 . -> six packed bytes */
    const __m128i squeeze = _mm_setr_epi8(0, 1, 2, 4, 5, 6, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    for (int r = 0; r < a->rows; r++) {
        int64_t at = (int64_t)r * a->row_bytes + a->col_base;
        const unsigned char *row = a->src + at;
        unsigned char *o = a->out + (int64_t)r * a->dw * 3;
        int safe = safe_columns(a->bounds, a->dw, used, a->readable - at) & ~1;
        columns_scalar(row, a->bounds, a->coeffs, a->ksize, safe, a->dw, o);
        for (int x = 0; x < safe; x += 2) {
            const unsigned char *p0 = row + 3 * (int64_t)a->bounds[2 * x], *p1 = row + 3 * (int64_t)a->bounds[2 * x + 2];
            const __m256i *kx = (const __m256i *)(kv + (int64_t)x * pairs * 2);
            __m256i hi = _mm256_setzero_si256(), lo = start;
            for (int j = 0; j < used; j++) {
                __m256i v = _mm256_inserti128_si256(
                    _mm256_castsi128_si256(_mm_loadl_epi64((const __m128i *)(p0 + 6 * j))),
                    _mm_loadl_epi64((const __m128i *)(p1 + 6 * j)), 1);
                v = _mm256_shuffle_epi8(v, spread);
                hi = _mm256_add_epi32(hi, _mm256_madd_epi16(v, _mm256_load_si256(kx + 2 * j)));
                lo = _mm256_add_epi32(lo, _mm256_madd_epi16(v, _mm256_load_si256(kx + 2 * j + 1)));
            }
            __m256i acc = _mm256_srai_epi32(_mm256_add_epi32(_mm256_slli_epi32(hi, 15), lo), PRECISION_BITS);
            __m128i two = _mm_packs_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
            two = _mm_shuffle_epi8(_mm_packus_epi16(two, two), squeeze);
            if (x + 2 < safe) _mm_storel_epi64((__m128i *)(o + 3 * x), two); /* 2 bytes over: rewritten next */
            else memcpy(o + 3 * x, &two, 6);
        }
    }
}

static int pairs_used(const pass_t *a) {
    int used = 0;
    for (int x = 0; x < a->dw; x++)
        if ((a->bounds[2 * x + 1] + 1) / 2 > used) used = (a->bounds[2 * x + 1] + 1) / 2;
    return used;
}

/* The SIMD pass: the table, then the loop specialized for the usual pair counts. Returns 0 when
 * there was no memory for the table (nothing written). */
#define SIMD_PASS(name, target_isa, loop, lanes) \
    __attribute__((target(target_isa))) static int name(const pass_t *a) { \
        int used = pairs_used(a), pairs = (a->ksize + 1) / 2; \
        __m128i *kv = coefficient_table(a, pairs, lanes); \
        if (!kv) return 0; \
        switch (used) { \
            case 1: loop(a, kv, pairs, 1); break; \
            case 2: loop(a, kv, pairs, 2); break; \
            case 3: loop(a, kv, pairs, 3); break; \
            case 4: loop(a, kv, pairs, 4); break; \
            default: loop(a, kv, pairs, used); \
        } \
        free(kv); \
        return 1; \
    }
SIMD_PASS(pass_sse41, "ssse3,sse4.1", rows_sse41, 1)
SIMD_PASS(pass_avx2, "avx2", rows_avx2, 2)

static int best_level(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? 2
           : (__builtin_cpu_supports("ssse3") && __builtin_cpu_supports("sse4.1")) ? 1 : 0;
}
#else
static int best_level(void) { return 0; }
#endif

static int level = -1; /* 0: portable, 1: SSE4.1, 2: AVX2 */

/* The code path in use; `at_most` >= 0 caps it (tests compare every path the CPU has). */
int fl_resample_level(int at_most) {
    int best = best_level();
    if (level < 0) level = best;
    if (at_most >= 0) level = at_most < best ? at_most : best;
    return level;
}

static void run_pass(const pass_t *a) {
    if (level < 0) fl_resample_level(-1);
#if defined(__x86_64__) || defined(__i386__)
    if (level == 2 && pass_avx2(a)) return;
    if (level == 1 && pass_sse41(a)) return;
#endif
    rows_scalar(a);
}

/* `rows` source rows, `row_bytes` apart, starting at `src`; `col_base` is the byte offset of box
 * column 0 within a row (negative when the rows hold only the columns the window reads);
 * `readable` is how many bytes from `src` may be read. Output rows are dw * 3 bytes, packed. */
void fl_resample_rows(const unsigned char *src, int64_t readable, int64_t row_bytes, int rows, int64_t col_base,
                      const int32_t *bounds, const int32_t *coeffs, int ksize, int dw, unsigned char *out) {
    pass_t a = {src, readable, row_bytes, col_base, rows, ksize, dw, bounds, coeffs, out};
    run_pass(&a);
}
