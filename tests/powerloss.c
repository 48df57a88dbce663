/* Power-loss model for tests (LD_PRELOAD): what survives a power cut is what was fsynced.
 *
 * For every file whose path starts with $POWERLOSS_PREFIX, fsync()/fdatasync() first copy the file's whole content
 * to "<path>.durable" (write to a temp file, then rename): the shadow is the file as it is on disk after that sync.
 * unlink() of such a file removes its shadow. A "power loss" is then: SIGKILL the process, replace every file by its
 * shadow (no shadow: the file was never synced, so it is gone), drop SQLite's -shm (memory, rebuilt on open).
 * The model loses every write since the file's last sync, which is one of the outcomes a power cut may have.
 *
 * Build: cc -shared -fPIC -O2 -o powerloss.so powerloss.c -ldl   (tests/test_chaos.py does it in a temp dir)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int tracked_path(const char *path) {
    const char *prefix = getenv("POWERLOSS_PREFIX");
    return prefix != NULL && *prefix != '\0' && strncmp(path, prefix, strlen(prefix)) == 0
           && strstr(path, ".durable") == NULL;
}

static void shadow(int fd) {
    char link[64], path[PATH_MAX], dst[PATH_MAX + 16], tmp[PATH_MAX + 32], buf[65536];
    struct stat st;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return;
    path[n] = '\0';
    if (!tracked_path(path)) return;
    snprintf(dst, sizeof dst, "%s.durable", path);
    snprintf(tmp, sizeof tmp, "%s.durable.tmp", path);
    int in = open(path, O_RDONLY | O_CLOEXEC);
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (in >= 0 && out >= 0) {
        off_t off = 0;
        ssize_t r;
        while ((r = pread(in, buf, sizeof buf, off)) > 0) {
            if (write(out, buf, (size_t)r) != r) break;
            off += r;
        }
    }
    if (in >= 0) close(in);
    if (out >= 0) {
        close(out);
        rename(tmp, dst);
    }
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    shadow(fd);
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    shadow(fd);
    return real(fd);
}

int unlink(const char *path) {
    static int (*real)(const char *);
    if (!real) real = (int (*)(const char *))dlsym(RTLD_NEXT, "unlink");
    int rc = real(path);
    if (rc == 0 && tracked_path(path)) {
        char dst[PATH_MAX + 16];
        snprintf(dst, sizeof dst, "%s.durable", path);
        real(dst);
    }
    return rc;
}
