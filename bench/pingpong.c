/* pingpong.c - a context-switch storm for bench/offcpu.py.
 *
 * Two threads hand one byte back and forth over two pipes for SECONDS; pinned to one CPU
 * (taskset), every hand-over is a context switch from the thread that blocks in read to
 * the one it woke. Prints "roundtrips <n> switches <n> seconds <s>": the switches are the
 * process's voluntary and involuntary context switches (getrusage) over the run.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static int ab[2], ba[2];
static volatile int stop;

static void *echo(void *arg)
{
    (void)arg;
    char c;
    while (read(ab[0], &c, 1) == 1) {
        if (write(ba[1], &c, 1) != 1)
            break;
    }
    return NULL;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long switches(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_nvcsw + ru.ru_nivcsw;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    if (pipe(ab) || pipe(ba))
        return 1;
    pthread_t t;
    if (pthread_create(&t, NULL, echo, NULL))
        return 1;
    char c = 'x';
    long trips = 0;
    long sw0 = switches();
    double began = now(), end = began + seconds, t1 = began;
    while (t1 < end) {
        for (int i = 0; i < 256; i++) {
            if (write(ab[1], &c, 1) != 1 || read(ba[0], &c, 1) != 1)
                return 1;
        }
        trips += 256;
        t1 = now();
    }
    long sw = switches() - sw0;
    close(ab[1]);
    pthread_join(t, NULL);
    printf("roundtrips %ld switches %ld seconds %.6f\n", trips, sw, t1 - began);
    return 0;
}
