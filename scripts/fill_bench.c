// How fast can one file of decoded bytes be written into the page cache? (issue 13: the disk
// cache's fill bound). Threads take 2 MiB pieces; each piece is "decoded" (a cheap generated
// pattern, standing in for a decoder's output) and written by METHOD:
//   pwrite  into a reused per-thread scratch buffer, then pwrite at its offset (what the daemon did)
//   mmap    straight into a shared mapping of the whole file, faulting its pages in as it writes
//   popul   the same, each piece's pages first made writable with MADV_POPULATE_WRITE
//   keep    as mmap, the pages left mapped until the end (the daemon before LLMFS_FILL_DROP_MAPPED)
// and (mmap, popul) the piece's pages unmapped after (MADV_DONTNEED: the page cache keeps
// them, the process's RSS does not), as the daemon's mapped fills do. Then the file is read once as a loader would: mmap and
// copy every byte into a buffer (one thread), which shows the page-cache folio size's effect.
// usage: fill_bench DIR SIZE_MIB THREADS pwrite|mmap|popul|keep [FILES]   (FILES files of SIZE/FILES each, at once)
// build: cc -O2 -pthread -o fill_bench scripts/fill_bench.c
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#define PIECE (2u << 20)

static size_t per_file, pieces_per_file;
static int nfiles, method;
static int fds[64];
static char *maps[64];
static atomic_size_t next_piece;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void gen(uint64_t *p, size_t n, uint64_t seed) {
    for (size_t i = 0; i < n / 8; i++) p[i] = (seed + i) * 0x9E3779B97F4A7C15ull;
}

static void *worker(void *arg) {
    (void)arg;
    uint64_t *scratch = aligned_alloc(4096, PIECE);
    memset(scratch, 0, PIECE);
    for (;;) {
        size_t k = atomic_fetch_add(&next_piece, 1);
        if (k >= pieces_per_file * nfiles) break;
        int f = k % nfiles;
        size_t off = (k / nfiles) * PIECE, n = per_file - off < PIECE ? per_file - off : PIECE;
        if (method == 0) {
            gen(scratch, n, k);
            if (pwrite(fds[f], scratch, n, off) != (ssize_t)n) { perror("pwrite"); exit(1); }
        } else {
            char *p = maps[f] + off;
            if (method == 2 && madvise(p, n, MADV_POPULATE_WRITE)) { perror("populate"); exit(1); }
            gen((uint64_t *)p, n, k);
            if (method != 3) madvise(p, n, MADV_DONTNEED);
        }
    }
    free(scratch);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s DIR SIZE_MIB THREADS pwrite|mmap|popul|keep [FILES]\n", argv[0]); return 2; }
    size_t size = (size_t)atol(argv[2]) << 20;
    int threads = atoi(argv[3]);
    method = !strcmp(argv[4], "pwrite") ? 0 : !strcmp(argv[4], "mmap") ? 1 : !strcmp(argv[4], "keep") ? 3 : 2;
    nfiles = argc > 5 ? atoi(argv[5]) : 1;
    per_file = size / nfiles;
    pieces_per_file = (per_file + PIECE - 1) / PIECE;
    char path[4096];
    for (int f = 0; f < nfiles; f++) {
        snprintf(path, sizeof path, "%s/fill_bench.%d.%d", argv[1], getpid(), f);
        fds[f] = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fds[f] < 0) { perror(path); return 1; }
        unlink(path);
        if (ftruncate(fds[f], per_file) || (!getenv("NOFALLOC") && fallocate(fds[f], 0, 0, per_file))) perror("ftruncate/fallocate");
        if (method) {
            maps[f] = mmap(NULL, per_file, PROT_READ | PROT_WRITE, MAP_SHARED, fds[f], 0);
            if (maps[f] == MAP_FAILED) { perror("mmap"); return 1; }
        }
    }
    double t0 = now();
    pthread_t th[256];
    for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, worker, NULL);
    for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
    // Unmapped within the fill's time, as the daemon's fill drops its mapping before it is done
    // (with keep, munmap takes down every page's entry then).
    for (int f = 0; f < nfiles; f++)
        if (method) munmap(maps[f], per_file);
    double fill = now() - t0;
    // The pattern alone, on the same threads' worth of scratch: the "decoder" speed.
    uint64_t *s = aligned_alloc(4096, PIECE);
    double g0 = now();
    for (int r = 0; r < 64; r++) gen(s, PIECE, r);
    double gen1 = (64.0 * PIECE) / (now() - g0) / 1e9;
    // A loader's read: mmap the (first) file, copy it all into one buffer.
    char *buf = malloc(per_file);
    memset(buf, 1, per_file);
    char *m = mmap(NULL, per_file, PROT_READ, MAP_PRIVATE, fds[0], 0);
    double r0 = now();
    memcpy(buf, m, per_file);
    double rd = now() - r0;
    munmap(m, per_file);
    // And read() in 16 MiB pieces.
    double p0 = now();
    for (size_t off = 0; off < per_file; off += 16 << 20) {
        size_t n = per_file - off < (16u << 20) ? per_file - off : 16u << 20;
        if (pread(fds[0], buf + off, n, off) != (ssize_t)n) { perror("pread"); return 1; }
    }
    double pr = now() - p0;
    printf("%s files=%d threads=%d method=%s: fill %.2f GB/s (%.3f s); pattern alone %.1f GB/s/thread; "
           "then one reader: mmap+copy %.2f GB/s, pread %.2f GB/s\n",
           argv[1], nfiles, threads, argv[4], size / fill / 1e9, fill, gen1, per_file / rd / 1e9, per_file / pr / 1e9);
    return 0;
}
