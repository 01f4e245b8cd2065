"""Keep only the capabilities the daemon needs once its capture sockets are open.

:func:`drop_privileges` is called by ``egressd run`` after the packet sockets
are open.  It

* switches to an unprivileged user when started as root and ``EGRESSD_USER``
  (``user`` or ``user:group``) names one, keeping the capabilities to keep
  across the switch (``PR_SET_KEEPCAPS``);
* reduces the permitted, effective and inheritable sets to the kept ones
  (``CAP_NET_RAW`` by default: an interface that comes back is reopened);
* drops every other capability from the bounding set and the ambient set;
* sets ``no_new_privs``, so no later ``execve`` (of a set-user-ID program or
  one with file capabilities) can gain anything.

Capabilities, the bounding set and ``no_new_privs`` belong to a thread, not
to the process: only the calling thread changes (a user switch is applied to
every thread by the C library, and clears the capabilities of the others).
Threads started before the call keep what they had; they are logged with a
warning.  Threads started afterwards inherit the reduced sets.

:func:`current_capabilities` reads the sets back from ``/proc/self/status``.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import logging
import os
import pwd
import threading
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

USER_ENV = "EGRESSD_USER"
"""Environment variable naming the user (``user`` or ``user:group``) to run as."""

# linux/capability.h
CAP_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
_CAP_NUMBERS = {name: i for i, name in enumerate(CAP_NAMES)}

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_LINUX_CAPABILITY_U32S_3 = 2

# linux/prctl.h
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_LOWER = 3

_STATUS_SETS = {"CapInh": "inheritable", "CapPrm": "permitted", "CapEff": "effective",
                "CapBnd": "bounding", "CapAmb": "ambient"}


class _Header(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _Data(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32))


_DataArray = _Data * _LINUX_CAPABILITY_U32S_3

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong)
_libc.prctl.restype = ctypes.c_int
_libc.capget.argtypes = (ctypes.POINTER(_Header), ctypes.POINTER(_Data))
_libc.capget.restype = ctypes.c_int
_libc.capset.argtypes = (ctypes.POINTER(_Header), ctypes.POINTER(_Data))
_libc.capset.restype = ctypes.c_int


@dataclass(frozen=True, slots=True)
class CapSets:
    """The three capability sets of the calling thread, as bit masks."""

    effective: int
    permitted: int
    inheritable: int


def _errno_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    res = int(_libc.prctl(option, arg2, arg3, 0, 0))
    if res < 0:
        raise _errno_error(f"prctl({option})")
    return res


def cap_last_cap() -> int:
    """The highest capability number this kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return len(CAP_NAMES) - 1


def cap_name(number: int) -> str:
    return CAP_NAMES[number] if number < len(CAP_NAMES) else f"CAP_{number}"


def cap_number(name: str) -> int:
    """``CAP_NET_RAW``, ``net_raw`` or ``13`` → 13; ValueError for an unknown name."""
    key = name.strip().upper()
    if key.isdigit():
        return int(key)
    if not key.startswith("CAP_"):
        key = "CAP_" + key
    try:
        return _CAP_NUMBERS[key]
    except KeyError:
        raise ValueError(f"unknown capability {name!r}") from None


def mask_names(mask: int) -> set[str]:
    """Names of the capabilities set in ``mask``."""
    return {cap_name(i) for i in range(mask.bit_length()) if mask >> i & 1}


def _mask(numbers: Iterable[int]) -> int:
    m = 0
    for n in numbers:
        m |= 1 << n
    return m


def capget() -> CapSets:
    """The calling thread's capability sets."""
    hdr = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _DataArray()
    if _libc.capget(ctypes.byref(hdr), data) != 0:
        raise _errno_error("capget")
    return CapSets(effective=data[0].effective | data[1].effective << 32,
                   permitted=data[0].permitted | data[1].permitted << 32,
                   inheritable=data[0].inheritable | data[1].inheritable << 32)


def capset(sets: CapSets) -> None:
    """Set the calling thread's capability sets."""
    hdr = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _DataArray()
    for i in range(_LINUX_CAPABILITY_U32S_3):
        shift = 32 * i
        data[i].effective = sets.effective >> shift & 0xFFFFFFFF
        data[i].permitted = sets.permitted >> shift & 0xFFFFFFFF
        data[i].inheritable = sets.inheritable >> shift & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        raise _errno_error("capset")


def _status_masks(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in _STATUS_SETS:
                out[_STATUS_SETS[key]] = int(val.strip(), 16)
            elif key == "NoNewPrivs":
                out["no_new_privs"] = int(val.strip())
    return out


def current_capabilities(pid: int | str = "self") -> dict[str, set[str]]:
    """The capability sets of a process (its main thread), by name, from /proc.

    ``pid`` is a process id, ``"self"`` or ``"thread-self"`` (the calling thread).
    Keys: ``effective``, ``permitted``, ``inheritable``, ``bounding``,
    ``ambient``.
    """
    masks = _status_masks(f"/proc/{pid}/status")
    return {name: mask_names(masks.get(name, 0)) for name in _STATUS_SETS.values()}


def describe(caps: dict[str, set[str]]) -> str:
    """One log line: ``effective=CAP_NET_RAW permitted=… bounding=… ambient=…``."""
    return " ".join(f"{k}={','.join(sorted(caps[k])) or '-'}"
                    for k in ("effective", "permitted", "inheritable", "bounding", "ambient"))


def _resolve_user(spec: str) -> tuple[str, int, int]:
    """``user`` or ``user:group`` (names or numbers) → (name, uid, gid)."""
    user, _, group = spec.partition(":")
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"{USER_ENV}: no such user {user!r}") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"{USER_ENV}: no such group {group!r}") from None
    return pw.pw_name, pw.pw_uid, gid


def _switch_user(name: str, uid: int, gid: int) -> None:
    """setgroups([]), setgid, setuid, keeping the permitted set across the switch."""
    _prctl(PR_SET_KEEPCAPS, 1)
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    finally:
        _prctl(PR_SET_KEEPCAPS, 0)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError(errno.EPERM, f"switching to user {name} did not take effect")
    log.info("switched to user %s (uid %d, gid %d)", name, uid, gid)


def _other_threads_with_more(keep_mask: int) -> list[int]:
    """Other threads of this process whose capabilities exceed ``keep_mask``."""
    me = threading.get_native_id()
    found = []
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return []
    for tid in tids:
        if tid == me:
            continue
        try:
            m = _status_masks(f"/proc/self/task/{tid}/status")
        except OSError:
            continue  # the thread has ended
        extra = ~keep_mask
        if (m.get("effective", 0) | m.get("permitted", 0) | m.get("bounding", 0)) & extra \
                or m.get("no_new_privs", 1) == 0:
            found.append(tid)
    return found


def drop_privileges(keep: Iterable[str] = ("CAP_NET_RAW",), user: str | None = None) -> None:
    """Switch user (when root and asked to) and keep only ``keep`` of the capabilities.

    ``user`` defaults to ``$EGRESSD_USER``; it is used only when running as
    root.  Capabilities in ``keep`` that the process does not have are not
    gained.  Raises OSError (or ValueError for an unknown user) when a step
    that must succeed fails; the bounding set is reduced only as far as the
    process may (``CAP_SETPCAP``).
    """
    keep_numbers = {cap_number(c) for c in keep}
    keep_mask = _mask(keep_numbers)
    last = cap_last_cap()
    if user is None:
        user = os.environ.get(USER_ENV) or None

    if user is not None:
        name, uid, gid = _resolve_user(user)
        if os.geteuid() == 0 and uid != 0:
            _switch_user(name, uid, gid)
        elif os.geteuid() != uid:
            log.warning("%s=%s ignored: not running as root (uid %d)", USER_ENV, user,
                        os.geteuid())

    # Everything permitted is made effective for the steps below (after a user
    # switch the effective set is empty; CAP_SETPCAP drops the bounding set).
    sets = capget()
    capset(CapSets(sets.permitted, sets.permitted, sets.inheritable))

    dropped_bounding: list[str] = []
    kept_bounding: list[str] = []
    for cap in range(last + 1):
        if cap in keep_numbers or _prctl(PR_CAPBSET_READ, cap) != 1:
            continue
        try:
            _prctl(PR_CAPBSET_DROP, cap)
            dropped_bounding.append(cap_name(cap))
        except OSError as e:
            if e.errno != errno.EPERM:
                raise
            kept_bounding.append(cap_name(cap))  # no CAP_SETPCAP: an unprivileged start
    if kept_bounding:
        log.warning("cannot drop %s from the bounding set without CAP_SETPCAP",
                    ",".join(kept_bounding))

    for cap in range(last + 1):
        if cap in keep_numbers:
            continue
        try:
            if _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, cap) == 1:
                _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_LOWER, cap)
        except OSError as e:
            if e.errno != errno.EINVAL:  # a kernel without ambient capabilities
                raise

    final = CapSets(effective=sets.permitted & keep_mask, permitted=sets.permitted & keep_mask,
                    inheritable=sets.inheritable & keep_mask)
    capset(final)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)

    after = capget()
    if after.permitted & ~keep_mask or after.effective & ~keep_mask:
        raise OSError(errno.EPERM, "capabilities were not reduced: "
                      f"{','.join(sorted(mask_names(after.permitted & ~keep_mask)))}")
    missing = keep_mask & ~after.effective
    if missing:
        log.warning("not available, so not kept: %s", ",".join(sorted(mask_names(missing))))
    log.info("privileges dropped: uid %d gid %d, %d capabilities removed from the bounding "
             "set, no_new_privs set; now %s", os.getuid(), os.getgid(), len(dropped_bounding),
             describe(current_capabilities("thread-self")))
    others = _other_threads_with_more(keep_mask)
    if others:
        log.warning("%d thread(s) started earlier keep more privileges than %s "
                    "(capabilities are per thread): %s", len(others),
                    ",".join(sorted(mask_names(keep_mask))) or "none",
                    ",".join(map(str, sorted(others))))
