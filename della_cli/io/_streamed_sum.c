/*
 * A weighted sum (task arithmetic, linear) read straight from the input files, piece by piece.
 *
 * The engine's chunks otherwise copy each input's rows from the page cache into a buffer of
 * 2 MiB or more, which leaves the caches before the kernel reads it back. Here each input's
 * next STEP entries are read into a small scratch region that stays in L2, merged at once by
 * the same kernel (backends/cpu/weighted_sum_kernel.h, so the bytes cannot differ), and the result
 * goes to the caller's output buffer. POSIX only (positioned reads); elsewhere the module is
 * not built and the engine reads the rows itself.
 *
 * Scratch regions are placed like io/buffers.py places its buffers: at the page offset of the
 * file offset they are read from, rounded down to 64 bytes, where the kernel's copy from the
 * page cache is fastest.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <unistd.h>

#include "weighted_sum_call.h"

/* Entries read per input at a time: 64 KiB of bfloat16, so that a base and three experts
 * (256 KiB) stay in a 512 KiB L2 with the pieces being merged. */
#define STEP 32768
#define PAGE_BYTES 4096
#define ALIGNMENT 64
/* Scratch bytes per input: STEP float32 entries and room to place them in their page. */
#define REGION_BYTES (STEP * 4 + PAGE_BYTES)

typedef struct {
    int descriptor;
    long long offset; /* of the first entry, in bytes */
    int kind;
    char *scratch;
} Source;

static size_t itemsize_of(int kind)
{
    return kind == KIND_BFLOAT16 ? 2 : 4;
}

/* Read `count` bytes at `offset`; 0, or -1 with errno set (0 for an early end of file). */
static int read_fully(int descriptor, char *target, size_t count, long long offset)
{
    while (count > 0) {
        ssize_t got = pread(descriptor, target, count, (off_t)offset);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            if (got == 0)
                errno = 0;
            return -1;
        }
        target += got;
        count -= (size_t)got;
        offset += got;
    }
    return 0;
}

/* OSError(errno, message) with the failed input's index as its input_index. */
static void raise_read_error(int error, Py_ssize_t index)
{
    const char *message = error ? strerror(error) : "end of file";
    PyObject *exception = PyObject_CallFunction(PyExc_OSError, "is", error, message);
    if (exception == NULL)
        return;
    PyObject *value = PyLong_FromSsize_t(index);
    if (value != NULL && PyObject_SetAttrString(exception, "input_index", value) == 0)
        PyErr_SetObject(PyExc_OSError, exception);
    Py_XDECREF(value);
    Py_DECREF(exception);
}

/* Fill `source` from (descriptor, offset, kind). */
static int take_source(PyObject *triple, Source *source)
{
    if (!PyArg_ParseTuple(triple, "iLi", &source->descriptor, &source->offset, &source->kind))
        return -1;
    if (check_kind(source->kind) < 0)
        return -1;
    if (source->offset < 0) {
        PyErr_SetString(PyExc_ValueError, "negative file offset");
        return -1;
    }
    return 0;
}

/* Each input's scratch region, placed for its file offset: -1 (error set) where the
 * scratch buffer is too small. */
static int place_regions(const Py_buffer *scratch, Source *inputs, Py_ssize_t count)
{
    uintptr_t origin = ((uintptr_t)scratch->buf + PAGE_BYTES - 1) / PAGE_BYTES * PAGE_BYTES;
    size_t needed = (size_t)(origin - (uintptr_t)scratch->buf) + (size_t)count * REGION_BYTES;
    if ((size_t)scratch->len < needed) {
        PyErr_SetString(PyExc_ValueError, "scratch buffer too small");
        return -1;
    }
    for (Py_ssize_t s = 0; s < count; s++) {
        size_t place = (size_t)(inputs[s].offset % PAGE_BYTES) / ALIGNMENT * ALIGNMENT;
        inputs[s].scratch = (char *)origin + s * REGION_BYTES + place;
    }
    return 0;
}

/* Read STEP entries of every input at a time and merge them into the job's output, whose
 * entries set how many are read; without the GIL. Returns -1, or the position in `inputs` of
 * the one whose read failed (its errno in *error, 0 for an early end of file). */
static Py_ssize_t stream(const Job *job, Source *inputs, Py_ssize_t count, Py_ssize_t entries,
                         uint64_t *flags, int *error)
{
    for (Py_ssize_t first = 0; first < entries; first += STEP) {
        Py_ssize_t step = entries - first < STEP ? entries - first : STEP;
        for (Py_ssize_t s = 0; s < count; s++) {
            size_t size = itemsize_of(inputs[s].kind);
            long long at = inputs[s].offset + (long long)first * (long long)size;
            if (read_fully(inputs[s].descriptor, inputs[s].scratch, (size_t)step * size, at)) {
                *error = errno;
                return s;
            }
        }
        *flags |= merge_entries(job, 0, first, step);
    }
    return -1;
}

PyDoc_STRVAR(merge_doc,
    "merge(out, out_kind, base, experts, weights, on_deltas, divisor, lambda_, scratch) -> int\n\n"
    "Merge entries read from files into the writable buffer out (out_kind 0 for bfloat16 bits,\n"
    "1 for float32; its length sets the entries). base and each expert are (descriptor,\n"
    "offset, kind) triples, or base is an int t: expert t's entries serve as the base. scratch\n"
    "is a writable buffer of at least scratch_bytes(inputs). Returns the non-finite flags as\n"
    "merge() in _weighted_sum does. A failed read raises OSError(errno, message) whose\n"
    "input_index names the input (0 the base, 1 + t expert t); errno 0: an early end of file.\n"
    "Runs without the GIL.");

static PyObject *merge(PyObject *self, PyObject *args)
{
    PyObject *out_object, *base_object, *expert_triples, *weight_values, *divisor_value;
    PyObject *scratch_object;
    int out_kind, on_deltas;
    float lambda;
    if (!PyArg_ParseTuple(args, "OiOO!O!pOfO", &out_object, &out_kind, &base_object,
                          &PyTuple_Type, &expert_triples, &PyTuple_Type, &weight_values,
                          &on_deltas, &divisor_value, &lambda, &scratch_object))
        return NULL;
    Py_ssize_t expert_count = PyTuple_GET_SIZE(expert_triples);
    if (check_counts(PyTuple_GET_SIZE(weight_values), expert_count) < 0 ||
        check_kind(out_kind) < 0)
        return NULL;
    Py_buffer out = {0}, scratch = {0};
    /* sources[0] the base, [1 + t] expert t */
    Source *sources = PyMem_Calloc((size_t)expert_count + 1, sizeof(Source));
    Operand *operands = PyMem_Calloc((size_t)expert_count + 1, sizeof(Operand));
    float *weights = PyMem_Calloc((size_t)expert_count + 1, sizeof(float));
    PyObject *result = NULL;
    if (sources == NULL || operands == NULL || weights == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (PyObject_GetBuffer(out_object, &out, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        goto done;
    if (PyObject_GetBuffer(scratch_object, &scratch, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        goto done;
    Py_ssize_t base_expert = -1; /* the expert whose entries serve as the base, if any */
    if (PyLong_Check(base_object)) {
        base_expert = PyLong_AsSsize_t(base_object);
        if (base_expert < 0 || base_expert >= expert_count) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "base names no expert");
            goto done;
        }
    } else if (take_source(base_object, &sources[0]) < 0) {
        goto done;
    }
    if (take_weights(weight_values, weights) < 0)
        goto done;
    for (Py_ssize_t t = 0; t < expert_count; t++)
        if (take_source(PyTuple_GET_ITEM(expert_triples, t), &sources[1 + t]) < 0)
            goto done;
    /* The inputs read: the base unless it is an expert, and the experts. */
    Source *read = base_expert < 0 ? sources : sources + 1;
    Py_ssize_t read_count = expert_count + (base_expert < 0 ? 1 : 0);
    if (place_regions(&scratch, read, read_count) < 0)
        goto done;
    if (base_expert >= 0)
        sources[0] = sources[1 + base_expert];
    for (Py_ssize_t s = 0; s <= expert_count; s++)
        operands[s] = (Operand){sources[s].scratch, sources[s].kind};
    Job job = {
        .base = operands[0],
        .experts = &operands[1],
        .weights = weights,
        .expert_count = expert_count,
        .on_deltas = on_deltas,
        .lambda = lambda,
        .out = out.buf,
        .out_kind = out_kind,
    };
    if (take_divisor(divisor_value, &job) < 0)
        goto done;
    Py_ssize_t entries = out.len / (Py_ssize_t)itemsize_of(out_kind);
    uint64_t flags = 0;
    Py_ssize_t failed;
    int error = 0;
    Py_BEGIN_ALLOW_THREADS
    failed = stream(&job, read, read_count, entries, &flags, &error);
    Py_END_ALLOW_THREADS
    if (failed >= 0) {
        raise_read_error(error, failed + (base_expert < 0 ? 0 : 1));
        goto done;
    }
    result = PyLong_FromUnsignedLongLong(flags);
done:
    if (out.obj != NULL)
        PyBuffer_Release(&out);
    if (scratch.obj != NULL)
        PyBuffer_Release(&scratch);
    PyMem_Free(sources);
    PyMem_Free(operands);
    PyMem_Free(weights);
    return result;
}

static PyObject *scratch_bytes(PyObject *self, PyObject *inputs)
{
    Py_ssize_t count = PyLong_AsSsize_t(inputs);
    if (count < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "a count of inputs");
        return NULL;
    }
    return PyLong_FromSsize_t(count * REGION_BYTES + PAGE_BYTES);
}

static PyMethodDef methods[] = {
    {"merge", merge, METH_VARARGS, merge_doc},
    {"scratch_bytes", scratch_bytes, METH_O,
     "scratch_bytes(inputs) -> int: the scratch merge() needs to read that many inputs."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_streamed_sum",
    "Weighted sums read from the input files piece by piece (see streamed_sum.py).",
    -1,
    methods,
};

PyMODINIT_FUNC PyInit__streamed_sum(void)
{
    return PyModule_Create(&module);
}
