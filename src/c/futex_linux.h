/* Linux waiting primitives shared by sync_linux.c and channel_linux.c:
   the spin-loop hint, and futex sleep and wake on absolute CLOCK_MONOTONIC
   deadlines.  Private to the Linux platform files (fmap.h stays neutral). */
#ifndef FMAP_FUTEX_LINUX_H
#define FMAP_FUTEX_LINUX_H

#include <errno.h>
#include <linux/futex.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__) || defined(__arm__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

static inline struct timespec ns_ts(uint64_t ns)
{
    struct timespec ts;
    if (ns > (uint64_t)INT32_MAX * 1000000000u)   /* far enough: a year 2038 bound */
        ns = (uint64_t)INT32_MAX * 1000000000u;
    ts.tv_sec = (time_t)(ns / 1000000000u);
    ts.tv_nsec = (long)(ns % 1000000000u);
    return ts;
}

/* Sleep while *w == val, until the absolute CLOCK_MONOTONIC deadline.
   Returns 0 (woken, or the value changed: EAGAIN), ETIMEDOUT, EINTR or errno. */
static inline int futex_wait_until(uint32_t *w, uint32_t val, uint64_t deadline)
{
    struct timespec ts = ns_ts(deadline);
    /* FUTEX_WAIT_BITSET takes an absolute time on CLOCK_MONOTONIC. */
    if (syscall(SYS_futex, w, FUTEX_WAIT_BITSET, val, &ts, NULL, FUTEX_BITSET_MATCH_ANY) == 0)
        return 0;
    return errno == EAGAIN ? 0 : errno;
}

/* Wake up to n sleepers on w; how many were woken. */
static inline long futex_wake(uint32_t *w, int n)
{
    return syscall(SYS_futex, w, FUTEX_WAKE, n, NULL, NULL, 0);
}

#endif
