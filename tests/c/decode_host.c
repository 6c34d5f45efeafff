/* A C host for kiln decode-step libraries (`kiln build --decode-step`), used by
 * tests/tests/decode_step.rs: runs STEPS tokens through the library the way a user's
 * generation loop would. The recurrent states start as zeros sized from the declared dims
 * (the symbolic batch dim is BATCH); after each run every `state_out.<x>` output is copied
 * into the `state.<x>` input of the next; `position` (when the library takes it) is the
 * step's index. The token inputs of step t are read from DIR/step_<t>_in_<i>.bin, and the
 * non-state outputs written to DIR/step_<t>_out_<o>.bin. Tensor files are
 *   int32 dtype (ONNX code), int32 rank, int64 dims[rank], then the raw little-endian data.
 * Usage: decode_host DIR STEPS BATCH */
#include MODEL_HEADER

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what) {
    fprintf(stderr, "decode_host: %s: %s\n", what, kiln_last_error());
    return 1;
}

static size_t dtype_size(int dtype) {
    switch (dtype) {
    case KILN_DTYPE_F64: case KILN_DTYPE_I64: case KILN_DTYPE_U64: return 8;
    case KILN_DTYPE_F32: case KILN_DTYPE_I32: case KILN_DTYPE_U32: return 4;
    case KILN_DTYPE_F16: case KILN_DTYPE_BF16: case KILN_DTYPE_I16: case KILN_DTYPE_U16: return 2;
    default: return 1;
    }
}

static void *read_tensor(const char *path, int32_t *dtype, int32_t *rank, int64_t *dims,
                         size_t max_rank) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    void *data = NULL;
    if (fread(dtype, 4, 1, f) != 1 || fread(rank, 4, 1, f) != 1 || *rank < 0 ||
        (size_t)*rank > max_rank || fread(dims, 8, (size_t)*rank, f) != (size_t)*rank)
        goto bad;
    long start = ftell(f);
    fseek(f, 0, SEEK_END);
    size_t bytes = (size_t)(ftell(f) - start);
    fseek(f, start, SEEK_SET);
    data = malloc(bytes > 0 ? bytes : 1);
    if (bytes > 0 && fread(data, 1, bytes, f) != bytes) goto bad;
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

#define MAX_IO 64
#define MAX_RANK 8

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: decode_host DIR STEPS BATCH\n");
        return 2;
    }
    const char *dir = argv[1];
    long steps = atol(argv[2]), batch = atol(argv[3]);
    kiln_ctx *ctx = NULL;
    if (kiln_create(NULL, &ctx) != KILN_OK) return fail("kiln_create");
    size_t ni = kiln_num_inputs(ctx), no = kiln_num_outputs(ctx);
    if (ni > MAX_IO || no > MAX_IO) {
        fprintf(stderr, "decode_host: too many inputs or outputs\n");
        return 1;
    }
    void *in[MAX_IO] = {0};
    int64_t dims[MAX_IO][MAX_RANK];
    const int64_t *in_dims[MAX_IO] = {0};
    size_t in_bytes[MAX_IO] = {0};
    int kind[MAX_IO] = {0};   /* 0 token, 1 state, 2 position */
    long source[MAX_IO];      /* a state's `state_out` output */
    int64_t position = 0;
    int rc = 1;
    size_t states = 0;
    for (size_t i = 0; i < ni; i++) {
        const char *name = kiln_input_name(ctx, i);
        source[i] = -1;
        if (strcmp(name, "position") == 0) {
            kind[i] = 2;
            in[i] = &position;
            in_dims[i] = NULL;
        } else if (strncmp(name, "state.", 6) == 0) {
            kind[i] = 1;
            for (size_t o = 0; o < no; o++) {
                const char *oname = kiln_output_name(ctx, o);
                if (strncmp(oname, "state_out.", 10) == 0 && strcmp(oname + 10, name + 6) == 0)
                    source[i] = (long)o;
            }
            if (source[i] < 0) {
                fprintf(stderr, "decode_host: state `%s` has no state_out output\n", name);
                goto done;
            }
            /* Zeros: the start. Declared dims, the symbolic one (batch) from BATCH. */
            int64_t rank = kiln_input_rank(ctx, i);
            size_t n = 1;
            for (int64_t a = 0; a < rank; a++) {
                int64_t d = kiln_input_dim(ctx, i, (size_t)a);
                dims[i][a] = d < 0 ? batch : d;
                n *= (size_t)dims[i][a];
            }
            in_bytes[i] = n * dtype_size(kiln_input_dtype(ctx, i));
            in[i] = calloc(in_bytes[i] > 0 ? in_bytes[i] : 1, 1);
            in_dims[i] = dims[i];
            states++;
        }
    }
    if (states == 0) {
        fprintf(stderr, "decode_host: not a decode-step library (no `state.` input)\n");
        goto done;
    }
    char path[4096];
    for (long t = 0; t < steps; t++) {
        position = t;
        for (size_t i = 0; i < ni; i++) {
            if (kind[i] != 0) continue;
            int32_t dtype, rank;
            free(in[i]);
            snprintf(path, sizeof path, "%s/step_%ld_in_%zu.bin", dir, t, i);
            in[i] = read_tensor(path, &dtype, &rank, dims[i], MAX_RANK);
            if (!in[i] || dtype != kiln_input_dtype(ctx, i) || rank != kiln_input_rank(ctx, i)) {
                fprintf(stderr, "decode_host: cannot read %s for `%s`\n", path,
                        kiln_input_name(ctx, i));
                goto done;
            }
            in_dims[i] = dims[i];
        }
        if (kiln_run(ctx, (const void *const *)in, in_dims, NULL, NULL) != KILN_OK) {
            fail("kiln_run");
            goto done;
        }
        for (size_t o = 0; o < no; o++) {
            int is_state = 0;
            for (size_t i = 0; i < ni; i++) {
                if (source[i] != (long)o) continue;
                is_state = 1;
                if (kiln_result_bytes(ctx, o) != in_bytes[i]) {
                    fprintf(stderr, "decode_host: `%s` is %zu bytes, its state %zu\n",
                            kiln_output_name(ctx, o), kiln_result_bytes(ctx, o), in_bytes[i]);
                    goto done;
                }
                memcpy(in[i], kiln_result_data(ctx, o), in_bytes[i]);
            }
            if (is_state) continue;
            int64_t rank = kiln_result_rank(ctx, o), odims[MAX_RANK];
            if (rank > MAX_RANK || kiln_result_dims(ctx, o, odims) != KILN_OK) {
                fail("kiln_result_dims");
                goto done;
            }
            snprintf(path, sizeof path, "%s/step_%ld_out_%zu.bin", dir, t, o);
            if (write_tensor(path, kiln_output_dtype(ctx, o), (int32_t)rank, odims,
                             kiln_result_data(ctx, o), kiln_result_bytes(ctx, o))) {
                fprintf(stderr, "decode_host: cannot write %s\n", path);
                goto done;
            }
        }
    }
    printf("decode_host: %ld steps, %zu state tensors\n", steps, states);
    rc = 0;
done:
    for (size_t i = 0; i < ni; i++)
        if (kind[i] != 2) free(in[i]);
    kiln_destroy(ctx);
    return rc;
}
