/* Pillow's resize, for both backends (pipelines/kernels.py for numba code, dali.py through
 * ctypes). First its horizontal pass (Resample.c, ImagingResampleHorizontal_8bpc) over rows of
 * interleaved RGB: the same 22-bit integer
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

/* The code path in use (0: portable, 1: SSE4.1, 2: AVX2): chosen when the library loads, before
 * any thread can call in, and read atomically (tests may cap it while no resample runs). */
static int level;
__attribute__((constructor)) static void choose_level(void) { __atomic_store_n(&level, best_level(), __ATOMIC_RELAXED); }

/* `at_most` >= 0 caps the path (tests compare every path the CPU has); returns the one in use. */
int fl_resample_level(int at_most) {
    int best = best_level();
    if (at_most >= 0) __atomic_store_n(&level, at_most < best ? at_most : best, __ATOMIC_RELAXED);
    return __atomic_load_n(&level, __ATOMIC_RELAXED);
}

static void run_pass(const pass_t *a) {
#if defined(__x86_64__) || defined(__i386__)
    int path = __atomic_load_n(&level, __ATOMIC_RELAXED);
    if (path == 2 && pass_avx2(a)) return;
    if (path == 1 && pass_sse41(a)) return;
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

/* ------------------------------------------------------------------------------------------
 * The whole of kernels.py's geometry rules, in C: Pillow's support bounds and coefficients
 * (Resample.c's precompute_coeffs + normalize_coeffs_8bpc; NEAREST as ImagingScaleAffine),
 * which rows and columns a window reads, and the window's resample (horizontal pass above,
 * then the vertical pass), flip and fused normalization. Called by numba code (ffcv backend)
 * and through ctypes (DALI backend on CPU), so the rules are written once.
 * Floating point as Python/numba computes it: no contraction into fused multiply-adds. */
#pragma GCC optimize("fp-contract=off")
#include <math.h>
#include <stdlib.h>

enum { F_BOX, F_BILINEAR, F_HAMMING, F_BICUBIC, F_LANCZOS, F_NEAREST };
enum { PAD_CONSTANT, PAD_EDGE, PAD_REFLECT };
static const double SUPPORT[6] = {0.5, 1.0, 1.0, 2.0, 3.0, 0.0};

static double sinc(double x) {
    if (x == 0.0) return 1.0;
    x = x * M_PI;
    return sin(x) / x;
}

static double weight(int filt, double x) {
    switch (filt) {
        case F_BILINEAR: x = fabs(x); return x < 1.0 ? 1.0 - x : 0.0;
        case F_BICUBIC:
            x = fabs(x);
            if (x < 1.0) return ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1;
            if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * -0.5;
            return 0.0;
        case F_LANCZOS: return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0;
        case F_BOX: return (-0.5 < x && x <= 0.5) ? 1.0 : 0.0;
        default: /* HAMMING, with Pillow's float constants */
            x = fabs(x);
            if (x == 0.0) return 1.0;
            if (x >= 1.0) return 0.0;
            x = x * M_PI;
            return sin(x) / x * ((double)0.54f + (double)0.46f * cos(x));
    }
}

/* First source index and tap count of outputs first..first+count-1 into bounds[2k], bounds[2k+1]. */
void fl_support_bounds(int64_t in_size, int64_t out_size, int64_t first, int64_t count, int filt, int32_t *bounds) {
    double scale = (double)in_size / (double)out_size;
    if (filt == F_NEAREST) {
        double xo = scale * 0.5;
        for (int64_t i = 0; i < first; i++) xo += scale;
        for (int64_t k = 0; k < count; k++) {
            int64_t v = xo < 0.0 ? -1 : (int64_t)xo;
            bounds[2 * k] = (int32_t)(v < in_size - 1 ? v : in_size - 1);
            bounds[2 * k + 1] = 1;
            xo += scale;
        }
        return;
    }
    double support = SUPPORT[filt] * (scale > 1.0 ? scale : 1.0);
    for (int64_t k = 0; k < count; k++) {
        double center = (double)(first + k) + 0.5;
        center = center * scale;
        int64_t xmin = (int64_t)(center - support + 0.5), xmax = (int64_t)(center + support + 0.5);
        if (xmin < 0) xmin = 0;
        if (xmax > in_size) xmax = in_size;
        bounds[2 * k] = (int32_t)xmin;
        bounds[2 * k + 1] = (int32_t)(xmax - xmin);
    }
}

static int64_t kernel_size(int64_t in_size, int64_t out_size, int filt) {
    double scale = (double)in_size / (double)out_size, filterscale = scale > 1.0 ? scale : 1.0;
    return (int64_t)ceil(SUPPORT[filt] * filterscale) * 2 + 1;
}

/* bounds as above and int32 coefficients [count, ksize] (zero past each output's taps). */
static void coefficients(int64_t in_size, int64_t out_size, int64_t first, int64_t count, int filt, int32_t *bounds,
                         int32_t *kk, int64_t ksize, double *tmp) {
    double scale = (double)in_size / (double)out_size, filterscale = scale > 1.0 ? scale : 1.0;
    fl_support_bounds(in_size, out_size, first, count, filt, bounds);
    memset(kk, 0, (size_t)(count * ksize) * sizeof(int32_t));
    if (filt == F_NEAREST) {
        for (int64_t k = 0; k < count; k++) kk[k * ksize] = 1 << PRECISION_BITS;
        return;
    }
    double ss = 1.0 / filterscale;
    for (int64_t k = 0; k < count; k++) {
        double center = ((double)(first + k) + 0.5) * scale;
        int64_t xmin = bounds[2 * k], n = bounds[2 * k + 1];
        double ww = 0.0;
        for (int64_t x = 0; x < n; x++) {
            double w = weight(filt, ((double)(x + xmin) - center + 0.5) * ss);
            tmp[x] = w;
            ww += w;
        }
        for (int64_t x = 0; x < n; x++) {
            double v = ww != 0.0 ? tmp[x] / ww : tmp[x];
            kk[k * ksize + x] = (int32_t)(v < 0 ? (int64_t)(-0.5 + v * (1 << PRECISION_BITS))
                                                : (int64_t)(0.5 + v * (1 << PRECISION_BITS)));
        }
    }
}

static int64_t reflect(int64_t i, int64_t n, int mode) {
    if (mode == PAD_EDGE) return i < 0 ? 0 : (i >= n ? n - 1 : i);
    if (n == 1) return 0; /* reflect without repeating the edge (numpy/torchvision 'reflect') */
    int64_t period = 2 * n - 2;
    i = (i < 0 ? -i : i) % period;
    return i >= n ? period - i : i;
}

/* The positions [lo, hi) of an axis of `size` that a crop window [start, start + n) reads: the
 * window clipped to the axis with constant padding, else every position its padding mirrors. */
static void crop_span(int64_t size, int64_t start, int64_t n, int pad_mode, int64_t *lo, int64_t *hi) {
    if (pad_mode == PAD_CONSTANT || (start >= 0 && start + n <= size)) {
        *lo = start > 0 ? start : 0;
        *hi = start + n < size ? start + n : size;
    } else {
        *lo = size;
        *hi = 0;
        for (int64_t i = start; i < start + n; i++) {
            int64_t j = reflect(i, size, pad_mode);
            if (j < *lo) *lo = j;
            if (j + 1 > *hi) *hi = j + 1;
        }
    }
    if (*hi < *lo) *hi = *lo;
}

/* Along one axis: the source span [lo, hi) that outputs start..start+n-1 of a resize from `size`
 * to `out` read (clipped to the box), or of a crop (out == size) with `pad_mode` padding. */
static void axis_span(int64_t size, int64_t out, int64_t start, int64_t n, int filt, int pad_mode, int64_t *lo,
                      int64_t *hi) {
    if (out == size) {
        crop_span(size, start, n, pad_mode, lo, hi);
        return;
    }
    int32_t b[2];
    fl_support_bounds(size, out, start, 1, filt, b);
    *lo = b[0];
    fl_support_bounds(size, out, start + n - 1, 1, filt, b);
    *hi = (int64_t)b[0] + b[1];
    if (*hi < *lo) *hi = *lo;
}

/* Rows [r0, r1) and columns [c0, c1) of an h x w box that the (top, left, dh, dw) window of its
 * resize to out_h x out_w reads: out[0..3]. */
void fl_source_window(int64_t h, int64_t w, int64_t out_h, int64_t out_w, int64_t top, int64_t left, int64_t dh,
                      int64_t dw, int filt, int pad_mode, int64_t *out) {
    axis_span(h, out_h, top, dh, filt, pad_mode, &out[0], &out[1]);
    axis_span(w, out_w, left, dw, filt, pad_mode, &out[2], &out[3]);
}

/* The positions [lo, hi) that support bounds (first, count per output) read. */
static void bounds_span(const int32_t *bounds, int64_t n, int64_t *lo, int64_t *hi) {
    *lo = INT64_MAX;
    *hi = INT64_MIN;
    for (int64_t k = 0; k < n; k++) {
        if (bounds[2 * k + 1] <= 0) continue;
        if (bounds[2 * k] < *lo) *lo = bounds[2 * k];
        if ((int64_t)bounds[2 * k] + bounds[2 * k + 1] > *hi) *hi = (int64_t)bounds[2 * k] + bounds[2 * k + 1];
    }
    if (*hi < *lo) *lo = *hi = 0;
}

/* Box positions [lo, hi) at `offset` lie in [0, extent) (or none is read). */
static int within(int64_t lo, int64_t hi, int64_t offset, int64_t extent) {
    return hi <= lo || (offset + lo >= 0 && offset + hi <= extent);
}

/* One output row of 0..255 levels (interleaved RGB) -> dst: uint8 HWC, or float
 * level * scale[c] - shift[c] in HWC or CHW; mirrored when `flip`. */
static inline void store_row(void *dst, int64_t yy, const int32_t *levels, int64_t dh, int64_t dw, int flip, int chw,
                      int norm, const float *scale, const float *shift) {
    if (chw) {
        for (int c = 0; c < 3; c++) {
            float *out = (float *)dst + ((int64_t)c * dh + yy) * dw, s = scale[c], b = shift[c];
            for (int64_t xx = 0; xx < dw; xx++) out[flip ? dw - 1 - xx : xx] = (float)levels[xx * 3 + c] * s - b;
        }
        return;
    }
    for (int64_t xx = 0; xx < dw; xx++) {
        int64_t at = (yy * dw + (flip ? dw - 1 - xx : xx)) * 3;
        for (int c = 0; c < 3; c++) {
            if (norm) ((float *)dst)[at + c] = (float)levels[xx * 3 + c] * scale[c] - shift[c];
            else ((unsigned char *)dst)[at + c] = (unsigned char)levels[xx * 3 + c];
        }
    }
}

/* Write the (top, left) window (dh x dw) of resize(box -> out_h x out_w) into `dst`, where box
 * pixel (y, x) is src[y0 + y][x0 + x] of the src_rows x src_cols RGB image `src` (y0/x0 may be
 * negative when `src` holds only the rows/columns fl_source_window names). Returns 0; 1 when out
 * of memory; 2, before reading anything, when the geometry would read a pixel `src` does not hold
 * (sizes come from a dataset's records index: nothing is read outside `src` whatever they say).
 * Nothing sensible is written unless it returns 0. */
#if defined(__x86_64__)
/* the vertical pass and the store vectorize: wider with AVX2 where the CPU has it */
__attribute__((target_clones("avx2", "default")))
#endif
int fl_resample_window(const unsigned char *src, int64_t src_rows, int64_t src_cols, int64_t y0, int64_t x0,
                       int64_t h, int64_t w, int64_t out_h, int64_t out_w, int64_t top, int64_t left, int flip,
                       int pad_mode, int filt, void *dst, int64_t dh, int64_t dw, int chw, int norm,
                       const float *scale, const float *shift) {
    if (h < 1 || w < 1 || out_h < 1 || out_w < 1 || dh < 1 || dw < 1 || src_rows < 0 || src_cols < 0) return 2;
    int64_t n3 = dw * 3;
    if (out_h == h && out_w == w) { /* no resampling: a (padded) crop reads what crop_span says, if anything */
        int64_t r0, r1, c0, c1;
        crop_span(h, top, dh, pad_mode, &r0, &r1);
        crop_span(w, left, dw, pad_mode, &c0, &c1);
        if (r1 > r0 && c1 > c0 && !(within(r0, r1, y0, src_rows) && within(c0, c1, x0, src_cols))) return 2;
    }
    int32_t *levels = malloc((size_t)n3 * sizeof(int32_t));
    if (!levels) return 1;
    if (out_h == h && out_w == w) {
        for (int64_t yy = 0; yy < dh; yy++) {
            int64_t sy = top + yy;
            int inside_y = 0 <= sy && sy < h;
            if (!inside_y && pad_mode != PAD_CONSTANT) {
                sy = reflect(sy, h, pad_mode);
                inside_y = 1;
            }
            for (int64_t xx = 0; xx < dw; xx++) {
                int64_t sx = left + xx;
                int inside = inside_y && 0 <= sx && sx < w;
                if (inside_y && !inside && pad_mode != PAD_CONSTANT) {
                    sx = reflect(sx, w, pad_mode);
                    inside = 1;
                }
                for (int c = 0; c < 3; c++)
                    levels[xx * 3 + c] = inside ? src[((y0 + sy) * src_cols + (x0 + sx)) * 3 + c] : 0;
            }
            store_row(dst, yy, levels, dh, dw, flip, chw, norm, scale, shift);
        }
        free(levels);
        return 0;
    }
    int need_h = out_w != w, need_v = out_h != h;
    int64_t ksh = kernel_size(w, out_w, filt), ksv = kernel_size(h, out_h, filt);
    int64_t kmax = ksh > ksv ? ksh : ksv;
    int32_t *bh = malloc((size_t)(2 * dw + dw * ksh + 2 * dh + dh * ksv) * sizeof(int32_t));
    double *weights = malloc((size_t)kmax * sizeof(double));
    if (!bh || !weights) {
        free(levels); free(bh); free(weights);
        return 1;
    }
    int32_t *kh = bh + 2 * dw, *bv = kh + dw * ksh, *kv = bv + 2 * dh;
    coefficients(w, out_w, left, dw, filt, bh, kh, ksh, weights);
    coefficients(h, out_h, top, dh, filt, bv, kv, ksv, weights);
    /* the source rows and columns read: the filters' support, or an unresampled axis's window
     * (inside the box: padding comes with resampling on neither axis, the crop above) */
    int64_t r0 = top, r1 = top + dh, c0 = left, c1 = left + dw;
    if (need_v) bounds_span(bv, dh, &r0, &r1);
    if (need_h) bounds_span(bh, dw, &c0, &c1);
    if (!(need_v || (r0 >= 0 && r1 <= h)) || !(need_h || (c0 >= 0 && c1 <= w)) || !within(r0, r1, y0, src_rows)
        || !within(c0, c1, x0, src_cols)) {
        free(levels); free(bh); free(weights);
        return 2;
    }
    unsigned char *tmp = malloc((size_t)((r1 - r0) * n3 + 1));
    if (!tmp) {
        free(levels); free(bh); free(weights);
        return 1;
    }
    /* horizontal pass: each needed source row once, into uint8 rows of dw pixels */
    int64_t row_bytes = src_cols * 3, first = (y0 + r0) * row_bytes;
    if (need_h) {
        fl_resample_rows(src + first, src_rows * row_bytes - first, row_bytes, (int)(r1 - r0), x0 * 3, bh, kh,
                         (int)ksh, (int)dw, tmp);
    } else {
        for (int64_t r = r0; r < r1; r++)
            memcpy(tmp + (r - r0) * n3, src + (y0 + r) * row_bytes + (x0 + left) * 3, (size_t)n3);
    }
    /* vertical pass: whole interleaved rows per tap (the compiler vectorizes it) */
    for (int64_t yy = 0; yy < dh; yy++) {
        if (need_v) {
            for (int64_t j = 0; j < n3; j++) levels[j] = 1 << (PRECISION_BITS - 1);
            int64_t ymin = bv[2 * yy] - r0;
            for (int64_t y = 0; y < bv[2 * yy + 1]; y++) {
                int32_t k = kv[yy * ksv + y];
                const unsigned char *line = tmp + (ymin + y) * n3;
                for (int64_t j = 0; j < n3; j++) levels[j] += (int32_t)line[j] * k;
            }
            for (int64_t j = 0; j < n3; j++) levels[j] = clip8(levels[j]);
        } else {
            const unsigned char *line = tmp + yy * n3;
            for (int64_t j = 0; j < n3; j++) levels[j] = line[j];
        }
        store_row(dst, yy, levels, dh, dw, flip, chw, norm, scale, shift);
    }
    free(tmp); free(levels); free(bh); free(weights);
    return 0;
}

/* A geometry row, as pipelines/sampling.py writes it (PARAM_COLUMNS): the source box (y0, x0,
 * h, w), its resize (out_h, out_w), the output window's corner (top, left), the flip. native.py
 * checks fl_param_columns() against sampling.py's names when it loads this library. */
enum { P_Y0, P_X0, P_H, P_W, P_OUT_H, P_OUT_W, P_TOP, P_LEFT, P_FLIP, P_COLUMNS };
const char *fl_param_columns(void) { return "y0 x0 h w out_h out_w top left flip"; }

/* The DALI backend's batch on CPU. Per sample k: the image region its window reads (top, left,
 * height, width: at least one pixel, inside the image) from its geometry row. */
void fl_source_regions(const int64_t *rows, int64_t n, const int64_t *heights, const int64_t *widths, int64_t dh,
                       int64_t dw, int filt, int pad_mode, int64_t *regions) {
    for (int64_t k = 0; k < n; k++) {
        const int64_t *p = rows + P_COLUMNS * k;
        int64_t win[4];
        fl_source_window(p[P_H], p[P_W], p[P_OUT_H], p[P_OUT_W], p[P_TOP], p[P_LEFT], dh, dw, filt, pad_mode, win);
        int64_t *r = regions + 4 * k;
        r[0] = p[P_Y0] + win[0] < heights[k] - 1 ? p[P_Y0] + win[0] : heights[k] - 1;
        r[1] = p[P_X0] + win[2] < widths[k] - 1 ? p[P_X0] + win[2] : widths[k] - 1;
        r[2] = win[1] - win[0] > 1 ? win[1] - win[0] : 1;
        r[3] = win[3] - win[2] > 1 ? win[3] - win[2] : 1;
    }
}

/* ... and each decoded region (uint8 RGB at addresses[k], placed as fl_source_regions says)
 * resampled into image k of `dst` by its geometry row. Returns 0, else (k << 2) | fl_resample_window's
 * code for the first image k it failed. */
int fl_resample_regions(const uint64_t *addresses, const int64_t *regions, const int64_t *rows, int64_t n,
                        int pad_mode, int filt, void *dst, int64_t dh, int64_t dw, int chw, int norm,
                        const float *scale, const float *shift) {
    int64_t image_bytes = dh * dw * 3 * (norm ? (int64_t)sizeof(float) : 1);
    for (int64_t k = 0; k < n; k++) {
        const unsigned char *region = (const unsigned char *)(uintptr_t)addresses[k];
        const int64_t *p = rows + P_COLUMNS * k, *r = regions + 4 * k;
        int failed = fl_resample_window(region, r[2], r[3], p[P_Y0] - r[0], p[P_X0] - r[1], p[P_H], p[P_W],
                                        p[P_OUT_H], p[P_OUT_W], p[P_TOP], p[P_LEFT], p[P_FLIP] != 0, pad_mode, filt,
                                        (char *)dst + k * image_bytes, dh, dw, chw, norm, scale, shift);
        if (failed) return (int)(k << 2) | failed;
    }
    return 0;
}
