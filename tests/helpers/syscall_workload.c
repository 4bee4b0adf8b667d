/* A workload whose syscalls are known: exactly N getppid calls, then K sleeps of
 * SLEEP_MS each (glibc's nanosleep is the clock_nanosleep syscall), then it prints
 * "done" and exits. With a fourth argument it first waits for a line on stdin, so a
 * test can start it, hand its pid to the agent and then let it run.
 *
 * usage: syscall_workload N K SLEEP_MS [wait]
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s N K SLEEP_MS [wait]\n", argv[0]);
        return 2;
    }
    long n = atol(argv[1]), k = atol(argv[2]), sleep_ms = atol(argv[3]);
    if (argc > 4) {
        char line[16];
        printf("ready %d\n", getpid());
        fflush(stdout);
        if (!fgets(line, sizeof(line), stdin))
            return 1;
    }
    for (long i = 0; i < n; i++)
        syscall(SYS_getppid);
    struct timespec ts = {.tv_sec = sleep_ms / 1000, .tv_nsec = (sleep_ms % 1000) * 1000000L};
    for (long i = 0; i < k; i++)
        nanosleep(&ts, NULL);
    printf("done\n");
    fflush(stdout);
    return 0;
}
