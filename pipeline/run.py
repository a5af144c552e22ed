"""``rlsynth run``: the whole job as Ray tasks, resumable, with a report.

Stages: source → target agent → generator (+ world model for dynamics guidance) → synthesize (N shard
tasks, each sampling with its own seeds and writing one Parquet part; one atomic commit when every part
exists) → fidelity → agents (real / synthetic / mixed / PGD loop; one task per job) → report.

Each stage's output lives in ``<runs>/stages/<stage>-<key>/`` where the key hashes the stage's config
and the keys (or content hashes) of its inputs; a stage whose ``done.json`` exists is skipped. A re-run
therefore resumes after a crash or Ctrl-C, and a changed config re-runs only the stages that depend on
what changed. Synthesis is deterministic given its key, so a killed and resumed run commits the same
content as an uninterrupted one.

Ray: by default a private cluster started for the run (this machine's CPUs, no dashboard) that listens
on loopback only and requires a token made for it (see :func:`start_private_cluster`); it never attaches
to another cluster found on the machine. An existing cluster is used only when named (``--address`` /
``RAY_ADDRESS``), and is probed first so a dead address fails in seconds. Paths (catalog, runs folder)
must be visible to every node: on a multi-node cluster use shared storage or an object-store catalog URI.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from rlsynth.datasets.errors import RlsynthError
from rlsynth.generators.options import SamplerSettings
from rlsynth.guidance.options import GuidanceConfig
from rlsynth.pipeline.config import RunConfig, check_run_name, to_dict

FAIL_ONCE_ENV = "RLSYNTH_FAIL_SHARD_ONCE"
"""Fault injection for tests: a path; the first shard task to find it missing creates it and fails."""


def stage_key(stage: str, config: Any, inputs: dict[str, Any]) -> str:
    blob = json.dumps({"stage": stage, "config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Stage:
    name: str
    key: str
    folder: Path

    @property
    def done(self) -> bool:
        return (self.folder / "done.json").is_file()

    def result(self) -> dict[str, Any]:
        return json.loads((self.folder / "done.json").read_text())

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        tmp = self.folder / "done.json.tmp"
        tmp.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp, self.folder / "done.json")
        return result


class Runner:
    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        stages_dir: Path,
        catalog_uri: str | None,
        log: Callable[[str], None],
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.stages_dir = stages_dir
        self.catalog_uri = catalog_uri
        self.log = log
        self.status: dict[str, str] = {}

    def locate(self, name: str, config: Any, inputs: dict[str, Any]) -> Stage:
        key = stage_key(name, config, inputs)
        return Stage(name, key, self.stages_dir / f"{name}-{key}")

    def stage(
        self, name: str, config: Any, inputs: dict[str, Any], work: Callable[[Path], dict[str, Any]]
    ) -> dict[str, Any]:
        st = self.locate(name, config, inputs)
        if st.done:
            self.status[name] = "cached"
            self.log(f"[{name}] done earlier ({st.folder.name}), skipped")
            return st.result()
        st.folder.mkdir(parents=True, exist_ok=True)
        self.status[name] = "running"
        self.log(f"[{name}] running ({st.folder.name})")
        t0 = time.perf_counter()
        result = work(st.folder)
        result["seconds"] = time.perf_counter() - t0
        self.status[name] = "done"
        self.log(f"[{name}] done in {result['seconds']:.0f} s")
        return st.finish(result)


# --- Ray tasks (plain functions wrapped with ray.remote at run time) ----------------------------------


def _task_train_agent(
    catalog_uri: str | None, ref: str, algo: str, steps: int, seed: int, out: str
) -> dict[str, Any]:
    import torch

    from rlsynth.datasets.catalog import Catalog
    from rlsynth.offline_rl.train import train_agent

    torch.set_num_threads(1)
    ds = Catalog(catalog_uri).read(ref)
    run = train_agent(algo, ds, Path(out), steps=steps, seed=seed, progress=False, lineage={"ref": ref})
    return {"agent": str(run.path), "seconds": run.seconds}


def _task_train_generator(
    catalog_uri: str | None, ref: str, kind: str, preset: str, steps: int | None, seed: int, out: str
) -> dict[str, Any]:
    from rlsynth.datasets.catalog import Catalog
    from rlsynth.generators.api import load_generator, record_refiner, train_generator

    cat = Catalog(catalog_uri)
    ds = cat.read(ref)

    def fit(k: str, folder: Path) -> float | None:
        res = train_generator(
            k, ds, folder, preset_name=preset, steps=steps, seed=seed, progress=False, source={"ref": ref}
        )
        return res.val_loss

    if kind == "autoregressive":
        # A drafter needs the trajectory model that refines its drafts: trained first, next to it, and
        # recorded in its config (so its checkpoint hash covers the choice).
        refiner = Path(out).parent / "refiner"
        fit("trajectory", refiner)
        val_loss = fit(kind, Path(out))
        record_refiner(Path(out), refiner)
    else:
        val_loss = fit(kind, Path(out))
    return {
        "folder": out,
        "checkpoint_hash": load_generator(out, device="cpu").checkpoint_hash,
        "val_loss": val_loss,
    }


@dataclass(frozen=True)
class SynthesisTask:
    """What every shard of one synthesis shares; each Ray shard task gets it as one value."""

    catalog_uri: str | None
    generator: str
    """The generator's folder."""
    source_ref: str
    """Start states (the source's catalog ref)."""
    seed: int
    """The run's seed; shard k samples with seed sample_seed(seed, k)."""
    sampler: SamplerSettings
    guidance: GuidanceConfig | None
    """With the target agent and world model filled in (None: unguided)."""
    shards: int = 1
    """How many shards the synthesis has (recorded in lineage)."""
    source: dict[str, Any] | None = None
    """How the start states are recorded in lineage (default: ``{"source": source_ref}``)."""


def _task_shard(task: SynthesisTask, txn: Any, index: int, n: int, episode_offset: int) -> dict[str, Any]:
    """Sample shard ``index`` and write it as part ``index`` of the open transaction (atomic per part);
    returns the part's row count, time and lineage (:func:`offline_rl.synthesis.combine_shards` joins
    the parts' lineages)."""
    import numpy as np
    import torch

    from rlsynth.datasets.catalog import Catalog
    from rlsynth.datasets.types import Transitions
    from rlsynth.generators.api import load_generator
    from rlsynth.offline_rl.synthesis import Shard, synthesize

    torch.set_num_threads(1)
    marker = os.environ.get(FAIL_ONCE_ENV)
    if marker and not Path(marker).exists():
        Path(marker).write_text(f"shard {index} failed once on purpose\n")
        raise RuntimeError(f"injected failure in shard {index}")
    gen = load_generator(task.generator, device="cpu")
    source = Catalog(task.catalog_uri).read(task.source_ref)
    t0 = time.perf_counter()
    made = synthesize(
        gen,
        source,
        n,
        task.sampler,
        task.guidance,
        seed=task.seed,
        source_ref=task.source or {"source": task.source_ref},
        shard=Shard(index, task.shards),
        producer={"name": "run"},
    )
    t = made.dataset.transitions
    cols = {c: np.array(getattr(t, c)) for c in Transitions.columns()}
    cols["episode_id"] = cols["episode_id"] + episode_offset
    part = txn.write_part(index, Transitions(**cols))
    seconds = time.perf_counter() - t0
    return {"index": index, "rows": len(t), "seconds": seconds, "part": part, "lineage": made.lineage}


def synthesis_guidance(
    g: GuidanceConfig, target_agent: str, world_model: str | None
) -> GuidanceConfig | None:
    """A run's synthesis guidance: ``g`` with the files it names, else the run's target agent (for the
    policy term) and trained world model; None when it has no terms."""
    if not g.terms:
        return None
    return replace(
        g,
        policy=g.policy or (target_agent if "policy" in g.terms else None),
        world_model=g.world_model or world_model,
    )


def pgd_guidance(g: GuidanceConfig) -> GuidanceConfig:
    """The PGD condition's guidance: ``g``'s policy term as configured; the loop fills in its agent."""
    return replace(g, terms=("policy",), policy=None, world_model=None)


# --- the run ------------------------------------------------------------------------------------------


def run_bounded(
    ray: Any,
    task: Any,
    arg_list: list[tuple[Any, ...]],
    max_in_flight: int,
    what: str,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """``task(*args)`` for every args, at most ``max_in_flight`` at once; results in completion order."""
    pending: list[Any] = []
    results: list[dict[str, Any]] = []
    todo = list(arg_list)
    while todo or pending:
        while todo and len(pending) < max_in_flight:
            pending.append(task.remote(*todo.pop(0)))
        ready, pending = ray.wait(pending, num_returns=1)
        results += ray.get(ready)
        log(f"[{what}] {len(results)}/{len(arg_list)}")
    return results


# --- Ray: which cluster, and keeping the embedded one private -----------------------------------------

LOOPBACK = "127.0.0.1"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
PROBE_TIMEOUT_S = 3.0
"""A named cluster's address must accept a TCP connection within this, or the run is refused."""


@dataclass(frozen=True)
class RayTarget:
    """Where a run's tasks go."""

    address: str | None
    """An existing cluster's address, or None: a private cluster started for this run."""
    origin: str
    """What named it: ``--address``, ``RAY_ADDRESS`` or ``default`` (nothing did)."""


def ray_target(address: str | None) -> RayTarget:
    """``--address`` first, then a non-empty ``RAY_ADDRESS`` (``ray job submit`` sets it for the job's
    driver); otherwise a private cluster. Ray's own discovery of "the cluster on this machine"
    (``/tmp/ray/ray_current_cluster``) is never used: a cluster is attached to only when named."""
    if address:
        return RayTarget(address, "--address")
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env != "local":
        return RayTarget(env, "RAY_ADDRESS")
    return RayTarget(None, "default")


def _host_port(target: RayTarget) -> tuple[str, int]:
    where = f"{target.origin} {target.address!r}"
    rest = str(target.address).split("://", 1)[-1]
    try:
        parts = urlsplit(f"//{rest}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise RlsynthError(f"{where}: expected HOST:PORT (or ray://HOST:PORT)")
    return host, port


def check_ray_address(address: str | None) -> RayTarget:
    """The run's Ray target; a named cluster must accept a TCP connection within PROBE_TIMEOUT_S, so a
    closed port or an unreachable host is refused in seconds (``ray.init`` would retry for minutes)."""
    target = ray_target(address)
    if target.address is None or target.address == "auto":
        return target
    host, port = _host_port(target)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise RlsynthError(
            f"{target.origin} {target.address}: no Ray cluster answers at {host}:{port} ({reason})"
        ) from None
    return target


@dataclass(frozen=True)
class PrivateCluster:
    """A Ray cluster started for one run (see :func:`start_private_cluster`)."""

    gcs_address: str
    temp_dir: Path
    token: str
    num_cpus: int
    saved_env: tuple[tuple[str, str | None], ...]
    """The environment variables changed for it, with their earlier values (None: unset)."""
    saved_enable_cluster: bool


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def _short_temp_root() -> str:
    # Ray puts AF_UNIX sockets under its temp dir and their paths must stay under 108 bytes.
    root = tempfile.gettempdir()
    return root if len(root) <= 20 else "/tmp"


def _private_env(token: str) -> dict[str, str | None]:
    """What the private cluster's processes (all inherit this process's environment) must see."""
    return {
        # Ray on Linux advertises and binds its servers on the machine's network address; with
        # cluster mode off (its macOS/Windows default) every server binds loopback: GCS, raylet, object
        # manager and core workers (IPv4-mapped 127.0.0.1), agents and metrics (127.0.0.1).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # Token authentication on whatever the user's shell says (README once advised disabling it), with
        # a fresh token held only in the environment of this process tree: nothing written to ~/.ray.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_AUTH_TOKEN_PATH": None,
        # Never a cluster named by the environment, and no fixed metrics ports that a second cluster on
        # the machine (a user's head, another run) already holds.
        "RAY_ADDRESS": None,
        "AUTOSCALER_METRIC_PORT": str(_free_loopback_port()),
        "DASHBOARD_METRIC_PORT": str(_free_loopback_port()),
    }


def _apply_env(values: dict[str, str | None]) -> tuple[tuple[str, str | None], ...]:
    saved = tuple((k, os.environ.get(k)) for k in values)
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return saved


def _reload_ray_auth() -> None:
    """Ray caches the auth mode (RayConfig) and the token per process: reread both from the environment,
    or this process would go on presenting another cluster's token (or none)."""
    raylet = importlib.import_module("ray._raylet")  # its stubs omit these two
    raylet.Config.initialize("")
    raylet.AuthenticationTokenLoader.instance().reset_cache()


def start_private_cluster(num_cpus: int | None = None) -> PrivateCluster:
    """Start this process's own Ray cluster: listening on loopback only, token authentication required
    (a fresh 256-bit token, never written to disk), its own temp dir inside a 0700 folder (so its Unix
    sockets and logs are this user's), never attached to another cluster on the machine
    (``address="local"`` skips Ray's discovery of one)."""
    token = secrets.token_hex(32)
    saved = _apply_env(_private_env(token))
    import ray
    from ray._private import ray_constants

    # Read at import; ray may have been imported before the environment changed.
    saved_enable = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray makes its temp dir world-writable (0777) for shared machines; inside a 0700 folder of ours its
    # Unix sockets and logs stay reachable by this user only.
    temp = Path(tempfile.mkdtemp(prefix="rlsynth-", dir=_short_temp_root()))
    cpus = num_cpus or os.cpu_count() or 1
    cluster = PrivateCluster("", temp, token, cpus, saved, saved_enable)
    try:
        _reload_ray_auth()
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            _node_ip_address=LOOPBACK,
            _temp_dir=str(temp / "ray"),
        )
        node_ip = ray.util.get_node_ip_address()
        if node_ip not in LOOPBACK_HOSTS:
            raise RlsynthError(f"Ray put its private cluster on {node_ip}, not loopback; refusing to run")
        gcs = str(ray.get_runtime_context().gcs_address)
    except BaseException:
        stop_private_cluster(cluster)
        raise
    return PrivateCluster(gcs, temp, token, cpus, saved, saved_enable)


def stop_private_cluster(cluster: PrivateCluster) -> None:
    """Stop every process of the cluster and put the environment back as it was."""
    import ray
    from ray._private import ray_constants

    ray.shutdown()
    _apply_env(dict(cluster.saved_env))
    ray_constants.ENABLE_RAY_CLUSTER = cluster.saved_enable_cluster
    _reload_ray_auth()
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def _attach(target: RayTarget) -> None:
    import ray

    try:
        ray.init(address=target.address, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as e:  # Ray raises ConnectionError, AuthenticationError, RuntimeError, ValueError
        lines = str(e).strip().splitlines()
        reason = lines[0][:200] if lines else type(e).__name__
        raise RlsynthError(f"{target.origin} {target.address}: Ray could not connect: {reason}") from None


@contextlib.contextmanager
def ray_session(target: RayTarget, log: Callable[[str], None]) -> Iterator[Any]:
    """Ray for the duration of the block, and one line saying which cluster it is."""
    existing = sys.modules.get("ray")
    if existing is not None and existing.is_initialized():
        log("ray: using the Ray session this process already started")
        yield existing
        return
    if target.address is None:
        cluster = start_private_cluster()
        log(
            f"ray: started a private cluster at {cluster.gcs_address} ({cluster.num_cpus} CPUs, loopback "
            "only, token authentication); another cluster is used only with --address or RAY_ADDRESS"
        )
        try:
            yield sys.modules["ray"]
        finally:
            stop_private_cluster(cluster)
        return
    _attach(target)
    import ray

    log(f"ray: attached to the cluster at {target.address} (from {target.origin})")
    try:
        yield ray
    finally:
        ray.shutdown()


def init_ray(address: str | None) -> Any:
    """Ray for a script (the benchmarks): like ``rlsynth run``'s, left running until the process exits."""
    import ray

    if not ray.is_initialized():
        target = check_ray_address(address)
        if target.address is None:
            start_private_cluster()
        else:
            _attach(target)
    return ray


def _gpu_options(ray: Any) -> dict[str, Any]:
    return {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) >= 1 else {}


def run_pipeline(
    cfg: RunConfig,
    run_dir: Path,
    *,
    catalog_uri: str | None = None,
    address: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) every stage; returns the metrics also written to ``run_dir/metrics.json``.

    Ray runs for exactly this call: a private cluster is stopped at the end, an attached one disconnected
    (a session this process had already started is used and left running)."""
    from rlsynth.datasets.catalog import Catalog

    # Before anything is written or started: a dead address or a missing source fails in seconds.
    target = check_ray_address(address)
    cat = Catalog(catalog_uri)
    check_source_exists(cfg, cat)
    check_guidance_files(cfg)
    with ray_session(target, log) as ray:
        return _run_stages(cfg, run_dir, cat, catalog_uri, ray, log)


def check_guidance_files(cfg: RunConfig) -> None:
    """The agent and world model the guidance section names, if any, exist (before anything starts)."""
    g = cfg.synthesize.guidance
    if g.policy is not None and not Path(g.policy).is_file():
        raise RlsynthError(f"synthesize.guidance.policy: {g.policy}: no such agent file")
    if g.world_model is not None and not Path(g.world_model).is_dir():
        raise RlsynthError(f"synthesize.guidance.world_model: {g.world_model}: no such generator folder")


def named_inputs(g: GuidanceConfig) -> dict[str, str]:
    """The content hashes of the files the guidance section names: synthesis depends on them."""
    from rlsynth.datasets.sources import file_sha256
    from rlsynth.generators.checkpoint import checkpoint_hash

    out: dict[str, str] = {}
    if g.policy is not None:
        out["policy"] = file_sha256(Path(g.policy))
    if g.world_model is not None:
        out["world_model"] = checkpoint_hash(Path(g.world_model))
    return out


def check_source_exists(cfg: RunConfig, cat: Any) -> None:
    """The configured source can be found (a catalog version or an HDF5 file); Minari ids are left to the
    source stage, which may download them."""
    ref = cfg.source.ref
    if ref is None or ref.startswith("minari:"):
        return
    if ref.startswith("hdf5:") or ref.endswith((".hdf5", ".h5")):
        path = Path(ref.removeprefix("hdf5:"))
        if not path.is_file():
            raise RlsynthError(f"source.ref: {path}: no such HDF5 file")
        return
    cat.manifest(ref)


def _run_stages(
    cfg: RunConfig, run_dir: Path, cat: Any, catalog_uri: str | None, ray: Any, log: Callable[[str], None]
) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    stages_dir = run_dir.parent / "stages"
    runner = Runner(cfg, run_dir, stages_dir, catalog_uri, log)
    remote = {
        "agent": ray.remote(num_cpus=1, max_retries=1)(_task_train_agent),
        "generator": ray.remote(num_cpus=1, max_retries=1)(_task_train_generator),
        "shard": ray.remote(num_cpus=1, max_retries=2, retry_exceptions=True)(_task_shard),
    }
    metrics: dict[str, Any] = {"run": str(run_dir), "stages": {}}

    # 1. source
    def source_work(folder: Path) -> dict[str, Any]:
        s = cfg.source
        if s.ref is not None:
            from rlsynth.datasets.sources import load_source, source_lineage

            external = s.ref.startswith(("minari:", "hdf5:")) or s.ref.endswith((".hdf5", ".h5"))
            if not external:
                man = cat.manifest(s.ref)
                return {"ref": f"{man['name']}@{man['version']}", "content_hash": man["content_hash"]}
            ds = load_source(s.ref, cat)
            ref = cat.write(s.name, ds, lineage={"sources": [source_lineage(s.ref, ds, cat)]})
        else:
            from rlsynth.datasets.recipes import RecipeConfig, build

            rcfg = RecipeConfig(
                s.recipe or "", s.env, steps=s.steps, transitions=s.transitions, seed=cfg.seed, progress=False
            )
            built = build(rcfg)
            lineage = {"recipe": {**asdict(rcfg), "details": built.details}, "seeds": {"recipe": cfg.seed}}
            ref = cat.write(s.name, built.dataset, lineage=lineage, tags={"recipe": rcfg.recipe})
        return {"ref": str(ref), "content_hash": cat.manifest(ref)["content_hash"]}

    src = runner.stage("source", asdict(cfg.source) | {"seed": cfg.seed}, {}, source_work)
    metrics["stages"]["source"] = src
    src_in = {"source": src["content_hash"]}

    # 2. target agent and 3. generator, submitted together so they train in parallel
    g = cfg.generator
    target_cfg = asdict(cfg.target) | {"seed": cfg.seed}
    gen_cfg = asdict(cfg.generator) | {"seed": cfg.seed}
    submitted: dict[str, Any] = {}
    t_stage, g_stage = (
        runner.locate("target", target_cfg, src_in),
        runner.locate("generator", gen_cfg, src_in),
    )
    if not t_stage.done:
        t_stage.folder.mkdir(parents=True, exist_ok=True)
        submitted["target"] = remote["agent"].remote(
            catalog_uri,
            src["ref"],
            cfg.target.algo,
            cfg.target.steps,
            cfg.seed,
            str(t_stage.folder / "agent.d3"),
        )
    if not g_stage.done:
        g_stage.folder.mkdir(parents=True, exist_ok=True)
        submitted["generator"] = (
            remote["generator"]
            .options(**_gpu_options(ray))
            .remote(
                catalog_uri, src["ref"], g.kind, g.preset, g.steps, cfg.seed, str(g_stage.folder / "model")
            )
        )
    target = runner.stage("target", target_cfg, src_in, lambda _f: dict(ray.get(submitted["target"])))
    gen = runner.stage("generator", gen_cfg, src_in, lambda _f: dict(ray.get(submitted["generator"])))
    metrics["stages"] |= {"target": target, "generator": gen}
    gsec = cfg.synthesize.guidance
    wm: dict[str, Any] | None = None
    if {"dynamics", "return"} & set(gsec.terms) and gsec.world_model is None:
        wm_steps = cfg.synthesize.world_model_steps

        def wm_work(folder: Path) -> dict[str, Any]:
            return ray.get(
                remote["generator"].remote(
                    catalog_uri,
                    src["ref"],
                    "world-model",
                    "cpu-small",
                    wm_steps or None,
                    cfg.seed,
                    str(folder / "model"),
                )
            )

        wm = runner.stage("world-model", {"steps": wm_steps, "seed": cfg.seed}, src_in, wm_work)
        metrics["stages"]["world-model"] = wm
    guidance = synthesis_guidance(gsec, target["agent"], wm["folder"] if wm else None)

    # 4. synthesize: shards as Ray tasks, one commit
    syn_cfg = asdict(cfg.synthesize) | {"seed": cfg.seed}
    syn_in = {"generator": gen["checkpoint_hash"], "target": target["agent"], "source": src["content_hash"]}
    syn_in |= named_inputs(gsec)

    def synth_work(folder: Path) -> dict[str, Any]:
        s = cfg.synthesize
        source = cat.read(src["ref"])
        txn = cat.begin(s.name, source.info)
        sizes = [
            s.transitions // s.shards + (1 if i < s.transitions % s.shards else 0) for i in range(s.shards)
        ]
        offsets = [sum(sizes[:i]) for i in range(s.shards)]
        max_in_flight = max(1, int(ray.cluster_resources().get("CPU", 1)))
        from rlsynth.offline_rl.synthesis import combine_shards

        # As datasets.sources.source_lineage records a catalog source (its content hash is already known).
        source_entry = {
            "source": src["ref"],
            "content_hash": src["content_hash"],
            "kind": "catalog",
            "ref": src["ref"],
        }
        task = SynthesisTask(
            catalog_uri,
            gen["folder"],
            src["ref"],
            cfg.seed,
            s.sampler,
            guidance,
            shards=s.shards,
            source=source_entry,
        )
        try:
            shard_args = [(task, txn, i, n, offsets[i]) for i, n in enumerate(sizes)]
            results = run_bounded(ray, remote["shard"], shard_args, max_in_flight, "synthesize", log)
            parts = [r["lineage"] for r in sorted(results, key=lambda r: int(r["index"]))]
            producer = {"name": "run", "run": str(run_dir), "synthesize": syn_cfg}
            lineage = combine_shards(parts) | {"producer": producer}
            written = [r["part"] for r in sorted(results, key=lambda r: int(r["index"]))]
            ref = txn.commit(
                lineage=lineage, tags={"run": cfg.name}, expected_parts=s.shards, written=written
            )
        except BaseException:
            txn.abort()
            raise
        rows = sum(r["rows"] for r in results)
        busy = sum(r["seconds"] for r in results)
        return {
            "ref": str(ref),
            "content_hash": cat.manifest(ref)["content_hash"],
            "rows": rows,
            "task_seconds": busy,
        }

    syn = runner.stage("synthesize", syn_cfg, syn_in, synth_work)
    metrics["stages"]["synthesize"] = syn

    # 5. fidelity
    def fidelity_work(folder: Path) -> dict[str, Any]:
        from rlsynth.datasets.fidelity import EvalConfig, evaluate, linear_yardstick, plot

        f = cfg.fidelity
        ecfg = EvalConfig(sample=f.sample, horizons=f.horizons, windows=64, seed=cfg.seed)
        source = cat.read(src["ref"])
        res = evaluate(cat.read(syn["ref"]), reference=source, config=ecfg)
        plot(res, folder / "fidelity.png")
        (folder / "fidelity.json").write_text(json.dumps(res, indent=2, default=str))
        return {"one_step": res["one_step"]["obs_mse_normalised"], "png": str(folder / "fidelity.png"),
                "json": str(folder / "fidelity.json"),
                "linear": linear_yardstick(source.transitions)}  # fmt: skip

    fid_in = {"synthetic": syn["content_hash"]}
    fid = runner.stage("fidelity", asdict(cfg.fidelity) | {"seed": cfg.seed}, fid_in, fidelity_work)
    metrics["stages"]["fidelity"] = fid

    # 6. agents on each data condition (each job a Ray task) and 7. report
    def agents_work(folder: Path) -> dict[str, Any]:
        from rlsynth.offline_rl.compare import (
            CompareConfig,
            Condition,
            PGDSpec,
            aggregate,
            jobs_for,
            markdown,
            plot_curves,
        )

        a = cfg.agents
        conds = []
        for c in a.conditions:
            if c == "real":
                conds.append(Condition("real", data=(src["ref"],)))
            elif c == "synthetic":
                conds.append(Condition("synthetic", data=(syn["ref"],)))
            elif c == "mixed":
                conds.append(Condition("mixed", data=(syn["ref"],), mix=((src["ref"], 16),)))
            else:
                conds.append(Condition("pgd", pgd=PGDSpec(
                    generator=gen["folder"], real=src["ref"], name=f"{cfg.synthesize.name}-pgd",
                    regenerate_every=a.pgd_regenerate_every, synthetic_transitions=a.pgd_transitions,
                    guidance=pgd_guidance(gsec), initial_target=target["agent"] if a.pgd_warm_start else None,
                    sampler=cfg.synthesize.sampler, regeneration=a.pgd_regeneration)))  # fmt: skip
        ccfg = CompareConfig(algos=a.algos, seeds=a.seeds, steps=a.steps, eval_every=a.eval_every,
                             eval_episodes=a.eval_episodes, final_episodes=a.final_episodes,
                             catalog=catalog_uri)  # fmt: skip
        from rlsynth.offline_rl.compare import _run_job

        task = ray.remote(num_cpus=1, max_retries=1)(_run_job)
        jobs = jobs_for(conds, ccfg, folder)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        results = run_bounded(ray, task, [(j,) for j in jobs], cpus, "agents", log)
        rows = aggregate(results)
        (folder / "results.json").write_text(
            json.dumps({"aggregate": rows, "runs": results}, indent=2, default=str)
        )
        table = markdown(rows, [c.name for c in conds], list(a.algos))
        plot_curves(results, folder / "curves.png")
        return {"aggregate": rows, "table": table, "curves": str(folder / "curves.png")}

    agents_in = {
        "source": src["content_hash"],
        "synthetic": syn["content_hash"],
        "generator": gen["checkpoint_hash"],
    } | ({"target": target["agent"]} if cfg.agents.pgd_warm_start else {})
    pgd_sampling = {"guidance": asdict(pgd_guidance(gsec)), "sampler": asdict(cfg.synthesize.sampler)}
    agents_key = asdict(cfg.agents) | {"seed": cfg.seed} | pgd_sampling
    agents = runner.stage("agents", agents_key, agents_in, agents_work)
    metrics["stages"]["agents"] = agents
    metrics["status"] = runner.status
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    write_report(run_dir, cfg, metrics)
    return metrics


# Fewer agent seeds than this, or fewer steps, and the report says its comparison cannot rank the data.
REPORT_MIN_SEEDS = 3
REPORT_MIN_STEPS = 20_000


def fidelity_lines(fid: dict[str, Any]) -> list[str]:
    line = f"One-step normalised next-observation MSE: {fid['one_step']:.4g}"
    lin = fid.get("linear")
    if lin is None:
        return [line]
    verdict = "below" if fid["one_step"] < lin else "not below"
    return [
        f"{line}; a linear next-state regression fitted on the source scores {lin:.4g}, so this generator is "
        f"{verdict} the cheapest model a user could fit ({fid['one_step'] / max(lin, 1e-12):.2f}×)."
    ]


def agents_caveat(cfg: RunConfig) -> list[str]:
    a = cfg.agents
    if len(a.seeds) >= REPORT_MIN_SEEDS and a.steps >= REPORT_MIN_STEPS:
        return []
    return [
        f"**This comparison cannot rank the data**: {len(a.seeds)} agent seed(s) of {a.steps:,} steps each; "
        f"differences between conditions at this size are within seed-to-seed noise. It shows that every "
        f"stage runs; for measured comparisons use ≥ {REPORT_MIN_SEEDS} seeds and ≥ {REPORT_MIN_STEPS:,} "
        "steps, or see BENCHMARKS.md.",
        "",
    ]


def write_report(run_dir: Path, cfg: RunConfig, m: dict[str, Any]) -> Path:
    """``run_dir/report.md``; images are linked relative to the report, so any Markdown viewer shows them."""
    s = m["stages"]
    syn = s["synthesize"]

    def image(path: str) -> str:
        return Path(os.path.relpath(Path(path).resolve(), run_dir.resolve())).as_posix()

    lines = [
        f"# rlsynth run `{cfg.name}`",
        "",
        f"Run folder `{run_dir}`. Stages: " + ", ".join(f"{k} {v}" for k, v in m.get("status", {}).items()),
        "",
        "## Data",
        "",
        f"- source: `{s['source']['ref']}` ({s['source']['content_hash']})",
        f"- synthetic: `{syn['ref']}` ({syn['content_hash']}), {syn['rows']:,} transitions from "
        f"{cfg.synthesize.shards} shard tasks "
        f"({syn['rows'] / max(syn['task_seconds'], 1e-9):,.0f} transitions/s per task)",
        f"- target agent: `{s['target']['agent']}`; generator: `{s['generator']['folder']}`",
        "",
        "## Fidelity against MuJoCo",
        "",
        *fidelity_lines(s["fidelity"]),
        "",
        f"![fidelity]({image(s['fidelity']['png'])})",
        "",
        "## Agents",
        "",
        *agents_caveat(cfg),
        s["agents"]["table"],
        "",
        f"![learning curves]({image(s['agents']['curves'])})",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def new_run_dir(runs_root: Path, name: str) -> Path:
    """A fresh ``<runs_root>/<stamp>-<name>``; the name is checked again here, so the folder is always one
    new component directly under ``runs_root`` whoever calls this."""
    check_run_name(name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = runs_root / f"{stamp}-{name}"
    i = 1
    while d.exists():
        i += 1
        d = runs_root / f"{stamp}-{name}-{i}"
    return d


def check_resume(run_dir: Path) -> None:
    if not (run_dir / "config.yaml").is_file():
        raise RlsynthError(f"{run_dir}: not a run folder (no config.yaml)")
