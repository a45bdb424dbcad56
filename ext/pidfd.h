/* pidfd system call numbers, shared by the shepherd (shepherd.c, built without libc) and the
 * caller (child.c). pidfds (Linux 5.1/5.3) let a signal or a wait reach exactly the process
 * that was checked, never a stranger that got its pid since. Not a public API. */
#ifndef RETEST_PIDFD_H
#define RETEST_PIDFD_H

#include <sys/syscall.h>

/* The numbers are the same on every architecture but alpha (new syscalls share one table
 * since 5.1); old headers lack the names. */
#if !defined(SYS_pidfd_open) && !defined(__alpha__)
#define SYS_pidfd_open 434
#endif
#if !defined(SYS_pidfd_send_signal) && !defined(__alpha__)
#define SYS_pidfd_send_signal 424
#endif

#endif
