"""The inherited-state fingerprint keeps each thread's /proc files open between runs (issue 15).

A kept file must say what a file opened now would: after a fork, after somebody closed our
descriptor and its number went to another file, after a move to another user namespace, in
a thread that has no slot of its own. Each case runs in a fresh interpreter (its fds and
namespaces are its own) and compares the fingerprint with the one a new thread takes, which
opens everything afresh: equal states must give equal fingerprints, and a change must show.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from helpers_proc import child_env

PRELUDE = '''
import ctypes, json, os, threading
from retest import _proc_group as g


def fresh():
    """The fingerprint as a new thread (new files, same inherited state) takes it."""
    got = []
    t = threading.Thread(target=lambda: got.append(g._fingerprint()))
    t.start()
    t.join()
    return got[0]
'''


def in_fresh_interpreter(code: str) -> dict:
    """Run PRELUDE + code in a new interpreter; return the JSON it prints last."""
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
                          env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in seen:
        pytest.skip(seen["skip"])
    return seen


def test_a_kept_file_equals_a_fresh_one_and_follows_changes() -> None:
    seen = in_fresh_interpreter('''
        first = g._fingerprint()
        same = [g._fingerprint(), fresh()]
        os.umask(0o077)
        umask = [g._fingerprint(), fresh()]
        with open("/proc/self/coredump_filter") as f:
            core = int(f.read(), 16)
        with open("/proc/self/coredump_filter", "w") as f:
            f.write(hex(core ^ 0x10))
        filt = [g._fingerprint(), fresh()]
        print(json.dumps(dict(first=first, same=same, umask=umask, filt=filt)))
    ''')

    assert seen["same"] == [seen["first"]] * 2
    assert seen["umask"][0] == seen["umask"][1] != seen["first"]
    assert seen["filt"][0] == seen["filt"][1] not in (seen["first"], seen["umask"][0])


def test_a_kept_descriptor_closed_and_reused_by_another_file_is_not_read() -> None:
    seen = in_fresh_interpreter('''
        before = g._fingerprint()
        kept = sorted(int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2)
        os.closerange(3, 1 << 16)  # a daemonizing library closes what it does not own
        fakes = []
        while len(fakes) < len(kept) + 4:  # every freed number now names another file
            fd = os.open("/etc/hostname", os.O_RDONLY)
            fakes.append(fd)
        same = g._fingerprint()
        os.umask(0o077)
        after = [g._fingerprint(), fresh()]
        still_open = all(os.fstat(fd) for fd in fakes)
        print(json.dumps(dict(before=before, same=same, after=after, still_open=still_open)))
    ''')

    assert seen["same"] == seen["before"]
    assert seen["after"][0] == seen["after"][1] != seen["before"]
    assert seen["still_open"]  # ours were gone: nobody else's fd was closed in their place


def test_a_forked_child_reads_its_own_files() -> None:
    seen = in_fresh_interpreter('''
        parent = g._fingerprint()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            child = g._fingerprint()
            os.umask(0o077)
            changed = g._fingerprint()
            os.write(w, json.dumps([child, changed, fresh()]).encode())
            os._exit(0)
        os.close(w)
        child, changed, child_fresh = json.loads(os.read(r, 4096))
        os.waitpid(pid, 0)
        print(json.dumps(dict(parent=parent, child=child, changed=changed, child_fresh=child_fresh,
                              parent_again=g._fingerprint())))
    ''')

    assert seen["child"] != seen["parent"]  # the pid is in it
    assert seen["changed"] == seen["child_fresh"] != seen["child"]
    assert seen["parent_again"] == seen["parent"]


def test_more_threads_than_slots_all_fingerprint_alike() -> None:
    seen = in_fresh_interpreter('''
        barrier = threading.Barrier(24)
        got = []
        def take():
            barrier.wait()  # all alive at once: 16 keep files, 8 open them per call
            got.append((g._fingerprint(), g._fingerprint()))
            barrier.wait()
        threads = [threading.Thread(target=take) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(json.dumps(dict(main=g._fingerprint(), got=sorted(set(got)))))
    ''')

    assert seen["got"] == [[seen["main"], seen["main"]]]


def test_files_of_threads_that_ended_are_closed() -> None:
    seen = in_fresh_interpreter('''
        import time
        g._fingerprint()
        before = len(os.listdir("/proc/self/fd"))
        threads = [threading.Thread(target=g._fingerprint) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 5  # the key's destructor runs as the thread ends
        while len(os.listdir("/proc/self/fd")) != before and time.monotonic() < deadline:
            time.sleep(0.01)
        after_threads = len(os.listdir("/proc/self/fd"))
        g.close_shepherds()
        closed = len(os.listdir("/proc/self/fd"))
        print(json.dumps(dict(before=before, after_threads=after_threads, closed=closed)))
    ''')

    assert seen["after_threads"] == seen["before"]
    assert seen["closed"] == seen["before"] - 5  # close_shepherds let the main thread's go


def test_the_files_are_opened_again_in_a_new_user_namespace() -> None:
    seen = in_fresh_interpreter('''
        before = g._fingerprint()
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER; the process has one thread
            print(json.dumps(dict(skip=f"unshare(CLONE_NEWUSER): {os.strerror(ctypes.get_errno())}")))
            raise SystemExit(0)
        print(json.dumps(dict(before=before, after=g._fingerprint(), fresh=fresh())))
    ''')

    # Without opening status again its Uid line would be the old namespace's view ("0"),
    # where a fresh open shows the unmapped id (65534): the two would differ.
    assert seen["after"] == seen["fresh"] != seen["before"]
