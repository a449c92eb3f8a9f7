/* camid.forensics._dcscan: the 1/8-scale luma image of a baseline JPEG, from its DC coefficients.
 *
 * `camid inspect` hashes every photo (perceptual hash) from a JPEG "draft mode" decode at 1/8 scale, which
 * also proves that the whole scan decodes (truncated files are rejected). At 1/8 scale libjpeg's output pixel
 * is just the block's DC coefficient, dequantized, descaled and level-shifted (jidctred.c, jpeg_idct_1x1),
 * but libjpeg still entropy-decodes every AC coefficient on the way, and that Huffman decoding is nearly all
 * of the cost. This module does the same walk through the entropy-coded data, skipping AC coefficients
 * without producing them: one lookup in a 12-bit table skips up to several whole (code + extra bits) symbols.
 *
 * The result is byte-identical to libjpeg's 1/8 grayscale decode (Pillow: Image.draft("L", ...) at scale 8),
 * so the perceptual hash is the same whichever path computed it; tests/test_dcscan.py checks this on many
 * layouts. Anything unusual is not handled here: progressive, lossless, arithmetic-coded or 12-bit frames, RGB-
 * or CMYK-coded colour, luma that is itself subsampled, more than one scan, bad Huffman codes, data running out
 * or a marker where data should be, restart markers out of sequence, garbage between segments, no EOI after
 * the scan. For all of those dc_image returns None and the caller decodes with Pillow, which then behaves
 * exactly as it always did (including its error for a truncated file). Never reads outside `data`.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LOOK 12    /* bits looked up at once when skipping AC symbols */
#define SLOOK 11   /* bits looked up for single symbols (DC, and AC where the multi-symbol entry can't be used) */
#define MAXBITS 18 /* most bits one multi-symbol entry consumes: 3 entries fit in one refill (>= 56 bits) */
#define BLOCK_MAX_BYTES 320 /* a block reads at most 27 + 63 * 31 bits plus the refill's 8-byte look-ahead */
#define READ_PAD (10 * BLOCK_MAX_BYTES + 16) /* zeros after the data: an MCU (<= 10 blocks) may overrun it */

typedef struct {
  int present;
  int nvals;
  /* AC: several whole symbols per LOOK bits: bits | (advance + eob) << 5 | eob << 12; 127 << 5 = no entry */
  uint16_t multi[1 << LOOK];
  uint16_t code[1 << SLOOK]; /* codes of <= SLOOK bits: length | symbol << 5; 0 = longer code */
  uint16_t one[1 << SLOOK];  /* AC single symbol, same layout as multi; DC: length | size << 5 (size <= 11) */
  int32_t maxcode[18];
  int32_t valptr[17];
  int32_t mincode[17];
  uint8_t vals[256];
} htable;

/* Huffman table from a DHT segment (bits[1..16], vals) as in T.81 Annex C; -1 where libjpeg would reject it. */
static int build_table(htable *t, const uint8_t bits[17], const uint8_t *vals, int nvals, int is_ac) {
  uint16_t huffcode[256], single[1 << LOOK];
  uint8_t huffsize[256];
  int code = 0, k = 0;
  memset(single, 0, sizeof single);
  memset(t->code, 0, sizeof t->code);
  memset(t->one, 0, sizeof t->one);
  memcpy(t->vals, vals, nvals);
  t->nvals = nvals;
  for (int l = 1; l <= 16; l++) {
    t->mincode[l] = code;
    t->valptr[l] = k;
    for (int i = 0; i < bits[l]; i++) {
      if (k >= nvals) return -1;
      huffcode[k] = (uint16_t)code;
      huffsize[k] = (uint8_t)l;
      code++;
      k++;
    }
    if (code > (1 << l)) return -1;
    t->maxcode[l] = bits[l] ? code - 1 : -1;
    code <<= 1;
  }
  t->maxcode[17] = 0x7FFFFFFF;
  for (int i = 0; i < k; i++) {
    int l = huffsize[i], sym = vals[i];
    uint16_t entry = (uint16_t)(l | (sym << 5)), one;
    if (is_ac) {
      int r = sym >> 4, s = sym & 15, eob = (s == 0 && r != 15);
      int advance = s ? r + 1 : (eob ? 0 : 16);
      one = (uint16_t)((l + s) | ((advance + eob) << 5) | (eob << 12));
    } else {
      one = sym <= 11 ? entry : 0;
    }
    if (l <= SLOOK)
      for (int j = 0; j < 1 << (SLOOK - l); j++) {
        t->code[(huffcode[i] << (SLOOK - l)) + j] = entry;
        t->one[(huffcode[i] << (SLOOK - l)) + j] = one;
      }
    if (l <= LOOK)
      for (int j = 0; j < 1 << (LOOK - l); j++) single[(huffcode[i] << (LOOK - l)) + j] = entry;
  }
  if (is_ac) {
    /* Pack as many whole symbols as the LOOK bits identify (codes inside the window, extra bits may run past
       it up to MAXBITS); stop after an end-of-block. The skipper accepts an entry only if the block cannot end
       inside it: k + advance <= 64 (the eob bit adds one so that an end-of-block needs k + advance < 64). */
    for (int idx = 0; idx < (1 << LOOK); idx++) {
      int pos = 0, advance = 0, eob = 0, nsym = 0;
      for (;;) {
        uint16_t e = single[((unsigned)idx << pos) & ((1u << LOOK) - 1)];
        if (!e) break;
        int l = e & 31, sym = e >> 5, r = sym >> 4, s = sym & 15;
        if (pos + l > LOOK || pos + l + s > MAXBITS) break;
        if (s == 0 && r != 15) {
          pos += l;
          eob = 1;
          nsym++;
          break;
        }
        int a = s ? r + 1 : 16;
        if (advance + a > 63) break;
        pos += l + s;
        advance += a;
        nsym++;
      }
      t->multi[idx] = nsym ? (uint16_t)(pos | ((advance + eob) << 5) | (eob << 12)) : (uint16_t)(127 << 5);
    }
  }
  t->present = 1;
  return 0;
}

static inline uint64_t load_be64(const uint8_t *p) {
  uint64_t w;
  memcpy(&w, p, 8);
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_bswap64(w);
#else
  uint64_t r = 0;
  for (int i = 0; i < 8; i++) r = (r << 8) | ((w >> (8 * i)) & 0xFF);
  return r;
#endif
}

#if defined(__GNUC__) || defined(__clang__)
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define LIKELY(x) (x)
#define UNLIKELY(x) (x)
#endif

/* Bits are kept left-aligned in buf (cnt valid); the data has been unstuffed and is followed by zero padding.
   The branch-free refill leaves 56 <= cnt <= 63. */
#define REFILL()                          \
  do {                                    \
    buf |= load_be64(p) >> cnt;           \
    p += (63 - cnt) >> 3;                 \
    cnt |= 56;                            \
  } while (0)
#define CONSUME(n)                        \
  do {                                    \
    int n_ = (n);                         \
    buf <<= n_;                           \
    cnt -= n_;                            \
  } while (0)

/* A symbol by canonical decoding (codes longer than SLOOK bits); -1 for a code the table doesn't have. */
static int slow_symbol(uint64_t *bufp, int *cntp, const htable *t) {
  uint64_t buf = *bufp;
  uint16_t e = t->code[buf >> (64 - SLOOK)];
  if (e) {
    *bufp = buf << (e & 31);
    *cntp -= e & 31;
    return e >> 5;
  }
  for (int l = SLOOK + 1; l <= 16; l++) {
    int32_t code = (int32_t)(buf >> (64 - l));
    if (code <= t->maxcode[l]) {
      int32_t index = t->valptr[l] + code - t->mincode[l];
      if (index < 0 || index >= t->nvals) return -1;
      *bufp = buf << l;
      *cntp -= l;
      return t->vals[index];
    }
  }
  return -1;
}

typedef struct {
  const uint8_t *p;
  uint64_t buf;
  int cnt;
} bitreader;

/* Entropy-decode n blocks of one component, keeping only the DC (into dcs when not NULL). 0, or -1 on a bad
   code. Each block reads at most BLOCK_MAX_BYTES past where it started. */
static int skip_blocks(bitreader *br, const htable *dc, const htable *ac, int64_t *pred, int n, int64_t *dcs) {
  uint64_t buf = br->buf;
  int cnt = br->cnt;
  const uint8_t *p = br->p;
  int rc = 0;
  for (int b = 0; b < n; b++) {
    REFILL();
    uint16_t e = dc->one[buf >> (64 - SLOOK)];
    int s;
    if (LIKELY(e != 0)) {
      CONSUME(e & 31);
      s = e >> 5;
    } else {
      s = slow_symbol(&buf, &cnt, dc);
      if (s < 0 || s > 11) {
        rc = -1;
        goto out;
      }
    }
    if (s) {
      int v = (int)(buf >> (64 - s));
      CONSUME(s);
      if (v < (1 << (s - 1))) v -= (1 << s) - 1;
      *pred += v;
    }
    if (dcs) dcs[b] = *pred;
    int k = 1;
    for (;;) {
      REFILL();
#define STEP()                                                \
  {                                                           \
    uint16_t me = ac->multi[buf >> (64 - LOOK)];              \
    int advance = (me >> 5) & 127;                            \
    if (UNLIKELY(k + advance > 64)) goto single;              \
    CONSUME(me & 31);                                         \
    k = (k + advance) | ((me >> 6) & 64);                     \
    if (k >= 64) goto block_done;                             \
  }
      STEP() STEP() STEP()
      continue;
    single:
      REFILL();
      {
        uint16_t one = ac->one[buf >> (64 - SLOOK)];
        if (LIKELY(one != 0)) {
          CONSUME(one & 31);
          k = (k + ((one >> 5) & 127)) | ((one >> 6) & 64);
          if (k >= 64) goto block_done;
          continue;
        }
        int sym = slow_symbol(&buf, &cnt, ac);
        if (sym < 0) {
          rc = -1;
          goto out;
        }
        int r = sym >> 4;
        s = sym & 15;
        if (s) {
          CONSUME(s);
          k += r + 1;
        } else {
          if (r != 15) goto block_done;
          k += 16;
        }
        if (k >= 64) goto block_done;
      }
#undef STEP
    }
  block_done:;
  }
out:
  br->buf = buf;
  br->cnt = cnt;
  br->p = p;
  return rc;
}

typedef struct {
  int id, h, v, tq;
} component;

/* libjpeg's 1/8-scale output sample for a dequantized DC value: range_limit[DESCALE(dc, 3) & RANGE_MASK]. */
static inline uint8_t dc_sample(int64_t pred, int q) {
  int dc = (int)(int16_t)pred * q; /* libjpeg stores the DC as a 16-bit JCOEF */
  int index = ((dc + 4) >> 3) & 1023;
  return (uint8_t)(index < 128 ? index + 128 : index < 512 ? 255 : index < 896 ? 0 : index - 896);
}

static int be16(const uint8_t *p) { return (p[0] << 8) | p[1]; }

/* 0 and *out (ow x oh bytes, malloc'd) on success; 1 where the fast path does not apply; -1 out of memory. */
static int dc_scan(const uint8_t *data, size_t len, uint8_t **out, int *out_w, int *out_h) {
  htable *tables = NULL; /* [class * 4 + id] */
  uint8_t *clean = NULL, *image = NULL;
  size_t *seg_end = NULL;
  int q0[4] = {0, 0, 0, 0}, have_q[4] = {0, 0, 0, 0};
  component comps[4];
  int nf = 0, width = 0, height = 0, restart = 0, adobe = 0, transform = -1, frame = 0, rc = 1, sos_length = 0;
  size_t pos = 2;

  if (len < 4 || data[0] != 0xFF || data[1] != 0xD8) return 1;
  tables = calloc(8, sizeof(htable));
  if (!tables) return -1;
  for (;;) {
    if (pos >= len || data[pos] != 0xFF) goto done; /* garbage between segments */
    while (pos < len && data[pos] == 0xFF) pos++;
    if (pos >= len) goto done;
    int marker = data[pos++];
    if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7)) continue; /* no length field */
    if (marker == 0x00 || marker == 0xD8 || marker == 0xD9 || pos + 2 > len) goto done;
    int length = be16(data + pos);
    if (length < 2 || pos + length > len) goto done;
    const uint8_t *seg = data + pos + 2;
    int n = length - 2;
    if (marker == 0xC0 || marker == 0xC1) { /* baseline / extended sequential, Huffman */
      if (frame || n < 6 || seg[0] != 8) goto done;
      height = be16(seg + 1);
      width = be16(seg + 3);
      nf = seg[5];
      if ((nf != 1 && nf != 3) || n < 6 + 3 * nf || width == 0 || height == 0) goto done;
      for (int i = 0; i < nf; i++) {
        comps[i].id = seg[6 + 3 * i];
        comps[i].h = seg[7 + 3 * i] >> 4;
        comps[i].v = seg[7 + 3 * i] & 15;
        comps[i].tq = seg[8 + 3 * i];
        if (comps[i].h < 1 || comps[i].h > 4 || comps[i].v < 1 || comps[i].v > 4 || comps[i].tq > 3) goto done;
      }
      frame = 1;
    } else if (marker >= 0xC2 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC) {
      goto done; /* progressive, lossless, arithmetic, hierarchical */
    } else if (marker == 0xC4) {
      for (int i = 0; i < n;) {
        if (i + 17 > n) goto done;
        int tc = seg[i] >> 4, th = seg[i] & 15, count = 0;
        uint8_t bits[17];
        if (tc > 1 || th > 3) goto done;
        bits[0] = 0;
        for (int l = 1; l <= 16; l++) count += bits[l] = seg[i + l];
        if (count > 256 || i + 17 + count > n) goto done;
        if (build_table(&tables[tc * 4 + th], bits, seg + i + 17, count, tc)) goto done;
        i += 17 + count;
      }
    } else if (marker == 0xDB) {
      for (int i = 0; i < n;) {
        int pq = seg[i] >> 4, tq = seg[i] & 15, size;
        if (tq > 3 || pq > 1) goto done;
        size = pq ? 129 : 65;
        if (i + size > n) goto done;
        q0[tq] = pq ? be16(seg + i + 1) : seg[i + 1];
        have_q[tq] = 1;
        i += size;
      }
    } else if (marker == 0xDD) {
      if (n < 2) goto done;
      restart = be16(seg);
    } else if (marker == 0xEE) {
      if (n >= 12 && !memcmp(seg, "Adobe", 5)) {
        adobe = 1;
        transform = seg[11];
      }
    } else if (marker == 0xDA) {
      sos_length = length; /* checked above to lie within data */
      break;
    }
    pos += length;
  }

  /* SOS: one scan holding every component (interleaved, or the only one of a grayscale frame) */
  {
    int length = sos_length, n = length - 2;
    const uint8_t *seg = data + pos + 2;
    const htable *dct[4], *act[4];
    int order[4], hb[4], vb[4], hmax = 1, vmax = 1, blocks = 0, ns, ow, oh, mcux, mcuy;
    if (!frame || n < 1) goto done;
    ns = seg[0];
    if (ns != nf || n < 1 + 2 * ns + 3) goto done;
    /* colour coded as RGB (libjpeg's rules, either order of its tests): its gray is not the first component */
    if (nf == 3 && ((adobe && transform == 0) || (comps[0].id == 'R' && comps[1].id == 'G' && comps[2].id == 'B')))
      goto done;
    for (int i = 0; i < ns; i++) {
      int cs = seg[1 + 2 * i], td = seg[2 + 2 * i] >> 4, ta = seg[2 + 2 * i] & 15, ci = -1;
      for (int j = 0; j < nf; j++)
        if (comps[j].id == cs) ci = j;
      if (ci < 0 || td > 3 || ta > 3 || !tables[td].present || !tables[4 + ta].present) goto done;
      for (int j = 0; j < i; j++)
        if (order[j] == ci) goto done;
      order[i] = ci;
      dct[i] = &tables[td];
      act[i] = &tables[4 + ta];
    }
    const uint8_t *spectral = seg + 1 + 2 * ns;
    if (spectral[0] != 0 || spectral[1] != 63 || spectral[2] != 0) goto done;
    if (!have_q[comps[0].tq]) goto done;
    int q = q0[comps[0].tq];
    for (int i = 0; i < nf; i++) {
      if (comps[i].h > hmax) hmax = comps[i].h;
      if (comps[i].v > vmax) vmax = comps[i].v;
    }
    ow = (width + 7) / 8;
    oh = (height + 7) / 8;
    if (nf == 1) { /* non-interleaved: one block per MCU, whatever the sampling factors say */
      mcux = ow;
      mcuy = oh;
      hb[0] = vb[0] = 1;
    } else {
      if (comps[0].h != hmax || comps[0].v != vmax) goto done; /* subsampled luma: libjpeg would upsample */
      mcux = (width + 8 * hmax - 1) / (8 * hmax);
      mcuy = (height + 8 * vmax - 1) / (8 * vmax);
      for (int i = 0; i < ns; i++) {
        hb[i] = comps[order[i]].h;
        vb[i] = comps[order[i]].v;
        blocks += hb[i] * vb[i];
      }
      if (blocks > 10) goto done;
    }

    /* Unstuff the entropy-coded data (FF 00 -> FF), cutting it into restart intervals at RSTn markers, which
       must come in sequence; the scan must end at EOI. */
    const uint8_t *src = data + pos + length, *end = data + len;
    size_t c = 0, nseg = 0, seg_cap = 16;
    int ended = 0;
    clean = malloc((size_t)(end - src) + READ_PAD);
    seg_end = malloc(seg_cap * sizeof(size_t));
    if (!clean || !seg_end) {
      rc = -1;
      goto done;
    }
    while (src < end) {
      const uint8_t *ff = memchr(src, 0xFF, (size_t)(end - src));
      size_t chunk = (size_t)((ff ? ff : end) - src);
      memcpy(clean + c, src, chunk);
      c += chunk;
      src += chunk;
      if (!ff || src + 1 >= end) break;
      if (src[1] == 0x00) {
        clean[c++] = 0xFF;
        src += 2;
        continue;
      }
      const uint8_t *m = src + 1;
      while (m < end && *m == 0xFF) m++;
      if (m >= end) break;
      if (*m >= 0xD0 && *m <= 0xD7 && (size_t)(*m & 7) == (nseg & 7)) {
        if (nseg + 1 >= seg_cap) {
          size_t *grown = realloc(seg_end, 2 * seg_cap * sizeof(size_t));
          if (!grown) {
            rc = -1;
            goto done;
          }
          seg_end = grown;
          seg_cap *= 2;
        }
        seg_end[nseg++] = c;
        src = m + 1;
        continue;
      }
      ended = *m == 0xD9;
      break;
    }
    memset(clean + c, 0, READ_PAD);
    long total = (long)mcux * mcuy;
    if (!ended || nseg + 1 != (size_t)(restart ? (total + restart - 1) / restart : 1)) goto done;
    seg_end[nseg] = c;

    image = malloc((size_t)ow * oh);
    if (!image) {
      rc = -1;
      goto done;
    }
    bitreader br = {clean, 0, 0};
    int64_t pred[4] = {0, 0, 0, 0}, dcs[16];
    size_t segment = 0;
    long left = restart;
    for (int my = 0; my < mcuy; my++) {
      for (int mx = 0; mx < mcux; mx++) {
        if (restart && left == 0) { /* the interval must have ended exactly (< 8 padding bits) */
          size_t used = (size_t)(br.p - clean) * 8 - (size_t)br.cnt;
          if (used > seg_end[segment] * 8 || seg_end[segment] * 8 - used >= 8) goto done;
          br.p = clean + seg_end[segment++];
          br.buf = 0;
          br.cnt = 0;
          pred[0] = pred[1] = pred[2] = pred[3] = 0;
          left = restart;
        }
        for (int i = 0; i < ns; i++) {
          int luma = order[i] == 0;
          if (skip_blocks(&br, dct[i], act[i], &pred[i], hb[i] * vb[i], luma ? dcs : NULL)) goto done;
          if (luma)
            for (int v = 0; v < vb[i]; v++) {
              int y = my * vb[i] + v;
              for (int h = 0; h < hb[i]; h++) {
                int x = mx * hb[i] + h;
                if (y < oh && x < ow) image[(size_t)y * ow + x] = dc_sample(dcs[v * hb[i] + h], q);
              }
            }
        }
        if ((size_t)(br.p - clean) > c + 8) goto done; /* ran past the data: truncated or corrupt */
        left--;
      }
    }
    size_t used = (size_t)(br.p - clean) * 8 - (size_t)br.cnt;
    if (used > seg_end[segment] * 8 || seg_end[segment] * 8 - used >= 8) goto done;
    *out = image;
    *out_w = ow;
    *out_h = oh;
    image = NULL;
    rc = 0;
  }
done:
  free(tables);
  free(clean);
  free(seg_end);
  free(image);
  return rc;
}

PyDoc_STRVAR(dc_image_doc,
             "dc_image(data) -> (width, height, pixels) or None\n\n"
             "The 1/8-scale luma image of a baseline JPEG, from its DC coefficients: byte-identical to libjpeg's\n"
             "1/8-scale grayscale decode (Pillow: Image.draft('L', ...) at scale 8), `pixels` being width * height\n"
             "bytes, row-major. The whole scan is entropy-decoded, so success also means the scan is complete.\n"
             "None where this fast path does not apply (progressive, arithmetic, 12-bit, RGB/CMYK-coded, truncated,\n"
             "corrupt, ...): decode with Pillow instead.");

static PyObject *dc_image(PyObject *self, PyObject *arg) {
  Py_buffer view;
  uint8_t *pixels = NULL;
  int width = 0, height = 0, rc;
  (void)self;
  if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
  Py_BEGIN_ALLOW_THREADS
  rc = dc_scan((const uint8_t *)view.buf, (size_t)view.len, &pixels, &width, &height);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&view);
  if (rc < 0) return PyErr_NoMemory();
  if (rc > 0) Py_RETURN_NONE;
  PyObject *bytes = PyBytes_FromStringAndSize((const char *)pixels, (Py_ssize_t)width * height);
  free(pixels);
  if (!bytes) return NULL;
  return Py_BuildValue("(iiN)", width, height, bytes);
}

static PyMethodDef methods[] = {
    {"dc_image", dc_image, METH_O, dc_image_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_dcscan",
    "Fast 1/8-scale luma images of baseline JPEGs from their DC coefficients (see dc_image).", -1, methods,
};

PyMODINIT_FUNC PyInit__dcscan(void) { return PyModule_Create(&module); }
