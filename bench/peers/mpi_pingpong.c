/* A small MPI ping-pong and streaming-bandwidth test, the OSU micro-benchmarks' method without
 * their tarball (they are not packaged in Debian):
 *   latency    8 B ping-pong, one-way = RTT/2, median of per-iteration times (µs)
 *   bandwidth  osu_bw: a window of 64 non-blocking sends of SIZE, then a 4-byte ack (GB/s = 1e9 B/s);
 *              as in osu_bw every message of the window uses the same buffer (one per side)
 * Usage: mpirun -np 2 ... mpi_pingpong SECONDS SIZE[,SIZE...]|none   (one JSON object per line;
 *        `none` measures latency only) */
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
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    double seconds = argc > 1 ? atof(argv[1]) : 2.0;
    char sizes[1024] = "1048576";
    if (argc > 2) strncpy(sizes, argv[2], sizeof sizes - 1);

    /* latency */
    char small[8] = {0};
    size_t cap = 1 << 24, n = 0;
    double *rtt = malloc(cap * sizeof *rtt);
    for (int i = 0; i < 10000; i++) {
        if (rank == 0) { MPI_Send(small, 8, MPI_BYTE, 1, 1, MPI_COMM_WORLD); MPI_Recv(small, 8, MPI_BYTE, 1, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE); }
        else { MPI_Recv(small, 8, MPI_BYTE, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE); MPI_Send(small, 8, MPI_BYTE, 0, 1, MPI_COMM_WORLD); }
    }
    /* Calibrate on the warm-up rate, then both ranks run the same iteration count. */
    double t_warm = MPI_Wtime();
    for (int i = 0; i < 10000; i++) {
        if (rank == 0) { MPI_Send(small, 8, MPI_BYTE, 1, 1, MPI_COMM_WORLD); MPI_Recv(small, 8, MPI_BYTE, 1, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE); }
        else { MPI_Recv(small, 8, MPI_BYTE, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE); MPI_Send(small, 8, MPI_BYTE, 0, 1, MPI_COMM_WORLD); }
    }
    long iters = (long)(seconds / ((MPI_Wtime() - t_warm) / 10000));
    if (iters > (long)cap) iters = (long)cap;
    MPI_Bcast(&iters, 1, MPI_LONG, 0, MPI_COMM_WORLD);
    for (long i = 0; i < iters; i++) {
        double t = MPI_Wtime();
        if (rank == 0) {
            MPI_Send(small, 8, MPI_BYTE, 1, 1, MPI_COMM_WORLD);
            MPI_Recv(small, 8, MPI_BYTE, 1, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            rtt[n++] = MPI_Wtime() - t;
        } else {
            MPI_Recv(small, 8, MPI_BYTE, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Send(small, 8, MPI_BYTE, 0, 1, MPI_COMM_WORLD);
        }
    }
    if (rank == 0) {
        qsort(rtt, n, sizeof *rtt, cmp);
        printf("{\"what\": \"latency\", \"size_bytes\": 8, \"p50_us\": %.4f, \"samples\": %zu}\n", rtt[n / 2] * 1e6 / 2, n);
        fflush(stdout);
    }

    /* bandwidth */
    const int window = 64;
    for (char *tok = strtok(sizes, ","); tok && strcmp(tok, "none") != 0; tok = strtok(NULL, ",")) {
        size_t size = (size_t)atol(tok);
        char *buf = malloc(size);
        memset(buf, 1, size);
        MPI_Request req[64];
        int ack = 0;
        double total = 0, t0 = 0;
        long rounds = 0;
        int more = 1;
        for (int warm = 1; warm >= 0; warm--) {
            MPI_Barrier(MPI_COMM_WORLD);
            t0 = MPI_Wtime();
            rounds = 0;
            more = 1;
            while (more) {
                if (rank == 0) {
                    for (int w = 0; w < window; w++) MPI_Isend(buf, (int)size, MPI_BYTE, 1, 2, MPI_COMM_WORLD, &req[w]);
                    MPI_Waitall(window, req, MPI_STATUSES_IGNORE);
                    MPI_Recv(&ack, 1, MPI_INT, 1, 3, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                    rounds++;
                    more = MPI_Wtime() - t0 < (warm ? seconds / 4 : seconds);
                } else {
                    for (int w = 0; w < window; w++) MPI_Irecv(buf, (int)size, MPI_BYTE, 0, 2, MPI_COMM_WORLD, &req[w]);
                    MPI_Waitall(window, req, MPI_STATUSES_IGNORE);
                    MPI_Send(&ack, 1, MPI_INT, 0, 3, MPI_COMM_WORLD);
                    rounds++;
                }
                MPI_Bcast(&more, 1, MPI_INT, 0, MPI_COMM_WORLD);
            }
            total = MPI_Wtime() - t0;
        }
        if (rank == 0) {
            printf("{\"what\": \"bandwidth\", \"size_bytes\": %zu, \"gbytes_per_s\": %.4f}\n", size, (double)size * window * rounds / total / 1e9);
            fflush(stdout);
        }
        free(buf);
    }
    MPI_Finalize();
    return 0;
}
