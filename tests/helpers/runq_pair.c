/* A known contention: two CPU-bound processes sharing one CPU in known time slices.
 *
 * usage: runq_pair CPU RUN_MS
 *
 * Forks two workers. Each pins itself to CPU and becomes SCHED_RR at priority 1, so the
 * two share it in slices of /proc/sys/kernel/sched_rr_timeslice_ms and no ordinary task
 * runs between them; it says it is ready and blocks. When both are ready the parent
 * releases them with one write (both wake within microseconds). Each then spins until it
 * has used RUN_MS of CPU since its release, reports its pid and blocks until the parent
 * exits. The parent prints "done FIRST SECOND" (the workers' pids in the order they
 * finished) and exits, taking the workers with it, when its stdin closes.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void fail(const char *what)
{
    perror(what);
    _exit(1);
}

static void worker(int cpu, long long run_ns, int ready, int go, int done, int hold)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set))
        fail("sched_setaffinity");
    struct sched_param param = {.sched_priority = 1};
    if (sched_setscheduler(0, SCHED_RR, &param))
        fail("sched_setscheduler");
    char c = 'r';
    if (write(ready, &c, 1) != 1 || read(go, &c, 1) != 1)
        fail("release");
    long long until = cpu_ns() + run_ns;
    volatile unsigned long spins = 0;
    while (spins++ % 4096 || cpu_ns() < until)
        ;
    int pid = getpid();
    if (write(done, &pid, sizeof(pid)) != sizeof(pid))
        fail("done");
    read(hold, &c, 1);  /* blocks until the parent exits */
    _exit(0);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s CPU RUN_MS\n", argv[0]);
        return 2;
    }
    int cpu = atoi(argv[1]);
    long long run_ns = atoll(argv[2]) * 1000000LL;
    int ready[2], go[2], done[2], hold[2];
    if (pipe(ready) || pipe(go) || pipe(done) || pipe(hold))
        fail("pipe");
    pid_t workers[2];
    for (int i = 0; i < 2; i++) {
        workers[i] = fork();
        if (workers[i] < 0)
            fail("fork");
        if (workers[i] == 0) {
            close(hold[1]);
            worker(cpu, run_ns, ready[1], go[0], done[1], hold[0]);
        }
    }
    char c[2];
    for (int got = 0; got < 2;) {
        ssize_t n = read(ready[0], c, 2 - got);
        if (n <= 0)
            fail("ready");
        got += n;
    }
    if (write(go[1], "gg", 2) != 2)  /* one write: both released together */
        fail("go");
    int finished[2];
    for (int i = 0; i < 2; i++)
        if (read(done[0], &finished[i], sizeof(int)) != sizeof(int))
            fail("read done");
    printf("done %d %d\n", finished[0], finished[1]);
    fflush(stdout);
    while (read(0, c, 1) > 0)
        ;
    for (int i = 0; i < 2; i++) {
        kill(workers[i], SIGKILL);
        waitpid(workers[i], NULL, 0);
    }
    return 0;
}
