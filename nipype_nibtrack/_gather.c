/* A blocked strided gather into Fortran order: the compiled half of digest.f_blocks.
 *
 * gather(src, dst) copies every item of ``src`` (any object exporting a strided buffer:
 * a numpy array of any layout, negative and zero strides included) into the writable
 * contiguous buffer ``dst``, in Fortran order (first index fastest), and returns the
 * number of bytes written. Bytes are copied as they are: no byte swapping, no dtype
 * interpretation beyond the item size.
 *
 * numpy copies a transposing view element by element with a stride on one side; here
 * the output's fastest axis (axis 0) and the source's longest contiguous run (its fastest
 * axis and every axis that continues it: the columns) are walked in tiles staged in L1
 * and transposed in vector registers, so that every cache line read or written is used
 * whole while it is in cache. The GIL is released while copying. Only the CPython C API
 * is used (no numpy headers): building needs a C compiler and nothing else. All index
 * arithmetic is in Py_ssize_t on products checked for overflow.
 *
 * Measured (benchmarks/bench_gather.py, 2-core EPYC, float32): in cache, 2.5-3x the time
 * xxh3-128 takes over the same bytes (1- and 2-byte items: up to 4.5x); from memory,
 * 2.7x (blocks of whole source rows) to 4.5x (the 16 MiB slabs of a 256^3 array).
 * Tried and no faster: AVX2 8 x 8 micro tiles chosen at run time, software prefetch of
 * the next tile, non-temporal stores (2-3x slower), reading R rows whole before moving
 * on, tiles of 64 x 1024 to 512 x 512 bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define MAX_DIMS 64 /* PyBUF_MAX_NDIM */
#define LINE 64     /* bytes of a cache line: a tile's side covers at least one */

typedef struct {
    uint64_t lo, hi;
} item16;
typedef struct {
    uint8_t rgb[3];
} item3; /* RGB voxels */
_Static_assert(sizeof(item3) == 3 && sizeof(item16) == 16, "items are packed");

/* The geometry of a copy after size-1 axes are dropped and mergeable axes merged. */
typedef struct {
    int nd;
    Py_ssize_t itemsize;
    Py_ssize_t shape[MAX_DIMS];
    Py_ssize_t src[MAX_DIMS]; /* source strides, bytes */
    Py_ssize_t dst[MAX_DIMS]; /* output strides, bytes (Fortran order) */
} plan;

/* The columns of a 2-D copy: one or more axes that follow each other in the source
 * (``shape[g]`` items at a stride of ``s1`` times the items before: column j's source is
 * at j * s1), each with its own output stride. Merging them makes a tile's source rows
 * longer runs (a 4-D block x[:, :, z:z + 4, :] reads 4 x 16 items in a row, not 16). */
typedef struct {
    int m;
    Py_ssize_t n;  /* columns: the product of the shapes */
    Py_ssize_t s1; /* source stride of a column, bytes */
    Py_ssize_t shape[MAX_DIMS];
    Py_ssize_t dst[MAX_DIMS]; /* output strides, bytes */
} cols;

/* Output offsets of columns j0 .. j0 + n - 1 (an odometer over the group's axes). */
static void
col_offsets(const cols *c, Py_ssize_t j0, Py_ssize_t n, Py_ssize_t *offs)
{
    Py_ssize_t idx[MAX_DIMS];
    Py_ssize_t off = 0;
    for (int g = 0; g < c->m; g++) {
        idx[g] = j0 % c->shape[g];
        j0 /= c->shape[g];
        off += idx[g] * c->dst[g];
    }
    for (Py_ssize_t t = 0; t < n; t++) {
        offs[t] = off;
        for (int g = 0; g < c->m; g++) {
            off += c->dst[g];
            if (++idx[g] < c->shape[g])
                break;
            off -= c->dst[g] * c->shape[g];
            idx[g] = 0;
        }
    }
}

/* One 2-D copy: out[i * k + offs(j)] = in[i * s0 + j * s1] for i < n0, j < c->n. */
typedef void (*copy2d)(char *out, const cols *c, const char *in, Py_ssize_t s0,
                       Py_ssize_t n0, Py_ssize_t k);

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#if defined(__GNUC__)
#define NOINLINE __attribute__((noinline))
#else
#define NOINLINE
#endif

/* Vectorised micro tiles for items of 1, 2, 4 and 8 bytes, read from a staging tile:
 * N x N items (N = 16 / item size) in N 16-byte vectors, transposed in registers by
 * log2(N) rounds of interleaving (a perfect shuffle: row m with row m + N/2), then
 * stored as N 16-byte runs of the output. About four times fewer instructions than a
 * copy item by item; the rest of a tile (edges) is copied item by item. */
#if defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 12) \
    && (defined(__SSE2__) || defined(__ARM_NEON) || defined(__aarch64__))
#define HAVE_SIMD 1
typedef uint8_t v16 __attribute__((vector_size(16)));

#define LO1 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23
#define HI1 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31
#define LO2 0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23
#define HI2 8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31
#define LO4 0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23
#define HI4 8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31
#define LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31

#define DEFINE_MICRO(NAME, E)                                                              \
    static inline void NAME(char *out, const Py_ssize_t *offs, const char *in, Py_ssize_t s0) \
    {                                                                                      \
        enum { N = 16 / (E) };                                                             \
        v16 r[N], t[N];                                                                    \
        for (int i = 0; i < N; i++)                                                        \
            memcpy(&r[i], in + i * s0, 16);                                                \
        for (int round = 1; round < N; round *= 2) {                                       \
            for (int m = 0; m < N / 2; m++) {                                              \
                t[2 * m] = __builtin_shufflevector(r[m], r[m + N / 2], LO##E);             \
                t[2 * m + 1] = __builtin_shufflevector(r[m], r[m + N / 2], HI##E);         \
            }                                                                              \
            memcpy(r, t, sizeof r);                                                        \
        }                                                                                  \
        for (int j = 0; j < N; j++)                                                        \
            memcpy(out + offs[j], &r[j], 16);                                             \
    }

DEFINE_MICRO(micro_1, 1)
DEFINE_MICRO(micro_2, 2)
DEFINE_MICRO(micro_4, 4)
DEFINE_MICRO(micro_8, 8)

#else
#define HAVE_SIMD 0
#endif

/* n bytes, 16 at a time then what is left: a call of memcpy per short row
 * costs more than the copy, and a loop over items may be interchanged with the loop
 * over rows by the compiler (a read per row, each from another page). */
static inline void
copy_row(char *dst, const char *src, Py_ssize_t n)
{
    Py_ssize_t b = 0;
    for (; b + 16 <= n; b += 16)
        memcpy(dst + b, src + b, 16);
    if (n - b >= 8) {
        memcpy(dst + b, src + b, 8);
        b += 8;
    }
    if (n - b >= 4) {
        memcpy(dst + b, src + b, 4);
        b += 4;
    }
    if (n - b >= 2) {
        memcpy(dst + b, src + b, 2);
        b += 2;
    }
    if (n - b >= 1)
        dst[b] = src[b];
}

/* The 2-D copy through a staging tile of R x C items in L1: R source rows (axis 0) are
 * copied C items at a time (along the columns, the source's fastest) into the tile, then
 * the tile is transposed into C output runs of R items (along axis 0, the output's
 * fastest), each at its column's output offset.
 * Every source and output line is read or written whole in one go: direct transposes
 * keep R + C lines alive at once, often a power of two apart, so in the same cache set,
 * and lose them before they are used up. */
#define DEFINE_STAGED(NAME, T, R, C, MICRO)                                                   \
    static NOINLINE void NAME##_row(T *dst, const char *src, Py_ssize_t s1, Py_ssize_t n)  \
    {                                                                                      \
        for (Py_ssize_t j = 0; j < n; j++)                                                 \
            memcpy(&dst[j], src + j * s1, sizeof(T));                                      \
    }                                                                                      \
    static void NAME(char *out, const cols *c, const char *in, Py_ssize_t s0,              \
                     Py_ssize_t n0, Py_ssize_t k)                                          \
    {                                                                                      \
        enum { E = sizeof(T), N = HAVE_SIMD && (E & (E - 1)) == 0 && E <= 8 ? 16 / E : 1 }; \
        T tile[(R) * (C)];                                                                 \
        Py_ssize_t offs[C];                                                                \
        const Py_ssize_t n1 = c->n, s1 = c->s1;                                            \
        (void)k;                                                                           \
        for (Py_ssize_t jb = 0; jb < n1; jb += (C)) {                                      \
            const Py_ssize_t jn = MIN((Py_ssize_t)(C), n1 - jb);                           \
            col_offsets(c, jb, jn, offs);                                                  \
            for (Py_ssize_t ib = 0; ib < n0; ib += (R)) {                                  \
                const Py_ssize_t in_ = MIN((Py_ssize_t)(R), n0 - ib);                      \
                const char *src = in + ib * s0 + jb * s1;                                  \
                if (s1 == E && jn == (C)) /* a constant size: inlined vector moves */      \
                    for (Py_ssize_t i = 0; i < in_; i++)                                   \
                        memcpy(&tile[i * (C)], src + i * s0, (size_t)(C) * E);             \
                else if (s1 == E)                                                          \
                    for (Py_ssize_t i = 0; i < in_; i++)                                   \
                        copy_row((char *)&tile[i * (C)], src + i * s0, jn * E);            \
                else /* strided: an item a move, a row a call (see copy_row) */            \
                    for (Py_ssize_t i = 0; i < in_; i++)                                   \
                        NAME##_row(&tile[i * (C)], src + i * s0, s1, jn);                  \
                char *dst = out + ib * E;                                                  \
                const Py_ssize_t mi = in_ - in_ % N, mj = jn - jn % N;                     \
                for (Py_ssize_t j = 0; j < mj; j += N) {                                   \
                    for (Py_ssize_t i = 0; i < mi; i += N)                                 \
                        MICRO(dst + i * E, offs + j, (const char *)&tile[i * (C) + j],     \
                              (Py_ssize_t)(C) * E);                                        \
                    for (Py_ssize_t i = mi; i < in_; i++)                                  \
                        for (Py_ssize_t jj = j; jj < j + N; jj++)                          \
                            memcpy(dst + i * E + offs[jj], &tile[i * (C) + jj], E);        \
                }                                                                          \
                for (Py_ssize_t jj = mj; jj < jn; jj++)                                    \
                    for (Py_ssize_t i = 0; i < in_; i++)                                   \
                        memcpy(dst + i * E + offs[jj], &tile[i * (C) + jj], E);            \
            }                                                                              \
        }                                                                                  \
    }

/* a 1 x 1 "transpose": one item */
#define DEFINE_MICRO_COPY(NAME, T)                                                         \
    static inline void NAME(char *out, const Py_ssize_t *offs, const char *in, Py_ssize_t s0) \
    {                                                                                      \
        out += offs[0];                                                                    \
        (void)s0;                                                                          \
        memcpy(out, in, sizeof(T));                                                        \
    }
DEFINE_MICRO_COPY(micro_16, item16)
DEFINE_MICRO_COPY(micro_3, item3)
#if !HAVE_SIMD
DEFINE_MICRO_COPY(micro_1, uint8_t)
DEFINE_MICRO_COPY(micro_2, uint16_t)
DEFINE_MICRO_COPY(micro_4, uint32_t)
DEFINE_MICRO_COPY(micro_8, uint64_t)
#endif

/* Tiles read 256 bytes of each source row (4 lines: runs the prefetchers follow) and
 * write runs of 256 bytes, or of 64 items of 1 and 2 bytes, so that every tile is 16 KiB
 * and leaves room in L1. Measured: shapes from 64 x 1024 to 1024 x 64 bytes are no
 * faster; reading 256 bytes of a row of small items, not 64 items, is 2-15% faster. */
#ifndef TILE_ROWS
#define TILE_ROWS 256 /* bytes along axis 0 (output runs) */
#endif
#ifndef TILE_COLS
#define TILE_COLS 256 /* bytes along the source's fastest axis (source runs) */
#endif
DEFINE_STAGED(staged_1, uint8_t, TILE_ROWS / 4, TILE_COLS, micro_1)
DEFINE_STAGED(staged_2, uint16_t, TILE_ROWS / 4, TILE_COLS / 2, micro_2)
DEFINE_STAGED(staged_4, uint32_t, TILE_ROWS / 4, TILE_COLS / 4, micro_4)
DEFINE_STAGED(staged_8, uint64_t, TILE_ROWS / 8, TILE_COLS / 8, micro_8)
DEFINE_STAGED(staged_16, item16, TILE_ROWS / 16, TILE_COLS / 16, micro_16)
DEFINE_STAGED(staged_3, item3, TILE_ROWS / 4, TILE_COLS / 4, micro_3)

/* Any other item size (strings, structured records) */
static void
copy2d_any(char *out, const cols *c, const char *in, Py_ssize_t s0, Py_ssize_t n0,
           Py_ssize_t k)
{
    enum { B = 64 };
    Py_ssize_t offs[B];
    const Py_ssize_t b = k >= LINE ? 1 : (LINE + k - 1) / k + 1;
    for (Py_ssize_t jb = 0; jb < c->n; jb += B) {
        const Py_ssize_t jn = MIN((Py_ssize_t)B, c->n - jb);
        col_offsets(c, jb, jn, offs);
        for (Py_ssize_t ib = 0; ib < n0; ib += b) {
            const Py_ssize_t in_ = MIN(b, n0 - ib);
            for (Py_ssize_t j = 0; j < jn; j++) {
                const char *s = in + ib * s0 + (jb + j) * c->s1;
                char *d = out + ib * k + offs[j];
                for (Py_ssize_t i = 0; i < in_; i++)
                    memcpy(d + i * k, s + i * s0, (size_t)k);
            }
        }
    }
}

static copy2d
copier(Py_ssize_t k)
{
    switch (k) {
    case 1: return staged_1;
    case 2: return staged_2;
    case 4: return staged_4;
    case 8: return staged_8;
    case 16: return staged_16;
    case 3: return staged_3;
    default: return copy2d_any;
    }
}

/* A run along axis 0 (one column of the output): strided or contiguous source. */
static void
copy_run(char *out, const char *in, Py_ssize_t s0, Py_ssize_t n0, Py_ssize_t k, copy2d f)
{
    static const cols one = {1, 1, 0, {1}, {0}};
    if (s0 == k)
        memcpy(out, in, (size_t)(n0 * k));
    else
        f(out, &one, in, s0, n0, k);
}

static Py_ssize_t
abs_ssize(Py_ssize_t x)
{
    return x < 0 ? -x : x; /* strides of real buffers are far from PY_SSIZE_T_MIN */
}

/* Build the plan; returns -1 (with an exception set) if sizes overflow Py_ssize_t. */
static int
make_plan(plan *p, const Py_buffer *view, Py_ssize_t *total)
{
    const Py_ssize_t k = view->itemsize;
    Py_ssize_t count = 1;
    p->nd = 0;
    p->itemsize = k;
    for (int d = 0; d < view->ndim; d++) {
        const Py_ssize_t n = view->shape[d];
        if (n == 0) {
            p->nd = 0;
            *total = 0;
            return 0;
        }
        if (__builtin_mul_overflow(count, n, &count))
            goto overflow;
    }
    if (__builtin_mul_overflow(count, k, total))
        goto overflow;
    /* an exporter may leave strides out for a C-contiguous buffer */
    Py_ssize_t c_strides[MAX_DIMS];
    const Py_ssize_t *strides = view->strides;
    if (strides == NULL) {
        Py_ssize_t s = k;
        for (int d = view->ndim - 1; d >= 0; d--) {
            c_strides[d] = s;
            s *= view->shape[d]; /* <= total */
        }
        strides = c_strides;
    }
    /* output strides in bytes before merging: Fortran order */
    Py_ssize_t out = k;
    for (int d = 0; d < view->ndim; d++) {
        const Py_ssize_t n = view->shape[d];
        const Py_ssize_t s = strides[d];
        if (n != 1) {
            int nd = p->nd;
            Py_ssize_t joined;
            /* axis d continues the previous one in both source and output: merge */
            if (nd > 0 && !__builtin_mul_overflow(p->src[nd - 1], p->shape[nd - 1], &joined)
                && joined == s) {
                p->shape[nd - 1] *= n; /* <= count: cannot overflow */
            }
            else {
                p->shape[nd] = n;
                p->src[nd] = s;
                p->dst[nd] = out;
                p->nd = nd + 1;
            }
        }
        out *= n; /* <= total: cannot overflow */
    }
    return 0;
overflow:
    PyErr_SetString(PyExc_OverflowError, "gather: the array's size overflows Py_ssize_t");
    return -1;
}

/* Copy along every axis but 0 and the column group (the 2-D part) with an odometer. */
static void
run_plan(const plan *p, char *out, const char *in)
{
    const Py_ssize_t k = p->itemsize;
    const copy2d f = copier(k);
    if (p->nd == 0) {
        memcpy(out, in, (size_t)k);
        return;
    }
    /* the source's fastest axis other than 0 */
    int a = -1;
    for (int d = 1; d < p->nd; d++)
        if (a < 0 || abs_ssize(p->src[d]) < abs_ssize(p->src[a]))
            a = d;
    const int tiled = a > 0 && abs_ssize(p->src[a]) < abs_ssize(p->src[0]);
    /* the column group: a, then every axis that continues it in the source */
    int in_group[MAX_DIMS] = {0};
    cols c = {0};
    if (tiled) {
        c.s1 = p->src[a];
        int last = a;
        for (;;) {
            in_group[last] = 1;
            c.shape[c.m] = p->shape[last];
            c.dst[c.m] = p->dst[last];
            c.m++;
            Py_ssize_t next_stride;
            if (__builtin_mul_overflow(p->src[last], p->shape[last], &next_stride))
                break;
            int next = -1;
            for (int d = 1; d < p->nd; d++)
                if (!in_group[d] && p->src[d] == next_stride) {
                    next = d;
                    break;
                }
            if (next < 0)
                break;
            last = next;
        }
        c.n = 1;
        for (int g = 0; g < c.m; g++)
            c.n *= c.shape[g]; /* <= the item count: cannot overflow */
    }
    /* outer axes, the source's fastest first: consecutive 2-D copies read neighbouring
     * memory (pages already mapped, lines already fetched) */
    int outer[MAX_DIMS];
    int no = 0;
    for (int d = 1; d < p->nd; d++) {
        if (in_group[d])
            continue;
        int o = no++;
        for (; o > 0 && abs_ssize(p->src[outer[o - 1]]) > abs_ssize(p->src[d]); o--)
            outer[o] = outer[o - 1];
        outer[o] = d;
    }
    Py_ssize_t index[MAX_DIMS] = {0};
    for (;;) {
        if (tiled)
            f(out, &c, in, p->src[0], p->shape[0], k);
        else
            copy_run(out, in, p->src[0], p->shape[0], k, f);
        int o = 0;
        for (; o < no; o++) {
            const int d = outer[o];
            in += p->src[d];
            out += p->dst[d];
            if (++index[o] < p->shape[d])
                break;
            in -= p->src[d] * p->shape[d];
            out -= p->dst[d] * p->shape[d];
            index[o] = 0;
        }
        if (o == no)
            return;
    }
}

static PyObject *
gather(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "gather(src, dst) takes exactly 2 arguments");
        return NULL;
    }
    Py_buffer src, dst;
    if (PyObject_GetBuffer(args[0], &src, PyBUF_STRIDES) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    plan p;
    Py_ssize_t total = 0;
    PyObject *result = NULL;
    if (src.itemsize <= 0 || src.ndim > MAX_DIMS) {
        PyErr_SetString(PyExc_ValueError, "gather: the source's item size must be positive");
        goto done;
    }
    if (make_plan(&p, &src, &total) < 0)
        goto done;
    if (dst.len < total) {
        PyErr_Format(PyExc_ValueError,
                     "gather: the destination holds %zd bytes, the source %zd", dst.len, total);
        goto done;
    }
    if (total > 0) {
        Py_BEGIN_ALLOW_THREADS
        run_plan(&p, (char *)dst.buf, (const char *)src.buf);
        Py_END_ALLOW_THREADS
    }
    result = PyLong_FromSsize_t(total);
done:
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return result;
}

static PyMethodDef methods[] = {
    {"gather", (PyCFunction)(void (*)(void))gather, METH_FASTCALL,
     "gather(src, dst) -> int\n\nCopy the items of the strided buffer src into the "
     "writable contiguous buffer dst in Fortran order; return the bytes written."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_gather",
    "A blocked strided gather into Fortran order (see nipype_nibtrack.digest).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__gather(void)
{
    return PyModule_Create(&module);
}
