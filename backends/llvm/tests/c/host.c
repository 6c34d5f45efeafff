/* A C host for kiln AOT libraries, used by the tests: reads DIR/in_<i>.bin, runs the model
 * through its C ABI and writes DIR/out_<i>.bin. Tensor files are
 *   int32 dtype (ONNX code), int32 rank, int64 dims[rank], then the raw little-endian data.
 * Usage: host DIR [WEIGHTS_FILE|-] [THREADS]
 * It also checks the ABI's contracts: a run into caller buffers equals the run kept in the
 * context, and a too-small buffer gives KILN_ERR_OUTPUT_SIZE with a message. */
#include MODEL_HEADER

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what) {
    fprintf(stderr, "host: %s: %s\n", what, kiln_last_error());
    return 1;
}

static void *read_tensor(const char *path, int32_t *dtype, int32_t *rank, int64_t **dims,
                         size_t *bytes) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    void *data = NULL;
    long end;
    if (fread(dtype, 4, 1, f) != 1 || fread(rank, 4, 1, f) != 1 || *rank < 0) goto bad;
    *dims = malloc(sizeof(int64_t) * (size_t)(*rank > 0 ? *rank : 1));
    if (fread(*dims, 8, (size_t)*rank, f) != (size_t)*rank) goto bad;
    long start = ftell(f);
    fseek(f, 0, SEEK_END);
    end = ftell(f);
    fseek(f, start, SEEK_SET);
    *bytes = (size_t)(end - start);
    data = malloc(*bytes > 0 ? *bytes : 1);
    if (*bytes > 0 && fread(data, 1, *bytes, f) != *bytes) goto bad;
    fclose(f);
    return data;
bad:
    fclose(f);
    free(data);
    return NULL;
}

static int write_tensor(const char *path, int32_t dtype, int32_t rank, const int64_t *dims,
                        const void *data, size_t bytes) {
    FILE *f = fopen(path, "wb");
    if (!f) return 1;
    int ok = fwrite(&dtype, 4, 1, f) == 1 && fwrite(&rank, 4, 1, f) == 1 &&
             fwrite(dims, 8, (size_t)rank, f) == (size_t)rank &&
             (bytes == 0 || fwrite(data, 1, bytes, f) == bytes);
    return fclose(f) != 0 || !ok;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: host DIR [WEIGHTS_FILE|-] [THREADS]\n");
        return 2;
    }
    const char *dir = argv[1];
    const char *weights = argc > 2 && strcmp(argv[2], "-") != 0 ? argv[2] : NULL;
    kiln_ctx *ctx = NULL;
    if (kiln_create(weights, &ctx) != KILN_OK) return fail("kiln_create");
    if (argc > 3 && kiln_set_threads(ctx, (size_t)atoi(argv[3])) != KILN_OK)
        return fail("kiln_set_threads");
    size_t ni = kiln_num_inputs(ctx), no = kiln_num_outputs(ctx);
    if (ni != KILN_MODEL_NUM_INPUTS || no != KILN_MODEL_NUM_OUTPUTS) {
        fprintf(stderr, "host: header and library disagree on input/output counts\n");
        return 1;
    }
    const void **in = calloc(ni + 1, sizeof(void *));
    int64_t **in_dims = calloc(ni + 1, sizeof(int64_t *));
    char path[4096];
    int rc = 1;
    void **out = calloc(no + 1, sizeof(void *));
    size_t *cap = calloc(no + 1, sizeof(size_t));
    for (size_t i = 0; i < ni; i++) {
        int32_t dtype, rank;
        size_t bytes;
        snprintf(path, sizeof path, "%s/in_%zu.bin", dir, i);
        in[i] = read_tensor(path, &dtype, &rank, &in_dims[i], &bytes);
        if (!in[i]) {
            fprintf(stderr, "host: cannot read %s\n", path);
            goto done;
        }
        if (dtype != kiln_input_dtype(ctx, i) || rank != kiln_input_rank(ctx, i)) {
            fprintf(stderr, "host: %s is dtype %d rank %d; input `%s` wants %d, %lld\n", path,
                    dtype, rank, kiln_input_name(ctx, i), kiln_input_dtype(ctx, i),
                    (long long)kiln_input_rank(ctx, i));
            goto done;
        }
    }
    /* First run: results kept in the context; sizes the caller's buffers. */
    if (kiln_run(ctx, in, (const int64_t *const *)in_dims, NULL, NULL) != KILN_OK) {
        fail("kiln_run");
        goto done;
    }
    for (size_t i = 0; i < no; i++) {
        cap[i] = kiln_result_bytes(ctx, i);
        out[i] = malloc(cap[i] > 0 ? cap[i] : 1);
    }
    /* A too-small buffer is an error with a message, not an overflow. */
    if (no > 0 && cap[0] > 0) {
        size_t saved = cap[0];
        cap[0] = saved - 1;
        int st = kiln_run(ctx, in, (const int64_t *const *)in_dims, out, cap);
        cap[0] = saved;
        if (st != KILN_ERR_OUTPUT_SIZE || kiln_last_error()[0] == '\0') {
            fprintf(stderr, "host: short buffer gave status %d\n", st);
            goto done;
        }
    }
    /* Second run: into the caller's buffers. */
    if (kiln_run(ctx, in, (const int64_t *const *)in_dims, out, cap) != KILN_OK) {
        fail("kiln_run (caller buffers)");
        goto done;
    }
    for (size_t i = 0; i < no; i++) {
        if (kiln_result_bytes(ctx, i) != cap[i] ||
            memcmp(kiln_result_data(ctx, i), out[i], cap[i]) != 0) {
            fprintf(stderr, "host: output %zu differs between runs\n", i);
            goto done;
        }
        int64_t rank = kiln_result_rank(ctx, i);
        int64_t *dims = calloc((size_t)(rank > 0 ? rank : 1), sizeof(int64_t));
        kiln_result_dims(ctx, i, dims);
        snprintf(path, sizeof path, "%s/out_%zu.bin", dir, i);
        int bad = write_tensor(path, kiln_output_dtype(ctx, i), (int32_t)rank, dims, out[i],
                               cap[i]);
        free(dims);
        if (bad) {
            fprintf(stderr, "host: cannot write %s\n", path);
            goto done;
        }
    }
    printf("host: ran %zu inputs -> %zu outputs\n", ni, no);
    rc = 0;
done:
    for (size_t i = 0; i < ni; i++) {
        free((void *)in[i]);
        free(in_dims[i]);
    }
    for (size_t i = 0; i < no; i++) free(out[i]);
    free(in);
    free(in_dims);
    free(out);
    free(cap);
    kiln_destroy(ctx);
    return rc;
}
