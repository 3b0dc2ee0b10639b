/* Times one MPI collective over a list of sizes, as sinew bench does: barrier, then the op, per
 * iteration; prints one JSON object per size with the median time (µs) and the bus bandwidth.
 * Usage: mpirun -np N ... mpi_collective OP SIZES ITERS
 *        OP: all-reduce | all-gather | reduce-scatter | broadcast | all-to-all | sendrecv
 *        (f32, sum; sendrecv: every rank sends SIZE bytes to rank + 1 while receiving SIZE from
 *        rank - 1, as MPI_Sendrecv and as sinew bench sendrecv) */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, n;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    if (argc != 4) {
        if (rank == 0) fprintf(stderr, "usage: mpi_collective OP SIZES ITERS\n");
        MPI_Finalize();
        return 2;
    }
    const char *op = argv[1];
    int iters = atoi(argv[3]);
    char sizes[4096];
    strncpy(sizes, argv[2], sizeof sizes - 1);
    sizes[sizeof sizes - 1] = 0;
    double *t = malloc(sizeof(double) * (iters + 5));
    for (char *tok = strtok(sizes, ","); tok; tok = strtok(NULL, ",")) {
        size_t size = (size_t)atol(tok);
        size_t count = size / 4 / n * n;
        if (count < (size_t)n) count = n;
        float *a = malloc(count * 4), *b = malloc(count * 4);
        for (size_t i = 0; i < count; i++) a[i] = (float)(rank + 1 + i % 5);
        double factor = 1.0;
        for (int i = 0; i < iters + 5; i++) {
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            if (!strcmp(op, "all-reduce")) { MPI_Allreduce(a, b, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD); factor = 2.0 * (n - 1) / n; }
            else if (!strcmp(op, "all-gather")) { MPI_Allgather(a, (int)(count / n), MPI_FLOAT, b, (int)(count / n), MPI_FLOAT, MPI_COMM_WORLD); factor = (double)(n - 1) / n; }
            else if (!strcmp(op, "reduce-scatter")) { MPI_Reduce_scatter_block(a, b, (int)(count / n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD); factor = (double)(n - 1) / n; }
            else if (!strcmp(op, "broadcast")) { MPI_Bcast(a, (int)count, MPI_FLOAT, 0, MPI_COMM_WORLD); factor = 1.0; }
            else if (!strcmp(op, "sendrecv")) { MPI_Sendrecv(a, (int)count, MPI_FLOAT, (rank + 1) % n, 7, b, (int)count, MPI_FLOAT, (rank + n - 1) % n, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE); factor = 1.0; }
            else if (!strcmp(op, "all-to-all")) { MPI_Alltoall(a, (int)(count / n), MPI_FLOAT, b, (int)(count / n), MPI_FLOAT, MPI_COMM_WORLD); factor = (double)(n - 1) / n; }
            else { if (rank == 0) fprintf(stderr, "unknown op %s\n", op); MPI_Abort(MPI_COMM_WORLD, 2); }
            if (i >= 5) t[i - 5] = MPI_Wtime() - t0;
        }
        qsort(t, iters, sizeof *t, cmp);
        double p50 = t[iters / 2];
        if (rank == 0)
            printf("{\"op\": \"%s\", \"size_bytes\": %zu, \"p50_us\": %.3f, \"busbw_gbytes_per_s\": %.4f}\n", op, count * 4,
                   p50 * 1e6, (double)count * 4 / p50 / 1e9 * factor);
        fflush(stdout);
        free(a);
        free(b);
    }
    free(t);
    MPI_Finalize();
    return 0;
}
