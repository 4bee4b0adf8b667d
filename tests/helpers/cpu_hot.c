/* Known CPU truth for the profiler, built with frame pointers.
 *
 *   cpu_hot split SECONDS     alternates hot_a for 3u ms and hot_b for u ms of CPU, u drawn
 *                             from [0.5, 1.5) each round: a 3:1 split with no fixed
 *                             period a sampling frequency could fall into lockstep with
 *   cpu_hot syscalls SECONDS  writes 4 KiB to /dev/null in a loop: kernel time under
 *                             the write syscall
 *   cpu_hot mixed SECONDS     waits for a line on stdin (so a test can first move it into
 *                             a cgroup), then spins SECONDS in hot_a and sleeps 3 x 50 ms:
 *                             profile samples, syscalls and slow calls from one process
 * Prints "done" and exits. The clock is read rarely (every 4096 or 65536 spins) so that
 * almost no sample lands in the vDSO or libc, whose code may not keep the frame-pointer chain.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The thread's own CPU time: the split is 3:1 in what a CPU profiler samples even when a
 * loaded machine preempts the spinner (a wall-clock split then skews with the load). */
static long long cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

__attribute__((noinline)) static void spin_until(long long cpu_deadline)
{
    do {  /* ~30 us of spinning per clock read: the read is a syscall (no vDSO for it) */
        for (int i = 0; i < 65536; i++)
            sink += i;
    } while (cpu_ns() < cpu_deadline);
}

__attribute__((noinline)) void hot_a(long unit_ns) { spin_until(cpu_ns() + 3 * unit_ns); }
__attribute__((noinline)) void hot_b(long unit_ns) { spin_until(cpu_ns() + unit_ns); }

__attribute__((noinline)) void write_loop(long long deadline)
{
    static char buf[4096];
    int fd = open("/dev/null", O_WRONLY);
    while (now_ns() < deadline)
        for (int i = 0; i < 64; i++)
            if (write(fd, buf, sizeof(buf)) < 0)
                return;
    close(fd);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s split|syscalls SECONDS\n", argv[0]);
        return 2;
    }
    long long deadline = now_ns() + (long long)(atof(argv[2]) * 1e9);
    if (!strcmp(argv[1], "split")) {
        srand(getpid());
        while (now_ns() < deadline) {
            long unit_ns = 500000 + rand() % 1000000;
            hot_a(unit_ns);
            hot_b(unit_ns);
        }
    } else if (!strcmp(argv[1], "mixed")) {
        char line[16];
        printf("ready %d\n", getpid());
        fflush(stdout);
        if (!fgets(line, sizeof(line), stdin))
            return 1;
        deadline = now_ns() + (long long)(atof(argv[2]) * 1e9);
        while (now_ns() < deadline)
            hot_a(1000000);
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 50000000};
        for (int i = 0; i < 3; i++)
            nanosleep(&ts, NULL);
    } else if (!strcmp(argv[1], "syscalls")) {
        write_loop(deadline);
    } else {
        return 2;
    }
    printf("done\n");
    return 0;
}
