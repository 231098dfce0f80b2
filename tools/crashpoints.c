/* Counts the durability steps a process takes on files under $CRASH_DIR (write,
   fsync, fdatasync, ftruncate, rename), across all its threads; at step $CRASH_AT it
   kills the process (SIGKILL) before the step, at step $FAIL_AT the step fails with
   $FAIL_ERRNO instead.  Built by test_minivan.py (DaemonTests), loaded with LD_PRELOAD. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

static atomic_long steps;
static long crash_at = -1, fail_at = -1;
static int fail_errno = EIO;
static const char *dir;
static size_t dir_len;

__attribute__((constructor)) static void setup(void) {
    const char *s;
    if ((s = getenv("CRASH_AT"))) crash_at = atol(s);
    if ((s = getenv("FAIL_AT"))) fail_at = atol(s);
    if ((s = getenv("FAIL_ERRNO"))) fail_errno = atoi(s);
    dir = getenv("CRASH_DIR");
    dir_len = dir ? strlen(dir) : 0;
}

static int under_dir(const char *path) {
    return dir && path && strncmp(path, dir, dir_len) == 0;
}

static int fd_under_dir(int fd) {
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n <= 0) return 0;
    target[n] = 0;
    return under_dir(target);
}

/* 0: go on with the step; -1: fail it (errno set) */
static int step(void) {
    long n = atomic_fetch_add(&steps, 1) + 1;
    if (n == crash_at) kill(getpid(), SIGKILL);
    if (n == fail_at) { errno = fail_errno; return -1; }
    return 0;
}

#define REAL(name) static __typeof__(name) *real; if (!real) real = dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write);
    if (fd_under_dir(fd) && step()) return -1;
    return real(fd, buf, count);
}

int fsync(int fd) {
    REAL(fsync);
    if (fd_under_dir(fd) && step()) return -1;
    return real(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync);
    if (fd_under_dir(fd) && step()) return -1;
    return real(fd);
}

int ftruncate(int fd, off_t length) {
    REAL(ftruncate);
    if (fd_under_dir(fd) && step()) return -1;
    return real(fd, length);
}

int rename(const char *from, const char *to) {
    REAL(rename);
    if (under_dir(to) && step()) return -1;
    return real(from, to);
}
