/*
 * The weighted sum of task arithmetic and linear in one pass over the inputs: the kernel,
 * without Python, shared by _weighted_sum.c (arrays in memory) and io/_streamed_sum.c (pieces
 * read from the input files).
 *
 * weighted_sum.py does the same in numpy: about ten passes over each chunk (widen, subtract,
 * add, narrow, check), which made the merge compute-bound on small machines. Here the inputs
 * are read from memory once and the output written once, in pieces that stay in L1: one pass
 * per group of up to four experts over a piece, then one that stores it.
 *
 * The float32 operations are weighted_sum.py's, in its order (the torch reference's):
 *
 *     on deltas:  total = +0;  total = total + (x_t - base) [* w_t];  total = total / D;
 *                 total = total * lambda;  result = base + total
 *     linear:     total = +0;  total = total + x_t * w_t;  total = total / D
 *
 * with the division and the lambda skipped where weighted_sum.py skips them; the weights
 * multiply every term (weighted_sum.py skips a weight of 1, which is exact). The kernel must
 * be compiled without floating-point contraction (-ffp-contract=off: an FMA rounds once where
 * the reference rounds twice) and without -ffast-math (signed zeros, NaN propagation).
 *
 * Rounding to bfloat16 is to nearest, ties to even, and every NaN becomes 0xFFFF, the bits
 * torch's vectorized conversion gives it. Each input's flag says whether it holds a NaN or an
 * Inf anywhere in the span (the exponent bits, exact).
 */
#ifndef DELLA_WEIGHTED_SUM_KERNEL_H
#define DELLA_WEIGHTED_SUM_KERNEL_H

#include <stddef.h>
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

/* An input entry as float32 bits (bfloat16 is the top half of a float32). */
ALWAYS_INLINE uint32_t wide_bits(const void *buffer, int kind, ptrdiff_t i)
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
                              const void *const *sources, const void *base, ptrdiff_t start,
                              ptrdiff_t count, const float *weights, float *total)
{
    const void *source[MAX_GROUP];
    float weight[MAX_GROUP];
    for (int g = 0; g < group; g++) {
        source[g] = sources[g];
        weight[g] = weights[g];
    }
    for (ptrdiff_t i = 0; i < count; i++) {
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
                                    ptrdiff_t start, ptrdiff_t count, const float *weights,
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
                             const void *base, ptrdiff_t start, ptrdiff_t count,
                             const float *total, uint32_t *base_largest)
{
    uint32_t largest = 0, base_seen = 0;
    for (ptrdiff_t i = 0; i < count; i++) {
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
                                    const void *base, ptrdiff_t start, ptrdiff_t count,
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
ALWAYS_INLINE uint32_t largest_of(const void *buffer, int kind, ptrdiff_t start,
                                  ptrdiff_t count)
{
    uint32_t largest = 0;
    for (ptrdiff_t i = 0; i < count; i++) {
        uint32_t magnitude = wide_bits(buffer, kind, start + i) & 0x7FFFFFFFu;
        largest = magnitude > largest ? magnitude : largest;
    }
    return largest;
}

ALWAYS_INLINE uint32_t largest_input(const void *buffer, int kind, ptrdiff_t start,
                                     ptrdiff_t count)
{
    if (kind == KIND_BFLOAT16)
        return largest_of(buffer, KIND_BFLOAT16, start, count);
    return largest_of(buffer, KIND_FLOAT32, start, count);
}

/* An input or the output: its entries and their dtype. */
typedef struct {
    const void *data;
    int kind;
} Operand;

/* One weighted sum: the operands, the experts' weights and the global parameters. */
typedef struct {
    Operand base;
    const Operand *experts;
    const float *weights;
    ptrdiff_t expert_count;
    int on_deltas;
    int divide;
    float divisor;
    float lambda;
    void *out;
    int out_kind;
} Job;

/* Every input's flag over one piece (bit 0 the base, bit 1 + t expert t). */
static uint64_t piece_flags(const Job *job, ptrdiff_t start, ptrdiff_t count)
{
    uint64_t flags = 0;
    if (nonfinite(largest_input(job->base.data, job->base.kind, start, count)))
        flags |= 1;
    for (ptrdiff_t t = 0; t < job->expert_count; t++) {
        const Operand *expert = &job->experts[t];
        if (nonfinite(largest_input(expert->data, expert->kind, start, count)))
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
HOT static uint64_t merge_piece(const Job *job, ptrdiff_t start, ptrdiff_t out_start,
                                ptrdiff_t count)
{
    float total[PIECE];
    const void *base = job->base.data;
    int base_kind = job->base.kind;
    if (job->expert_count == 0)
        for (ptrdiff_t i = 0; i < count; i++)
            total[i] = 0.0f;
    for (ptrdiff_t t = 0; t < job->expert_count;) {
        /* The next experts of one kind, at most MAX_GROUP of them. */
        const void *sources[MAX_GROUP] = {NULL};
        int kind = job->experts[t].kind, group = 0;
        while (group < MAX_GROUP && t + group < job->expert_count &&
               job->experts[t + group].kind == kind) {
            sources[group] = job->experts[t + group].data;
            group++;
        }
        accumulate_group(kind, base_kind, job->on_deltas, group, t == 0, sources, base, start,
                         count, &job->weights[t], total);
        t += group;
    }
    if (job->divide)
        for (ptrdiff_t i = 0; i < count; i++)
            total[i] = total[i] / job->divisor;
    if (job->on_deltas && job->lambda != 1.0f)
        for (ptrdiff_t i = 0; i < count; i++)
            total[i] = total[i] * job->lambda;
    /* The output's entries out_start.. seen from the inputs' index start. */
    size_t out_itemsize = job->out_kind == KIND_BFLOAT16 ? 2 : 4;
    void *target = (char *)job->out + (out_start - start) * (ptrdiff_t)out_itemsize;
    uint32_t base_largest = 0;
    uint32_t largest = store_output(job->out_kind, base_kind, job->on_deltas, target, base,
                                    start, count, total, &base_largest);
    if (nonfinite(largest))
        return piece_flags(job, start, count);
    return nonfinite(base_largest) ? 1 : 0;
}

/* Entries start .. start + count of the inputs, merged into the output's entries from
 * out_start on, piece by piece; the flags of the inputs (bit 0 the base, bit 1 + t expert t). */
static uint64_t merge_entries(const Job *job, ptrdiff_t start, ptrdiff_t out_start,
                              ptrdiff_t count)
{
    uint64_t flags = 0;
    for (ptrdiff_t done = 0; done < count; done += PIECE) {
        ptrdiff_t piece = count - done < PIECE ? count - done : PIECE;
        flags |= merge_piece(job, start + done, out_start + done, piece);
    }
    return flags;
}

#endif /* DELLA_WEIGHTED_SUM_KERNEL_H */
