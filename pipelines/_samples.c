/* Checks of a stored sample before anything decodes it, the same in every backend: its bytes
 * against the records index's CRC32C (a flipped byte on disk or in transit), and, for a JPEG, its
 * marker structure and frame size against the index (a file cut short, garbage, another image),
 * so that no decoder, fastload's or DALI's, is handed bytes the dataset does not vouch for.
 * Part of the _native library. Everything here reads only within [data, data + size).
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* ---------------------------------------------------------------------------- CRC32C */
static uint32_t table[8][256];

__attribute__((constructor)) static void make_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1; /* Castagnoli, reflected */
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
}

static uint32_t crc_portable(uint32_t crc, const unsigned char *p, uint64_t n) {
    while (n >= 8) { /* slicing by 8 */
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc;
        crc = table[7][v & 0xff] ^ table[6][(v >> 8) & 0xff] ^ table[5][(v >> 16) & 0xff] ^
              table[4][(v >> 24) & 0xff] ^ table[3][(v >> 32) & 0xff] ^ table[2][(v >> 40) & 0xff] ^
              table[1][(v >> 48) & 0xff] ^ table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
    return crc;
}

#if defined(__x86_64__)
#include <nmmintrin.h>
/* SSE4.2's crc32 instruction computes CRC32C: 8 bytes a step (~8 GB/s), about a percent of a
 * JPEG decode's time. */
__attribute__((target("sse4.2"))) static uint32_t crc_sse42(uint32_t crc, const unsigned char *p, uint64_t n) {
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
        p += 8;
        n -= 8;
    }
    crc = (uint32_t)c;
    while (n--) crc = _mm_crc32_u8(crc, *p++);
    return crc;
}
static int have_sse42;
__attribute__((constructor)) static void detect(void) {
    __builtin_cpu_init();
    have_sse42 = __builtin_cpu_supports("sse4.2");
}
#endif

/* The CRC32C of n bytes (iSCSI's, as the crc32c package and TFRecord framing compute it). */
uint32_t fl_crc32c(const unsigned char *data, uint64_t n) {
#if defined(__x86_64__)
    if (have_sse42) return ~crc_sse42(0xFFFFFFFFu, data, n);
#endif
    return ~crc_portable(0xFFFFFFFFu, data, n);
}

/* ---------------------------------------------------------------------------- JPEG structure */
#define FAIL(...) do { snprintf(message, message_len, __VA_ARGS__); return 1; } while (0)

/* A stored JPEG's markers, walked from SOI to EOI: every segment within the data, one 8-bit,
 * three-component frame of `height` x `width` pixels before the first scan, every scan's
 * entropy-coded data ending at a marker (not at the end of the data: a file cut short), and EOI
 * after a scan (what follows EOI is ignored, as libjpeg ignores it). Returns 0, or 1 with a message. */
static int jpeg_structure(const unsigned char *data, uint64_t size, int64_t height, int64_t width, char *message,
                          int message_len) {
    if (size < 4 || data[0] != 0xFF || data[1] != 0xD8) FAIL("not a JPEG (no start-of-image marker)");
    uint64_t pos = 2;
    int frames = 0, scans = 0;
    for (;;) {
        if (pos >= size || data[pos] != 0xFF) {
            if (pos >= size) FAIL("the JPEG ends at byte %llu without its end-of-image marker (cut short)",
                                  (unsigned long long)pos);
            FAIL("no JPEG marker at byte %llu (damaged data)", (unsigned long long)pos);
        }
        while (pos < size && data[pos] == 0xFF) pos++; /* fill bytes */
        if (pos >= size) FAIL("the JPEG ends inside a marker (cut short)");
        unsigned marker = data[pos++];
        if (marker == 0xD9) { /* EOI */
            if (!scans) FAIL("the JPEG ends before any image data");
            return 0;
        }
        if (marker == 0x00 || marker == 0xD8) FAIL("invalid JPEG marker 0xFF%02X at byte %llu", marker,
                                                    (unsigned long long)(pos - 2));
        if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7)) continue; /* no length */
        if (pos + 2 > size) FAIL("the JPEG ends inside a segment header (cut short)");
        uint64_t length = ((uint64_t)data[pos] << 8) | data[pos + 1];
        if (length < 2 || pos + length > size)
            FAIL("a JPEG segment at byte %llu runs past the end of its data", (unsigned long long)(pos - 2));
        int sof = marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
        if (sof) {
            if (frames++) FAIL("the JPEG holds more than one frame");
            if (length < 8) FAIL("the JPEG's frame header is too short");
            int64_t h = ((int64_t)data[pos + 3] << 8) | data[pos + 4], w = ((int64_t)data[pos + 5] << 8) | data[pos + 6];
            if (data[pos + 2] != 8 || data[pos + 7] != 3)
                FAIL("the JPEG has %d-bit samples and %d components, not an 8-bit RGB image", data[pos + 2],
                     data[pos + 7]);
            if (h != height || w != width)
                FAIL("the JPEG is %lldx%lld pixels, the records index says %lldx%lld", (long long)w, (long long)h,
                     (long long)width, (long long)height);
        }
        pos += length;
        if (marker != 0xDA) continue;
        if (!frames) FAIL("the JPEG has image data before its frame header");
        scans++;
        for (;;) { /* entropy-coded data: up to the next marker that is not a stuffed 0 or a restart */
            const unsigned char *ff = memchr(data + pos, 0xFF, size - pos);
            if (!ff || ff + 1 >= data + size) FAIL("the JPEG's image data ends without an end-of-image marker "
                                                   "(cut short)");
            pos = (uint64_t)(ff - data);
            unsigned next = data[pos + 1];
            if (next == 0x00 || (next >= 0xD0 && next <= 0xD7)) pos += 2;
            else if (next == 0xFF) pos += 1;
            else break;
        }
    }
}

/* ---------------------------------------------------------------------------- a batch */
enum { CHECK_CRC = 1, CHECK_JPEG = 2 };

/* Samples 0..n-1, each `sizes[k]` bytes at `addresses[k]`: with CHECK_CRC in `what`, the CRC32C
 * against crcs[k]; with CHECK_JPEG, the structure above for a heights[k] x widths[k] image.
 * Returns -1 when all pass, else the first failing k with a message. */
int64_t fl_check_samples(const uint64_t *addresses, const uint64_t *sizes, const uint32_t *crcs,
                         const int64_t *heights, const int64_t *widths, int64_t n, int what, char *message,
                         int message_len) {
    int jpeg = what & CHECK_JPEG;
    for (int64_t k = 0; k < n; k++) {
        const unsigned char *data = (const unsigned char *)(uintptr_t)addresses[k];
        if (what & CHECK_CRC) {
            uint32_t crc = fl_crc32c(data, sizes[k]);
            if (crc != crcs[k]) {
                snprintf(message, message_len, "its bytes do not match their checksum (crc32c %08x, the records "
                         "index says %08x): the data file is damaged", crc, crcs[k]);
                return k;
            }
        }
        if (jpeg && jpeg_structure(data, sizes[k], heights[k], widths[k], message, message_len)) return k;
    }
    return -1;
}
