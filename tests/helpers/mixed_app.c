/* A frame-pointer executable without unwind tables (-fno-omit-frame-pointer
 * -fno-asynchronous-unwind-tables) calling nofp_lib.c's library, which calls back into
 * it: main -> drive -> lib_work -> lib_inner -> app_leaf. Unwinding it needs frame
 * pointers for the application's frames and the library's CFI for its own.
 *
 *   mixed_app SECONDS   prints "ready PID", spins ~0.5 s of CPU in the same calls, prints
 *                       "waiting", waits for a line on stdin, spins SECONDS of CPU, prints "done".
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

unsigned long lib_work(unsigned long (*leaf)(unsigned long), unsigned long n);

static volatile unsigned long sink;

static long long cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

__attribute__((noinline)) unsigned long app_leaf(unsigned long n)
{
    unsigned long local = n;
    for (int i = 0; i < 16384; i++)
        local += i ^ sink;
    return local;
}

__attribute__((noinline)) void drive(long long cpu_for)
{
    long long deadline = cpu_ns() + cpu_for;
    unsigned long n = 1;
    while (cpu_ns() < deadline)
        n += lib_work(app_leaf, n);
    sink += n;
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
    drive(500000000LL);
    printf("waiting\n");
    fflush(stdout);
    if (!fgets(line, sizeof(line), stdin))
        return 1;
    drive((long long)(atof(argv[1]) * 1e9));
    printf("done\n");
    return 0;
}
