/*
 * Python binding of the weighted-sum kernel (weighted_sum_kernel.h) for arrays in memory.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "weighted_sum_call.h"

typedef struct {
    Py_buffer view;
    int kind;
    int held;
} Input;

static int kind_of(PyObject *code, int *kind)
{
    long value = PyLong_AsLong(code);
    if ((value == -1 && PyErr_Occurred()) || check_kind(value) < 0)
        return -1;
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
    if (check_counts(PyTuple_GET_SIZE(weight_values), expert_count) < 0)
        return NULL;
    /* inputs[0] the output, [1] the base, [2 + t] expert t */
    Input *inputs = PyMem_Calloc((size_t)expert_count + 2, sizeof(Input));
    Operand *experts = PyMem_Calloc((size_t)expert_count + 1, sizeof(Operand));
    float *weights = PyMem_Calloc((size_t)expert_count + 1, sizeof(float));
    PyObject *result = NULL;
    if (inputs == NULL || experts == NULL || weights == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t entries = -1;
    if (take_input(out_pair, 1, &inputs[0], &entries) < 0 ||
        take_input(base_pair, 0, &inputs[1], &entries) < 0)
        goto done;
    if (take_weights(weight_values, weights) < 0)
        goto done;
    for (Py_ssize_t t = 0; t < expert_count; t++)
        if (take_input(PyTuple_GET_ITEM(expert_pairs, t), 0, &inputs[2 + t], &entries) < 0)
            goto done;
    for (Py_ssize_t t = 0; t < expert_count; t++)
        experts[t] = (Operand){inputs[2 + t].view.buf, inputs[2 + t].kind};
    Job job = {
        .base = {inputs[1].view.buf, inputs[1].kind},
        .experts = experts,
        .weights = weights,
        .expert_count = expert_count,
        .on_deltas = on_deltas,
        .lambda = lambda,
        .out = inputs[0].view.buf,
        .out_kind = inputs[0].kind,
    };
    if (take_divisor(divisor_value, &job) < 0)
        goto done;
    uint64_t flags = 0;
    Py_BEGIN_ALLOW_THREADS
    flags = merge_entries(&job, 0, 0, entries);
    Py_END_ALLOW_THREADS
    result = PyLong_FromUnsignedLongLong(flags);
done:
    if (inputs != NULL)
        release(inputs, expert_count + 2);
    PyMem_Free(inputs);
    PyMem_Free(weights);
    PyMem_Free(experts);
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
