// How fast does this machine hand out memory that no process has touched lately? (issue 13:
// a first load writes the decoded file into new page-cache pages; on a VM whose freed pages go
// back to the host, each new page is a host fault.) THREADS threads write SIZE_MIB of fresh
// anonymous memory, ROUNDS times, sleeping PAUSE_S seconds between rounds (freed memory is
// returned to the host after a delay, if at all).
// usage: mem_touch SIZE_MIB THREADS ROUNDS PAUSE_S
// build: cc -O2 -pthread -o mem_touch scripts/mem_touch.c
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static char *mem;
static size_t size, per;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *worker(void *arg) {
    size_t i = (size_t)arg;
    memset(mem + i * per, 1, per);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s SIZE_MIB THREADS ROUNDS PAUSE_S\n", argv[0]); return 2; }
    size = (size_t)atol(argv[1]) << 20;
    int threads = atoi(argv[2]), rounds = atoi(argv[3]);
    double pause = atof(argv[4]);
    per = size / threads;
    for (int r = 0; r < rounds; r++) {
        mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) { perror("mmap"); return 1; }
        double t0 = now();
        pthread_t th[256];
        for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, worker, (void *)(size_t)i);
        for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
        double t = now() - t0;
        double t1 = now();
        memset(mem, 2, size);  // the same pages again, one thread: memory bandwidth alone
        double again = now() - t1;
        printf("round %d (after %.0f s pause): %d threads wrote %zu MiB of fresh memory at %.2f GB/s; "
               "the same pages again, one thread: %.2f GB/s\n",
               r, r ? pause : 0.0, threads, size >> 20, size / t / 1e9, size / again / 1e9);
        fflush(stdout);
        munmap(mem, size);
        if (r + 1 < rounds) usleep((useconds_t)(pause * 1e6));
    }
    return 0;
}
