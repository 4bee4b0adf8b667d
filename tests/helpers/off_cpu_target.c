/* Known off-CPU truth for the off-CPU profiler and slow-call stacks, built with frame
 * pointers. Each wait goes main -> <known function> -> <leaf helper> -> libc: libc keeps
 * no frame pointer, so a frame-pointer walk loses the leaf helper (the direct caller of
 * libc) but keeps the known function and main.
 *
 *   off_cpu_target sleeps K MS   K nanosleeps of MS ms from wait_for_tick
 *   off_cpu_target read [MS]     spins MS ms of CPU in burn (default 0), then one read of
 *                                a byte from stdin from read_config: slow when the test
 *                                writes to the pipe late; then waits for the end of stdin
 *                                (the test keeps it alive until then)
 * Prints "done" and exits.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile long sink;

__attribute__((noinline)) static void pause_once(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    sink++; /* work after the call: no tail call */
}

__attribute__((noinline)) static void wait_for_tick(long k, long ms)
{
    for (long i = 0; i < k; i++) {
        pause_once(ms);
        sink++;
    }
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) static void burn(long ms)
{
    double end = now() + ms / 1000.0;
    while (now() < end)
        for (int i = 0; i < 100000; i++)
            sink += i;
}

__attribute__((noinline)) static long read_once(int fd, char *byte)
{
    long n = read(fd, byte, 1);
    sink++;
    return n;
}

__attribute__((noinline)) static long read_config(void)
{
    char byte = 0;
    long n = read_once(0, &byte);
    sink += byte;
    return n;
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strcmp(argv[1], "sleeps")) {
        wait_for_tick(atol(argv[2]), atol(argv[3]));
    } else if ((argc == 2 || argc == 3) && !strcmp(argv[1], "read")) {
        if (argc == 3)
            burn(atol(argv[2]));
        if (read_config() != 1)
            return 1;
        char rest;
        while (read(0, &rest, 1) > 0)
            ;
    } else {
        fprintf(stderr, "usage: %s sleeps K MS | read [MS]\n", argv[0]);
        return 2;
    }
    puts("done");
    return 0;
}
