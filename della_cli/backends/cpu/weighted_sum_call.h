/*
 * Argument checks shared by the two Python bindings of the weighted-sum kernel
 * (_weighted_sum.c for arrays in memory, io/_streamed_sum.c for entries read from files).
 */
#ifndef DELLA_WEIGHTED_SUM_CALL_H
#define DELLA_WEIGHTED_SUM_CALL_H

#include <Python.h>

#include "weighted_sum_kernel.h"

/* The flags of the inputs fit in 64 bits: the base and at most 63 experts. */
#define MAX_EXPERTS 63

/* 0 where there is one weight per expert and at most MAX_EXPERTS, else -1 (error set). */
static int check_counts(Py_ssize_t weight_count, Py_ssize_t expert_count)
{
    if (weight_count != expert_count || expert_count > MAX_EXPERTS) {
        PyErr_SetString(PyExc_ValueError, "one weight per expert, at most 63 experts");
        return -1;
    }
    return 0;
}

/* 0 where `kind` is a dtype kind the kernel takes, else -1 (error set). */
static int check_kind(long kind)
{
    if (kind != KIND_BFLOAT16 && kind != KIND_FLOAT32) {
        PyErr_SetString(PyExc_ValueError, "unknown dtype kind");
        return -1;
    }
    return 0;
}

/* The tuple of weights as floats into `weights`; -1 (error set) for one that is not a number. */
static int take_weights(PyObject *values, float *weights)
{
    for (Py_ssize_t t = 0; t < PyTuple_GET_SIZE(values); t++) {
        weights[t] = (float)PyFloat_AsDouble(PyTuple_GET_ITEM(values, t));
        if (PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* The job's division: none for None, else by `divisor` as a float; -1 (error set). */
static int take_divisor(PyObject *divisor, Job *job)
{
    job->divide = divisor != Py_None;
    job->divisor = 1.0f;
    if (job->divide) {
        job->divisor = (float)PyFloat_AsDouble(divisor);
        if (PyErr_Occurred())
            return -1;
    }
    return 0;
}

#endif /* DELLA_WEIGHTED_SUM_CALL_H */
