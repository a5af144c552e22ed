"""``rlsynth run``: the whole job as Ray tasks, resumable, with a report.

Stages: source → target agent → generator (+ world model for dynamics guidance) → synthesize (N shard
tasks, each sampling with its own seeds and writing one Parquet part; one atomic commit when every part
exists) → fidelity → agents (real / synthetic / mixed / PGD loop; one task per job) → report.

Each stage's output lives in ``<runs>/stages/<stage>-<key>/`` where the key hashes the stage's config
and the keys (or content hashes) of its inputs; a stage whose ``done.json`` exists is skipped. A re-run
therefore resumes after a crash or Ctrl-C, and a changed config re-runs only the stages that depend on
what changed. Synthesis is deterministic given its key, so a killed and resumed run commits the same
content as an uninterrupted one.

Ray: an in-process local cluster by default (``ray.init`` with this machine's CPUs, no dashboard) or an
existing cluster (``--address`` / ``RAY_ADDRESS``). Paths (catalog, runs folder) must be visible to every
node: on a multi-node cluster use shared storage or an object-store catalog URI.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from datasets.errors import RlsynthError
from pipeline.config import RunConfig, to_dict

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

    from datasets.catalog import Catalog
    from offline_rl.train import train_agent

    torch.set_num_threads(1)
    ds = Catalog(catalog_uri).read(ref)
    run = train_agent(algo, ds, Path(out), steps=steps, seed=seed, progress=False, lineage={"ref": ref})
    return {"agent": str(run.path), "seconds": run.seconds}


def _task_train_generator(
    catalog_uri: str | None, ref: str, kind: str, preset: str, steps: int | None, seed: int, out: str
) -> dict[str, Any]:
    from datasets.catalog import Catalog
    from generators.api import load_generator, record_refiner, train_generator

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


def _task_shard(
    catalog_uri: str | None,
    txn: Any,
    index: int,
    generator: str,
    source_ref: str,
    n: int,
    seed: int,
    guidance: dict[str, Any] | None,
    episode_offset: int,
    polish: int = 0,
) -> dict[str, Any]:
    """Sample shard ``index`` and write it as part ``index`` of the open transaction (atomic per part)."""
    import numpy as np
    import torch

    from datasets.catalog import Catalog
    from datasets.types import Transitions
    from generators.api import SampleOptions, load_generator, sample, sample_seed
    from guidance.spec import GuidanceConfig, build_guidance

    torch.set_num_threads(1)
    marker = os.environ.get(FAIL_ONCE_ENV)
    if marker and not Path(marker).exists():
        Path(marker).write_text(f"shard {index} failed once on purpose\n")
        raise RuntimeError(f"injected failure in shard {index}")
    gen = load_generator(generator, device="cpu")
    source = Catalog(catalog_uri).read(source_ref)
    g = build_guidance(GuidanceConfig(**guidance), gen.info) if guidance else None
    t0 = time.perf_counter()
    ds = sample(gen, source, n, SampleOptions(seed=sample_seed(seed, index), guidance=g, polish=polish))
    t = ds.transitions
    cols = {c: np.array(getattr(t, c)) for c in Transitions.columns()}
    cols["episode_id"] = cols["episode_id"] + episode_offset
    part = txn.write_part(index, Transitions(**cols))
    return {"index": index, "rows": len(t), "seconds": time.perf_counter() - t0, "part": part}


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


def init_ray(address: str | None) -> Any:
    import ray

    if ray.is_initialized():
        return ray
    addr = address or os.environ.get("RAY_ADDRESS")
    if addr:
        ray.init(address=addr, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
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
    """Run (or resume) every stage; returns the metrics also written to ``run_dir/metrics.json``."""
    from datasets.catalog import Catalog

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    stages_dir = run_dir.parent / "stages"
    runner = Runner(cfg, run_dir, stages_dir, catalog_uri, log)
    cat = Catalog(catalog_uri)
    ray = init_ray(address)
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
            from datasets.sources import load_source, source_lineage

            external = s.ref.startswith(("minari:", "hdf5:")) or s.ref.endswith((".hdf5", ".h5"))
            if not external:
                man = cat.manifest(s.ref)
                return {"ref": f"{man['name']}@{man['version']}", "content_hash": man["content_hash"]}
            ds = load_source(s.ref, cat)
            ref = cat.write(s.name, ds, lineage={"sources": [source_lineage(s.ref, ds, cat)]})
        else:
            from datasets.recipes import RecipeConfig, build

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
    if {"dynamics", "return"} & set(gsec.terms):

        def wm_work(folder: Path) -> dict[str, Any]:
            return ray.get(
                remote["generator"].remote(
                    catalog_uri,
                    src["ref"],
                    "world-model",
                    "cpu-small",
                    gsec.world_model_steps or None,
                    cfg.seed,
                    str(folder / "model"),
                )
            )

        wm = runner.stage("world-model", {"steps": gsec.world_model_steps, "seed": cfg.seed}, src_in, wm_work)
        metrics["stages"]["world-model"] = wm
    guidance = (
        {
            "terms": list(gsec.terms),
            "policy": target["agent"] if "policy" in gsec.terms else None,
            "scale": gsec.scale,
            "world_model": wm["folder"] if wm else None,
            "dynamics_scale": gsec.dynamics_scale,
            "deterministic_std": gsec.deterministic_std,
        }
        if gsec.terms
        else None
    )

    # 4. synthesize: shards as Ray tasks, one commit
    syn_cfg = asdict(cfg.synthesize) | {"seed": cfg.seed}
    syn_in = {"generator": gen["checkpoint_hash"], "target": target["agent"], "source": src["content_hash"]}

    def synth_work(folder: Path) -> dict[str, Any]:
        s = cfg.synthesize
        source = cat.read(src["ref"])
        txn = cat.begin(s.name, source.info)
        sizes = [
            s.transitions // s.shards + (1 if i < s.transitions % s.shards else 0) for i in range(s.shards)
        ]
        offsets = [sum(sizes[:i]) for i in range(s.shards)]
        max_in_flight = max(1, int(ray.cluster_resources().get("CPU", 1)))
        try:
            shard_args = [
                (catalog_uri, txn, i, gen["folder"], src["ref"], n, cfg.seed, guidance, offsets[i], s.polish)
                for i, n in enumerate(sizes)
            ]
            results = run_bounded(ray, remote["shard"], shard_args, max_in_flight, "synthesize", log)
            lineage = {
                "sources": [{"ref": src["ref"], "content_hash": src["content_hash"]}],
                "generator": {"folder": gen["folder"], "checkpoint_hash": gen["checkpoint_hash"]},
                "guidance": guidance,
                "synthesize": syn_cfg,
                "run": str(run_dir),
            }
            ref = txn.commit(lineage=lineage, tags={"run": cfg.name}, expected_parts=s.shards)
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
        from datasets.fidelity import EvalConfig, evaluate, linear_yardstick, plot

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
        from offline_rl.compare import (
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
                from guidance.spec import GuidanceConfig

                conds.append(Condition("pgd", pgd=PGDSpec(
                    generator=gen["folder"], real=src["ref"], name=f"{cfg.synthesize.name}-pgd",
                    regenerate_every=a.pgd_regenerate_every, synthetic_transitions=a.pgd_transitions,
                    guidance=GuidanceConfig(terms=("policy",), scale=gsec.scale,
                                            deterministic_std=gsec.deterministic_std),
                    initial_target=target["agent"] if a.pgd_warm_start else None,
                    polish=cfg.synthesize.polish)))  # fmt: skip
        ccfg = CompareConfig(algos=a.algos, seeds=a.seeds, steps=a.steps, eval_every=a.eval_every,
                             eval_episodes=a.eval_episodes, final_episodes=a.final_episodes,
                             catalog=catalog_uri)  # fmt: skip
        from offline_rl.compare import _run_job

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
    agents_key = asdict(cfg.agents) | {"seed": cfg.seed, "scale": gsec.scale, "std": gsec.deterministic_std}
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
