"""Downstream offline RL: the same d3rlpy algorithms, steps and seeds on real, synthetic and mixed data.

Conditions (one run): real data; unguided synthetic data; policy-guided synthetic data (target: an IQL
agent trained on the real data); 240 unguided synthetic + 16 real rows per batch; and the PGD loop
(240 synthetic + 16 real, the synthetic set regenerated every --regen steps with the current agent as the
guidance target, the first set unguided or, with --pgd-warm-start, guided by --target). TD3+BC and IQL,
3 seeds, --steps gradient steps each, scored with D4RL-normalised returns in the real environment.

    python bench/downstream.py --data halfcheetah/medium-replay@1 --generator GEN_DIR --target IQL.d3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Not the script's folder on the path: bench/ files must not shadow the packages they measure.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.sources import source_lineage
from rlsynth.generators.api import load_generator
from rlsynth.generators.options import SamplerSettings
from rlsynth.guidance.options import GuidanceConfig
from rlsynth.offline_rl.compare import CompareConfig, Condition, PGDSpec, compare
from rlsynth.offline_rl.synthesis import synthesize
from rlsynth.offline_rl.train import ALGOS
from rlsynth.pipeline.bench_report import int_list, write_section

PLOT = Path(__file__).resolve().parent / "plots" / "downstream.png"
CONDITIONS = {
    "real": "real",
    "unguided": "unguided synthetic",
    "guided": "policy-guided synthetic",
    "mix": "unguided 240 + real 16",
    "pgd": "PGD loop (240 + 16)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and checked options (a bad one exits 2 with one line, before anything runs); adds
    ``keys`` (conditions asked for), ``mix`` (synthetic, real rows) and ``names`` (condition labels)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--catalog", default=None)
    p.add_argument(
        "--generator",
        required=True,
        help="trained trajectory or transition diffusion generator folder, or an autoregressive drafter "
        "with a recorded refiner",
    )
    p.add_argument(
        "--target", required=True, help="agent (.d3) trained on --data: the static guidance target"
    )
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--regen", type=int, default=1000, help="PGD: agent steps between regenerations")
    p.add_argument("--synthetic", type=int, default=50_000, help="transitions per synthetic set")
    p.add_argument("--pgd-synthetic", type=int, default=20_000, help="transitions per PGD regeneration")
    p.add_argument(
        "--pgd-mix",
        default="240:16",
        help="PGD: synthetic:real rows per batch (they must add up to the batch size, 256)",
    )
    p.add_argument("--scale", type=float, default=0.05, help="policy guidance scale")
    p.add_argument(
        "--polish",
        type=int,
        default=None,
        help="denoise-renoise iterations after sampling every set (0: off; default: the model's)",
    )
    p.add_argument(
        "--pgd-std",
        type=float,
        default=0.1,
        help="PGD: a deterministic agent (TD3+BC) is read as N(μ(s), std²) for guidance",
    )
    p.add_argument(
        "--pgd-warm-start",
        action="store_true",
        help="PGD: round 0 is guided by --target (the agent from the earlier stage) instead of unguided",
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--algos", default="td3bc,iql")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="/tmp/rlsynth-downstream")
    p.add_argument("--no-write", action="store_true")
    p.add_argument(
        "--conditions",
        default=",".join(CONDITIONS),
        help=f"comma-separated subset of {','.join(CONDITIONS)} (the static sets are sampled only if used)",
    )
    a = p.parse_args(argv)
    keys = a.conditions.split(",")
    try:
        syn_rows, real_rows = (int(x) for x in a.pgd_mix.split(":"))
    except ValueError:
        p.error(f"--pgd-mix: expected SYNTHETIC:REAL rows, got {a.pgd_mix!r}")
    if syn_rows < 1 or real_rows < 0 or syn_rows + real_rows != 256:
        p.error(f"--pgd-mix: {a.pgd_mix} must be positive synthetic rows and real rows adding up to 256")
    unknown = sorted(set(keys) - set(CONDITIONS))
    if unknown:
        p.error(f"--conditions: unknown {unknown}; choose from {','.join(CONDITIONS)}")
    for flag in ("steps", "regen", "synthetic", "pgd_synthetic", "workers"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(a, flag)}")
    if not a.scale > 0 or not a.pgd_std > 0:
        p.error(f"--scale and --pgd-std must be positive, got {a.scale} and {a.pgd_std}")
    if a.polish is not None and a.polish < 0:
        p.error(f"--polish must be ≥ 0, got {a.polish}")
    seeds = int_list(p, "--seeds", a.seeds)
    algos = a.algos.split(",")
    bad_algos = sorted(set(algos) - set(ALGOS))
    if bad_algos:
        p.error(f"--algos: unknown {bad_algos}; choose from {','.join(ALGOS)}")
    a.keys, a.mix, a.seed_list, a.algo_list = keys, (syn_rows, real_rows), seeds, tuple(algos)
    a.names = {**CONDITIONS, "pgd": f"PGD loop ({syn_rows} + {real_rows})"}
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    keys, names = a.keys, a.names
    syn_rows, real_rows = a.mix
    gen = load_generator(a.generator)  # CUDA if present
    if gen.kind not in ("trajectory", "transition", "autoregressive"):
        raise RlsynthError(
            f"--generator {a.generator} is a {gen.kind} model; guidance needs a diffusion one or a drafter"
        )
    cat = Catalog(a.catalog)
    real = cat.read(a.data)
    stamp = time.strftime("%Y%m%d%H%M%S")
    gcfg = GuidanceConfig(terms=("policy",), scale=a.scale, deterministic_std=a.pgd_std)
    made = {}
    static: list[tuple[str, GuidanceConfig | None]] = (
        [("unguided", None)] if {"unguided", "mix"} & set(keys) else []
    )
    if "guided" in keys:
        static.append(("guided", GuidanceConfig(terms=("policy",), policy=a.target, scale=a.scale)))
    for label, g in static:
        t0 = time.perf_counter()
        syn = synthesize(
            gen,
            real,
            a.synthetic,
            SamplerSettings(polish=a.polish),
            g,
            seed=1,
            source_ref=source_lineage(a.data, real, cat),
            producer={"name": "bench/downstream"},
        )
        ref = cat.write(f"bench/downstream-{stamp}/{label}", syn.dataset, lineage=syn.lineage)
        made[label] = str(ref)
        print(f"{label}: {ref} in {time.perf_counter() - t0:.0f} s", flush=True)
    pgd = PGDSpec(
        generator=a.generator,
        real=a.data,
        name=f"bench/downstream-{stamp}/pgd",
        regenerate_every=a.regen,
        synthetic_transitions=a.pgd_synthetic,
        synthetic_rows=syn_rows,
        real_rows=real_rows,
        guidance=gcfg,
        initial_target=a.target if a.pgd_warm_start else None,
        sampler=SamplerSettings(polish=a.polish),
    )
    build = {
        "real": lambda: Condition(names["real"], data=(a.data,)),
        "unguided": lambda: Condition(names["unguided"], data=(made["unguided"],)),
        "guided": lambda: Condition(names["guided"], data=(made["guided"],)),
        "mix": lambda: Condition(names["mix"], data=(made["unguided"],), mix=((a.data, 16),)),
        "pgd": lambda: Condition(names["pgd"], pgd=pgd),
    }
    conditions = [build[k]() for k in CONDITIONS if k in keys]
    cfg = CompareConfig(
        algos=a.algo_list,
        seeds=a.seed_list,
        steps=a.steps,
        eval_every=max(1, a.steps // 4),
        eval_episodes=2,
        final_episodes=5,
        workers=a.workers,
        catalog=a.catalog,
    )
    t0 = time.perf_counter()
    report = compare(conditions, cfg, Path(a.out))
    wall = time.perf_counter() - t0
    table = (Path(a.out) / "results.md").read_text()
    rows = {(r["condition"], r["algo"]): r for r in report["aggregate"]}
    verdict = []
    for algo in cfg.algos if {"pgd", "real"} <= set(keys) else ():
        pgd_r, real_r = rows[(names["pgd"], algo)], rows[(names["real"], algo)]
        vs_real = "≥" if pgd_r["mean"] >= real_r["mean"] else "<"
        line = f"- {algo}: PGD loop {pgd_r['mean']:.1f} {vs_real} real {real_r['mean']:.1f}"
        if "unguided" in keys:
            ung = rows[(names["unguided"], algo)]
            vs_ung = ">" if pgd_r["mean"] > ung["mean"] else "≤"
            line += f"; PGD loop {vs_ung} unguided synthetic {ung['mean']:.1f}"
        verdict.append(line)
    intro = (
        f"Data `{a.data}` ({real.n_transitions:,} transitions); generator `{a.generator}`; static guidance "
        f"target `{a.target}` at scale {a.scale}; {a.synthetic:,} synthetic transitions per static set, "
        f"{a.pgd_synthetic:,} per PGD regeneration every {a.regen} steps, batches of {syn_rows} synthetic + "
        f"{real_rows} real rows (a TD3+BC actor read as "
        f"N(μ(s), {a.pgd_std}²) for guidance; round 0 "
        f"{'guided by the static target' if a.pgd_warm_start else 'unguided'}). "
        f"Budget: {a.steps:,} gradient steps per run (batch 256), a 2-core budget far below the 1M steps "
        "of published results, so absolute scores are low. Curves: `bench/plots/downstream.png` "
        f"({cfg.eval_episodes} episodes every "
        f"{cfg.eval_every} steps); final scores over {cfg.final_episodes} episodes per seed. Wall time "
        f"{wall / 60:.0f} min with {a.workers} worker processes."
    )
    body = "\n".join([intro, "", table.strip(), "", *verdict])
    print(body)
    (Path(a.out) / "bench.json").write_text(json.dumps({"made": made, "wall_s": wall}, indent=2))
    if not a.no_write:
        PLOT.parent.mkdir(exist_ok=True)
        PLOT.write_bytes((Path(a.out) / "curves.png").read_bytes())
        write_section("downstream", "Downstream offline RL: real vs synthetic vs PGD", body)


if __name__ == "__main__":
    try:
        main()
    except RlsynthError as e:
        sys.exit(f"downstream: {e}")
