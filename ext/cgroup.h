/* cgroup v2 helpers shared by the shepherd (shepherd.c) and the caller (run.c): a run's own
 * cgroup, opened once as a directory fd, then killed, watched and accounted through its
 * files. Plain C, no Python, no allocation: both sides may call these at any time outside
 * a vfork child. Not a public API. */
#ifndef RETEST_CGROUP_H
#define RETEST_CGROUP_H

#include <stdint.h>
#include <sys/types.h>

/* What the cgroup's own files say about the whole run (-1: the file or controller is absent). */
struct cg_usage {
    int64_t usage_us;    /* cpu.stat usage_usec */
    int64_t user_us;     /* cpu.stat user_usec */
    int64_t system_us;   /* cpu.stat system_usec */
    int64_t memory_peak; /* memory.peak, bytes (the memory controller) */
    int64_t pids_peak;   /* pids.peak (the pids controller) */
    int64_t oom_kill;    /* memory.events oom_kill: processes the OOM killer killed */
    int64_t oom_group_kill; /* memory.events oom_group_kill (5.17): memory.oom.group kills */
};

/* Open the cgroup directory at path (O_DIRECTORY, close-on-exec). Return the fd or -1. */
int cg_open(const char *path);

/* Open file of cgroup dfd with flags (close-on-exec added). Return the fd or -1. */
int cg_open_file(int dfd, const char *file, int flags);

/* Write text to file of cgroup dfd in one write(). Return 0, or -1 with errno. */
int cg_write(int dfd, const char *file, const char *text);

/* Return 1 if a process is in the cgroup (cgroup.events "populated 1"), 0 if none, -1 with
 * errno if it cannot be read. events_fd: an open cgroup.events, or -1 to open it here. */
int cg_populated(int dfd, int events_fd);

/* Read cgroup.procs into pids (at most cap); return how many there are in all (may exceed
 * cap), or -1 with errno. */
long cg_read_procs(int dfd, pid_t *pids, long cap);

/* Kill everything in the cgroup at once: cgroup.kill (Linux 5.14), or, without it, freeze,
 * SIGKILL every pid in cgroup.procs, thaw (one pass: call again while populated). Return 0,
 * or -1 with errno. A cgroup once killed is removed, never kept for another run: on Linux
 * 6.18 (checked) every later clone3(CLONE_INTO_CGROUP) into it is SIGKILLed at once (a
 * process moved in through cgroup.procs is not). */
int cg_kill(int dfd);

/* Wait up to timeout_ns (< 0: no bound) for the cgroup to be empty, by poll() on
 * cgroup.events (POLLPRI on each change). Return 1 if empty, 0 on timeout, -1 on error. */
int cg_wait_empty(int dfd, int64_t timeout_ns);

/* The core files cg_reusable compares with a new cgroup's (cgroup.c: made_state). */
#define CG_MADE_FILES 7

/* Files of a run's cgroup that the shepherd keeps open while it uses that cgroup, run after
 * run (issue 15): a pread at offset 0 reads a cgroup file again for ~1.5 us, where open, read
 * and close cost ~12 us (kernfs makes a seq_file per open). -1: not open yet; -2: absent. */
struct cg_files {
    int cpu_stat;
    int cpu_pressure;
    int made[CG_MADE_FILES];
};

/* Mark every file of f not open. */
void cg_files_init(struct cg_files *f);

/* Close the open files of f and mark them not open. */
void cg_files_close(struct cg_files *f);

/* Read cpu.stat (through f, opening it there if needed) into u's usage_us, user_us and
 * system_us (-1 each if absent). */
void cg_read_cpu(int dfd, struct cg_files *f, struct cg_usage *u);

/* The "some" stall total (us) of cpu.pressure (through f), or -1 if absent. */
int64_t cg_read_cpu_some(int dfd, struct cg_files *f);

/* Read the accounting files into u (absent ones stay -1). cpu_only: the cgroup is known to
 * have no controller (cg_reusable said so), so memory.* and pids.* are not looked for. */
void cg_read_usage(int dfd, struct cg_files *f, int cpu_only, struct cg_usage *u);

/* The files whose mode and owner cg_snapshot notes (cgroup.c: made_inodes). */
#define CG_MADE_INODES 5

/* A run's cgroup as first opened, beside the texts of made_state: the mode and owner of its
 * directory and of the files the runner relies on, and its extended attribute names. */
struct cg_made {
    uint32_t mode[CG_MADE_INODES], uid[CG_MADE_INODES], gid[CG_MADE_INODES];
    uint64_t xattrs;  /* FNV-1a of flistxattr's answer */
};

/* Note the cgroup dfd as it is now into m. Return 0, or -1 with errno. */
int cg_snapshot(int dfd, struct cg_made *m);

/* Return 1 if the emptied cgroup dfd is as a run's cgroup is made, so that another run may
 * use it: no controller (cpu.stat is then all its accounting, and deltas of it are exact),
 * not frozen, a domain, no descendant and no limit on them, PSI on, cg_snapshot equal to
 * made's (modes, owners, xattr names), and no BPF program attached. Else 0 (also when a read
 * fails). The files stay open in f. */
int cg_reusable(int dfd, struct cg_files *f, const struct cg_made *made);

/* Return 1 if the cgroup dfd has no controller (the first of cg_reusable's checks, the one
 * that decides which accounting files exist), else 0 (also when the read fails). */
int cg_no_controllers(int dfd, struct cg_files *f);

/* Remove the (empty) cgroup at path; retry a moment on EBUSY (the kernel releases a
 * cgroup's last task asynchronously). Return 0 (ENOENT too), or -1 with errno. */
int cg_remove(const char *path);

#endif
