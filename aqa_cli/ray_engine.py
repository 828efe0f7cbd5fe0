"""``aqa extract-features --engine ray``: the local engine's per-video step, on the workers of a Ray cluster.

The pattern is Ray's batch inference with stateful workers. Each worker is a Ray
actor that builds one backbone when it starts and then extracts whole videos,
one call per video, through :func:`aqa_cli.extract.extract_video`, the same
function the local engine calls: the same streaming decode, the same
temporaries renamed into place with the sidecar last, the same sidecar.

The driver (the ``aqa`` process) decides everything about the batch: the output
names, which videos are already complete (it reads the sidecars; it never
needs the model), which worker gets which video, and, when a worker dies,
whether the video it held was finished before the death or goes to another
worker. A worker only ever gets one video at a time, so a death loses at most
one video's work, and that video's outputs are either complete or absent
(temporaries aside, which the next start on that machine removes).

Why Ray Core actors and not Ray Data's ``ActorPoolStrategy``: the unit of work
is a whole video whose outputs the worker writes itself, so there is no dataset
to stream back, and Ray Data would add pyarrow, blocks and its own progress and
retry rules (a retried block re-runs every video in it). ``ray.util.ActorPool``
loses which input a failed call belonged to, which is what the driver needs to
decide about a dead worker's video. The dispatch loop here is ``ray.wait`` over
one outstanding call per worker: Ray schedules, places and restarts the actors.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aqa_cli import __version__
from aqa_cli.backbones import Backbone
from aqa_cli.errors import AqaError
from aqa_cli.extract import (ExtractEvents, ExtractOutcome, ExtractSettings, VideoJob, completed_outcome,
                             extract_video, failed_outcome, plan_jobs)
from aqa_cli.fileio import process_alive, remove_stale_temporaries
from aqa_cli.recipes import Recipe

RAY_VERSION = "2.60.0"  # the `aqa[ray]` pin
# How many workers may die holding the same video before it counts as a failure (a video that crashes the
# decoder would otherwise take down every worker in turn).
MAX_ATTEMPTS = 3
_POLL_S = 0.5  # ray.wait timeout: how quickly Ctrl-C is noticed
_START_ATTEMPTS = 3


@dataclass
class RayOptions:
    """Where and how wide to run. None means: work it out from the cluster (see :func:`plan_workers`)."""

    address: str | None = None  # a running cluster ("auto", "HOST:PORT", "ray://…"); None: RAY_ADDRESS or a new one
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    threads_per_worker: int | None = None  # torch intra-op threads; None: the local engine's count


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker needs to build the same backbone the driver checked."""

    backbone: str
    weights: str | None
    device: str
    precision: str
    recipe: Recipe
    identity: dict
    threads: int
    extract: ExtractSettings
    cwd: str
    out_dir: str
    aqa_version: str
    code: str  # code_fingerprint() of the driver's aqa_cli


def code_fingerprint() -> str:
    """sha256 over aqa_cli's Python sources: workers must run the driver's code, not just its version number."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


class ExtractWorker:
    """A Ray actor holding one backbone; ``extract`` runs one whole video.

    Setup errors (weights missing on this node, no GPU, another aqa version) do not kill the actor,
    which Ray would restart forever: they are kept and reported by :meth:`ready`, and the driver
    stops the run with them.
    """

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.backbone: Backbone | None = None
        self.error: str | None = None
        try:
            self.backbone = self._build(settings)
        except AqaError as exc:
            self.error = exc.message
        except Exception as exc:  # noqa: BLE001 - reported to the driver on one line
            self.error = f"worker setup failed on {socket.gethostname()}: {type(exc).__name__}: " \
                         + " ".join(str(exc).split())[:300]

    @staticmethod
    def _build(s: WorkerSettings) -> Backbone:
        import torch

        from aqa_cli.backbones import create_backbone

        host = socket.gethostname()
        if code_fingerprint() != s.code:
            raise AqaError(f"node {host} runs other aqa code ({__version__}, {Path(__file__).parent}) than the "
                           f"driver ({s.aqa_version})", fix="install the same aqa on every node")
        # Relative input paths and the sidecars' "video" field mean what they mean on the driver.
        if Path(s.cwd).is_dir():
            os.chdir(s.cwd)
        # The local engine's thread count, not Ray's OMP_NUM_THREADS=<num_cpus>: README, "Same outputs".
        torch.set_num_threads(s.threads)
        if not Path(s.out_dir).is_dir():  # the driver made it: this node does not share its filesystem
            raise AqaError(f"the output folder {s.out_dir} is not on node {host}",
                           fix="--out must be a folder every node shares, at the same path")
        # A restarted worker clears what its killed predecessor on this machine was writing.
        remove_stale_temporaries(s.out_dir)
        bb = create_backbone(s.backbone, device=s.device, precision=s.precision, weights=s.weights)
        bb.recipe = s.recipe
        if bb.identity() != s.identity:
            raise AqaError(f"node {host} has other {bb.spec.weights} weights (sha256 "
                           f"{bb.identity()['weights_sha256'][:12]}…, the driver {s.identity['weights_sha256'][:12]}…)",
                           fix=f"run `aqa weights fetch {bb.spec.weights} --force` on that node")
        return bb

    def ready(self) -> dict:
        import torch

        bb = self.backbone
        return {"pid": os.getpid(), "host": socket.gethostname(), "error": self.error,
                "device": None if bb is None else str(bb.device), "threads": torch.get_num_threads()}

    def extract(self, job: VideoJob) -> ExtractOutcome:
        if self.backbone is None:
            raise RuntimeError(self.error)
        # The driver has decided that this video needs extracting: no second resume check here.
        return extract_video(job, self.backbone, self.settings.extract, resume=False)


def import_ray(local: bool = False):
    """Ray, or a one-line error saying how to install it.

    ``local``: for a new single-machine instance. Ray then binds every server to 127.0.0.1
    (otherwise it swaps 127.0.0.1 for the machine's routable address); checked after start.
    """
    if local:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for Ray's own child processes
    try:
        import ray
        from ray._private import ray_constants
    except ImportError:
        raise AqaError("--engine ray needs Ray, which is not installed",
                       fix=f"pip install 'aqa[ray]' (ray=={RAY_VERSION})") from None
    if local:
        ray_constants.ENABLE_RAY_CLUSTER = False  # read when the instance starts, whenever ray was imported
    return ray


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    gpus: float
    cpus: float
    threads: int


def plan_workers(options: RayOptions, device: str, nodes: list[dict], threads: int) -> WorkerPlan:
    """Workers and their resources, from the options and the cluster's nodes (Ray's ``Resources`` dicts).

    Defaults: one GPU per worker when the device may be a GPU and the cluster has GPUs, else none;
    one worker per GPU (GPU workers) or per ``threads`` CPUs (CPU workers, ``threads`` torch threads
    each), so that a CPU node is not oversubscribed.
    """
    cpus = options.cpus_per_worker
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    if options.gpus_per_worker is not None:
        gpus = options.gpus_per_worker
    elif device == "cpu" or total_gpus == 0:
        gpus = 0.0
    else:
        gpus = 1.0
    if device.startswith("cuda") and gpus == 0:
        raise AqaError(f"--device {device} but the workers get no GPU", fix="pass --gpus-per-worker 1, or --device cpu")
    if options.workers is not None:
        workers = options.workers
    elif gpus > 0:
        workers = max(1, int(total_gpus // gpus))
    else:
        workers = max(1, int(sum(n.get("CPU", 0) for n in nodes) // max(cpus, threads)))
    if not any(n.get("GPU", 0) >= gpus and n.get("CPU", 0) >= cpus for n in nodes):
        raise AqaError(f"no node of the cluster has {gpus:g} GPU(s) and {cpus:g} CPU(s) for one worker",
                       fix="lower --gpus-per-worker / --cpus-per-worker, or add nodes (`ray status` lists them)")
    return WorkerPlan(workers=workers, gpus=gpus, cpus=cpus, threads=threads)


def _stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _auth_refused(exc: BaseException) -> bool:
    """Whether Ray refused to connect for want of the cluster's token (Ray >= 2.52's token authentication).

    ``ray.init`` wraps the refusal: a ConnectionError whose cause is an ``AuthenticationError``, or that error
    itself when ``RAY_AUTH_MODE=token`` is set without a token.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _token_problem() -> str:
    """What is wrong with this process's token settings, in words."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return "RAY_AUTH_MODE is not 'token' here"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or (Path.home() / ".ray" / "auth_token").is_file()):
        return "no token is set here (RAY_AUTH_TOKEN)"
    return "this token is not the cluster's"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


def extract_with_ray(videos: Sequence[Path], probe: Backbone, out_dir: Path, options: RayOptions,
                     settings: ExtractSettings, *, backbone: str, weights: str | None, device: str, precision: str,
                     events: ExtractEvents | None = None) -> list[ExtractOutcome]:
    """Extract ``videos`` into ``out_dir`` on Ray workers; outcomes in input order, as the local engine's.

    ``probe`` is the backbone built on the driver (weights checked there, before any cluster work):
    its identity and recipe decide which outputs are complete, and every worker must match it.
    """
    events = events or ExtractEvents()
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    identity, recipe = probe.identity(), probe.recipe

    outcomes: dict[int, ExtractOutcome] = {}
    todo: deque[tuple[int, VideoJob]] = deque()
    for i, job in enumerate(plan_jobs(videos, out_dir)):
        if isinstance(job, ExtractOutcome):
            outcomes[i] = job
            continue
        try:
            done = None if settings.overwrite else completed_outcome(job, identity, recipe, settings.show_pred)
        except AqaError as exc:
            done = failed_outcome(job.video, exc)
        if done is None:
            todo.append((i, job))
        else:
            outcomes[i] = done
    for i in sorted(outcomes):
        events.video_finished(outcomes[i])
    # Largest file first: the run ends when its longest video does, so long videos must not start last.
    todo = deque(sorted(todo, key=lambda item: -_size(item[1].video)))
    if todo:
        import torch

        # The local engine's thread count unless told otherwise: the same GEMM splits, the same bytes.
        threads = options.threads_per_worker or torch.get_num_threads()
        worker = WorkerSettings(backbone=backbone, weights=weights, device=device, precision=precision,
                                recipe=recipe, identity=identity, threads=threads, extract=settings, cwd=os.getcwd(),
                                out_dir=str(out_dir), aqa_version=__version__, code=code_fingerprint())
        with _RayRun(options, device, worker, events) as run:
            run.process(todo, outcomes)
    return [outcomes[i] for i in sorted(outcomes)]


class _RayRun:
    """Connect to (or start) Ray, start the workers, hand out videos, and always clean up."""

    def __init__(self, options: RayOptions, device: str, settings: WorkerSettings, events: ExtractEvents):
        self.options, self.device, self.settings, self.events = options, device, settings, events
        self.ray = None
        self.started_here = False
        self.actors: list = []
        self.pids: dict[int, tuple[str, int]] = {}  # actor index → (host, pid) of its current process

    # ------------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> _RayRun:
        address = self.options.address or os.environ.get("RAY_ADDRESS") or None
        logging.getLogger("ray").setLevel(logging.ERROR)
        ray = self.ray = import_ray(local=address is None)
        aqa_root = str(Path(__file__).resolve().parents[1])
        # Workers import this aqa (a checkout on the path, or the install), not whatever their node finds first.
        pythonpath = os.pathsep.join(p for p in (aqa_root, os.environ.get("PYTHONPATH", "")) if p)
        runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                      runtime_env=runtime_env)
        if address is None:
            import torch

            plan_cpus = (self.options.workers or 1) * self.options.cpus_per_worker
            kwargs.update(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(plan_cpus)),
                          num_gpus=torch.cuda.device_count(), object_store_memory=256 * 2**20)
        else:
            kwargs.update(address=address)
        # Ray gives a new node 30 s to register with its GCS; a loaded machine can miss that once.
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                ray.init(**kwargs)
                break
            except Exception as exc:  # noqa: BLE001 - Ray raises bare Exception, RuntimeError or ConnectionError
                ray.shutdown()
                if _auth_refused(exc):  # a retry would be refused the same way, after another 30 s
                    raise AqaError(f"the Ray cluster at {address} refused this driver: it uses token "
                                   f"authentication and {_token_problem()}",
                                   fix="export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token> "
                                       "(`ray get-auth-token` on the head node), as on every node, then rerun "
                                       "(docs/scale-out.md)") from None
                if attempt == _START_ATTEMPTS:
                    raise AqaError(f"cannot start or join Ray at {address or 'a new local instance'} "
                                   f"({_one_line(exc)})",
                                   fix="check --address / RAY_ADDRESS (`ray status` on the head node); on a "
                                       "loaded machine, retry") from None
        self.started_here = address is None
        if self.started_here:
            ip = ray.util.get_node_ip_address()
            if ip != "127.0.0.1":
                ray.shutdown()
                raise AqaError(f"the local Ray instance started on {ip}, not 127.0.0.1 only",
                               fix=f"pass --address of a cluster you started, or install ray=={RAY_VERSION}")
        return self

    def __exit__(self, *exc_info) -> None:
        ray = self.ray
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        ray.shutdown()
        # A killed worker leaves its temporary behind; once its process is gone it is stale.
        here = socket.gethostname()
        deadline = time.monotonic() + 10
        for host, pid in self.pids.values():
            while host == here and process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        remove_stale_temporaries(self.settings.out_dir)

    # ------------------------------------------------------------------------------------------ the work

    def _start_workers(self) -> WorkerPlan:
        ray = self.ray
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        plan = plan_workers(self.options, self.device, nodes, self.settings.threads)
        # Ray restarts a worker whose process dies (max_restarts=-1); the driver resubmits its video itself
        # (max_task_retries=0), after checking whether the dead worker had finished it.
        remote = ray.remote(ExtractWorker).options(num_cpus=plan.cpus, num_gpus=plan.gpus, max_restarts=-1,
                                                   max_task_retries=0)
        self.actors = [remote.remote(self.settings) for _ in range(plan.workers)]
        return plan

    def process(self, todo: deque[tuple[int, VideoJob]], outcomes: dict[int, ExtractOutcome]) -> None:
        ray, events = self.ray, self.events
        from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

        plan = self._start_workers()
        events.note(f"Ray: {plan.workers} worker(s), each {plan.gpus:g} GPU, {plan.cpus:g} CPU, "
                    f"{plan.threads} torch thread(s)")
        attempts: dict[int, int] = {}
        inflight: dict = {}  # ObjectRef → (actor index, None for ready() or (video index, job, sidecar stamp))
        for k, actor in enumerate(self.actors):
            inflight[actor.ready.remote()] = (k, None)
        idle: list[int] = []
        failed_starts: dict[int, int] = {}  # actor index → ready() calls lost in a row

        def dispatch() -> None:
            while idle and todo:
                k = idle.pop(0)
                i, job = todo.popleft()
                attempts[i] = attempts.get(i, 0) + 1
                inflight[self.actors[k].extract.remote(job)] = (k, (i, job, _stamp(job.sidecar_path)))

        while todo or any(work is not None for _, work in inflight.values()):
            dispatch()
            if not inflight:
                raise AqaError(f"every Ray worker is gone, {len(todo)} video(s) not extracted",
                               fix="check the cluster (`ray status`) and rerun: complete videos are kept")
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=_POLL_S)
            for ref in ready:
                k, work = inflight.pop(ref)
                if work is None:  # a worker (re)started
                    try:
                        info = ray.get(ref)
                    except RayActorError as exc:  # died while starting (killed, out of memory): Ray restarts it
                        failed_starts[k] = failed_starts.get(k, 0) + 1
                        if isinstance(exc, ActorDiedError) and failed_starts[k] >= MAX_ATTEMPTS:
                            events.note(f"a Ray worker is gone for good ({_one_line(exc)[:160]})")
                            continue
                        inflight[self.actors[k].ready.remote()] = (k, None)
                        continue
                    if info["error"]:
                        raise AqaError(info["error"])
                    failed_starts[k] = 0
                    self.pids[k] = (info["host"], info["pid"])
                    idle.append(k)
                    continue
                i, job, stamp = work
                try:
                    outcome = ray.get(ref)
                except RayTaskError as exc:  # a bug, not a bad video (those come back as failed outcomes)
                    outcome = ExtractOutcome(job.video, "failed", error=f"{job.video}: the worker raised "
                                             f"{_one_line(exc.cause if exc.cause is not None else exc)} — "
                                             "please report it")
                    idle.append(k)
                except RayActorError as exc:
                    # The worker died holding this video: finished before the death, or to be done again.
                    inflight[self.actors[k].ready.remote()] = (k, None)
                    outcome = self._after_death(k, i, job, stamp, attempts[i], exc, todo)
                    if outcome is None:
                        continue
                else:
                    idle.append(k)
                outcomes[i] = outcome
                if outcome.status == "extracted":
                    events.clips_done(outcome.clips)
                events.video_finished(outcome)

    def _after_death(self, k: int, i: int, job: VideoJob, stamp: tuple | None, attempt: int, exc: BaseException,
                     todo: deque) -> ExtractOutcome | None:
        cause = _one_line(exc)
        host, pid = self.pids.get(k, ("?", "?"))
        worker = f"pid {pid} on {host}"
        s = self.settings
        if _stamp(job.sidecar_path) != stamp:  # its sidecar was (re)written after the video was handed out
            try:
                done = completed_outcome(job, s.identity, s.recipe, s.extract.show_pred)
            except AqaError:
                done = None
            if done is not None:
                self.events.note(f"a Ray worker died after finishing {job.video}; its outputs are complete")
                done.status = "extracted"
                return done
        if attempt >= MAX_ATTEMPTS:
            return ExtractOutcome(job.video, "failed", error=f"{job.video}: {attempt} Ray workers died extracting "
                                  f"it (last: {cause}) — check the file (`aqa extract-features` on it alone) "
                                  "and the workers' memory")
        self.events.note(f"a Ray worker ({worker}) died extracting {job.video}; "
                         f"retrying it (attempt {attempt + 1} of {MAX_ATTEMPTS})")
        todo.append((i, job))
        return None


