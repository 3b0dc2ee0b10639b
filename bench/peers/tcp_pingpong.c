/* A raw busy-poll TCP ping-pong: the floor a framed, authenticated link is compared with.
 *
 *   tcp_pingpong server PORT
 *   tcp_pingpong client HOST PORT SIZE SECONDS
 *
 * Both sides use non-blocking sockets with TCP_NODELAY and spin on recv(); the client prints the
 * one-way latency (RTT/2) percentiles in microseconds as one JSON object. */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static void tune(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static int spin_io(int fd, char *buf, size_t len, int sending) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = sending ? send(fd, buf + done, len - done, MSG_NOSIGNAL) : recv(fd, buf + done, len - done, 0);
        if (n > 0) done += (size_t)n;
        else if (n == 0) return -1;
        else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -1;
    }
    return 0;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "server") == 0) {
        int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2])), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4)) { perror("listen"); return 1; }
        printf("listening\n");
        fflush(stdout);
        for (;;) {
            int c = accept(l, NULL, NULL);
            if (c < 0) continue;
            tune(c);
            char buf[1 << 16];
            for (;;) {
                ssize_t n = recv(c, buf, sizeof buf, 0);
                if (n > 0) { if (spin_io(c, buf, (size_t)n, 1)) break; }
                else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) break;
            }
            close(c);
        }
    }
    if (argc == 6 && strcmp(argv[1], "client") == 0) {
        size_t size = (size_t)atol(argv[4]);
        double seconds = atof(argv[5]);
        struct addrinfo *ai;
        if (getaddrinfo(argv[2], argv[3], NULL, &ai)) { fprintf(stderr, "bad address\n"); return 1; }
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, ai->ai_addr, ai->ai_addrlen)) { perror("connect"); return 1; }
        tune(fd);
        char *buf = calloc(size ? size : 1, 1);
        size_t cap = 1 << 24, n = 0;
        double *rtt = malloc(cap * sizeof *rtt);
        for (int i = 0; i < 1000; i++)
            if (spin_io(fd, buf, size, 1) || spin_io(fd, buf, size, 0)) return 1;
        double end = now_ns() + seconds * 1e9;
        while (n < cap) {
            double t = now_ns();
            if (t >= end) break;
            if (spin_io(fd, buf, size, 1) || spin_io(fd, buf, size, 0)) { fprintf(stderr, "peer gone\n"); return 1; }
            rtt[n++] = now_ns() - t;
        }
        qsort(rtt, n, sizeof *rtt, cmp);
        printf("{\"size_bytes\": %zu, \"samples\": %zu, \"p50_us\": %.3f, \"p99_us\": %.3f, \"p999_us\": %.3f}\n", size, n,
               rtt[n / 2] / 2000, rtt[(size_t)(n * 0.99)] / 2000, rtt[(size_t)(n * 0.999)] / 2000);
        return 0;
    }
    fprintf(stderr, "usage: %s server PORT | client HOST PORT SIZE SECONDS\n", argv[0]);
    return 2;
}
