"""Where trials live: storages, study names, resuming and sharing a study between workers.

Without ``--storage`` the study lives in a SQLite file beside the output, so rerunning the
same command resumes it. ``--storage`` takes an SQLAlchemy URL (``sqlite:///...``,
``postgresql://...``) or ``journal:PATH`` (a journal file on a shared disk); processes that
run the same command against one storage and study name cooperate. Every finished trial is
committed when it ends, so a killed worker loses only the trial it was running; RDB storages
keep a heartbeat and mark such a trial failed (and re-queue its knobs) once it goes stale. A
trial also records the process running it: opening its study on that machine again (a
resumed run, another worker) fails it at once if that process has ended, and queues its
knobs once more (journal storages have no heartbeat: such a trial stayed RUNNING for good).

One study per (device, sequence length): ``NAME:DEVICE:nLENGTH``. A study records what it
was started for (recipe, target, mode, data, seeds); joining it with other settings is an error.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from attncompose.tuner.errors import TunerError
from attncompose.tuner.objective import FINISHED

HEARTBEAT_S = 10
GRACE_S = 30
JOURNAL_PREFIX = "journal:"
OPEN_ATTEMPTS = 5
SQLITE_WAIT_S = 60  # how long a worker waits for another's SQLite transaction
# Modules whose code must not be cut short by Ctrl-C: it can leave a transaction open.
STORAGE_MODULES = ("sqlalchemy", "sqlite3", "optuna.storages", "optuna.study._tell")
INTERRUPT_RETRY_S = 0.02
WORKER_ATTR = "attncompose:worker"  # a trial's: the process that runs it (this_worker)
INTERRUPTED_ATTR = "attncompose:interrupted"  # a trial's: why it was failed for its worker
RETRY_ATTR = "attncompose:retry_of"  # a trial's: the number of the interrupted trial it reruns


def default_storage_url(out: Path) -> str:
    """The SQLite file beside the tuned output: ``tuned.yaml`` -> ``tuned.optuna.db``."""
    return f"sqlite:///{out.with_suffix('.optuna.db').resolve()}"


def open_storage(url: str) -> BaseStorage:
    """An Optuna storage from an SQLAlchemy URL or ``journal:PATH``; clear errors otherwise."""
    if url.startswith(JOURNAL_PREFIX):
        return _journal_storage(url, Path(url.removeprefix(JOURNAL_PREFIX)).expanduser())
    if "://" not in url:
        raise TunerError(
            f"--storage {url!r}: expected an SQLAlchemy URL (sqlite:///FILE, "
            "postgresql://USER@HOST/DB) or journal:PATH"
        )
    if _in_memory_sqlite(url):
        raise TunerError(
            f"--storage {url}: an in-memory SQLite database belongs to one connection, so "
            "workers (and the heartbeat) cannot share it; give a file (sqlite:///FILE), or "
            "omit --storage for a file beside --out"
        )
    for attempt in range(OPEN_ATTEMPTS):
        try:
            return _rdb_storage(url)
        except ImportError as err:
            cause = err.__cause__ or err
            raise TunerError(
                f"--storage {_redact(url)}: missing database driver ({cause}); for PostgreSQL: "
                "pip install 'psycopg[binary]'"
            ) from None
        except Exception as err:  # SQLAlchemy/driver errors: bad URL, refused connection, ...
            if attempt + 1 < OPEN_ATTEMPTS and _is_creation_race(err):
                time.sleep(0.2 * (attempt + 1))
                continue
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TunerError(f"--storage {_redact(url)}: cannot open ({reason})") from None
    raise AssertionError("unreachable")


def _journal_storage(url: str, path: Path) -> JournalStorage:
    """An Optuna journal file on a (shared) disk: a new file, or one written by Optuna."""
    if not path.parent.is_dir():
        raise TunerError(f"--storage {url}: folder {path.parent} does not exist")
    if path.is_dir():
        raise TunerError(f"--storage {url}: {path} is a folder; name a file in it")
    try:
        if path.exists() and not _is_journal(path):
            raise TunerError(
                f"--storage {url}: {path} is not an Optuna journal (its first line is not a "
                "journal record); name a new file, or one that tune wrote"
            )
        if path.exists() and _cut_short(path):  # Optuna would append after the cut record,
            raise TunerError(  # and every later read fail on the line they make together
                f"--storage {url}: the last record of {path} is cut short (a run killed while "
                "writing it?); delete what follows its last newline (every finished trial "
                "stays) and run again"
            )
        broken = _broken_record(path) if path.exists() else None
        if broken is not None:  # Optuna reads past it until a record follows, then fails
            raise TunerError(f"--storage {url}: line {broken} of {path} is no journal record")
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as err:
        raise TunerError(f"--storage {url}: cannot open ({err.strerror or err})") from None


def _broken_record(path: Path) -> int | None:
    """The number of the first line of the journal that is not a JSON record, or None."""
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                json.loads(line)
            except ValueError:
                return number
    return None


def _cut_short(path: Path, looks: int = 3) -> bool:
    """Whether the journal's last line lacks its newline, in each of ``looks`` looks 0.1 s
    apart (another worker may be writing a record right now)."""
    for look in range(looks):
        with path.open("rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return False
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return False
        if look + 1 < looks:
            time.sleep(0.1)
    return True


def _is_journal(path: Path) -> bool:
    """Whether a file is empty or starts with a journal record (one JSON object a line)."""
    with path.open("rb") as f:
        first = f.readline(1 << 20)
    if not first:
        return True
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and "op_code" in record


def _in_memory_sqlite(url: str) -> bool:
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return False  # RDBStorage says what is wrong with it
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def _rdb_storage(url: str) -> RDBStorage:
    sqlite = url.startswith("sqlite")
    # SQLite: no implicit transactions from Python's sqlite3 module; see _begin_immediate
    engine_kwargs = {"connect_args": {"isolation_level": None, "timeout": SQLITE_WAIT_S}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        storage = RDBStorage(
            url,
            engine_kwargs=engine_kwargs if sqlite else None,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    if sqlite:
        sqlalchemy.event.listen(storage.engine, "begin", _begin_immediate)
    return storage


def _begin_immediate(connection: sqlalchemy.engine.Connection) -> None:
    """Start every SQLite transaction holding the database's write lock.

    Optuna claims an enqueued (WAITING) trial by reading its row with SELECT ... FOR UPDATE and
    then setting it RUNNING. SQLite ignores FOR UPDATE and Python's sqlite3 module runs the
    read outside any transaction, so two workers could both read WAITING, both claim the
    trial and run it; the second to finish then died with "Cannot tell a COMPLETE trial".
    (Enqueued trials: the recipe's defaults, and the heartbeat's retries of stale trials.)
    Taking the lock at BEGIN makes read-then-write atomic, as the row lock does elsewhere.
    """
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _is_creation_race(err: Exception) -> bool:
    """Workers creating the same new database's tables at once: the loser retries."""
    text = str(err).lower()
    return any(word in text for word in ("unique", "duplicate", "already exists", "locked"))


def _redact(url: str) -> str:
    """The URL without a password."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


def study_name(base: str, device_name: str, seq_len: int) -> str:
    """The study of one device and length within a tuning job named ``base``."""
    return f"{base}:{device_name}:n{seq_len}"


def open_study(
    storage: BaseStorage,
    name: str,
    sampler: optuna.samplers.BaseSampler,
    meta: dict[str, Any],
    directions: Sequence[str] = ("minimize",),
) -> optuna.Study:
    """Create or join study ``name`` (one objective per direction); ``meta`` must match what
    the study was started with."""
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        directions=list(directions),
        load_if_exists=True,
    )
    recorded = study.user_attrs
    if not recorded:
        for key, value in meta.items():
            study.set_user_attr(key, value)
    diff = [k for k, v in meta.items() if k in recorded and recorded[k] != v]
    if diff:
        k = diff[0]
        raise TunerError(
            f"study {name!r} was started with {k}={recorded[k]!r}, not {meta[k]!r}; "
            "use another --study (or --out) for different settings"
        )
    fail_interrupted_trials(study)
    return study


def this_worker() -> dict[str, Any]:
    """What names this process among every other, now and later: host, PID namespace, boot,
    PID and start time (PIDs are reused; the namespace, boot and start as Linux's /proc says
    them, else None)."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid_space": _read("/proc/self/ns/pid", link=True),
        "boot": _read("/proc/sys/kernel/random/boot_id"),
        "pid": pid,
        "start": _process_start(pid),
    }


def worker_ended(worker: dict[str, Any]) -> bool:
    """Whether the process :func:`this_worker` described has ended; False where this process
    cannot tell (another host or PID namespace: it may be running there)."""
    here = this_worker()
    if worker.get("host") != here["host"] or worker.get("pid_space") != here["pid_space"]:
        return False
    if None not in (worker.get("boot"), here["boot"]) and worker.get("boot") != here["boot"]:
        return True  # the machine started again since
    pid = worker.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process: alive
    start = _process_start(pid)
    return start == "ended" or (worker.get("start") is not None and start != worker["start"])


def _read(path: str, link: bool = False) -> str | None:
    try:
        return os.readlink(path) if link else Path(path).read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks after boot), "ended" for a zombie, None where
    /proc does not say."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after the name, which may hold spaces
    return "ended" if fields[0] in ("Z", "X") else fields[19]


def fail_interrupted_trials(study: optuna.Study) -> None:
    """Fail each trial left RUNNING by a worker that has ended (killed: it never told it),
    saying so in its system attribute ``attncompose:interrupted``, and queue its knobs once
    more (not a rerun's: its knobs may be what killed the worker), as RDB storages'
    heartbeat does. Another live worker's running trial stays."""
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.system_attrs.get(WORKER_ATTR)
        if not isinstance(worker, dict) or not worker_ended(worker):
            continue
        why = (
            f"its worker (pid {worker['pid']} on {worker['host']}) ended while it ran; failed "
            "when the study was opened again"
        )
        try:
            storage.set_trial_system_attr(trial._trial_id, INTERRUPTED_ATTR, why)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another worker opening the study failed it first
        knobs = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
        if knobs and RETRY_ATTR not in trial.system_attrs:
            study.add_trial(
                optuna.trial.create_trial(
                    state=TrialState.WAITING,
                    system_attrs={"fixed_params": knobs, RETRY_ATTR: trial.number},
                )
            )


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed and pruned trials of the study (by every worker)."""
    return study.get_trials(deepcopy=False, states=FINISHED)


class TuningInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the trials; every finished one is kept in the study."""


class _Interrupted(BaseException):
    """Ctrl-C inside a trial, carried past Optuna's handler (which logs it with a traceback)."""


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    n_trials: int,
    timeout_s: float | None,
    on_trial: Callable[[optuna.Study], None] = lambda study: None,
) -> None:
    """Run trials until the study holds ``n_trials`` finished ones (counting every worker's),
    or ``timeout_s`` passes. A trial that raises an unexpected error stops the run; Ctrl-C
    fails the trial it interrupts (as Optuna would) and raises :class:`TuningInterrupted`."""
    start = time.monotonic()
    running: list[optuna.Trial] = []
    worker = this_worker()

    def interruptible(trial: optuna.Trial) -> float:
        running[:] = [trial]
        trial.storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, worker)
        try:
            return objective(trial)
        except KeyboardInterrupt:
            raise _Interrupted from None

    try:
        with interrupts_outside_storage():
            while len(finished_trials(study)) < n_trials:
                if timeout_s is not None and time.monotonic() - start >= timeout_s:
                    return
                study.optimize(interruptible, n_trials=1, catch=(), gc_after_trial=False)
                running.clear()
                on_trial(study)
    except (KeyboardInterrupt, _Interrupted):
        if running:  # told FAIL unless Optuna had told it already: not finished, not lost
            study.tell(running[0], state=TrialState.FAIL, skip_if_finished=True)
        done = len(finished_trials(study))
        raise TuningInterrupted(
            f"{done} finished trial{'s' * (done != 1)} of the study it stopped kept, as is "
            "every earlier study's; run the same command again to resume"
        ) from None


def _in_storage(frame: Any) -> bool:
    """Whether ``frame`` or a caller of it runs storage code (SQLAlchemy, sqlite3, Optuna's)."""
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(STORAGE_MODULES):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def interrupts_outside_storage() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt only outside storage code.

    A KeyboardInterrupt raised inside SQLAlchemy can leave an SQLite connection holding the
    write lock (BEGIN IMMEDIATE, see :func:`_begin_immediate`) where nothing rolls it back,
    so failing the interrupted trial then waited for that lock and died with "database is
    locked". A Ctrl-C that lands in storage code is retried a moment later, until it lands
    outside; one still pending when the block ends is raised there. Outside the main thread
    (where Python cannot install signal handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = {"active": True, "pending": False}
    lock = threading.Lock()  # no retry trips once the previous handler is back

    def retry() -> None:
        with lock:
            if state["active"]:
                _thread.interrupt_main(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if _in_storage(frame):
            state["pending"] = True
            threading.Timer(INTERRUPT_RETRY_S, retry).start()
            return
        state["pending"] = False
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        with lock:
            state["active"] = False
        signal.signal(signal.SIGINT, previous)
    if state["pending"]:
        raise KeyboardInterrupt
