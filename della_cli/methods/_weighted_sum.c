/*
 * The weighted sum of task arithmetic and linear in one pass over the inputs, compiled.
 *
 * weighted_sum.py does the same in numpy: about ten passes over each chunk (widen, subtract,
 * add, narrow, check), which made the merge compute-bound on small machines. Here the inputs
 * are read from memory once and the output written once, in pieces that stay in L1: one pass
 * per expert over a piece, then one that stores it.
 *
 * The float32 operations are weighted_sum.py's, in its order (the torch reference's):
 *
 *     on deltas:  total = +0;  total = total + (x_t - base) [* w_t];  total = total / D;
 *                 total = total * lambda;  result = base + total
 *     linear:     total = +0;  total = total + x_t * w_t;  total = total / D
 *
 * with each bracketed step skipped exactly where weighted_sum.py skips it. The extension must
 * be compiled without floating-point contraction (-ffp-contract=off: an FMA rounds once where
 * the reference rounds twice) and without -ffast-math (signed zeros, NaN propagation).
 *
 * Rounding to bfloat16 is to nearest, ties to even, and every NaN becomes 0xFFFF, the bits
 * torch's vectorized conversion gives it. Each input's flag says whether it holds a NaN or an
 * Inf anywhere in the span (the exponent bits, exact).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

enum { KIND_BFLOAT16 = 0, KIND_FLOAT32 = 1 };

/* Entries per piece: the float32 sums (4 KiB) stay in L1. */
#define PIECE 1024

/* The helpers below take their kinds and modes as constants once inlined, so that each
 * combination becomes its own vectorized loop: they must be inlined. */
#if defined(__GNUC__)
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define ALWAYS_INLINE static __forceinline
#else
#define ALWAYS_INLINE static inline
#endif

/* x86-64 with glibc: an AVX2 copy of the hot loop, chosen when the CPU loads the module
 * (twice as fast as the SSE2 baseline on the reference machine); elsewhere, the baseline. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__GLIBC__) && !defined(__APPLE__)
#define HOT __attribute__((target_clones("avx2", "default")))
#else
#define HOT
#endif

typedef struct {
    Py_buffer view;
    int kind;
    int held;
} Input;

/* How an expert's value becomes its term. */
enum { DELTA = 0, WEIGHTED_DELTA = 1, WEIGHTED_VALUE = 2 };

/* An input entry as float32 bits (bfloat16 is the top half of a float32). */
ALWAYS_INLINE uint32_t wide_bits(const void *buffer, int kind, Py_ssize_t i)
{
    if (kind == KIND_BFLOAT16)
        return (uint32_t)((const uint16_t *)buffer)[i] << 16;
    return ((const uint32_t *)buffer)[i];
}

ALWAYS_INLINE float as_float(uint32_t bits)
{
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

ALWAYS_INLINE uint16_t float_to_bf16_bits(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    uint32_t nan = (uint32_t)((int32_t)(bits & 0x7FFFFFFFu) > 0x7F800000);
    return (uint16_t)(rounded | (0u - nan)); /* all ones for a NaN, branch-free */
}

/* Whether the largest magnitude seen (float32 bits without the sign) is a NaN or an Inf. */
ALWAYS_INLINE int nonfinite(uint32_t largest)
{
    return largest >= 0x7F800000u;
}

/* The float32 magnitude bits of an entry, to take a maximum of. */
ALWAYS_INLINE uint32_t magnitude_bits(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits & 0x7FFFFFFFu;
}

/* Experts summed in one pass over a piece: each entry's running total stays in a register
 * while up to MAX_GROUP experts are added to it, and the base is widened once for them. */
#define MAX_GROUP 4

/* total[i] = (first ? +0 : total[i]) + term_0 + ... + term_{G-1}, left to right, where
 * term_g = (expert_g[i] - base[i]) * w_g on deltas and expert_g[i] * w_g otherwise (a
 * multiplication by 1 is exact, so weights of 1 need no case of their own). Called with
 * constant kinds, mode and group size, so that each combination is its own vectorized loop
 * with the experts unrolled. */
ALWAYS_INLINE void accumulate(int kind, int base_kind, int on_deltas, int group, int first,
                              const void *const *sources, const void *base, Py_ssize_t start,
                              Py_ssize_t count, const float *weights, float *total)
{
    const void *source[MAX_GROUP];
    float weight[MAX_GROUP];
    for (int g = 0; g < group; g++) {
        source[g] = sources[g];
        weight[g] = weights[g];
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        float reference = on_deltas ? as_float(wide_bits(base, base_kind, start + i)) : 0.0f;
        float sum = first ? 0.0f : total[i];
        for (int g = 0; g < group; g++) {
            float value = as_float(wide_bits(source[g], kind, start + i));
            sum = sum + (on_deltas ? value - reference : value) * weight[g];
        }
        total[i] = sum;
    }
}

ALWAYS_INLINE void accumulate_group(int kind, int base_kind, int on_deltas, int group, int first,
                                    const void *const *sources, const void *base,
                                    Py_ssize_t start, Py_ssize_t count, const float *weights,
                                    float *total)
{
#define ACCUMULATE(k, b, d, g)                                                             \
    if (kind == k && base_kind == b && on_deltas == d && group == g)                       \
        return accumulate(k, b, d, g, first, sources, base, start, count, weights, total);
#define EVERY_SIZE(k, b, d)                                                                \
    ACCUMULATE(k, b, d, 1) ACCUMULATE(k, b, d, 2) ACCUMULATE(k, b, d, 3)                   \
    ACCUMULATE(k, b, d, 4)
#define EITHER_MODE(k, b) EVERY_SIZE(k, b, 1) EVERY_SIZE(k, b, 0)
    EITHER_MODE(KIND_BFLOAT16, KIND_BFLOAT16)
    EITHER_MODE(KIND_BFLOAT16, KIND_FLOAT32)
    EITHER_MODE(KIND_FLOAT32, KIND_BFLOAT16)
    EITHER_MODE(KIND_FLOAT32, KIND_FLOAT32)
#undef EITHER_MODE
#undef EVERY_SIZE
#undef ACCUMULATE
}

/* out = (on_deltas ? base + total : total) in the output's dtype. Returns the largest
 * magnitude of the float32 results, and puts the base's in *base_largest where the result
 * does not contain the base (linear). */
ALWAYS_INLINE uint32_t store(int kind, int base_kind, int on_deltas, void *target,
                             const void *base, Py_ssize_t start, Py_ssize_t count,
                             const float *total, uint32_t *base_largest)
{
    uint32_t largest = 0, base_seen = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        float result = total[i];
        if (on_deltas) {
            result = as_float(wide_bits(base, base_kind, start + i)) + result;
        } else {
            uint32_t magnitude = wide_bits(base, base_kind, start + i) & 0x7FFFFFFFu;
            base_seen = magnitude > base_seen ? magnitude : base_seen;
        }
        uint32_t magnitude = magnitude_bits(result);
        largest = magnitude > largest ? magnitude : largest;
        if (kind == KIND_BFLOAT16)
            ((uint16_t *)target)[start + i] = float_to_bf16_bits(result);
        else
            ((float *)target)[start + i] = result;
    }
    *base_largest = base_seen;
    return largest;
}

ALWAYS_INLINE uint32_t store_output(int kind, int base_kind, int on_deltas, void *target,
                                    const void *base, Py_ssize_t start, Py_ssize_t count,
                                    const float *total, uint32_t *base_largest)
{
#define STORE(k, b, d)                                                                     \
    if (kind == k && base_kind == b && on_deltas == d)                                     \
        return store(k, b, d, target, base, start, count, total, base_largest);
#define EITHER(k, b) STORE(k, b, 1) STORE(k, b, 0)
    EITHER(KIND_BFLOAT16, KIND_BFLOAT16)
    EITHER(KIND_BFLOAT16, KIND_FLOAT32)
    EITHER(KIND_FLOAT32, KIND_BFLOAT16)
    EITHER(KIND_FLOAT32, KIND_FLOAT32)
#undef EITHER
#undef STORE
    return 0;
}

/* The largest magnitude of an input's entries start .. start + count. */
ALWAYS_INLINE uint32_t largest_of(const void *buffer, int kind, Py_ssize_t start,
                                  Py_ssize_t count)
{
    uint32_t largest = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t magnitude = wide_bits(buffer, kind, start + i) & 0x7FFFFFFFu;
        largest = magnitude > largest ? magnitude : largest;
    }
    return largest;
}

ALWAYS_INLINE uint32_t largest_input(const void *buffer, int kind, Py_ssize_t start,
                                     Py_ssize_t count)
{
    if (kind == KIND_BFLOAT16)
        return largest_of(buffer, KIND_BFLOAT16, start, count);
    return largest_of(buffer, KIND_FLOAT32, start, count);
}

typedef struct {
    const Input *base;
    const Input *experts;
    const float *weights;
    Py_ssize_t expert_count;
    int on_deltas;
    int divide;
    float divisor;
    float lambda;
    const Input *out;
} Job;

/* Every input's flag over one piece (bit 0 the base, bit 1 + t expert t). */
static uint64_t piece_flags(const Job *job, Py_ssize_t start, Py_ssize_t count)
{
    uint64_t flags = 0;
    if (nonfinite(largest_input(job->base->view.buf, job->base->kind, start, count)))
        flags |= 1;
    for (Py_ssize_t t = 0; t < job->expert_count; t++) {
        const Input *expert = &job->experts[t];
        if (nonfinite(largest_input(expert->view.buf, expert->kind, start, count)))
            flags |= (uint64_t)1 << (t + 1);
    }
    return flags;
}

/* One piece: the flags of the inputs (bit 0 the base, bit 1 + t expert t).
 *
 * A NaN or an Inf in any input makes the float32 result non-finite wherever it sits (every
 * operation propagates it: x - Inf, Inf * w with w = 0, Inf + -Inf, Inf / D, Inf * lambda),
 * except the base of a linear merge, which the result does not contain and whose magnitudes
 * the store watches. So inputs are searched only in a piece whose result is not finite: rare,
 * and then every input is searched, as finite inputs may also overflow. */
HOT static uint64_t merge_piece(const Job *job, Py_ssize_t start, Py_ssize_t count)
{
    float total[PIECE];
    const void *base = job->base->view.buf;
    int base_kind = job->base->kind;
    if (job->expert_count == 0)
        for (Py_ssize_t i = 0; i < count; i++)
            total[i] = 0.0f;
    for (Py_ssize_t t = 0; t < job->expert_count;) {
        /* The next experts of one kind, at most MAX_GROUP of them. */
        const void *sources[MAX_GROUP] = {NULL};
        int kind = job->experts[t].kind, group = 0;
        while (group < MAX_GROUP && t + group < job->expert_count &&
               job->experts[t + group].kind == kind) {
            sources[group] = job->experts[t + group].view.buf;
            group++;
        }
        accumulate_group(kind, base_kind, job->on_deltas, group, t == 0, sources, base, start,
                         count, &job->weights[t], total);
        t += group;
    }
    if (job->divide)
        for (Py_ssize_t i = 0; i < count; i++)
            total[i] = total[i] / job->divisor;
    if (job->on_deltas && job->lambda != 1.0f)
        for (Py_ssize_t i = 0; i < count; i++)
            total[i] = total[i] * job->lambda;
    uint32_t base_largest = 0;
    uint32_t largest = store_output(job->out->kind, base_kind, job->on_deltas,
                                    job->out->view.buf, base, start, count, total,
                                    &base_largest);
    if (nonfinite(largest))
        return piece_flags(job, start, count);
    return nonfinite(base_largest) ? 1 : 0;
}

static int kind_of(PyObject *code, int *kind)
{
    long value = PyLong_AsLong(code);
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (value != KIND_BFLOAT16 && value != KIND_FLOAT32) {
        PyErr_SetString(PyExc_ValueError, "unknown dtype kind");
        return -1;
    }
    *kind = (int)value;
    return 0;
}

/* Fill `input` from (buffer, kind); the buffer must hold `entries` entries (-1: any, and
 * `entries` becomes its count). */
static int take_input(PyObject *pair, int writable, Input *input, Py_ssize_t *entries)
{
    PyObject *buffer, *code;
    if (!PyArg_ParseTuple(pair, "OO", &buffer, &code) || kind_of(code, &input->kind) < 0)
        return -1;
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(buffer, &input->view, flags) < 0)
        return -1;
    input->held = 1;
    Py_ssize_t itemsize = input->kind == KIND_BFLOAT16 ? 2 : 4;
    Py_ssize_t count = input->view.len / itemsize;
    if (input->view.len % itemsize != 0 || (*entries >= 0 && count != *entries)) {
        PyErr_SetString(PyExc_ValueError, "inputs and output must hold the same entries");
        return -1;
    }
    *entries = count;
    return 0;
}

static void release(Input *inputs, Py_ssize_t count)
{
    for (Py_ssize_t i = 0; i < count; i++)
        if (inputs[i].held)
            PyBuffer_Release(&inputs[i].view);
}

PyDoc_STRVAR(merge_doc,
    "merge(out, base, experts, weights, on_deltas, divisor, lambda_) -> int\n\n"
    "out, base and each expert are (buffer, kind) pairs, kind 0 for bfloat16 bits and 1 for\n"
    "float32; divisor None means no division. Returns the non-finite flags of the inputs as\n"
    "bits: bit 0 the base, bit 1 + t expert t. Runs without the GIL.");

static PyObject *merge(PyObject *self, PyObject *args)
{
    PyObject *out_pair, *base_pair, *expert_pairs, *weight_values, *divisor_value;
    int on_deltas;
    float lambda;
    if (!PyArg_ParseTuple(args, "OOO!O!pOf", &out_pair, &base_pair, &PyTuple_Type,
                          &expert_pairs, &PyTuple_Type, &weight_values, &on_deltas,
                          &divisor_value, &lambda))
        return NULL;
    Py_ssize_t expert_count = PyTuple_GET_SIZE(expert_pairs);
    if (PyTuple_GET_SIZE(weight_values) != expert_count || expert_count > 63) {
        PyErr_SetString(PyExc_ValueError, "one weight per expert, at most 63 experts");
        return NULL;
    }
    /* inputs[0] the output, [1] the base, [2 + t] expert t */
    Input *inputs = PyMem_Calloc((size_t)expert_count + 2, sizeof(Input));
    float *weights = PyMem_Calloc((size_t)expert_count + 1, sizeof(float));
    PyObject *result = NULL;
    if (inputs == NULL || weights == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t entries = -1;
    if (take_input(out_pair, 1, &inputs[0], &entries) < 0 ||
        take_input(base_pair, 0, &inputs[1], &entries) < 0)
        goto done;
    for (Py_ssize_t t = 0; t < expert_count; t++) {
        weights[t] = (float)PyFloat_AsDouble(PyTuple_GET_ITEM(weight_values, t));
        if (PyErr_Occurred() ||
            take_input(PyTuple_GET_ITEM(expert_pairs, t), 0, &inputs[2 + t], &entries) < 0)
            goto done;
    }
    Job job = {
        .base = &inputs[1],
        .experts = &inputs[2],
        .weights = weights,
        .expert_count = expert_count,
        .on_deltas = on_deltas,
        .divide = divisor_value != Py_None,
        .divisor = 1.0f,
        .lambda = lambda,
        .out = &inputs[0],
    };
    if (job.divide) {
        job.divisor = (float)PyFloat_AsDouble(divisor_value);
        if (PyErr_Occurred())
            goto done;
    }
    uint64_t flags = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t start = 0; start < entries; start += PIECE) {
        Py_ssize_t count = entries - start < PIECE ? entries - start : PIECE;
        flags |= merge_piece(&job, start, count);
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromUnsignedLongLong(flags);
done:
    if (inputs != NULL)
        release(inputs, expert_count + 2);
    PyMem_Free(inputs);
    PyMem_Free(weights);
    return result;
}

static PyMethodDef methods[] = {
    {"merge", merge, METH_VARARGS, merge_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_weighted_sum",
    "The weighted sum of task arithmetic and linear in one compiled pass (see weighted_sum.py).",
    -1,
    methods,
};

PyMODINIT_FUNC PyInit__weighted_sum(void)
{
    return PyModule_Create(&module);
}
