/* Slow syscalls whose truth is known, named "slowpoke" (thread name).
 *
 *   slow_workload sleeps K MS F   K nanosleeps of MS ms, then F fast getppid calls;
 *                                 prints "start <unix ns> <tid> end <unix ns>" for each
 *                                 sleep, read just before and just after the call
 *   slow_workload recv MS         one recvfrom on a loopback UDP socket with a receive
 *                                 timeout of MS ms: fails with EAGAIN after MS ms
 *   slow_workload storm N         N getppid calls as fast as possible
 * Ends with "done".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long long now_unix_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s sleeps K MS F | recv MS | storm N\n", argv[0]);
        return 2;
    }
    prctl(PR_SET_NAME, "slowpoke");
    if (!strcmp(argv[1], "sleeps") && argc == 5) {
        long k = atol(argv[2]), ms = atol(argv[3]), f = atol(argv[4]);
        struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
        long tid = syscall(SYS_gettid);
        for (long i = 0; i < k; i++) {
            long long start = now_unix_ns();
            nanosleep(&ts, NULL);
            long long end = now_unix_ns();
            printf("start %lld %ld end %lld\n", start, tid, end);
        }
        for (long i = 0; i < f; i++)
            syscall(SYS_getppid);
    } else if (!strcmp(argv[1], "recv")) {
        long ms = atol(argv[2]);
        int fd = socket(AF_INET, SOCK_DGRAM, 0);
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
        char buf[16];
        if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) ||
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)))
            return 1;
        printf("start %lld %ld fd %d\n", now_unix_ns(), (long)syscall(SYS_gettid), fd);
        recvfrom(fd, buf, sizeof(buf), 0, NULL, NULL);
    } else if (!strcmp(argv[1], "storm")) {
        long n = atol(argv[2]);
        for (long i = 0; i < n; i++)
            syscall(SYS_getppid);
    } else {
        return 2;
    }
    printf("done\n");
    return 0;
}
