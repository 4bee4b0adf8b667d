/* getppid_storm.c - time a tight loop of raw getppid syscalls.
 *
 * Usage: getppid_storm CALLS
 * Prints one line: the mean wall-clock ns per call over CALLS calls (after a warm-up of
 * CALLS/10 calls that is not timed, so page faults, cache and branch predictor warm-up do
 * not land in the measurement).
 *
 * getppid is the cheapest syscall there is: it takes no lock and touches almost no memory,
 * so the time per call is dominated by the kernel entry/exit path, which is exactly where
 * the sys_enter / sys_exit tracepoints add their cost. syscall(SYS_getppid) rather than
 * getppid() so no libc version can ever cache the result in user space.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
    struct timespec ts;
    /* CLOCK_MONOTONIC is read through the vDSO: no syscall of its own inside the timing. */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s CALLS\n", argv[0]);
        return 2;
    }
    char *end;
    long long calls = strtoll(argv[1], &end, 10);
    if (*end != '\0' || calls <= 0) {
        fprintf(stderr, "%s: CALLS must be a positive integer, not %s\n", argv[0], argv[1]);
        return 2;
    }

    /* volatile sink: keeps -O2 from deciding the results are unused (it cannot drop the
     * syscalls themselves, but this makes the loop body unambiguous). */
    volatile long sink = 0;
    for (long long i = 0; i < calls / 10; i++)
        sink += syscall(SYS_getppid);

    long long start = now_ns();
    for (long long i = 0; i < calls; i++)
        sink += syscall(SYS_getppid);
    long long elapsed = now_ns() - start;

    printf("%.3f\n", (double)elapsed / (double)calls);
    return 0;
}
