"""Synthesis throughput with 1 vs 2 Ray workers on this machine, one run (the pipeline's shard tasks).

The same shards (same generator, seeds and sizes) are sampled and written as Parquet parts of one catalog
transaction, first with at most one shard task in flight, then with two; each task uses one torch thread.
Reported: transitions/s end to end (submit to commit) and the speed-up of 2 workers over 1.

    python bench/scaling.py --data halfcheetah/medium-replay@1 --generator GEN_DIR
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# Not the script's folder on the path: bench/ files must not shadow the packages they measure.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from rlsynth.datasets.catalog import Catalog
from rlsynth.generators.options import SamplerSettings
from rlsynth.pipeline.bench_report import write_section
from rlsynth.pipeline.run import SynthesisTask, _task_shard, init_ray, run_bounded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--catalog", default=None)
    p.add_argument("--generator", required=True)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--shard-transitions", type=int, default=7936)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    src = Catalog(a.catalog)
    info = src.read(a.data).info
    ray = init_ray(None)
    task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=True)(_task_shard)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cat = Catalog(tmp)
        cat.write("source", src.read(a.data))
        # Warm-up: start both worker processes and import everything before anything is timed.
        warm = cat.begin("warm-up", info)
        warm_task = SynthesisTask(tmp, a.generator, "source@1", 0, SamplerSettings(), None, shards=2)
        warm_args = [(warm_task, warm, i, 10, 10 * i) for i in range(2)]
        run_bounded(ray, task, warm_args, 2, "warm-up", lambda _s: None)
        warm.abort()
        hashes = []
        for workers in (1, 2):
            txn = cat.begin("synthetic", info)
            shard_task = SynthesisTask(
                tmp, a.generator, "source@1", 0, SamplerSettings(), None, shards=a.shards
            )
            args = [
                (shard_task, txn, i, a.shard_transitions, i * a.shard_transitions) for i in range(a.shards)
            ]
            t0 = time.perf_counter()
            results = run_bounded(ray, task, args, workers, f"{workers} worker(s)", lambda _s: None)
            ref = txn.commit(expected_parts=a.shards)
            wall = time.perf_counter() - t0
            n = sum(r["rows"] for r in results)
            hashes.append(cat.manifest(ref)["content_hash"])
            rows.append({"workers": workers, "transitions": n, "seconds": wall, "rate": n / wall})
            print(rows[-1], flush=True)
    base = rows[0]["rate"]
    lines = [
        f"Data `{a.data}`; trajectory generator `{a.generator}` (unguided); {a.shards} shard tasks of "
        f"{a.shard_transitions:,} transitions, each writing one Parquet part, one commit; local Ray cluster "
        f"with {int(ray.cluster_resources().get('CPU', 0))} CPUs, one torch thread per task, workers "
        "warmed up before timing. "
        f"Both runs committed the same content: {hashes[0] == hashes[1]}.",
        "",
        "| workers in flight | transitions | seconds | transitions/s | speed-up |",
        "|---|---|---|---|---|",
        *[
            f"| {r['workers']} | {r['transitions']:,} | {r['seconds']:.1f} | {r['rate']:,.0f} | "
            f"{r['rate'] / base:.2f}× |"
            for r in rows
        ],
    ]
    text = "\n".join(lines)
    print(text)
    if not a.no_write:
        write_section("scaling", "Scaling: synthesis with 1 vs 2 Ray workers", text)


if __name__ == "__main__":
    main()
