"""``embedq models ...``: prepare models in this machine's model store, tell the fleet where a
model comes from, and see what each host has prepared and what a model runs on here."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from storage import model_catalog
from storage.session import scope, sessions_for
from tasks.cli import present
from tasks.cli.failures import fail
from worker.errors import EmbedqError
from worker.manifest import Pooling, Precision, dump
from worker.manifest import rehash as record_files
from worker.settings import get_settings

if TYPE_CHECKING:
    from worker.model_store import ModelStore

app = typer.Typer(help="Prepare and inspect models in the model store.", no_args_is_help=True)

Source = Annotated[str, typer.Argument(help="hf://ORG/NAME[@REV], a URL, or a folder")]
Name = Annotated[str, typer.Option("--name", help="name to install the model under")]
Quantize = Annotated[str | None, typer.Option(help="int8: dynamic int8 for CPUs")]
Fp16 = Annotated[bool, typer.Option("--fp16", help="half precision, for GPUs")]
Bf16 = Annotated[
    bool,
    typer.Option("--bf16", help="bfloat16 on OpenVINO, for CPUs with AVX512-BF16 or AMX"),
]
Sha256 = Annotated[str | None, typer.Option(help="expected sha256 of a URL download")]
MaxSeqLength = Annotated[int | None, typer.Option(help="override the model's")]
PoolingOption = Annotated[Pooling | None, typer.Option(help="override the model's")]
Normalize = Annotated[
    bool | None, typer.Option("--normalize/--no-normalize", help="override the model's")
]


def _options(
    quantize: str | None,
    fp16: bool,
    bf16: bool,
    sha256: str | None,
    max_seq_length: int | None,
    pooling: Pooling | None,
    normalize: bool | None,
) -> dict[str, str | int | bool]:
    """The pull options as the catalog stores them (JSON), checked."""
    if quantize not in (None, "int8"):
        raise typer.BadParameter("only int8 is supported", param_hint="--quantize")
    if sum((quantize is not None, fp16, bf16)) > 1:
        raise typer.BadParameter("choose one of --quantize int8, --fp16 and --bf16")
    precision = (
        Precision.INT8
        if quantize
        else Precision.FP16
        if fp16
        else Precision.BF16
        if bf16
        else Precision.FP32
    )
    options = {
        "precision": str(precision),
        "sha256": sha256,
        "max_seq_length": max_seq_length,
        "pooling": None if pooling is None else str(pooling),
        "normalize": normalize,
    }
    return {key: value for key, value in options.items() if value is not None}


def _store() -> ModelStore:
    from worker.model_store import ModelStore  # loads onnxruntime and tokenizers

    return ModelStore(get_settings().model_dir)


@app.command("pull")
def pull(
    source: Source,
    name: Name,
    quantize: Quantize = None,
    fp16: Fp16 = False,
    bf16: Bf16 = False,
    sha256: Sha256 = None,
    max_seq_length: MaxSeqLength = None,
    pooling: PoolingOption = None,
    normalize: Normalize = None,
) -> None:
    """Fetch or export a model and install it in this machine's model store under NAME."""
    from tasks.model_options import pull_options

    options = _options(quantize, fp16, bf16, sha256, max_seq_length, pooling, normalize)
    try:
        manifest = _store().pull(source, name, pull_options(options), get_settings())
    except EmbedqError as exc:
        raise fail(exc) from exc
    typer.echo(
        f"prepared {manifest.name}: dim {manifest.dim}, {manifest.precision},"
        f" pooling {manifest.behaviour.pooling}, normalize {manifest.behaviour.normalize},"
        f" max_seq_length {manifest.behaviour.max_seq_length}"
    )


@app.command("register")
def register(
    source: Source,
    name: Name,
    quantize: Quantize = None,
    fp16: Fp16 = False,
    bf16: Bf16 = False,
    sha256: Sha256 = None,
    max_seq_length: MaxSeqLength = None,
    pooling: PoolingOption = None,
    normalize: Normalize = None,
) -> None:
    """Tell the fleet where NAME comes from: a worker host that lacks it prepares it from
    SOURCE (with these options) when a job first asks for it. Clears earlier failures."""
    from tasks import producer  # loads numpy

    options = _options(quantize, fp16, bf16, sha256, max_seq_length, pooling, normalize)
    try:
        producer.register_model(source, name, options)
    except EmbedqError as exc:
        raise fail(exc) from exc
    typer.echo(f"registered {name}: {source} {json.dumps(options)}")


@app.command("hosts")
def hosts() -> None:
    """What each worker host has prepared (or is preparing, or failed to prepare, and why)."""
    with scope(sessions_for(get_settings().database_url)) as session:
        rows = model_catalog.list_prepared(session)
        if not rows:
            typer.echo("no worker host has recorded a model yet")
        for row in rows:
            present.prepared_row(row)


@app.command("probe")
def probe(
    name: str,
    device: Annotated[int | None, typer.Option(help="GPU device id to bind to")] = None,
) -> None:
    """Load NAME as a worker would (on DEVICE) and embed one text; exits non-zero when the
    engine cannot be built, e.g. a GPU provider that fell back under the error policy."""
    from worker.engine import Engine  # loads onnxruntime and tokenizers

    settings = get_settings()
    try:
        store = _store()
        store.get(name)
        engine = Engine.load(store.path(name), settings, device)
        engine.encode(["probe"])
    except EmbedqError as exc:
        raise fail(exc) from exc
    typer.echo(
        f"{name} runs on {engine.provider} in {engine.precision}"
        + ("" if device is None else f" ({device})")
    )


@app.command("list")
def list_models() -> None:
    """List prepared models."""
    manifests = _store().list()
    if not manifests:
        typer.echo(f"no models in {get_settings().model_dir}")
    for manifest in manifests:
        present.manifest_row(manifest)


@app.command("show")
def show(name: str) -> None:
    """Show a model's manifest, the runtime and precision it would run in on this machine, and
    the execution providers this machine offers."""
    from worker import providers, runtimes  # load onnxruntime

    try:
        manifest = _store().get(name)
    except EmbedqError as exc:
        raise fail(exc) from exc
    typer.echo(dump(manifest))
    typer.echo(f"runs here on: {runtimes.describe_here(manifest, get_settings())}")
    typer.echo(f"providers available here: {', '.join(providers.available())}")


@app.command("rehash")
def rehash(name: str) -> None:
    """Record the hashes of a model's tokenizer and configs in its manifest, for a model
    prepared before embedq recorded them, after checking its ONNX file: from then on a damaged
    or edited file is refused at load like a damaged ONNX file. The files are trusted as they
    are now; a model whose manifest records them already is only checked."""
    store = _store()
    try:
        recorded = bool(store.get(name).files)
        manifest = record_files(store.path(name))
    except EmbedqError as exc:
        raise fail(exc) from exc
    if recorded:
        typer.echo(f"{name}: its {len(manifest.files)} recorded files and model.onnx all match")
    else:
        typer.echo(
            f"{name}: model.onnx matches; {len(manifest.files)} files recorded beside it as they"
            " are now (if one may have been changed, pull the model again instead)"
        )
