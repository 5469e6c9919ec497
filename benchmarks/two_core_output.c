// A model of a training step's output layer, for benchmarks/two_core_output.py: on one core, or on two
// cores that split the scored columns between them. Per step, for the columns (items) a core handles:
// gather their rows of Wy; logits = h·Wyᵀ; a softmax cross-entropy over all N columns (the rows' max and
// sum combined across the cores); dlogits; dh = dlogits·Wy (the cores' parts summed); dWy = dlogitsᵀ·h,
// summed per distinct item; Adagrad with momentum on those items' rows of Wy and its accumulator and
// velocity. Each product is one single-threaded BLAS call. The split: mode 1, each item goes to the core of
// the parity of (item + step), so the rows a core touches change from step to step; mode 2, each core owns
// the items of one parity, in every step, so their rows stay in its caches; mode 3, as mode 1, but each
// core updates the rows of the other core's columns (their gradient and rows cross between the cores, as
// when each op of a step is split between the cores on its own); mode 4, core 0 scores every column, then
// each core updates half of the rows (only the update split, as a two-thread RowAdagrad in the step).
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void scipy_cblas_sgemm(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                       int);
void scipy_openblas_set_num_threads(int);
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef struct {
    int n_cols, n_rows;  // the columns this core scores, the distinct items among them
    int *col, *item, *slot, *rows;  // per column: its position, item, index into rows; rows: the distinct items
    float *Wg, *logits, *dWy, *grad;  // n_cols x H, B x n_cols, n_cols x H, n_rows x H
    float *row_max, *row_sum, *dh;  // B, B, B x H
} Part;

static int B, H, N, cores, scoring, crossed, update_only;
static float *W, *acc, *vel, *h;
static Part part[2];
static atomic_int arrived, generation, go, finished;

static void barrier(void) {  // both cores wait here (spinning: a sleeping thread takes tens of µs to wake)
    if (cores == 1)
        return;
    int g = atomic_load(&generation);
    if (atomic_fetch_add(&arrived, 1) == 1) {
        atomic_store(&arrived, 0);
        atomic_fetch_add(&generation, 1);
    } else {
        while (atomic_load(&generation) == g) {
        }
    }
}

static void prefetch_row(const float* base, long r, int write) {
    for (int b = 0; b < H * 4; b += 64)
        __builtin_prefetch((const char*)(base + r * H) + b, write);
}

static void update_rows(const Part* p, int lo, int hi) {  // Adagrad with momentum on p's rows [lo, hi)
    for (int u = lo; u < hi; u++) {
        if (u + 8 < hi) {
            prefetch_row(W, p->rows[u + 8], 1);
            prefetch_row(acc, p->rows[u + 8], 1);
            prefetch_row(vel, p->rows[u + 8], 1);
        }
        const long r = p->rows[u];
        float *w = W + r * H, *a = acc + r * H, *v = vel + r * H;
        const float* g = p->grad + (long)u * H;
        for (int k = 0; k < H; k++) {
            a[k] += g[k] * g[k];
            v[k] = 0.2f * v[k] - 0.1f * g[k] / sqrtf(a[k] + 1e-6f);
            w[k] += v[k];
        }
    }
}

static void score(Part* p) {  // gather, logits, softmax cross-entropy's gradient, dh and dWy of p's columns
    const int n = p->n_cols;
    for (int j = 0; j < n; j++) {
        if (j + 8 < n)
            prefetch_row(W, p->item[j + 8], 0);
        memcpy(p->Wg + (long)j * H, W + (long)p->item[j] * H, H * sizeof(float));
    }
    scipy_cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, B, n, H, 1.f, h, H, p->Wg, H, 0.f, p->logits, n);
    for (int i = 0; i < B; i++) {
        const float* r = p->logits + (long)i * n;
        float m = -INFINITY;
        for (int j = 0; j < n; j++)
            m = r[j] > m ? r[j] : m;
        p->row_max[i] = m;
    }
    if (scoring == 2)
        barrier();
    for (int i = 0; i < B; i++) {
        float m = p->row_max[i], s = 0.f;
        for (int q = 0; q < scoring; q++)
            m = part[q].row_max[i] > m ? part[q].row_max[i] : m;
        float* r = p->logits + (long)i * n;
        for (int j = 0; j < n; j++) {
            r[j] = expf(r[j] - m);
            s += r[j];
        }
        p->row_sum[i] = s;
    }
    if (scoring == 2)
        barrier();
    for (int i = 0; i < B; i++) {  // dlogits = (softmax - one-hot of the target) / B
        float s = 0.f;
        for (int q = 0; q < scoring; q++)
            s += part[q].row_sum[i];
        const float scale = 1.f / (s * B);
        float* r = p->logits + (long)i * n;
        for (int j = 0; j < n; j++)
            r[j] *= scale;
    }
    for (int j = 0; j < n; j++)
        if (p->col[j] < B)  // column i is row i's target
            p->logits[(long)p->col[j] * n + j] -= 1.f / B;
    scipy_cblas_sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, B, H, n, 1.f, p->logits, n, p->Wg, H, 0.f, p->dh, H);
    scipy_cblas_sgemm(ROW_MAJOR, TRANS, NO_TRANS, n, H, B, 1.f, p->logits, n, h, H, 0.f, p->dWy, H);
}

static void sum_gradient(Part* p) {  // p's dWy summed per distinct item
    memset(p->grad, 0, (size_t)p->n_rows * H * sizeof(float));
    for (int j = 0; j < p->n_cols; j++) {
        float* g = p->grad + (long)p->slot[j] * H;
        const float* d = p->dWy + (long)j * H;
        for (int k = 0; k < H; k++)
            g[k] += d[k];
    }
}

static void output_layer(int c) {  // the part of core c
    Part* p = &part[c];
    if (update_only) {  // core 0 scores every column, then each core updates half of the rows
        if (c == 0) {
            score(p);
            sum_gradient(p);
        }
        barrier();
        const int half = part[0].n_rows / 2;
        update_rows(&part[0], c ? half : 0, c ? part[0].n_rows : half);
    } else {
        score(p);
        if (crossed) {  // the other core's columns: their dWy and rows come from that core's caches
            barrier();
            p = &part[1 - c];
        }
        sum_gradient(p);
        update_rows(p, 0, p->n_rows);
    }
    barrier();
}

static void* second_core(void* unused) {
    (void)unused;
    for (;;) {
        while (!atomic_load(&go)) {
        }
        atomic_store(&go, 0);
        if (atomic_load(&finished))
            return NULL;
        output_layer(1);
        atomic_store(&finished, 2);
    }
}

// Splits one step's columns (items[0..N)) between the cores; seen: n_items entries of -1, left so.
static void split(const int* items, int mode, int step, int* seen) {
    for (int c = 0; c < cores; c++) {
        Part* p = &part[c];
        p->n_cols = p->n_rows = 0;
        for (int j = 0; j < N; j++) {
            const int item = items[j];
            const int owner = mode == 0 || mode == 4 ? 0 : mode == 2 ? item & 1 : (item + step) & 1;
            if (owner != c)
                continue;
            if (seen[item] < 0) {
                seen[item] = p->n_rows;
                p->rows[p->n_rows++] = item;
            }
            p->col[p->n_cols] = j;
            p->item[p->n_cols] = item;
            p->slot[p->n_cols++] = seen[item];
        }
        for (int u = 0; u < p->n_rows; u++)
            seen[p->rows[u]] = -1;
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

// Seconds per step of the output layer over steps x n_scored items (row-major), in `mode`, the first
// `warm` steps untimed; 0 when memory runs out.
double run(int batch, int width, int n_scored, int n_items, int steps, int warm, const int* items, int mode) {
    B = batch, H = width, N = n_scored, cores = mode == 0 ? 1 : 2;
    crossed = mode == 3, update_only = mode == 4;
    scoring = mode == 0 || update_only ? 1 : 2;
    scipy_openblas_set_num_threads(1);
    const size_t table = (size_t)n_items * H * sizeof(float);
    W = malloc(table), acc = malloc(table), vel = malloc(table), h = malloc((size_t)B * H * sizeof(float));
    int* seen = malloc((size_t)n_items * sizeof(int));
    if (!W || !acc || !vel || !h || !seen)
        return 0;
    for (size_t i = 0; i < (size_t)n_items * H; i++)
        W[i] = 0.01f * (float)(i % 7), acc[i] = 0.1f, vel[i] = 0.f;
    for (int i = 0; i < B * H; i++)
        h[i] = 0.01f * (float)(i % 5);
    for (int i = 0; i < n_items; i++)
        seen[i] = -1;
    for (int c = 0; c < 2; c++) {
        Part* p = &part[c];
        p->col = malloc(N * sizeof(int)), p->item = malloc(N * sizeof(int));
        p->slot = malloc(N * sizeof(int)), p->rows = malloc(N * sizeof(int));
        p->Wg = malloc((size_t)N * H * sizeof(float)), p->logits = malloc((size_t)B * N * sizeof(float));
        p->dWy = malloc((size_t)N * H * sizeof(float)), p->grad = malloc((size_t)N * H * sizeof(float));
        p->row_max = malloc(B * sizeof(float)), p->row_sum = malloc(B * sizeof(float));
        p->dh = malloc((size_t)B * H * sizeof(float));
    }
    pthread_t thread;
    atomic_store(&finished, 0);
    if (cores == 2 && pthread_create(&thread, NULL, second_core, NULL))
        return 0;
    double seconds = 0;
    for (int s = 0; s < steps; s++) {
        split(items + (size_t)s * N, mode, s, seen);
        const double start = now();
        if (cores == 2) {
            atomic_store(&go, 1);
            output_layer(0);
            while (atomic_load(&finished) != 2) {
            }
            atomic_store(&finished, 0);
            for (int i = 0; i < B * H && scoring == 2; i++)
                part[0].dh[i] += part[1].dh[i];
        } else {
            output_layer(0);
        }
        if (s >= warm)
            seconds += now() - start;
    }
    if (cores == 2) {
        atomic_store(&finished, 1);
        atomic_store(&go, 1);
        pthread_join(thread, NULL);
    }
    for (int c = 0; c < 2; c++) {
        Part* p = &part[c];
        void* arrays[] = {p->col, p->item, p->slot, p->rows, p->Wg, p->logits, p->dWy, p->grad, p->row_max,
                          p->row_sum, p->dh};
        for (size_t k = 0; k < sizeof(arrays) / sizeof(arrays[0]); k++)
            free(arrays[k]);
    }
    free(W), free(acc), free(vel), free(h), free(seen);
    return seconds / (steps - warm);
}
