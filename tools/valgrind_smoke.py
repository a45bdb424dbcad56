"""A workload for the valgrind memcheck smoke run of retest's C code (see .ci/valgrind).

Exercises every path of the caller side (run.c) and the classifier (classify.c): output,
input, bounded capture (the tail kept in pipes too), callbacks, tee, spawn failures, timeouts with escalation, and
classification of large logs.
"""

import os
import sys
import tempfile

from retest import proc_group

assert proc_group.backend_status()[0] == "native", proc_group.backend_status()
ROUNDS = int(os.environ.get("RETEST_VALGRIND_ROUNDS", "20"))
with tempfile.TemporaryFile() as tee:
    for _ in range(ROUNDS):
        results = [
            proc_group.run(["sh", "-c", "echo out; echo err >&2; exit 3"]),
            proc_group.run(["cat"], input=b"x" * 300_000),
            proc_group.run(["retest-no-such-command"]),
            proc_group.run(["true"], cwd="/nonexistent"),
            proc_group.run(["sh", "-c", "head -c 3000000 /dev/zero"], capture_limit=10_000),
            # a tail of 1 MiB: moved through pipes (tailpipe.c) past the 1 MiB head
            proc_group.run(["sh", "-c", "head -c 9000000 /dev/zero"], capture_limit=2 << 20),
            proc_group.run(["sh", "-c", "trap '' TERM; sleep 5"], timeout=0.05, grace=0.05),
            proc_group.run(["sh", "-c", "echo x; (setsid sleep 5 &)"], on_output=lambda s, c: None,
                           tee=tee, env={"PATH": "/usr/bin:/bin"}),
        ]
        log = b"x" * 1_000_000 + b"\n==== 1 failed, 39 passed in 0.31s ====\n"
        for r in results:
            proc_group.classify(r)
        proc_group._native.classify(log, b"fatal: Unable to create '/r/.git/index.lock': File exists.",
                                    1, False, None, False, 0, True)
print("valgrind workload done", file=sys.stderr)
