/* Pillow's horizontal resampling pass (Resample.c, ImagingResampleHorizontal_8bpc) over rows of
 * interleaved RGB, for pipelines/kernels.py's resample_window: the same 22-bit integer
 * coefficients, int32 sums started at 1 << 21, shifted and clipped to 0..255, so the output is
 * Pillow's bit for bit. Why C: numba (its SLP vectorizer is off) computes the three channels
 * one multiply-add at a time, which made this pass 80% of a RandomResizedCrop's geometry. Here
 * one pixel is one vector of four int32 lanes (R, G, B and the next byte, whose sum is thrown
 * away) and each tap is one multiply-add, with SSE4.1 where the CPU has it (0.40 -> 0.22 ms per
 * RandomResizedCrop on ImageNet photos; AVX2, two taps a step, gained 4% more: not kept); the
 * plain C loop is the portable fallback and gives the same integers.
 */
#include <stdint.h>
#include <string.h>

#define PRECISION_BITS 22

static inline unsigned char clip8(int32_t s) {
    s >>= PRECISION_BITS;
    return s < 0 ? 0 : (s > 255 ? 255 : (unsigned char)s);
}

/* One output pixel the portable way (also where a four-byte load would pass `limit`). */
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

typedef void (*row_fn)(const unsigned char *, int64_t, const int32_t *, const int32_t *, int, int, unsigned char *);

/* One row: `row` is the source row's byte 0 (column 0 of the box, RGB), `readable` how many of
 * its bytes from there on may be read; output pixel x reads taps bounds[2x+1] from column
 * bounds[2x] with coefficients coeffs[x * ksize ...]. */
static void row_scalar(const unsigned char *row, int64_t readable, const int32_t *bounds, const int32_t *coeffs,
                       int ksize, int dw, unsigned char *out) {
    (void)readable;
    for (int x = 0; x < dw; x++)
        pixel_scalar(row + 3 * (int64_t)bounds[2 * x], coeffs + (int64_t)x * ksize, bounds[2 * x + 1], out + 3 * x);
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

__attribute__((target("sse4.1")))
static void row_sse41(const unsigned char *row, int64_t readable, const int32_t *bounds, const int32_t *coeffs,
                      int ksize, int dw, unsigned char *out) {
    const __m128i start = _mm_set1_epi32(1 << (PRECISION_BITS - 1));
    for (int x = 0; x < dw; x++) {
        int64_t first = 3 * (int64_t)bounds[2 * x];
        int taps = bounds[2 * x + 1];
        const int32_t *k = coeffs + (int64_t)x * ksize;
        if (first + 3 * (int64_t)taps + 1 > readable) { /* the last pixel's fourth byte is not ours */
            pixel_scalar(row + first, k, taps, out + 3 * x);
            continue;
        }
        const unsigned char *p = row + first;
        __m128i acc = start;
        for (int t = 0; t < taps; t++) {
            int32_t px;
            memcpy(&px, p + 3 * t, 4);
            __m128i v = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(px));
            acc = _mm_add_epi32(acc, _mm_mullo_epi32(v, _mm_set1_epi32(k[t])));
        }
        acc = _mm_srai_epi32(acc, PRECISION_BITS);
        /* saturating packs clip exactly to 0..255: int32 -> int16 -> uint8 */
        int32_t packed = _mm_cvtsi128_si32(_mm_packus_epi16(_mm_packs_epi32(acc, acc), acc));
        memcpy(out + 3 * x, &packed, 3);
    }
}

static row_fn pick_row(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.1") ? row_sse41 : row_scalar;
}
#else
static row_fn pick_row(void) { return row_scalar; }
#endif

/* `rows` source rows, `row_bytes` apart, starting at `src`; `col_base` is the byte offset of box
 * column 0 within a row (negative when the rows hold only the columns the window reads);
 * `readable` is how many bytes from `src` may be read. Output rows are dw * 3 bytes, packed. */
void fl_resample_rows(const unsigned char *src, int64_t readable, int64_t row_bytes, int rows, int64_t col_base,
                      const int32_t *bounds, const int32_t *coeffs, int ksize, int dw, unsigned char *out) {
    static row_fn row = 0;
    if (!row) row = pick_row();
    for (int r = 0; r < rows; r++) {
        int64_t at = (int64_t)r * row_bytes + col_base;
        row(src + at, readable - at, bounds, coeffs, ksize, dw, out + (int64_t)r * dw * 3);
    }
}
