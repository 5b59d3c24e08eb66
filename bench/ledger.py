"""The batch ledger's cost on the job pipeline: ``bench/pipeline.py`` on the code before the
ledger (commit f0af187) and on the working tree, taking turns, against the issue's budget.

Each run is its own ``bench/pipeline.py --json --repeats 1`` process started in its side's tree
(working directory and PYTHONPATH), so each side imports its own packages, not the editable
install's; a check process proves it before anything is timed. Runs alternate before, after,
before, ... so load on a shared machine hits both sides alike, and the medians of the runs are
compared. Budget: the pipeline's share of the engine down by at most 3 points, the one-text round
trip's p50 up by at most 2 ms. Redis databases 13 (before) and 14 (after) are flushed.

    python bench/ledger.py [--texts N] [--round-trips K] [--repeats R] [--database-url URL]
                           [--before-ref REF] [--corpus FILE] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from shutil import rmtree
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("EMBEDQ_CORPUS", REPO.parent / "shared" / "corpus" / "pydocs.jsonl"))
BEFORE_REF = "f0af187"  # the last commit before the batch ledger
BROKERS = {"before": "redis://127.0.0.1:6379/13", "after": "redis://127.0.0.1:6379/14"}
SHARE_BUDGET_POINTS = 3.0  # most the pipeline's share may fall, in points of the engine's rate
P50_BUDGET_MS = 2.0  # most the one-text round trip's p50 may rise
CHECKED_MODULES = ("tasks.producer", "worker", "storage.schema", "bench")
ROWS = {  # figure -> label and format, in the order printed
    "pipeline_share": ("pipeline share", ".3f"),
    "engine_texts_per_s": ("engine texts/s", ".1f"),
    "pipeline_texts_per_s": ("pipeline texts/s", ".1f"),
    "round_trip_p50_ms": ("round trip p50 ms", ".2f"),
    "round_trip_p99_ms": ("round trip p99 ms", ".2f"),
    "round_trip_submit_ms": ("  submit ms", ".2f"),
    "worker_queue_wait_ms": ("  queue wait ms", ".2f"),
    "worker_inference_ms": ("  inference ms", ".2f"),
    "worker_write_ms": ("  write ms", ".2f"),
    "worker_total_ms": ("  in the task ms", ".2f"),
}


@dataclass(frozen=True)
class Side:
    """One side of the comparison: the tree its code runs from, described, and its broker."""

    name: str
    tree: Path
    source: str
    broker_url: str


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def exported(ref: str, folder: Path) -> Path:
    """The files of commit ``ref`` written to ``folder`` (``git archive``: no worktree to prune)."""
    folder.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def side_env(side: Side, tmp: Path) -> dict[str, str]:
    # TMPDIR: pipeline.py leaves its store folder behind; this keeps it under our own temp folder.
    return {**os.environ, "PYTHONPATH": str(side.tree), "TMPDIR": str(tmp)}


def check_imports(side: Side, tmp: Path) -> dict[str, str]:
    """Where a process started like the pipeline's (and its worker's) finds our packages."""
    code = (
        "import importlib, json; print(json.dumps({m: importlib.import_module(m).__file__"
        f" for m in {CHECKED_MODULES!r}}}))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code],
        cwd=side.tree,
        env=side_env(side, tmp),
        check=True,
        capture_output=True,
        text=True,
    )
    files: dict[str, str] = json.loads(found.stdout)
    strays = {m: f for m, f in files.items() if not Path(f).resolve().is_relative_to(side.tree)}
    if strays:
        raise SystemExit(f"{side.name}: modules imported from outside {side.tree}: {strays}")
    return files


def run_pipeline(side: Side, args: argparse.Namespace, tmp: Path, label: str) -> dict[str, Any]:
    """One ``bench/pipeline.py`` run in ``side``'s tree; its JSON result."""
    command = [sys.executable, "bench/pipeline.py", "--json", "--repeats", "1"]
    command += ["--texts", str(args.texts), "--round-trips", str(args.round_trips)]
    command += ["--broker-url", side.broker_url, "--corpus", str(args.corpus)]
    if args.database_url:
        command += ["--database-url", args.database_url.format(side=side.name)]
    out, err = tmp / f"{label}.out", tmp / f"{label}.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            command, cwd=side.tree, env=side_env(side, tmp), stdout=stdout, stderr=stderr
        )
        try:
            code = process.wait()
        except KeyboardInterrupt:
            process.wait(60)  # it got the same SIGINT: let it stop its worker first
            raise
    lines = out.read_text().splitlines()
    if code != 0 or "{" not in lines:
        tail = "\n".join(err.read_text().splitlines()[-30:])
        raise SystemExit(f"{label}: bench/pipeline.py exited {code}; its stderr ends:\n{tail}")
    result: dict[str, Any] = json.loads("\n".join(lines[len(lines) - lines[::-1].index("{") - 1 :]))
    return result


def figures(run: dict[str, Any]) -> dict[str, float]:
    flat = {k: float(v) for k, v in run.items() if k in ROWS}
    flat.update({f"worker_{k}": float(v) for k, v in run["round_trip_worker_ms"].items()})
    return flat


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {k: round(statistics.median(figures(r)[k] for r in runs), 3) for k in ROWS}


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu if ln.startswith("Model name")), "?")
    return {"cpu": model, "cpus": os.cpu_count(), "load_average": os.getloadavg()}


def compare(args: argparse.Namespace, sides: list[Side], tmp: Path) -> dict[str, Any]:
    imports = {side.name: check_imports(side, tmp) for side in sides}
    at_start = machine()
    runs: dict[str, list[dict[str, Any]]] = {side.name: [] for side in sides}
    for repeat in range(1, args.repeats + 1):
        for side in sides:
            started = time.perf_counter()
            run = run_pipeline(side, args, tmp, f"{side.name}-{repeat}")
            runs[side.name].append(run)
            print(
                f"{side.name} {repeat}/{args.repeats}: share {run['pipeline_share']:.3f},"
                f" p50 {run['round_trip_p50_ms']:.1f} ms, p99 {run['round_trip_p99_ms']:.1f} ms"
                f" ({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    before, after = (medians(runs[side.name]) for side in sides)
    share_down = round((before["pipeline_share"] - after["pipeline_share"]) * 100, 2)
    p50_up = round(after["round_trip_p50_ms"] - before["round_trip_p50_ms"], 2)
    return {
        "texts": args.texts,
        "round_trips": args.round_trips,
        "repeats": args.repeats,
        "database": runs["before"][0]["database"],
        "machine": {**at_start, "load_average_at_end": os.getloadavg()},
        "sides": {
            side.name: {
                "source": side.source,
                "imports": imports[side.name],
                "medians": median,
                "runs": runs[side.name],
            }
            for side, median in zip(sides, (before, after), strict=True)
        },
        "share_points_down": share_down,
        "p50_ms_up": p50_up,
        "share_verdict": "PASS" if share_down <= SHARE_BUDGET_POINTS else "FAIL",
        "p50_verdict": "PASS" if p50_up <= P50_BUDGET_MS else "FAIL",
    }


def report(result: dict[str, Any]) -> str:
    before, after = (result["sides"][name] for name in ("before", "after"))
    m = result["machine"]
    loads = (" ".join(f"{x:.2f}" for x in m[k]) for k in ("load_average", "load_average_at_end"))
    lines = [
        f"the batch ledger's cost on bench/pipeline.py: {result['texts']} texts,"
        f" {result['round_trips']} round trips, medians of {result['repeats']} run(s) a side"
        f" taking turns, {result['database']} store",
        f"before: {before['source']} (tasks.producer: {before['imports']['tasks.producer']})",
        f"after:  {after['source']} (tasks.producer: {after['imports']['tasks.producer']})",
        f"cpu: {m['cpu']} ({m['cpus']} CPUs); load average {next(loads)} at start,"
        f" {next(loads)} at end",
        "",
        f"{'':20}{'before':>10}{'after':>10}{'change':>10}",
    ]
    for key, (label, f) in ROWS.items():
        b, a = before["medians"][key], after["medians"][key]
        lines.append(f"{label:20}{b:10{f}}{a:10{f}}{a - b:+10{f}}")
    for key in ("pipeline_share", "round_trip_p50_ms"):
        values = (" ".join(f"{r[key]:g}" for r in side["runs"]) for side in (before, after))
        lines.append(f"runs, {ROWS[key][0]}: before {next(values)}; after {next(values)}")
    lines += [
        "",
        f"pipeline share down {result['share_points_down']:.2f} points"
        f" (budget <= {SHARE_BUDGET_POINTS:g}): {result['share_verdict']}",
        f"round trip p50 up {result['p50_ms_up']:.2f} ms"
        f" (budget <= {P50_BUDGET_MS:g} ms): {result['p50_verdict']}",
    ]
    return "\n".join(lines)


def working_tree() -> str:
    changed = len(git("status", "--porcelain").splitlines())
    return f"working tree {REPO} at {git('rev-parse', '--short', 'HEAD')} + {changed} changed files"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="runs a side, taking turns")
    parser.add_argument(
        "--database-url",
        help="default: a new SQLite file a run; else a URL with {side} (before/after) in it,"
        " since the two sides migrate to different heads",
    )
    parser.add_argument("--before-ref", default=BEFORE_REF)
    parser.add_argument("--after-ref", help=argparse.SUPPRESS)  # check the script: same code
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.database_url and "{side}" not in args.database_url:
        parser.error("--database-url needs {side} in it, e.g. postgresql:///embedq_{side}")

    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="embedq-ledger-")).resolve()
        stack.callback(rmtree, tmp, ignore_errors=True)
        sha = git("rev-parse", "--short", f"{args.before_ref}^{{commit}}")
        before = Side("before", exported(sha, tmp / "before"), f"commit {sha}", BROKERS["before"])
        if args.after_ref:
            sha = git("rev-parse", "--short", f"{args.after_ref}^{{commit}}")
            after = Side("after", exported(sha, tmp / "after"), f"commit {sha}", BROKERS["after"])
        else:
            after = Side("after", REPO, working_tree(), BROKERS["after"])
        result = compare(args, [before, after], tmp)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
