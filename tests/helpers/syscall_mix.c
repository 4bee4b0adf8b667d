/* Calls whose durations are known in shape: R rounds of three getrandom calls for 16
 * bytes (well under a microsecond) and one for BIG bytes (tens of microseconds on the
 * CPU), so exactly a quarter of the getrandom calls are slow, in a strictly periodic
 * pattern a sampler must not lock onto; then S sleeps of MS ms (calls that block). Prints
 * "done" and exits.
 *
 * usage: syscall_mix R BIG S MS      (BIG <= 65536)
 *
 * No malloc and no stdio: glibc's malloc makes a getrandom call of its own when it sets up.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 5)
        return 2;
    long rounds = atol(argv[1]), big = atol(argv[2]), sleeps = atol(argv[3]);
    long ms = atol(argv[4]);
    static char small_buf[16], big_buf[65536];
    if (big < 1 || big > (long)sizeof(big_buf))
        return 2;
    for (long i = 0; i < rounds; i++) {
        for (int j = 0; j < 3; j++)
            syscall(SYS_getrandom, small_buf, sizeof(small_buf), 0);
        syscall(SYS_getrandom, big_buf, big, 0);
    }
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    for (long i = 0; i < sleeps; i++)
        nanosleep(&ts, NULL);
    return write(1, "done\n", 5) == 5 ? 0 : 1;
}
