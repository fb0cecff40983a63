/* Rewrites a buffer with page-stamped, generation-numbered patterns and checks every page
 * after each pass, for the migration tests (built static by the tests).
 *
 *   memstamp MIB SECONDS [RATE]
 *                          for SECONDS, pass after pass: write generation g into every
 *                          page of an MIB MiB buffer (its index, g, and a mix of both at
 *                          both ends and in the middle), then check every page. Every 16
 *                          passes it prints "STAMP-PASS g"; a page that does not hold what
 *                          was written prints "STAMP-BAD page g" and exits 1; at the end
 *                          "STAMP-DONE g". With RATE (MiB/s), the writes are paced to
 *                          dirty about RATE MiB of memory per second (a benchmark's load).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_WORDS 512
#define MAGIC 0x9e3779b97f4a7c15ULL

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: memstamp MIB SECONDS\n");
        return 2;
    }
    size_t pages = strtoul(argv[1], NULL, 10) * 256;
    double start = now();
    double end = start + strtod(argv[2], NULL);
    double rate = argc > 3 ? strtod(argv[3], NULL) : 0;
    double written = 0;
    uint64_t *buf = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    uint64_t g;
    for (g = 1; now() < end; g++) {
        for (size_t i = 0; i < pages; i++) {
            uint64_t *p = buf + i * PAGE_WORDS;
            p[0] = i;
            p[1] = g;
            p[PAGE_WORDS / 2] = (i * MAGIC) ^ g;
            p[PAGE_WORDS - 1] = i ^ (g * MAGIC);
            if (rate > 0 && i % 256 == 255) {
                written += 1;
                double due = start + written / rate;
                double t = now();
                if (due > t)
                    usleep((useconds_t)((due - t) * 1e6));
            }
        }
        for (size_t i = 0; i < pages; i++) {
            uint64_t *p = buf + i * PAGE_WORDS;
            if (p[0] != i || p[1] != g || p[PAGE_WORDS / 2] != ((i * MAGIC) ^ g)
                || p[PAGE_WORDS - 1] != (i ^ (g * MAGIC))) {
                printf("STAMP-BAD %zu %llu\n", i, (unsigned long long)g);
                fflush(stdout);
                return 1;
            }
        }
        if (g % 16 == 0) {
            printf("STAMP-PASS %llu\n", (unsigned long long)g);
            fflush(stdout);
        }
    }
    printf("STAMP-DONE %llu\n", (unsigned long long)(g - 1));
    return 0;
}
