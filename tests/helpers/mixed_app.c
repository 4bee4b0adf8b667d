/* A frame-pointer executable without unwind tables (-fno-omit-frame-pointer
 * -fno-asynchronous-unwind-tables) calling nofp_lib.c's library, which calls back into
 * it: main -> drive -> lib_work -> lib_inner -> app_leaf. Unwinding it needs frame
 * pointers for the application's frames and the library's CFI for its own.
 *
 *   mixed_app SECONDS           prints "ready PID", spins ~0.5 s of CPU in the same calls,
 *                               prints "waiting", waits for a line on stdin, spins SECONDS
 *                               of CPU, prints "done".
 *   mixed_app_dl SECONDS LIB    (built with -DUSE_DLOPEN) the same, but the warm-up calls
 *                               app_leaf alone and the library is dlopen'ed from LIB after
 *                               the line on stdin: mapped after the agent read the maps.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#ifdef USE_DLOPEN
#include <dlfcn.h>
#endif

typedef unsigned long (*leaf_fn)(unsigned long);
unsigned long lib_work(leaf_fn leaf, unsigned long n);

static volatile unsigned long sink;
static unsigned long (*work)(leaf_fn, unsigned long);

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

static unsigned long leaf_only(leaf_fn leaf, unsigned long n)
{
    return leaf(n) + leaf(n + 1);
}

__attribute__((noinline)) void drive(long long cpu_for)
{
    long long deadline = cpu_ns() + cpu_for;
    unsigned long n = 1;
    while (cpu_ns() < deadline)
        n += work(app_leaf, n);
    sink += n;
}

int main(int argc, char **argv)
{
    char line[16];
#ifdef USE_DLOPEN
    if (argc != 3) {
        fprintf(stderr, "usage: %s SECONDS LIB\n", argv[0]);
        return 2;
    }
    work = leaf_only;
#else
    if (argc != 2) {
        fprintf(stderr, "usage: %s SECONDS\n", argv[0]);
        return 2;
    }
    work = lib_work;
#endif
    printf("ready %d\n", getpid());
    fflush(stdout);
    drive(500000000LL);
    printf("waiting\n");
    fflush(stdout);
    if (!fgets(line, sizeof(line), stdin))
        return 1;
#ifdef USE_DLOPEN
    void *lib = dlopen(argv[2], RTLD_NOW);
    if (!lib || !(work = (unsigned long (*)(leaf_fn, unsigned long))dlsym(lib, "lib_work"))) {
        fprintf(stderr, "dlopen %s: %s\n", argv[2], dlerror());
        return 1;
    }
#endif
    drive((long long)(atof(argv[1]) * 1e9));
    printf("done\n");
    return 0;
}
