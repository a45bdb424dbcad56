/* nolibc.c: the few C library functions the shepherd uses, written on raw Linux system
 * calls, so that the shepherd links with -nostdlib -static and starts without any libc
 * start-up at all (issue 15).
 *
 * Why: the shepherd is exec'd for every run that finds no idle one (run.c, pool.c). A static
 * glibc start-up spends ~0.6 ms of every such run in CPU-feature detection (dozens of CPUID
 * instructions, each a trap to the hypervisor on a VM); musl's start-up is cheap but
 * musl-tools is an optional package. This file is the whole runtime: _start, errno, syscall
 * wrappers, an mmap allocator, directory reading and the string functions. It is compiled only
 * into the default shepherd build; the shepherd's own code is the same in every build (libc
 * builds: sanitizers, musl, glibc).
 *
 * The prototypes come from the system's libc headers, so every definition here is checked
 * against the declaration shepherd.c and cgroup.c compile against. Rules of this file: no
 * global state but errno, environ and the clock tick; every wrapper returns -1 with errno
 * set on failure, as libc's do; nothing here allocates except malloc and opendir.
 * Architectures: x86_64 and aarch64 (setup.py builds a libc shepherd elsewhere).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#if !defined(__x86_64__) && !defined(__aarch64__)
#error "nolibc.c: x86_64 and aarch64 only; build the shepherd against a libc elsewhere"
#endif

#define HIDDEN __attribute__((visibility("hidden")))

HIDDEN int nolibc_errno;
char **environ;
static long clock_ticks = 100;  /* AT_CLKTCK from the auxiliary vector */

int *__errno_location(void)
{
    return &nolibc_errno;
}

/* ---------------------------------------------------------------- system calls */

/* One system call with up to six arguments; returns the kernel's raw result (-errno). */
static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
#if defined(__x86_64__)
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
#else
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    register long x5 __asm__("x5") = f;
    __asm__ volatile("svc 0"
                     : "+r"(x0)
                     : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                     : "memory", "cc");
    return x0;
#endif
}

/* Turn a raw result into libc's convention: -1 with errno, else the value. Also the tail of
 * the assembly vfork below. */
HIDDEN long nolibc_ret(long r)
{
    if ((unsigned long)r > -4096UL) {
        nolibc_errno = (int)-r;
        return -1;
    }
    return r;
}

#define SC(n, a, b, c, d, e, f) \
    nolibc_ret(sys6((n), (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), (long)(f)))

long syscall(long n, ...)
{
    va_list ap;
    long a, b, c, d, e, f;
    va_start(ap, n);  /* reading six is what every libc does: the unused ones are ignored */
    a = va_arg(ap, long);
    b = va_arg(ap, long);
    c = va_arg(ap, long);
    d = va_arg(ap, long);
    e = va_arg(ap, long);
    f = va_arg(ap, long);
    va_end(ap);
    return SC(n, a, b, c, d, e, f);
}

/* vfork must be assembly: the child runs on the parent's stack until it execs, so a C
 * wrapper's return would pop the frame the parent returns through. The return address is
 * kept in a register across the call (x86_64) or lives in one (aarch64), as musl does. */
#if defined(__x86_64__)
__asm__(".text\n"
        ".global vfork\n"
        ".type vfork,@function\n"
        "vfork:\n"
        "  pop %rdx\n"
        "  mov $58, %eax\n"   /* SYS_vfork */
        "  syscall\n"
        "  push %rdx\n"
        "  mov %rax, %rdi\n"
        "  jmp nolibc_ret\n"
        ".size vfork, .-vfork\n");
#else
__asm__(".text\n"
        ".global vfork\n"
        ".type vfork,%function\n"
        "vfork:\n"
        "  mov x8, #220\n"          /* SYS_clone */
        "  mov x0, #0x4111\n"       /* CLONE_VM | CLONE_VFORK | SIGCHLD */
        "  mov x1, #0\n"
        "  svc 0\n"
        "  b nolibc_ret\n"
        ".size vfork, .-vfork\n");
#endif

/* clone3 for a vfork-like child on a stack of its own: the caller's args carry CLONE_VM,
 * CLONE_VFORK and the stack (issue 15: the shepherd's cgroup mode, where CLONE_INTO_CGROUP
 * needs clone3, which has no vfork form). The child starts on an empty stack with no frame
 * to return through, so it cannot come back into C: it calls fn(arg) from here and exits
 * 127 if fn returns. fn and arg wait in r8 and r9, which the syscall instruction keeps (it
 * clobbers rcx and r11 only), and the kernel sets the child's rsp to stack + stack_size:
 * with a 16-byte aligned top, the call leaves fn's frame aligned as the ABI wants. Returns
 * the child's pid in the parent, or -1 with errno. x86_64 only: shepherd.c finds the symbol
 * absent (weak) on aarch64 and in the libc builds and uses a fork-like clone3 there. */
#if defined(__x86_64__)
__asm__(".text\n"
        ".global nolibc_clone3_run\n"
        ".type nolibc_clone3_run,@function\n"
        "nolibc_clone3_run:\n"
        "  mov %rdx, %r8\n"
        "  mov %rcx, %r9\n"
        "  mov $435, %eax\n"   /* SYS_clone3: args in rdi, size in rsi */
        "  syscall\n"
        "  test %rax, %rax\n"
        "  jz 1f\n"
        "  mov %rax, %rdi\n"   /* the parent: a pid, or -errno */
        "  jmp nolibc_ret\n"
        "1:\n"
        "  xor %ebp, %ebp\n"   /* the child: the end of the frame chain */
        "  mov %r9, %rdi\n"
        "  call *%r8\n"
        "  mov $127, %edi\n"
        "  mov $231, %eax\n"   /* SYS_exit_group */
        "  syscall\n"
        "  hlt\n"
        ".size nolibc_clone3_run, .-nolibc_clone3_run\n");
#endif

int main(int argc, char **argv);

/* Entry from _start with the initial stack: argc, argv..., NULL, envp..., NULL, auxv. */
HIDDEN __attribute__((noreturn, used)) void nolibc_start(long *sp)
{
    int argc = (int)sp[0];
    char **argv = (char **)(sp + 1), **envp = argv + argc + 1, **p = envp;
    while (*p)
        p++;
    for (unsigned long *aux = (unsigned long *)(p + 1); aux[0] != 0; aux += 2)
        if (aux[0] == 17 /* AT_CLKTCK */ && aux[1] > 0)
            clock_ticks = (long)aux[1];
    environ = envp;
    _exit(main(argc, argv));
}

#if defined(__x86_64__)
__asm__(".text\n"
        ".global _start\n"
        ".type _start,@function\n"
        "_start:\n"
        "  xor %ebp, %ebp\n"
        "  mov %rsp, %rdi\n"
        "  and $-16, %rsp\n"
        "  call nolibc_start\n"
        "  hlt\n");
#else
__asm__(".text\n"
        ".global _start\n"
        ".type _start,%function\n"
        "_start:\n"
        "  mov x29, #0\n"
        "  mov x30, #0\n"
        "  mov x0, sp\n"
        "  bl nolibc_start\n");
#endif

void _exit(int status)
{
    for (;;)
        sys6(SYS_exit_group, status, 0, 0, 0, 0, 0);
}

ssize_t read(int fd, void *buf, size_t n) { return SC(SYS_read, fd, buf, n, 0, 0, 0); }
ssize_t write(int fd, const void *buf, size_t n) { return SC(SYS_write, fd, buf, n, 0, 0, 0); }
ssize_t pread(int fd, void *buf, size_t n, off_t off) { return SC(SYS_pread64, fd, buf, n, off, 0, 0); }
int close(int fd) { return (int)SC(SYS_close, fd, 0, 0, 0, 0, 0); }
pid_t getpid(void) { return (pid_t)SC(SYS_getpid, 0, 0, 0, 0, 0, 0); }
pid_t getppid(void) { return (pid_t)SC(SYS_getppid, 0, 0, 0, 0, 0, 0); }
pid_t setsid(void) { return (pid_t)SC(SYS_setsid, 0, 0, 0, 0, 0, 0); }
int kill(pid_t pid, int sig) { return (int)SC(SYS_kill, pid, sig, 0, 0, 0, 0); }
int chdir(const char *path) { return (int)SC(SYS_chdir, path, 0, 0, 0, 0, 0); }
int fchdir(int fd) { return (int)SC(SYS_fchdir, fd, 0, 0, 0, 0, 0); }
int pipe2(int fds[2], int flags) { return (int)SC(SYS_pipe2, fds, flags, 0, 0, 0, 0); }
int rmdir(const char *path) { return (int)SC(SYS_unlinkat, AT_FDCWD, path, AT_REMOVEDIR, 0, 0, 0); }

int execve(const char *path, char *const argv[], char *const envp[])
{
    return (int)SC(SYS_execve, path, argv, envp, 0, 0, 0);
}

ssize_t readlink(const char *restrict path, char *restrict buf, size_t size)
{
    return SC(SYS_readlinkat, AT_FDCWD, path, buf, size, 0, 0);
}

ssize_t send(int fd, const void *buf, size_t n, int flags)
{
    return SC(SYS_sendto, fd, buf, n, flags, 0, 0);
}

ssize_t recv(int fd, void *buf, size_t n, int flags)
{
    return SC(SYS_recvfrom, fd, buf, n, flags, 0, 0);
}

pid_t waitpid(pid_t pid, int *status, int options)
{
    return (pid_t)SC(SYS_wait4, pid, status, options, 0, 0, 0);
}

pid_t wait4(pid_t pid, int *status, int options, struct rusage *usage)
{
    return (pid_t)SC(SYS_wait4, pid, status, options, usage, 0, 0);
}

ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
    return SC(SYS_recvmsg, fd, msg, flags, 0, 0, 0);
}

int clock_gettime(clockid_t clock, struct timespec *ts)
{
    return (int)SC(SYS_clock_gettime, clock, ts, 0, 0, 0, 0);
}

int nanosleep(const struct timespec *req, struct timespec *rem)
{
    return (int)SC(SYS_nanosleep, req, rem, 0, 0, 0, 0);
}

int poll(struct pollfd *fds, nfds_t n, int timeout_ms)
{
    struct timespec ts, *tsp = NULL;
    if (timeout_ms >= 0) {
        ts.tv_sec = timeout_ms / 1000;
        ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
        tsp = &ts;
    }
    return (int)SC(SYS_ppoll, fds, n, tsp, 0, 0, 0);
}

int dup2(int old_fd, int new_fd)
{
    if (old_fd == new_fd)  /* dup3 refuses this case; dup2 checks the fd and returns it */
        return fcntl(old_fd, F_GETFD) < 0 ? -1 : new_fd;
    return (int)SC(SYS_dup3, old_fd, new_fd, 0, 0, 0, 0);
}

int fcntl(int fd, int cmd, ...)
{
    va_list ap;
    long arg;
    va_start(ap, cmd);
    arg = va_arg(ap, long);
    va_end(ap);
    return (int)SC(SYS_fcntl, fd, cmd, arg, 0, 0, 0);
}

int openat(int dfd, const char *path, int flags, ...)
{
    va_list ap;
    int mode = 0;
    va_start(ap, flags);
    if (flags & (O_CREAT | __O_TMPFILE))
        mode = va_arg(ap, int);
    va_end(ap);
    return (int)SC(SYS_openat, dfd, path, flags, mode, 0, 0);
}

/* The shepherd never creates files: open() takes no mode. */
int open(const char *path, int flags, ...)
{
    return openat(AT_FDCWD, path, flags & ~(O_CREAT | __O_TMPFILE));
}

int prctl(int option, ...)
{
    va_list ap;
    unsigned long a, b, c, d;
    va_start(ap, option);
    a = va_arg(ap, unsigned long);
    b = va_arg(ap, unsigned long);
    c = va_arg(ap, unsigned long);
    d = va_arg(ap, unsigned long);
    va_end(ap);
    return (int)SC(SYS_prctl, option, a, b, c, d, 0);
}

long sysconf(int name)
{
    if (name == _SC_CLK_TCK)
        return clock_ticks;
    nolibc_errno = EINVAL;
    return -1;
}

/* ---------------------------------------------------------------- signal sets */

/* The kernel's sigset is 64 bits on both architectures; libc's sigset_t is larger. */
#define KSIGSET_BYTES 8

int sigemptyset(sigset_t *set)
{
    memset(set, 0, sizeof(*set));
    return 0;
}

int sigaddset(sigset_t *set, int sig)
{
    unsigned long *w = (unsigned long *)set;
    if (sig < 1 || sig > 64) {
        nolibc_errno = EINVAL;
        return -1;
    }
    w[(sig - 1) / (8 * sizeof(long))] |= 1UL << ((sig - 1) % (8 * sizeof(long)));
    return 0;
}

int sigismember(const sigset_t *set, int sig)
{
    const unsigned long *w = (const unsigned long *)set;
    if (sig < 1 || sig > 64) {
        nolibc_errno = EINVAL;
        return -1;
    }
    return (int)((w[(sig - 1) / (8 * sizeof(long))] >> ((sig - 1) % (8 * sizeof(long)))) & 1);
}

int signalfd(int fd, const sigset_t *mask, int flags)
{
    return (int)SC(SYS_signalfd4, fd, mask, KSIGSET_BYTES, flags, 0, 0);
}

/* ---------------------------------------------------------------- memory */

/* Every block is its own anonymous mapping, its length in a 16-byte header: the shepherd
 * allocates a handful of blocks per run (the exec candidates, the tree walk's sets), so a
 * heap would be more code for nothing. realloc moves pages with mremap, never copying. */
#define BLOCK_HEADER 16

void *malloc(size_t n)
{
    size_t len = n + BLOCK_HEADER;
    char *p;
    if (len < n) {
        nolibc_errno = ENOMEM;
        return NULL;
    }
    p = (char *)SC(SYS_mmap, 0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == (char *)-1)
        return NULL;
    *(size_t *)p = len;
    return p + BLOCK_HEADER;
}

void *calloc(size_t count, size_t size)
{
    if (size && count > (size_t)-1 / size) {
        nolibc_errno = ENOMEM;
        return NULL;
    }
    return malloc(count * size);  /* fresh anonymous pages are zero */
}

void free(void *ptr)
{
    char *p = (char *)ptr - BLOCK_HEADER;
    if (ptr)
        sys6(SYS_munmap, (long)p, (long)*(size_t *)p, 0, 0, 0, 0);
}

void *realloc(void *ptr, size_t n)
{
    char *p, *moved;
    size_t len = n + BLOCK_HEADER;
    if (!ptr)
        return malloc(n);
    if (len < n) {
        nolibc_errno = ENOMEM;
        return NULL;
    }
    p = (char *)ptr - BLOCK_HEADER;
    moved = (char *)SC(SYS_mremap, p, *(size_t *)p, len, MREMAP_MAYMOVE, 0, 0);
    if (moved == (char *)-1)
        return NULL;  /* the old block is untouched, as realloc promises */
    *(size_t *)moved = len;
    return moved + BLOCK_HEADER;
}

/* ---------------------------------------------------------------- strings */

void *memset(void *dst, int c, size_t n)
{
    unsigned char *d = dst;
    while (n--)
        *d++ = (unsigned char)c;
    return dst;
}

void *memcpy(void *restrict dst, const void *restrict src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d < s) {
        while (n--)
            *d++ = *s++;
    } else {
        while (n--)
            d[n] = s[n];
    }
    return dst;
}

void *memchr(const void *s, int c, size_t n)
{
    const unsigned char *p = s;
    for (size_t i = 0; i < n; i++)
        if (p[i] == (unsigned char)c)
            return (void *)(p + i);
    return NULL;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

size_t strlen(const char *s)
{
    const char *p = s;
    while (*p)
        p++;
    return (size_t)(p - s);
}

char *strchr(const char *s, int c)
{
    for (;; s++) {
        if (*s == (char)c)
            return (char *)s;
        if (!*s)
            return NULL;
    }
}

char *strrchr(const char *s, int c)
{
    const char *last = NULL;
    for (;; s++) {
        if (*s == (char)c)
            last = s;
        if (!*s)
            return (char *)last;
    }
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return (unsigned char)*a - (unsigned char)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (unsigned char)*a - (unsigned char)*b;
        if (!*a)
            return 0;
    }
    return 0;
}

char *strstr(const char *hay, const char *needle)
{
    size_t n = strlen(needle);
    for (; *hay; hay++)
        if (strncmp(hay, needle, n) == 0)
            return (char *)hay;
    return n == 0 ? (char *)hay : NULL;
}

char *strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    return d ? memcpy(d, s, n) : NULL;
}

long long strtoll(const char *restrict s, char **restrict end, int base)
{
    const char *p = s;
    unsigned long long v = 0, limit;
    int negative = 0, digits = 0, overflow = 0;
    (void)base;  /* the shepherd parses decimal only */
    while (*p == ' ' || *p == '\t' || *p == '\n')
        p++;
    if (*p == '-' || *p == '+')
        negative = *p++ == '-';
    limit = negative ? (unsigned long long)LLONG_MAX + 1 : (unsigned long long)LLONG_MAX;
    for (; *p >= '0' && *p <= '9'; p++, digits++) {
        unsigned d = (unsigned)(*p - '0');
        if (v > (limit - d) / 10)
            overflow = 1;
        else
            v = v * 10 + d;
    }
    if (end)
        *end = (char *)(digits ? p : s);
    if (overflow) {
        nolibc_errno = ERANGE;
        return negative ? LLONG_MIN : LLONG_MAX;
    }
    return negative ? (long long)(0 - v) : (long long)v;
}

long strtol(const char *restrict s, char **restrict end, int base)
{
    return (long)strtoll(s, end, base);  /* long is 64 bits on both architectures */
}

char *getenv(const char *name)
{
    size_t n = strlen(name);
    for (char **e = environ; e && *e; e++)
        if (strncmp(*e, name, n) == 0 && (*e)[n] == '=')
            return *e + n + 1;
    return NULL;
}

/* ---------------------------------------------------------------- directories */

struct __dirstream {
    int fd;
    size_t pos, len;
    char buf[8192] __attribute__((aligned(8)));
};

DIR *opendir(const char *path)
{
    DIR *d;
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC), saved;
    if (fd < 0)
        return NULL;
    d = malloc(sizeof(*d));
    if (!d) {
        saved = nolibc_errno;
        close(fd);
        nolibc_errno = saved;
        return NULL;
    }
    d->fd = fd;
    d->pos = d->len = 0;
    return d;
}

/* getdents64 records have the layout of glibc's struct dirent on 64-bit Linux (d_ino,
 * d_off, d_reclen, d_type, then the NUL-terminated name), so one is returned in place. */
struct dirent *readdir(DIR *d)
{
    struct dirent *de;
    if (d->pos >= d->len) {
        long n = SC(SYS_getdents64, d->fd, d->buf, sizeof(d->buf), 0, 0, 0);
        if (n <= 0)
            return NULL;  /* end, or an error with errno set */
        d->len = (size_t)n;
        d->pos = 0;
    }
    de = (struct dirent *)(d->buf + d->pos);
    d->pos += de->d_reclen;
    return de;
}

int dirfd(DIR *d)
{
    return d->fd;
}

int closedir(DIR *d)
{
    int rc = close(d->fd);
    free(d);
    return rc;
}
