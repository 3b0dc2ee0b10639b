// Cache-line round trip between two cores: two threads pinned to CPU A and CPU B bounce one
// atomic word. About 50 ns when the cores share a cache, several hundred when they do not (two
// sockets, two Zen CCDs, or a VM whose host placed its vCPUs so). The bench scripts print it
// before and after a run, since a VM's host may move its vCPUs between runs.
// usage: cacheline_pingpong CPU_A CPU_B   (prints one JSON line)
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define ROUNDS 2000000L
static _Atomic long word __attribute__((aligned(64)));
static int cpu_b;

static void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (pthread_setaffinity_np(pthread_self(), sizeof set, &set) != 0) {
    fprintf(stderr, "cannot pin to CPU %d\n", cpu);
    exit(1);
  }
}

static void *bouncer(void *unused) {
  (void)unused;
  pin(cpu_b);
  for (long i = 0; i < ROUNDS; i++) {
    while (atomic_load(&word) != 2 * i + 1) {
    }
    atomic_store(&word, 2 * i + 2);
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s CPU_A CPU_B\n", argv[0]);
    return 2;
  }
  cpu_b = atoi(argv[2]);
  pin(atoi(argv[1]));
  pthread_t t;
  pthread_create(&t, NULL, bouncer, NULL);
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long i = 0; i < ROUNDS; i++) {
    atomic_store(&word, 2 * i + 1);
    while (atomic_load(&word) != 2 * i + 2) {
    }
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  pthread_join(t, NULL);
  double ns = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / ROUNDS;
  printf("{\"what\": \"cacheline_round_trip_ns\", \"value\": %.1f}\n", ns);
  return 0;
}
