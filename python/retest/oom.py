"""Kill-cause attribution: was the run's end the kernel's OOM killer (issue 10, item 3)?

A SIGKILL the runner did not send is "a signal that was not ours" unless the kernel says
otherwise. Around each run ``Watch`` reads the kernel's OOM-kill evidence before and after:

* the ``oom_kill`` counter: of the run's own cgroup when it has one (``memory.events`` on
  cgroup v2, ``memory.oom_control`` on v1), else the machine-wide one in ``/proc/vmstat``;
* the kernel log (``/dev/kmsg``, the records written during the run, read non-blocking):
  ``Killed process PID (COMM) ...`` and ``oom-kill:...,task=COMM,pid=PID,uid=N``, which name
  the victim.

``Watch.attribute`` decides whether the evidence is the run's: a victim whose pid is one of
the run's (the leader, a pid the probe reported), any kill counted in the run's own cgroup,
or, without a victim, a leader killed by a SIGKILL the runner did not send while the
machine-wide counter moved. Every step is best effort and never raises: a run must not fail
because the evidence cannot be read. Limits: docs/internals.md, "Kill-cause attribution".
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional

log = logging.getLogger(__name__)

__all__ = ["OomEvidence", "OomKill", "Watch", "decide", "kills_from_records", "parse_kmsg_record",
           "read_counter"]

VMSTAT = "/proc/vmstat"
KMSG = "/dev/kmsg"
#: One ``read()`` of /dev/kmsg returns one record, and fails with EINVAL if it does not fit.
_KMSG_RECORD_MAX = 16 * 1024
#: Records read after a run at most (the ring buffer is bounded; so is the time spent).
_KMSG_RECORDS_MAX = 100_000

# mm/oom_kill.c, __oom_kill_process (4.19+: "Killed process", before: "Kill process ...
# score N or sacrifice child" then "Killed process"): "%s: Killed process %d (%s) total-vm:...",
# the prefix "Out of memory" or "Memory cgroup out of memory". COMM is at most 15 bytes and
# may hold anything but NUL (kmsg escapes the unprintable as \xNN), ")" included.
_KILLED = re.compile(r"Killed process (?P<pid>\d+) \((?P<comm>.{0,64}?)\)(?: total-vm:| *$)")
# dump_oom_summary (4.19+): "oom-kill:constraint=...,task_memcg=/x,task=COMM,pid=PID,uid=UID"
_SUMMARY = re.compile(r"^oom-kill:(?P<head>.*),task=(?P<comm>.{0,64}),pid=(?P<pid>\d+),"
                      r"uid=(?P<uid>\d+)")
_SUMMARY_FIELD = re.compile(r"(constraint|task_memcg)=([^,]*)")

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _note_once(what: str, err: OSError) -> None:
    """Say once per process why a source of evidence is not used (it stays unused quietly)."""
    with _warned_lock:
        if what in _warned:
            return
        _warned.add(what)
    log.info("retest: OOM attribution without %s: %s", what, err)


@dataclass(frozen=True)
class OomKill:
    """One OOM kill as the kernel log names it."""

    pid: int
    comm: str
    #: The victim's memory cgroup (``oom-kill:`` summary line), e.g. ``/ci/run-17``.
    memcg: Optional[str] = None
    #: ``CONSTRAINT_NONE`` (the whole machine), ``CONSTRAINT_MEMCG`` (a cgroup's limit), ...
    constraint: Optional[str] = None


def parse_kmsg_record(record: str) -> Optional[OomKill]:
    """The OOM kill a kernel log line (or a /dev/kmsg record) reports, else ``None``.

    A /dev/kmsg record is ``PRIO,SEQ,USEC,FLAGS[,...];MESSAGE`` followed by `` KEY=VALUE``
    continuation lines; a ``dmesg`` line may start with ``[ 12.345678] ``. Both are accepted.
    """
    line = record.split("\n", 1)[0]
    head, sep, message = line.partition(";")
    if sep and re.fullmatch(r"\d+,\d+,\d+,[^;]*", head):
        line = message
    line = re.sub(r"^\[\s*\d+\.\d+\]\s*", "", line).rstrip()
    summary = _SUMMARY.match(line)
    if summary is not None:
        fields = dict(_SUMMARY_FIELD.findall(summary.group("head")))
        return OomKill(int(summary.group("pid")), summary.group("comm"),
                       memcg=fields.get("task_memcg"), constraint=fields.get("constraint"))
    killed = _KILLED.search(line)
    if killed is not None:
        return OomKill(int(killed.group("pid")), killed.group("comm"))
    return None


def _merge(kills: Iterable[OomKill]) -> list[OomKill]:
    """One entry per victim: the summary line's cgroup joined to the "Killed process" line."""
    by_pid: dict[int, OomKill] = {}
    for kill in kills:
        known = by_pid.get(kill.pid)
        if known is None or (known.memcg is None and kill.memcg is not None):
            by_pid[kill.pid] = kill
    return list(by_pid.values())


def read_counter(path: str) -> Optional[tuple[int, int]]:
    """``(oom_kill, oom_group_kill)`` from /proc/vmstat, memory.events or memory.oom_control."""
    try:
        with open(path, "rb", buffering=0) as handle:
            data = b"\n" + handle.read(1 << 16)
    except OSError as err:
        _note_once(path, err)
        return None
    # Two lookups, not a dict of /proc/vmstat's 170 lines: this runs twice per run.
    kills, groups = _field(data, b"oom_kill"), _field(data, b"oom_group_kill")
    if kills is None:
        return None
    return kills, groups or 0


def _field(data: bytes, name: bytes) -> Optional[int]:
    """The integer after ``\nNAME `` in ``data`` (a ``key value`` per line file)."""
    at = data.find(b"\n" + name + b" ")
    if at < 0:
        return None
    start = at + len(name) + 2
    end = data.find(b"\n", start)
    try:
        return int(data[start:end if end >= 0 else len(data)])
    except ValueError:
        return None


def cgroup_counter_path(cgroup: str) -> Optional[str]:
    """The file of ``cgroup`` (a directory) that counts its OOM kills: v2 first, then v1."""
    for name in ("memory.events", "memory.oom_control"):
        path = os.path.join(cgroup, name)
        if os.path.exists(path):
            return path
    return None


@dataclass(frozen=True)
class OomEvidence:
    """The kernel's word that the OOM killer ended (part of) a run."""

    #: What the attribution rests on: ``"memory.events"`` (the run's own cgroup counted the
    #: kill), ``"kmsg"`` (the kernel log named a victim that is one of the run's pids) or
    #: ``"vmstat"`` (no victim: the leader died of a SIGKILL the runner did not send while
    #: the machine-wide counter moved).
    source: str
    #: How much the counter moved during the run, and which counter it is (a path).
    oom_kill_delta: int
    counter: str
    oom_group_kill_delta: int = 0
    victim_pid: Optional[int] = None
    victim_comm: Optional[str] = None
    #: The victim's memory cgroup and the kernel's constraint, when the log said.
    victim_memcg: Optional[str] = None
    constraint: Optional[str] = None
    #: The victim is the command itself (the leader), not a process it started.
    victim_is_leader: bool = False

    def victim_text(self) -> str:
        """``pid 4242 (python)``, or what is known without a victim."""
        if self.victim_pid is None:
            return "victim not named in the kernel log"
        return f"pid {self.victim_pid} ({self.victim_comm})"

    def counter_text(self) -> str:
        """``oom_kill +1, /proc/vmstat``."""
        group = self.oom_group_kill_delta
        group_text = f", oom_group_kill +{group}" if group else ""
        return f"oom_kill +{self.oom_kill_delta}{group_text}, {self.counter}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "oom_kill_delta": self.oom_kill_delta,
            "oom_group_kill_delta": self.oom_group_kill_delta,
            "counter": self.counter,
            "victim_pid": self.victim_pid,
            "victim_comm": self.victim_comm,
            "victim_memcg": self.victim_memcg,
            "constraint": self.constraint,
            "victim_is_leader": self.victim_is_leader,
        }


class _Kmsg:
    """A /dev/kmsg cursor placed at the end of the log: what is read later is what came after."""

    def __init__(self) -> None:
        self.fd = -1
        try:
            self.fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as err:  # not root and kernel.dmesg_restrict=1, no /dev/kmsg (container)
            self.close()
            _note_once(KMSG, err)

    def kills(self) -> tuple[list[OomKill], bool]:
        """The OOM kills logged since the cursor was placed, and whether that is all of them
        (the log was readable and the ring overwrote nothing unread); closes the cursor."""
        found: list[OomKill] = []
        complete = self.fd >= 0
        try:
            for _ in range(_KMSG_RECORDS_MAX):
                if self.fd < 0:
                    break
                try:
                    record = os.read(self.fd, _KMSG_RECORD_MAX)
                except InterruptedError:
                    continue
                except BlockingIOError:
                    break
                except OSError as err:
                    complete = False
                    if err.errno == errno.EPIPE:  # the ring overwrote records we had not read
                        continue
                    _note_once(KMSG, err)
                    break
                if not record:
                    break
                kill = parse_kmsg_record(record.decode("utf-8", "replace"))
                if kill is not None:
                    found.append(kill)
            else:
                complete = False  # gave up reading: a flood of records
        finally:
            self.close()
        return _merge(found), complete

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Watch:
    """The kernel's OOM-kill evidence read before a run; ``attribute`` reads it again after."""

    def __init__(self, cgroup: Optional[str] = None) -> None:
        self.cgroup = cgroup
        self.vmstat = read_counter(VMSTAT)
        cg_path = cgroup_counter_path(cgroup) if cgroup else None
        self.cgroup_before = read_counter(cg_path) if cg_path else None
        self.kmsg = _Kmsg()

    def close(self) -> None:
        self.kmsg.close()

    def attribute(self, *, leader: Optional[int], pids: Iterable[int] = (),
                  returncode: Optional[int], timed_out: bool,
                  cgroup: Optional[str] = None) -> Optional[OomEvidence]:
        """The evidence that the OOM killer ended part of this run, or ``None``.

        ``cgroup``: the run's own cgroup, when it had one; a cgroup not given to the
        constructor was made for the run, so its counter started at zero.
        """
        kills, log_complete = self.kmsg.kills()
        cgroup = cgroup or self.cgroup
        moved = self._cgroup_delta(cgroup) if cgroup else None
        delta = 0
        if moved is None:
            after = read_counter(VMSTAT)
            if after is not None and self.vmstat is not None:
                delta = max(after[0] - self.vmstat[0], 0)
        return decide(kills=kills, log_complete=log_complete, leader=leader, pids=pids,
                      returncode=returncode, timed_out=timed_out, cgroup=cgroup, moved=moved,
                      vmstat_delta=delta)

    def _cgroup_delta(self, cgroup: str) -> Optional[tuple[str, int, int]]:
        """``(counter path, oom_kill delta, oom_group_kill delta)`` of the run's cgroup."""
        path = cgroup_counter_path(cgroup)
        after = read_counter(path) if path else None
        if path is None or after is None:
            return None
        before = self.cgroup_before if cgroup == self.cgroup and self.cgroup_before else (0, 0)
        return path, max(after[0] - before[0], 0), max(after[1] - before[1], 0)


def decide(*, kills: list[OomKill], log_complete: bool, leader: Optional[int],
           pids: Iterable[int], returncode: Optional[int], timed_out: bool,
           cgroup: Optional[str], moved: Optional[tuple[str, int, int]],
           vmstat_delta: int) -> Optional[OomEvidence]:
    """Whether the OOM evidence read around a run is the run's (``Watch.attribute``; the
    native runner reads the same evidence in C and comes here with it).

    ``kills``: the victims the kernel log named during the run (``log_complete``: every record
    was read); ``moved``: ``(counter, oom_kill delta, oom_group_kill delta)`` of the run's own
    cgroup, ``None`` without one; ``vmstat_delta``: the machine-wide counter's move (used only
    without ``moved``).
    """
    counter, delta, group_delta = VMSTAT, vmstat_delta, 0
    if moved is not None:
        counter, delta, group_delta = moved
    counted = moved is not None and (delta > 0 or group_delta > 0)
    victims: list[OomKill] = []
    if kills:  # nearly every run has none: no set of its pids made
        own = set(pids) | ({leader} if leader is not None else set())
        victims = [k for k in kills if k.pid in own]
        if counted and not victims:  # every kill in the run's own cgroup is the run's
            victims = [k for k in kills if _same_cgroup(k.memcg, cgroup)]
    if counted:
        source = "memory.events"
    elif victims:
        source = "kmsg"
    elif (moved is None and returncode == -9 and not timed_out and delta > 0
          and not (log_complete and len(kills) >= delta)):
        # The machine-wide counter alone: another process's OOM kill during the run looks
        # the same, so only a leader SIGKILLed by nobody we know of is attributed, and not
        # when the kernel log named every victim of the run's time and none was ours.
        source = "vmstat"
    else:
        return None
    victim = next((k for k in victims if k.pid == leader), victims[0] if victims else None)
    return OomEvidence(
        source=source, oom_kill_delta=delta, oom_group_kill_delta=group_delta,
        counter=counter,
        victim_pid=victim.pid if victim else None, victim_comm=victim.comm if victim else None,
        victim_memcg=victim.memcg if victim else None,
        constraint=victim.constraint if victim else None,
        victim_is_leader=victim is not None and victim.pid == leader,
    )


def kills_from_records(records: Iterable[bytes]) -> list[OomKill]:
    """The victims named by kernel log records (the native runner's, read in C)."""
    found = (parse_kmsg_record(r.decode("utf-8", "replace")) for r in records)
    return _merge(k for k in found if k is not None)


def note_unreadable_log(err: int) -> None:
    """The native runner could not open the kernel log: say so once, as ``Watch`` does."""
    _note_once(KMSG, OSError(err, os.strerror(err)))


def _same_cgroup(memcg: Optional[str], cgroup: Optional[str]) -> bool:
    """The log's ``task_memcg=/a/b`` (relative to the hierarchy's root) names ``cgroup``."""
    if not memcg or memcg == "/" or not cgroup:
        return False
    return os.path.normpath(cgroup).endswith(os.path.normpath(memcg))
