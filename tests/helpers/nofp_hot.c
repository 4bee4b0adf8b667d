/* Known CPU truth for the unwinder: the 3:1 split of cpu_hot.c, in code built without
 * frame pointers (-O2 -fomit-frame-pointer; tests/kernel/test_unwind.py builds it).
 *
 *   nofp_hot SECONDS   prints "ready PID", spins ~0.5 s of CPU in warm_up (so the agent
 *                      sees the process and loads its mappings), prints "waiting", waits
 *                      for a line on stdin, then alternates hot_a for 3u ms and hot_b for u ms of its
 *                      CPU time (u drawn from [0.5, 1.5)) for SECONDS of its CPU time
 *                      (not wall-clock: a loaded machine gives it less), prints "done".
 * Every function does work after its call, so none ends in a tail call that would drop
 * its own frame: main -> run_split -> hot_a | hot_b -> spin.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;

static long long cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ~30 us of spinning per clock read: few samples land in the clock read */
__attribute__((noinline)) unsigned long spin(long long cpu_deadline)
{
    unsigned long local = 0;
    do {
        for (int i = 0; i < 65536; i++)
            local += i ^ sink;
    } while (cpu_ns() < cpu_deadline);
    return local;
}

__attribute__((noinline)) unsigned long hot_a(long unit_ns)
{
    unsigned long r = spin(cpu_ns() + 3 * unit_ns);
    sink += r;
    return r + 1;
}

__attribute__((noinline)) unsigned long hot_b(long unit_ns)
{
    unsigned long r = spin(cpu_ns() + unit_ns);
    sink += r;
    return r + 2;
}

__attribute__((noinline)) unsigned long warm_up(void)
{
    unsigned long r = spin(cpu_ns() + 500000000LL);
    sink += r;
    return r;
}

__attribute__((noinline)) unsigned long run_split(double seconds)
{
    long long deadline = cpu_ns() + (long long)(seconds * 1e9);
    unsigned long total = 0;
    srand(getpid());
    while (cpu_ns() < deadline) {
        long unit_ns = 500000 + rand() % 1000000;
        total += hot_a(unit_ns);
        total += hot_b(unit_ns);
    }
    return total;
}

int main(int argc, char **argv)
{
    char line[16];
    if (argc != 2) {
        fprintf(stderr, "usage: %s SECONDS\n", argv[0]);
        return 2;
    }
    printf("ready %d\n", getpid());
    fflush(stdout);
    warm_up();
    printf("waiting\n");
    fflush(stdout);
    if (!fgets(line, sizeof(line), stdin))
        return 1;
    sink += run_split(atof(argv[1]));
    printf("done\n");
    return 0;
}
