"""The daemon keeps only CAP_NET_RAW once its capture sockets are open.

Each check runs in a child process inside a fresh network namespace, so the
test process keeps its own privileges and nothing touches the host's network:

* started as root with every capability: afterwards only CAP_NET_RAW is
  left (effective, permitted, bounding), ``no_new_privs`` is set, and things
  that need other capabilities fail;
* with ``EGRESSD_USER=nobody``: the process runs as nobody and can still
  open packet sockets;
* end to end, ``egressd run`` started the way the shipped systemd unit
  starts it (unprivileged user, CAP_NET_RAW as its only ambient and bounding
  capability, ``NoNewPrivileges``) captures real traffic, writes the alert,
  and its status in /proc shows nothing more than CAP_NET_RAW.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mmdb_builder import build_mmdb
from netns import Lab, ip, require_netns, veth_pair, wait_for
from test_daemon import Notify, alerts, free_port, udp_send, write_config

from egressd.privileges import current_capabilities, mask_names

ROOT = Path(__file__).resolve().parents[1]
NET_RAW = {"CAP_NET_RAW"}


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_netns()
    with veth_pair(a_v4="10.20.0.5/24", b_v4="10.20.0.1/24", a_v6="fd00:20::5/64",
                   b_v6="fd00:20::1/64", a_routes=("203.0.113.0/24 via 10.20.0.1",)) as lab:
        ip("addr", "add", "203.0.113.9/32", "dev", "lo", ns=lab.b.ns)
        yield lab


def run_child(ns: str, code: str, *args: str,
              env: dict[str, str] | None = None) -> tuple[Any, str]:
    """Run ``code`` after :data:`CHILD_PRELUDE` with a fresh interpreter in namespace ``ns``.

    Returns the JSON of its last output line and its stderr.
    """
    res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                          CHILD_PRELUDE + textwrap.dedent(code), *args], cwd=ROOT,
                         env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1]), res.stderr


# Everything the child needs is imported before the drop: once it runs as
# another user it may not be able to read the interpreter's files.
CHILD_PRELUDE = """
import ctypes, errno, json, logging, os, socket, sys, threading, time
from egressd.privileges import current_capabilities, drop_privileges
logging.basicConfig(level="INFO", stream=sys.stderr)
libc = ctypes.CDLL(None, use_errno=True)

def attempt(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"

def unshare_net():
    if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))

def status(key):
    with open("/proc/self/status") as f:
        return next(line.split()[1:] for line in f if line.startswith(key + ":"))

def caps():
    return {k: sorted(v) for k, v in current_capabilities().items()}
"""


def test_root_keeps_only_net_raw(lab: Lab, tmp_path: Path) -> None:
    target = tmp_path / "owned-by-root"
    target.write_text("x")
    before = current_capabilities()
    if not {"CAP_SYS_ADMIN", "CAP_CHOWN", "CAP_SETUID", "CAP_NET_RAW"} <= before["effective"]:
        pytest.skip(f"needs root with full capabilities, have {sorted(before['effective'])}")
    out, err = run_child(lab.b.ns, """
        target = sys.argv[1]
        assert attempt(os.chown, target, 0, 0) == "ok"  # still allowed before the drop
        drop_privileges()
        print(json.dumps({
            "caps": caps(), "nnp": status("NoNewPrivs"), "uid": os.getresuid(),
            "chown": attempt(os.chown, target, 4242, 4242),
            "unshare": attempt(unshare_net),
            "setuid": attempt(os.setuid, 4242),
            "packet": attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                                    0).close()),
        }))
    """, str(target), env={"EGRESSD_USER": ""})
    assert set(out["caps"]["effective"]) == NET_RAW, out
    assert set(out["caps"]["permitted"]) == NET_RAW, out
    assert set(out["caps"]["bounding"]) == NET_RAW, out
    assert out["caps"]["inheritable"] == [] and out["caps"]["ambient"] == [], out
    assert out["nnp"] == ["1"]
    assert out["uid"] == [0, 0, 0]  # no user asked for: root without root's powers
    assert out["chown"] == "EPERM"
    assert out["unshare"] == "EPERM"
    assert out["setuid"] == "EPERM"
    assert out["packet"] == "ok"
    assert os.stat(target).st_uid == 0
    assert "privileges dropped" in err and "bounding=CAP_NET_RAW" in err


def test_threads_started_earlier_are_reported(lab: Lab) -> None:
    if "CAP_SETPCAP" not in current_capabilities()["effective"]:
        pytest.skip("needs root with CAP_SETPCAP")
    out, err = run_child(lab.b.ns, """
        t = threading.Thread(target=time.sleep, args=(3,), daemon=True)
        t.start()
        drop_privileges()
        print(json.dumps({"caps": caps()}))
    """, env={"EGRESSD_USER": ""})
    assert set(out["caps"]["effective"]) == NET_RAW
    assert "1 thread(s) started earlier keep more privileges" in err


def test_switch_to_user_keeps_net_raw(lab: Lab, tmp_path: Path) -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    secret = tmp_path / "root-only"
    secret.write_text("x")
    secret.chmod(0o600)
    out, err = run_child(lab.b.ns, """
        secret = sys.argv[1]
        drop_privileges()
        print(json.dumps({
            "caps": caps(), "nnp": status("NoNewPrivs"), "uid": os.getresuid(),
            "gid": os.getresgid(), "groups": os.getgroups(),
            "packet": attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                                    0).close()),
            "read_secret": attempt(lambda: open(secret).close()),
            "setuid_root": attempt(os.setuid, 0),
        }))
    """, str(secret), env={"EGRESSD_USER": "nobody"})
    assert out["uid"] == [nobody.pw_uid] * 3
    assert out["gid"] == [nobody.pw_gid] * 3
    assert out["groups"] == []
    assert set(out["caps"]["effective"]) == NET_RAW, out
    assert set(out["caps"]["permitted"]) == NET_RAW, out
    assert set(out["caps"]["bounding"]) == NET_RAW, out
    assert out["nnp"] == ["1"]
    assert out["packet"] == "ok"
    assert out["read_secret"] == "EACCES"
    assert out["setuid_root"] == "EPERM"
    assert "switched to user nobody" in err


# -- end to end: the daemon started like the systemd unit starts it ----------------------

SETPRIV_ARGS = ("--reuid=nobody", "--regid=nogroup", "--clear-groups",
                "--inh-caps=-all,+net_raw", "--ambient-caps=-all,+net_raw",
                "--bounding-set=-all,+net_raw", "--no-new-privs")

# With a private mount namespace (``ip netns exec`` makes one), show the
# interpreter's installation at ``$2`` before running the rest as the user:
# for an interpreter installed where that user cannot enter.
BIND_AND_EXEC = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'


def _interpreter_for_nobody(ns: str, view: Path) -> tuple[list[str], str]:
    """The command prefix and interpreter path that let nobody run this checkout."""
    probe = [sys.executable, "-c", "import egressd.daemon"]
    res = subprocess.run(["ip", "netns", "exec", ns, "setpriv", *SETPRIV_ARGS, *probe],
                         cwd=ROOT, capture_output=True, timeout=60, check=False)
    if res.returncode == 0:
        return [], sys.executable
    real = Path(os.path.realpath(sys.executable))
    prefix = Path(sys.prefix)
    if not real.is_relative_to(prefix):
        pytest.skip(f"the interpreter cannot be used by nobody: {res.stderr.decode()[-300:]}")
    view.mkdir(mode=0o755)
    # Its shared library is found by a run path into the original location: point
    # the loader at the view instead.
    return (["env", f"LD_LIBRARY_PATH={view / 'lib'}", "sh", "-c", BIND_AND_EXEC, "sh",
             str(prefix), str(view)], str(view / real.relative_to(prefix)))


def _python_pid(pid: int) -> int:
    """The daemon's pid: ``ip netns exec`` and ``setpriv`` exec it, or it is a child."""
    for _ in range(3):
        if b"egressd" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not children:
            break
        pid = int(children[0])
    raise AssertionError("cannot find the daemon process")


def test_daemon_as_unit_starts_it_keeps_only_net_raw(lab: Lab) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to start the daemon like the systemd unit")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    ns_a, ns_b = lab.a.ns, lab.b.ns
    # Not the usual per-test directory: nobody must be able to enter this one.
    base = Path(tempfile.mkdtemp(prefix="egressd-privileges-"))
    try:
        base.chmod(0o755)
        out = base / "out"  # alert log and spool: the daemon's user writes here
        out.mkdir(mode=0o700)
        os.chown(out, nobody.pw_uid, nobody.pw_gid)
        geodb = build_mmdb(base / "country.mmdb", "GeoLite2-Country", {
            "203.0.113.0/24": {"country": {"iso_code": "US"},
                               "registered_country": {"iso_code": "US"}}})
        geodb.chmod(0o644)
        config = base / "egressd.yaml"
        mport = free_port()
        write_config(config, out, geodb, mport, free_port())
        config.chmod(0o644)
        notify = Notify(base / "notify.sock")
        (base / "notify.sock").chmod(0o666)
        prefix, python = _interpreter_for_nobody(ns_b, base / "python")
        env = dict(os.environ, NOTIFY_SOCKET=str(notify.path), PYTHONUNBUFFERED="1")
        env.pop("EGRESSD_USER", None)
        with open(base / "daemon.log", "w") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns_b, *prefix, "setpriv", *SETPRIV_ARGS, python, "-m",
                 "egressd", "run", "--config", str(config)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                notify.wait("READY=1")
            except AssertionError as e:
                raise AssertionError(f"{e}\n{(base / 'daemon.log').read_text()}") from None
            pid = _python_pid(proc.pid)
            udp_send(ns_a, "203.0.113.9", 9999, b"export" * 20)
            got = wait_for(lambda: alerts(out), timeout=15, what="the violation alert")
            assert got[0]["country"] == "US" and got[0]["dst_ip"] == "203.0.113.9"

            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f)
            uids = status["Uid"].split()
            assert uids == [str(nobody.pw_uid)] * 4, uids
            assert status["NoNewPrivs"].strip() == "1"
            caps = current_capabilities(pid)
            assert caps["effective"] == NET_RAW, caps
            assert caps["permitted"] == NET_RAW, caps
            assert caps["bounding"] == NET_RAW, caps
            # Every thread, not only the main one.
            for task in Path(f"/proc/{pid}/task").iterdir():
                with open(task / "status") as f:
                    masks = {k: v.strip() for k, v in (line.split(":", 1) for line in f)}
                assert mask_names(int(masks["CapEff"], 16)) <= NET_RAW, task
                assert mask_names(int(masks["CapBnd"], 16)) <= NET_RAW, task
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            notify.sock.close()
        output = (base / "daemon.log").read_text()
        assert code == 0, output
        assert "privileges dropped" in output, output
        assert "effective=CAP_NET_RAW" in output, output
    finally:
        shutil.rmtree(base, ignore_errors=True)
