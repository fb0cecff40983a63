/* Uses guest memory for the balloon tests (built static by the tests).
 *
 *   memtouch MIB [HOLD]   allocate MIB MiB, write every page with its own pattern, read it
 *                         all back, print "MEMTOUCH-OK MIB", then keep the memory HOLD
 *                         seconds (default 0) and exit, which frees it.
 *
 * A page that does not read back as written prints "MEMTOUCH-BAD" and exits 1; a guest
 * that cannot find the memory kills the program (the shell says "Killed").
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: memtouch MIB [HOLD]\n");
        return 2;
    }
    unsigned long mib = strtoul(argv[1], NULL, 10);
    unsigned hold = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 10) : 0;
    size_t len = mib << 20;
    uint8_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    for (size_t off = 0; off < len; off += PAGE) {
        uint64_t *w = (uint64_t *)(p + off);
        w[0] = off ^ 0x5a5a5a5a5a5a5a5aULL;
        w[PAGE / 8 - 1] = ~off;
    }
    for (size_t off = 0; off < len; off += PAGE) {
        uint64_t *w = (uint64_t *)(p + off);
        if (w[0] != (off ^ 0x5a5a5a5a5a5a5a5aULL) || w[PAGE / 8 - 1] != ~off) {
            printf("MEMTOUCH-BAD at %zu\n", off);
            return 1;
        }
    }
    printf("MEMTOUCH-OK %lu\n", mib);
    fflush(stdout);
    sleep(hold);
    return 0;
}
