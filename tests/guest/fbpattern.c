/* Draws a known pattern on /dev/fb0 for the display tests (built static by the tests).
 *
 *   fbpattern           the pattern once, then "FB-OK WIDTH HEIGHT"
 *   fbpattern loop N    N whole-screen redraws, each a different colour (a benchmark's
 *                       load), then "FB-LOOP-DONE N MILLISECONDS"
 *   fbpattern fill RGB  a 64x64 square at the top left in colour RGB (hex), then
 *                       "FB-FILLED" (a benchmark's latency probe)
 *
 * The console is switched to graphics mode (KD_GRAPHICS) first, so that no cursor or text
 * is drawn over the pattern. Pixel (x, y) of the pattern is
 *   r = (x * 7 + y * 3) & 0xff, g = (x ^ y) & 0xff, b = (x + y) / 4 & 0xff
 * except a solid block (0x204080) at x 64..191, y 64..127 and white at x 256..319, y 0..63,
 * so that encoders meet both solid and busy tiles. The tests compute the same.
 */
#include <fcntl.h>
#include <linux/fb.h>
#include <linux/kd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static uint32_t pattern(unsigned x, unsigned y)
{
    if (x >= 64 && x < 192 && y >= 64 && y < 128)
        return 0x204080;
    if (x >= 256 && x < 320 && y < 64)
        return 0xffffff;
    uint32_t r = (x * 7 + y * 3) & 0xff;
    uint32_t g = (x ^ y) & 0xff;
    uint32_t b = ((x + y) / 4) & 0xff;
    return r << 16 | g << 8 | b;
}

int main(int argc, char **argv)
{
    int tty = open("/dev/tty0", O_RDWR);
    if (tty >= 0)
        ioctl(tty, KDSETMODE, KD_GRAPHICS);
    int fd = open("/dev/fb0", O_RDWR);
    if (fd < 0) {
        perror("/dev/fb0");
        return 1;
    }
    struct fb_var_screeninfo var;
    struct fb_fix_screeninfo fix;
    if (ioctl(fd, FBIOGET_VSCREENINFO, &var) || ioctl(fd, FBIOGET_FSCREENINFO, &fix)) {
        perror("FBIOGET");
        return 1;
    }
    if (var.bits_per_pixel != 32) {
        fprintf(stderr, "%u bits per pixel\n", var.bits_per_pixel);
        return 1;
    }
    size_t size = (size_t)fix.line_length * var.yres;
    uint8_t *fb = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (fb == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    if (argc == 3 && strcmp(argv[1], "fill") == 0) {
        uint32_t colour = (uint32_t)strtoul(argv[2], NULL, 16);
        for (unsigned y = 0; y < 64 && y < var.yres; y++) {
            uint32_t *line = (uint32_t *)(fb + (size_t)y * fix.line_length);
            for (unsigned x = 0; x < 64 && x < var.xres; x++)
                line[x] = colour;
        }
        msync(fb, size, MS_SYNC);
        printf("FB-FILLED\n");
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "loop") == 0) {
        long n = atol(argv[2]);
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (long i = 0; i < n; i++) {
            uint32_t colour = (uint32_t)(i * 0x3d2b1f) & 0xffffff;
            for (unsigned y = 0; y < var.yres; y++) {
                uint32_t *line = (uint32_t *)(fb + (size_t)y * fix.line_length);
                for (unsigned x = 0; x < var.xres; x++)
                    line[x] = colour ^ (x & 0xff);
            }
            msync(fb, size, MS_SYNC);
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
        printf("FB-LOOP-DONE %ld %ld\n", n, ms);
        return 0;
    }
    for (unsigned y = 0; y < var.yres; y++) {
        uint32_t *line = (uint32_t *)(fb + (size_t)y * fix.line_length);
        for (unsigned x = 0; x < var.xres; x++)
            line[x] = pattern(x, y);
    }
    msync(fb, size, MS_SYNC);
    /* The DRM fbdev emulation copies damage to VRAM from a worker: give it time. */
    usleep(300 * 1000);
    printf("FB-OK %u %u\n", var.xres, var.yres);
    return 0;
}
