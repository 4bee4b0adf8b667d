/* churn_spawn.c - short-lived processes at a steady rate, for bench/churn.py.
 *
 * Usage: churn_spawn RATE SECONDS [PROGRAM [CGROUP]]
 * Starts PROGRAM (default /bin/true, no arguments) RATE times a second for SECONDS seconds,
 * or until SIGTERM/SIGINT, then waits for every child. With CGROUP (a cgroup v2 directory)
 * the driver first moves itself into it, so every child starts there: the agent then
 * counts them in a workload series of their own, apart from anyone else's PROGRAM. Spawn k is due at start + k / RATE
 * (an absolute clock_nanosleep, so a late wake-up does not shift the schedule; a late
 * driver catches up). posix_spawn is glibc's vfork-style clone: the driver's cost per
 * child is a clone and an exec, not a copy of its memory, so it keeps up where Python's
 * subprocess would not. Children are reaped after every spawn round.
 *
 * Prints one line:
 *   SPAWNED EXITED_OK FAILED ELAPSED_S MAX_LAG_MS SELF_CPU_S CHILDREN_CPU_S
 * spawned: children started (each ran PROGRAM's main: exec succeeded); exited_ok: those that
 * exited with status 0; failed: spawns refused or children that did not exit 0; the time
 * from the first spawn to the last child's exit; how far behind its schedule the driver
 * ever was; its own CPU time and its children's (getrusage), so the bench can show that
 * neither is the agent's.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

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

static double cpu_s(const struct timeval *user, const struct timeval *sys)
{
    return (double)(user->tv_sec + sys->tv_sec) + (double)(user->tv_usec + sys->tv_usec) / 1e6;
}

static long long exited_ok, failed, running;

/* Move this process into the cgroup v2 directory `dir` ("0" names the writer). */
static int join_cgroup(const char *self, const char *dir)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/cgroup.procs", dir);
    FILE *procs = fopen(path, "w");
    if (!procs || fputs("0\n", procs) == EOF || fclose(procs) != 0) {
        fprintf(stderr, "%s: cannot join %s: %s\n", self, dir, strerror(errno));
        return -1;
    }
    return 0;
}

static void reap(int options)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, options)) > 0) {
        running--;
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
            exited_ok++;
        else
            failed++;
    }
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 5) {
        fprintf(stderr, "usage: %s RATE SECONDS [PROGRAM [CGROUP]]\n", argv[0]);
        return 2;
    }
    double rate = atof(argv[1]), seconds = atof(argv[2]);
    char *program = argc >= 4 ? argv[3] : "/bin/true";
    if (argc == 5 && join_cgroup(argv[0], argv[4]) != 0)
        return 2;
    if (rate <= 0 || seconds <= 0) {
        fprintf(stderr, "%s: RATE and SECONDS must be positive\n", argv[0]);
        return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal; /* no SA_RESTART: a signal ends the sleep */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    char *child_argv[] = {program, NULL};
    long long total = (long long)(rate * seconds + 0.5);
    /* slots: spawns attempted, on the schedule; a refused spawn keeps its slot (it is
     * counted as failed, not retried, so the rate stays what was asked) */
    long long start = now_ns(), slots = 0, spawned = 0, max_lag = 0;
    while (slots < total && !stop) {
        long long now = now_ns();
        long long due = (long long)((double)(now - start) * rate / 1e9) + 1;
        if (due > total)
            due = total;
        long long lag = now - (start + (long long)((double)slots * 1e9 / rate));
        if (lag > max_lag)
            max_lag = lag;
        for (; slots < due && !stop; slots++) {
            pid_t pid;
            int err = posix_spawn(&pid, program, NULL, NULL, child_argv, environ);
            if (err != 0) {
                if (failed++ < 5)
                    fprintf(stderr, "%s: posix_spawn %s: %s\n", argv[0], program,
                            strerror(err));
                continue;
            }
            spawned++;
            running++;
        }
        reap(WNOHANG);
        long long next_ns = start + (long long)((double)slots * 1e9 / rate);
        struct timespec next = {.tv_sec = next_ns / 1000000000LL,
                                .tv_nsec = next_ns % 1000000000LL};
        if (slots < total && !stop)
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL); /* EINTR: re-check */
    }
    while (running > 0) {
        reap(0);
        if (running > 0 && errno == ECHILD)
            break;
    }
    long long end = now_ns();
    struct rusage self, children;
    getrusage(RUSAGE_SELF, &self);
    getrusage(RUSAGE_CHILDREN, &children);
    printf("%lld %lld %lld %.3f %.1f %.3f %.3f\n", spawned, exited_ok, failed,
           (double)(end - start) / 1e9, (double)max_lag / 1e6,
           cpu_s(&self.ru_utime, &self.ru_stime), cpu_s(&children.ru_utime, &children.ru_stime));
    return failed ? 1 : 0;
}
