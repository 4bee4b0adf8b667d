/* cpu_loop.c - a CPU-bound loop that counts its own progress, for bench/profile.py.
 *
 * Usage: cpu_loop COUNTER_FILE MAX_SECONDS
 * Runs fixed work units until killed (or MAX_SECONDS pass, or its parent dies: it never
 * outlives the bench), and after each unit stores the number of units done so far in the
 * first 8 bytes of COUNTER_FILE, which it maps shared. The bench reads that counter at the
 * edges of a window: units per second of wall time is the work rate the profiler may slow.
 * No syscall runs inside the loop, so the only kernel entries on its CPU are interrupts:
 * the timer tick, and with the profiler the cpu-clock sample and its BPF program.
 *
 * A work unit: a walk down a chain of 1..32 nested calls (a different depth each unit, so
 * the profiler sees a few dozen distinct user stacks, each needing a frame-pointer walk of
 * that depth), then 2048 dependent xorshift steps that read and write a 64 KiB table (it
 * stays in L1/L2, where a sampling interrupt's cache pollution would show). About 10 us.
 * Build with -fno-omit-frame-pointer, as a profiled program should be.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define TABLE_WORDS (64 * 1024 / 8)
#define STEPS 2048
#define MAX_DEPTH 32

static uint64_t table[TABLE_WORDS];

static uint64_t __attribute__((noinline)) leaf(uint64_t x)
{
    for (int i = 0; i < STEPS; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        uint64_t *slot = &table[x % TABLE_WORDS];
        *slot += x;
        x += *slot >> 3;
    }
    return x;
}

/* noinline and a use of the result after the call: every level keeps a real frame. */
static uint64_t __attribute__((noinline)) descend(int depth, uint64_t x)
{
    if (depth <= 1)
        return leaf(x);
    uint64_t r = descend(depth - 1, x + 1);
    __asm__ volatile("" : "+r"(r));
    return r ^ (uint64_t)depth;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s COUNTER_FILE MAX_SECONDS\n", argv[0]);
        return 2;
    }
    double max_s = atof(argv[2]);
    if (max_s <= 0) {
        fprintf(stderr, "%s: MAX_SECONDS must be positive\n", argv[0]);
        return 2;
    }
    /* Dies with the bench even if the bench is SIGKILLed. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1)
        return 1;

    int fd = open(argv[1], O_RDWR | O_CREAT, 0600);
    if (fd < 0 || ftruncate(fd, 4096) != 0) {
        perror(argv[1]);
        return 1;
    }
    volatile uint64_t *counter = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (counter == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    close(fd);

    for (int i = 0; i < TABLE_WORDS; i++)
        table[i] = (uint64_t)i * 0x9e3779b97f4a7c15ULL;
    double deadline = now_s() + max_s;
    uint64_t x = 88172645463325252ULL, units = 0;
    for (;;) {
        x = descend(1 + (int)(units % MAX_DEPTH), x);
        *counter = ++units;
        /* the clock is read through the vDSO (no syscall), and rarely */
        if ((units & 0xfff) == 0 && now_s() > deadline)
            break;
    }
    return x == 0;  /* uses x, so no step of the work can be dropped */
}
