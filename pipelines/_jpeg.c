/* Region-of-interest JPEG decoding for the ffcv backend, and the converter's corruption check,
 * called through ctypes (the GIL is released for the call) and from numba code by name.
 * libjpeg's accurate integer DCT (JDCT_ISLOW) with fancy upsampling: what PIL decodes, bit for
 * bit. Only the rows a crop needs are decoded (jpeg_skip_scanlines above, stop below) and,
 * within them, the iMCU columns that cover it (jpeg_crop_scanline). Part of the _native
 * library (_native.c).
 */
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <jpeglib.h>

struct error_state {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

static void on_error(j_common_ptr cinfo) {
    struct error_state *e = (struct error_state *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, e->message);
    longjmp(e->jump, 1);
}

/* Warnings (corrupt data, premature end) are counted, not printed: the caller refuses them. */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) {
        struct error_state *e = (struct error_state *)cinfo->err;
        if (e->pub.num_warnings == 0) (*cinfo->err->format_message)(cinfo, e->message);
        e->pub.num_warnings++;
    }
}

static void init_errors(struct jpeg_decompress_struct *d, struct error_state *e) {
    d->err = jpeg_std_error(&e->pub);
    e->pub.error_exit = on_error;
    e->pub.emit_message = on_message;
    e->message[0] = 0;
}

static void open_jpeg(struct jpeg_decompress_struct *d, const unsigned char *data, unsigned long size) {
    jpeg_create_decompress(d);
    jpeg_mem_src(d, data, size);
    jpeg_read_header(d, TRUE);
}

/* Stop decoding (whatever is left of the file is not read) and free `d`: 0, or 1 with the
 * first warning's message when libjpeg warned (corrupt or truncated data). */
static int finish(struct jpeg_decompress_struct *d, struct error_state *e, char *message, int message_len) {
    int warnings = (int)e->pub.num_warnings;
    jpeg_abort_decompress(d);
    jpeg_destroy_decompress(d);
    if (warnings) {
        snprintf(message, message_len, "%s", e->message);
        return 1;
    }
    return 0;
}

/* Decode rows [y0, y1) and at least columns [x0, x1) of a JPEG as RGB into `out` (row pitch
 * `stride` bytes, `capacity` bytes in all). The JPEG must be `height` x `width` pixels (what the
 * records index says: a dataset's files are checked, not trusted), and the rows must fit in `out`.
 * On success returns 0 and the first decoded column in *col0 (<= x0). Returns 1 with a message on
 * an error, a warning, or a JPEG or region that does not fit. */
int fl_jpeg_decode_region(const unsigned char *data, unsigned long size, int height, int width, int y0, int y1,
                          int x0, int x1, unsigned char *out, int64_t stride, int64_t capacity, int *col0,
                          char *message, int message_len) {
    struct jpeg_decompress_struct d;
    struct error_state e;
    init_errors(&d, &e);
    if (setjmp(e.jump)) { /* here, not in a helper: the jump needs this frame */
        snprintf(message, message_len, "%s", e.message);
        jpeg_destroy_decompress(&d);
        return 1;
    }
    open_jpeg(&d, data, size);
    if ((int64_t)d.image_height != height || (int64_t)d.image_width != width) {
        snprintf(message, message_len, "the JPEG is %ux%u pixels, the records index says %dx%d", d.image_width,
                 d.image_height, width, height);
        jpeg_destroy_decompress(&d);
        return 1;
    }
    d.out_color_space = JCS_RGB;
    d.dct_method = JDCT_ISLOW;
    jpeg_start_decompress(&d);
    if (y0 < 0 || x0 < 0 || y1 > (int)d.output_height || x1 > (int)d.output_width || y0 >= y1 || x0 >= x1
        || d.output_components != 3 || stride < 3 * (int64_t)d.output_width
        || (int64_t)(y1 - y0) * stride > capacity) {
        snprintf(message, message_len, "region rows %d..%d, columns %d..%d does not fit the %dx%d image or its "
                 "buffer", y0, y1, x0, x1, (int)d.output_height, (int)d.output_width);
        jpeg_destroy_decompress(&d);
        return 1;
    }
    /* One column of margin each side: with fancy upsampling, the edge columns of a cropped
     * scanline can differ from a full decode (measured on real photos); one more is exact. A crop
     * under 3 columns wide is not (a 1-column region at the image's edge, measured): widened. */
    int cx0 = x0 > 0 ? x0 - 1 : 0, cx1 = x1 < (int)d.output_width ? x1 + 1 : (int)d.output_width;
    if (cx1 - cx0 < 3) {
        cx1 = cx0 + 3 < (int)d.output_width ? cx0 + 3 : (int)d.output_width;
        cx0 = cx1 - 3 > 0 ? cx1 - 3 : 0;
    }
    JDIMENSION xoffset = (JDIMENSION)cx0, cropped = (JDIMENSION)(cx1 - cx0);
    if (cx0 > 0 || cx1 < (int)d.output_width) jpeg_crop_scanline(&d, &xoffset, &cropped);
    *col0 = (int)xoffset;
    if (y0 > 0) jpeg_skip_scanlines(&d, (JDIMENSION)y0);
    for (int r = y0; r < y1; r++) {
        JSAMPROW row = out + (size_t)(r - y0) * (size_t)stride;
        jpeg_read_scanlines(&d, &row, 1);
    }
    return finish(&d, &e, message, message_len);
}

/* The corruption check of a stored JPEG, at a fraction of a decode: every entropy-coded block
 * is read (where truncated or garbled data shows, as an error or a warning) but reconstructed
 * at 1/8 scale, DC only. Returns 0 when libjpeg neither fails nor warns, else 1 with a message. */
int fl_jpeg_check(const unsigned char *data, unsigned long size, char *message, int message_len) {
    struct jpeg_decompress_struct d;
    struct error_state e;
    init_errors(&d, &e);
    if (setjmp(e.jump)) {
        snprintf(message, message_len, "%s", e.message);
        jpeg_destroy_decompress(&d);
        return 1;
    }
    open_jpeg(&d, data, size);
    d.scale_num = 1;
    d.scale_denom = 8;
    d.do_fancy_upsampling = FALSE;
    jpeg_start_decompress(&d);
    JSAMPARRAY row = (*d.mem->alloc_sarray)((j_common_ptr)&d, JPOOL_IMAGE,
                                            d.output_width * (JDIMENSION)d.output_components, 1);
    while (d.output_scanline < d.output_height) jpeg_read_scanlines(&d, row, 1);
    return finish(&d, &e, message, message_len); /* nothing after the last row is read: as the decoder above */
}
