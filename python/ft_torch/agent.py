"""A training process under a coordinator: an agent, a zygote, a trainer.

ft-smp starts the script; it imports torch and calls `ft_torch.start()`.
There the process splits in three:

- the *agent* (the process ft-smp started; its pid is the worker's): it
  holds the link to the coordinator (hello and heartbeats on the library's
  thread, without pause), and runs the trainer: it starts one for each
  restore the coordinator orders, passes it the coordinator's resume, stop
  and hold, and reports what the trainer says (ready, step, activity, done).
  On a failure anywhere (a pause or a restore in a newer epoch) it kills the
  trainer and, at the restore, starts a new one.
- the *zygote*, forked before anything of ft runs (no thread, no socket):
  it waits, with torch imported and the script's state as it was when it
  called `start()`, and forks each trainer on the agent's word.
- the *trainer*: returns from `start()` into the script, which sets up
  torch.distributed with this epoch's MASTER_PORT, builds the model and
  DDP, attaches, restores from its SMP, and trains.

So every recovery restarts the training process on every rank (every rank
runs the script's set-up again, the process group and DDP included, the
same way whatever the script does, and a collective hung on a dead or
stopped peer is simply gone with its process), at the cost of a fork
instead of a new interpreter and torch's import, and the coordinator never
misses a heartbeat. A trainer dies with its agent (PR_SET_PDEATHSIG through
the zygote), so ending the worker's pid ends everything.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time

from . import _native
from .session import snapshot_interval

EVENT_RESTORE, EVENT_RESUME, EVENT_PAUSE, EVENT_STOP, EVENT_FENCED = 1, 2, 3, 4, 5
ACTIVITY = {"idle": 0, "computing": 1, "collective": 2, "snapshot_wait": 3, "restoring": 4, "held": 5}


def log(line: str) -> None:
    """One line in the worker's log (ft-smp keeps stdout), with the monotonic clock."""
    print(f"ft: {line} t={time.monotonic():.3f}", flush=True)


def _flush() -> None:
    sys.stdout.flush()
    sys.stderr.flush()


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG(SIGKILL): this process dies when its parent does."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() == 1:
        os._exit(1)  # the parent is already gone


class Link:
    """JSON lines over a stream socket (agent <-> zygote, agent <-> trainer)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""
        self.lock = threading.Lock()

    def send(self, message: dict, fds=()) -> None:
        data = (json.dumps(message) + "\n").encode()
        with self.lock:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)

    def receive(self, fds: int = 0):
        """The next message (and received descriptors); None at the end."""
        received = []
        while b"\n" not in self.buffer:
            if fds:
                data, new, _, _ = socket.recv_fds(self.sock, 65536, fds)
                received += new
            else:
                data = self.sock.recv(65536)
            if not data:
                return (None, received) if fds else None
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        message = json.loads(line)
        return (message, received) if fds else message

    def fileno(self) -> int:
        return self.sock.fileno()


def _process_age() -> float:
    """Seconds since this process started (/proc: its start in clock ticks since boot)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def start_under_coordinator(environment):
    """Called by `ft_torch.start()` when ft-smp runs this process under a
    coordinator. Returns only in a trainer, with its session; the agent and
    the zygote never return (they exit with the worker's status)."""
    log(f"agent up {_process_age() * 1000:.0f} ms after the process started (Python, torch and the script's imports)")
    agent_end, zygote_end = socket.socketpair()
    _flush()  # what is buffered would otherwise be written by every process forked from here
    pid = os.fork()
    if pid == 0:
        agent_end.close()
        _die_with_parent()
        return _zygote(Link(zygote_end))
    zygote_end.close()
    code = 1
    try:
        code = Agent(Link(agent_end), pid, environment).run()
    except BaseException:
        import traceback
        traceback.print_exc()
        log("the agent failed")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _zygote(link: Link):
    """Forks a trainer whenever the agent asks; reports their exits."""
    children = set()
    while True:
        ready, _, _ = select.select([link], [], [], 0.05)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            link.send({"exited": pid, "status": os.waitstatus_to_exitcode(status)})
        if not ready:
            continue
        message, fds = link.receive(fds=1)
        if message is None:
            os._exit(0)  # the agent is gone
        _flush()
        pid = os.fork()
        if pid == 0:
            link.sock.close()
            _die_with_parent()
            os.environ.update(message["env"])
            return TrainerSession(Link(socket.socket(fileno=fds[0])))
        os.close(fds[0])
        children.add(pid)
        link.send({"forked": pid})


class Trainer:
    def __init__(self, pid: int, link: Link, epoch: int):
        self.pid = pid
        self.link = link
        self.epoch = epoch
        self.ready = False
        self.done = False
        self.running = False
        self.restore_failed = False


class Agent:
    """The worker as the coordinator knows it (see the module doc)."""

    def __init__(self, zygote: Link, zygote_pid: int, environment):
        self.zygote = zygote
        self.zygote_pid = zygote_pid
        self.environment = environment
        self.L = _native.lib()
        handle = ctypes.c_void_p()
        _native._check(self.L.ft_control_open(ctypes.byref(handle)))
        self.control = handle
        self.trainer: Trainer | None = None
        self.held = False
        self.stop_event = None

    # ---- the coordinator's side ----------------------------------------------

    def next_event(self):
        handle = ctypes.c_void_p()
        _native._check(self.L.ft_control_next(self.control, ctypes.byref(handle)))
        if not handle.value:
            return None
        L = self.L
        e = {"kind": L.ft_event_kind(handle), "epoch": L.ft_event_epoch(handle), "step": L.ft_event_step(handle),
             "failed": bool(L.ft_event_failed(handle)), "reason": (L.ft_event_reason(handle) or b"").decode(errors="replace"),
             "sources": [(L.ft_event_source(handle, i) or b"").decode() for i in range(L.ft_event_source_count(handle))]}
        L.ft_event_free(handle)
        return e

    def run(self) -> int:
        while True:
            waiting = [self.L.ft_control_fd(self.control), self.zygote]
            if self.trainer is not None:
                waiting.append(self.trainer.link)
            ready, _, _ = select.select(waiting, [], [], 0.05)
            while (e := self.next_event()) is not None:
                code = self.on_event(e)
                if code is not None:
                    return code
            if self.zygote in ready and not self.on_zygote():
                log("the zygote is gone")
                return 1
            if self.trainer is not None and self.trainer.link in ready:
                code = self.on_trainer()
                if code is not None:
                    return code
            self.follow_hold()

    def on_event(self, e: dict):
        t = self.trainer
        kind = e["kind"]
        if kind == EVENT_FENCED:
            log(f"fenced: {e['reason']}")
            self.kill_trainer()
            return 3
        if kind == EVENT_STOP:
            log(f"stop: {e['reason']}")
            if t is not None and t.done and not e["failed"]:
                self.tell(t, {"kind": "stop"})
                self.stop_event = e
                return None  # exits once the trainer did
            self.kill_trainer()
            return 1 if e["failed"] else 0
        if kind == EVENT_PAUSE:
            if t is not None and e["epoch"] > t.epoch:
                log(f"pause in epoch {e['epoch']}: ending the trainer of epoch {t.epoch}")
                self.kill_trainer()
            return None
        if kind == EVENT_RESTORE:
            if t is not None and t.epoch == e["epoch"] and not t.ready and not t.restore_failed:
                return None  # the same order again: the trainer is on it
            log(f"restore instruction: step {e['step']} epoch {e['epoch']} sources {e['sources']}")
            self.kill_trainer()
            self.start_trainer(e)
            return None
        if kind == EVENT_RESUME:
            if t is not None and t.epoch == e["epoch"] and t.ready and not t.running:
                t.running = True
                _native._check(self.L.ft_control_running(self.control))
                self.tell(t, {"kind": "resume", "step": e["step"], "epoch": e["epoch"]})
        return None

    def follow_hold(self) -> None:
        held = ctypes.c_int()
        _native._check(self.L.ft_control_state(self.control, None, ctypes.byref(held), None))
        if bool(held.value) != self.held:
            self.held = bool(held.value)
            if self.trainer is not None:
                self.tell(self.trainer, {"kind": "hold", "held": self.held})

    # ---- the trainer -----------------------------------------------------------

    def start_trainer(self, e: dict) -> None:
        env = {}
        base = self.environment.get("FT_MASTER_PORT_BASE")
        if base:
            env["MASTER_PORT"] = str(int(base) + e["epoch"] % int(self.environment.get("FT_MASTER_PORT_SPAN", "64")))
        ours, theirs = socket.socketpair()
        self.zygote.send({"cmd": "fork", "env": env}, fds=[theirs.fileno()])
        theirs.close()
        reply = self._zygote_reply("forked")
        link = Link(ours)
        self.trainer = Trainer(reply["forked"], link, e["epoch"])
        self.tell(self.trainer, {"kind": "restore", "step": e["step"], "epoch": e["epoch"], "sources": e["sources"], "held": self.held})
        log(f"trainer pid {reply['forked']} started for epoch {e['epoch']}")

    def tell(self, t: Trainer, message: dict) -> None:
        """A message to the trainer; one that died meanwhile is seen at its link's end."""
        try:
            t.link.send(message)
        except OSError:
            pass

    def _zygote_reply(self, key: str) -> dict:
        while True:
            m = self.zygote.receive()
            if m is None:
                raise RuntimeError("the zygote is gone")
            if key in m:
                return m
            self._exited(m)

    def on_zygote(self) -> bool:
        m = self.zygote.receive()
        if m is None:
            return False
        self._exited(m)
        return True

    def _exited(self, m: dict) -> None:
        if "exited" in m and self.trainer is not None and m["exited"] == self.trainer.pid:
            self.trainer_status = m["status"]

    def kill_trainer(self) -> None:
        t = self.trainer
        if t is None:
            return
        self.trainer = None
        try:
            os.kill(t.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        t.link.sock.close()
        # Its exit comes through the zygote; a new trainer must not race the old one's ports.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(t.pid, 0)
            except ProcessLookupError:
                return
            if select.select([self.zygote], [], [], 0.01)[0]:
                m = self.zygote.receive()
                if m is not None and m.get("exited") == t.pid:
                    return

    def on_trainer(self):
        t = self.trainer
        m = t.link.receive()
        if m is None:
            status = self.wait_trainer_status(t)
            self.trainer = None
            if t.done and status == 0:
                if self.stop_event is not None:
                    return 0
                log("the trainer ended after its last step; waiting for the job's end")
                return None
            if status == 0:
                log(f"the trainer (pid {t.pid}) ended before its job was done: the script must end with job.finish()")
            else:
                log(f"the trainer (pid {t.pid}) failed (exit {status})")
            return 1  # this worker failed: its SMP reports it, the coordinator recovers the job
        kind = m["kind"]
        L = self.L
        if kind == "ready":
            t.ready = True
            _native._check(L.ft_control_ready(self.control, m["step"]))
        elif kind == "restore_failed":
            t.restore_failed = True  # the coordinator orders the restore again: a new trainer does it
            _native._check(L.ft_control_restore_failed(self.control, m["reason"].encode()))
        elif kind == "report":
            _native._check(L.ft_control_report(self.control, m["step"], m["skipped"]))
            if "snapshots" in m:
                _native._check(L.ft_control_report_snapshots(self.control, m["snapshots"], m["blocked"]))
        elif kind == "activity":
            _native._check(L.ft_control_set_activity(self.control, ACTIVITY[m["what"]], -1))
        elif kind == "done":
            t.done = True
            _native._check(L.ft_control_done(self.control, m["step"]))
        return None

    def wait_trainer_status(self, t: Trainer) -> int | None:
        self.trainer_status = None
        deadline = time.monotonic() + 10
        while self.trainer_status is None and time.monotonic() < deadline:
            if select.select([self.zygote], [], [], 0.05)[0]:
                m = self.zygote.receive()
                if m is None:
                    break
                if m.get("exited") == t.pid:
                    return m["status"]
        return self.trainer_status


class TrainerSession:
    """The session of a trainer (see the module doc): the snapshot client is
    its own, the coordinator is reached through the agent."""

    protected = True

    def __init__(self, link: Link):
        self.link = link
        first = link.receive()
        self.restore_step = first["step"]
        self.epoch = first["epoch"]
        self.sources = first["sources"]
        self.held = first["held"]
        self.environment = os.environ
        self.snapshot_interval = snapshot_interval(os.environ)
        self.skip_if_busy = os.environ.get("FT_SNAPSHOT_SKIP_IF_BUSY") == "1"
        _set_torchrun_environment(self.epoch)
        self.client = _native.Client()
        self.events: queue.Queue[dict] = queue.Queue()
        self._skipped = 0
        self._activity = None
        threading.Thread(target=self._listen, name="ft-agent-link", daemon=True).start()
        self._previous_excepthook = sys.excepthook
        sys.excepthook = self._excepthook
        log(f"trainer up for epoch {self.epoch}: restore {'nothing' if self.restore_step < 0 else f'step {self.restore_step}'}")

    def _listen(self) -> None:
        while True:
            m = self.link.receive()
            if m is None:
                os._exit(1)  # the agent is gone
            if m["kind"] == "hold":
                self.held = m["held"]
            else:
                self.events.put(m)

    def _excepthook(self, kind, value, tb) -> None:
        """A collective that failed because a peer died is the first sign of
        a failure the coordinator is about to announce: the agent ends this
        trainer then. Wait for it rather than exit as one more failure."""
        self._previous_excepthook(kind, value, tb)
        if not _collective_error(value):
            return
        grace = float(self.environment.get("FT_TORCH_COLLECTIVE_GRACE_S", "5"))
        log(f"the training thread failed in a collective; waiting up to {grace:g} s for the coordinator's pause")
        time.sleep(grace)
        log("no recovery came: exiting")

    def activity(self, what: str) -> None:
        if what != self._activity:
            self._activity = what
            self.link.send({"kind": "activity", "what": what})

    # ---- what Job asks --------------------------------------------------------

    def restore(self, client) -> int | None:
        log(f"attached; restoring {'nothing' if self.restore_step < 0 else f'step {self.restore_step}'}")
        if self.restore_step < 0:
            return None
        self.activity("restoring")
        sources = (ctypes.c_char_p * max(1, len(self.sources)))(*[s.encode() for s in self.sources])
        for attempt in range(1, 4):
            try:
                _native._check(_native.lib().ft_client_restore_from(client._h, self.restore_step, sources, len(self.sources)))
                log(f"restored step {self.restore_step} from the SMPs")
                return self.restore_step
            except _native.FTError as e:
                log(f"restore of step {self.restore_step} failed (attempt {attempt}): {e}")
                failure = e
        # A source may have died: the coordinator orders the restore again (the agent
        # then starts a new trainer) or moves to a new epoch (likewise).
        self.link.send({"kind": "restore_failed", "reason": str(failure)})
        while True:  # until the agent ends this trainer
            self.events.get()

    def ready(self, version) -> None:
        self.link.send({"kind": "ready", "step": -1 if version is None else version})
        log(f"ready: restored {version if version is not None else 'nothing'}")
        self.activity("idle")
        while True:
            m = self.events.get()
            if m["kind"] == "resume":
                break
        self.activity("computing")
        log(f"resume from step {m['step']} epoch {m['epoch']}")

    def report_step(self, version, snapshots=None, blocked=0.0) -> None:
        m = {"kind": "report", "step": version, "skipped": self._skipped}
        if snapshots is not None:
            m.update(snapshots=snapshots, blocked=blocked)
        self.link.send(m)
        self.activity("computing")

    def report_skipped(self, n) -> None:
        self._skipped = n

    def check_running(self) -> None:
        """Called while waiting for a round: that is a snapshot wait (or a
        hold while the coordinator is silent)."""
        self.activity("held" if self.held else "snapshot_wait")

    def hold(self) -> None:
        """At a step boundary: while the coordinator is silent, wait for it."""
        if not self.held:
            return
        self.activity("held")
        log("holding: the coordinator is silent")
        while self.held:
            time.sleep(0.005)
        log("carrying on: the coordinator is back")
        self.activity("computing")

    def done(self, version) -> None:
        self.link.send({"kind": "done", "step": version})
        self.activity("idle")
        log(f"done at step {version}; waiting for the job's end")
        while self.events.get()["kind"] != "stop":
            pass

    def detach(self, job) -> None:
        import ft_torch
        ft_torch._detached(job)


def _set_torchrun_environment(epoch: int) -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and MASTER_ADDR come
    from ft-smp, MASTER_PORT is this epoch's (the agent set it); defaults
    for what is missing."""
    env = os.environ
    env.setdefault("RANK", env.get("FT_DP_RANK", "0"))
    env.setdefault("WORLD_SIZE", env.get("FT_DP_SIZE", "1"))
    env.setdefault("MASTER_ADDR", env.get("FT_MASTER_ADDR", "127.0.0.1"))
    # Gloo advertises the address its host name resolves to (often 127.0.0.1),
    # which peers on other hosts cannot reach: bind it to the interface that
    # holds this host's address (FT_HOST_ADDR, the SMP's data plane's).
    host = env.get("FT_HOST_ADDR", "")
    if "GLOO_SOCKET_IFNAME" not in env and host and not host.startswith("127."):
        name = _interface_of(host)
        if name:
            env["GLOO_SOCKET_IFNAME"] = name
    log(f"epoch {epoch}: RANK={env['RANK']} WORLD_SIZE={env['WORLD_SIZE']} "
        f"MASTER_ADDR={env['MASTER_ADDR']} MASTER_PORT={env.get('MASTER_PORT', '(unset)')}")


def _interface_of(address: str):
    """The name of the network interface that holds IPv4 `address`, or None."""
    import fcntl
    import socket
    import struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            try:
                # SIOCGIFADDR: the interface's IPv4 address, at bytes 20..24 of the ifreq.
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    finally:
        s.close()
    return None


def _collective_error(e: BaseException) -> bool:
    dist = sys.modules.get("torch.distributed")
    error = getattr(dist, "DistError", None) if dist is not None else None
    return (error is not None and isinstance(e, error)) or (isinstance(e, RuntimeError) and "gloo" in str(e))
