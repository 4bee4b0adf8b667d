/* span_storm.c - getppid at a paced rate, for bench/spans.py.
 *
 * Usage: span_storm RATE SECONDS
 * Makes RATE getppid calls a second for SECONDS seconds: every millisecond (an absolute
 * clock_nanosleep, so a late wake-up does not shift the schedule) it makes as many calls as
 * bring the total up to RATE x elapsed time. With the agent's getppid threshold at 1 ns each
 * call is one span. Prints one line: "CALLS ELAPSED_S MAX_LAG_MS", the calls made (the spans
 * offered), the time it took and how far behind the schedule it ever was.
 *
 * Its comm ("span_storm") is what the agent's filter selects. clock_nanosleep is in the
 * agent's default exclude list, so it makes no spans of its own.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define TICK_NS 1000000LL

static long long ns_of(const struct timespec *ts)
{
    return (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec;
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ns_of(&ts);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s RATE SECONDS\n", argv[0]);
        return 2;
    }
    long long rate = atoll(argv[1]);
    double seconds = atof(argv[2]);
    if (rate <= 0 || seconds <= 0) {
        fprintf(stderr, "%s: RATE and SECONDS must be positive\n", argv[0]);
        return 2;
    }
    long long total = (long long)((double)rate * seconds + 0.5);
    long long start = now_ns(), done = 0, max_lag = 0;
    struct timespec next = {.tv_sec = start / 1000000000LL, .tv_nsec = start % 1000000000LL};
    volatile long sink = 0;
    while (done < total) {
        long long now = now_ns();
        long long due = (long long)((double)(now - start) * (double)rate / 1e9) + 1;
        if (due > total)
            due = total;
        long long lag = now - ns_of(&next);
        if (lag > max_lag)
            max_lag = lag;
        for (; done < due; done++)
            sink += syscall(SYS_getppid);
        long long next_ns = ns_of(&next) + TICK_NS;
        next.tv_sec = next_ns / 1000000000LL;
        next.tv_nsec = next_ns % 1000000000LL;
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
            ;
    }
    printf("%lld %.3f %.1f\n", done, (double)(now_ns() - start) / 1e9, (double)max_lag / 1e6);
    return 0;
}
