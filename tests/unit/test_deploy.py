"""Docker cannot run on the development machines: the compose file and the Dockerfile are
checked statically against the code (settings names, commands, build targets)."""

import re
from pathlib import Path
from typing import Any

import yaml
from typer.main import get_command

from tasks.cli import app
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def embedq_services() -> dict[str, Any]:
    return {
        name: spec
        for name, spec in compose()["services"].items()
        if spec.get("image", "").startswith("embedq")
    }


def test_every_embedq_variable_in_compose_is_a_setting() -> None:
    fields = {f"EMBEDQ_{name.upper()}" for name in Settings.model_fields}
    for name, spec in embedq_services().items():
        used = {key for key in spec.get("environment", {}) if key.startswith("EMBEDQ_")}
        assert used and used <= fields, (name, used - fields)
        assert {"EMBEDQ_BROKER_URL", "EMBEDQ_DATABASE_URL"} <= used


def test_every_command_is_an_embedq_command_that_exists() -> None:
    cli = get_command(app)
    commands = set(cli.commands)  # type: ignore[attr-defined]
    for name, spec in embedq_services().items():
        program, sub, *_ = spec["command"]
        assert program == "embedq" and sub in commands, (name, spec["command"])


def test_build_targets_exist_and_the_images_run_as_a_user_without_torch() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.MULTILINE))
    for name, spec in embedq_services().items():
        assert spec["build"]["target"] in stages, name
    assert {"cpu", "gpu"} <= stages and len(stages) >= 4  # multi-stage
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and "root" not in users
    assert "torch" not in re.sub(r"#.*", "", dockerfile)  # comments may mention it
    for copied in re.findall(r"^COPY (\w+) ", dockerfile, re.MULTILINE):
        assert (REPO / copied).is_dir(), copied


def test_the_images_install_the_worker_extra() -> None:
    """`pip install .` is the client side (no onnxruntime, no tokenizers); every image runs a
    worker, Flower or migrations, so each install of the project asks for the worker extra."""
    dockerfile = re.sub(r"#.*", "", (REPO / "Dockerfile").read_text())
    installs = re.findall(r"pip install ['\"]?\.(\[[^\]]*\])?['\"]?\s", dockerfile)
    assert installs
    for extras in installs:
        assert "worker" in extras.strip("[]").split(","), extras or "no extra"


def test_the_fleet_has_what_the_issue_asks_for() -> None:
    services = compose()["services"]
    assert "--requirepass" in services["redis"]["command"]
    assert services["migrate"]["command"] == ["embedq", "db", "upgrade"]
    gpu = services["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["EMBEDQ_GPU_DEVICES"] == "0"
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    assert "EMBEDQ_FLOWER_PASSWORD" in services["flower"]["environment"]
    for name, spec in services.items():
        assert "healthcheck" in spec or spec.get("restart") == "no", name
    assert "models:/models" in gpu["volumes"] and "models" in compose()["volumes"]


def test_workers_and_the_api_come_back_after_they_exit() -> None:
    """A worker exits on errors it cannot recover from (Redis at maxmemory): without a restart
    policy it stayed down, and its queues with it."""
    for name, spec in embedq_services().items():
        if name != "migrate":
            assert spec.get("restart") == "unless-stopped", name


def test_no_package_archive_is_named_in_deploy() -> None:
    """The stand-in images are built from the archive the host's apt uses
    (deploy/apt-archive.sh reads it from its sources), never from an address written here."""
    for path in (REPO / "deploy").rglob("*"):
        if path.is_file() and path.suffix in ("", ".sh", ".Dockerfile"):
            text = path.read_text(errors="replace")
            assert not re.search(r"(deb|archive|mirror)[\w.-]*\.(org|com|net)", text), path
