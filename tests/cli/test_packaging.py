"""The Docker packaging, read as files (no Docker here; ``scripts/compose-smoke`` runs it for real):
docker-compose.yml is one TLS server and two clients that each see only their own token and data,
with commands fedq's own parser accepts; the Dockerfile installs torch 2.13.0 before fedq, on the
``BASE_IMAGE`` it is given, and runs fedq unprivileged."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedq.cli import build_parser
from fedq.config import load_scenario

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ("client-0", "client-1")


def _compose() -> dict[str, Any]:
    """docker-compose.yml with ``${VAR:-default}`` replaced by its default, as compose does when
    VAR is unset."""
    text = (ROOT / "docker-compose.yml").read_text()
    text = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", text)
    assert "${" not in text, "an interpolation without a default"
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (host source, options) of a service's short-syntax volumes."""
    found = {}
    for entry in service.get("volumes", []):
        source, target, *opts = entry.split(":")
        found[target] = (source, ",".join(opts))
    return found


def _flag(command: list[str], flag: str) -> str:
    assert command.count(flag) == 1, (flag, command)
    return command[command.index(flag) + 1]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [
        ln
        for ln in (ROOT / "Dockerfile").read_text().splitlines()
        if not ln.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def test_compose_is_one_server_and_two_clients_with_tls() -> None:
    services = _compose()["services"]
    assert set(services) == {"server", *CLIENTS}
    images = {svc["image"] for svc in services.values()}
    assert len(images) == 1, images
    for name, svc in services.items():
        assert svc.get("init") is True, f"{name}: without an init, stopping it waits 10 s"
        assert "--insecure" not in svc["command"], name
        assert "network_mode" not in svc, f"{name}: clients must reach the server by its name"
    server = services["server"]["command"]
    assert server[0] == "serve"
    port = _flag(server, "--listen").rpartition(":")[2]
    assert f"{port}:{port}" in services["server"].get("ports", []), "sites elsewhere dial it"
    for cid in CLIENTS:
        client = services[cid]["command"]
        assert client[0] == "join" and _flag(client, "--client-id") == cid
        assert _flag(client, "--server") == f"server:{port}"
        assert services[cid]["depends_on"] == ["server"]


def test_server_mounts_its_credentials_scenarios_and_a_runs_volume() -> None:
    compose = _compose()
    svc = compose["services"]["server"]
    command, mounts = svc["command"], _mounts(svc)
    for flag, name in (
        ("--cert", "server.pem"),
        ("--key", "server.key"),
        ("--tokens", "tokens.yaml"),
    ):
        source, opts = mounts[_flag(command, flag)]
        assert source.endswith(f"/certs/{name}") and opts == "ro", (flag, source, opts)
    secrets = [src for src, _ in mounts.values() if src.endswith((".key", ".token"))]
    assert secrets == ["./deploy/certs/server.key"], "the server gets no CA or client key"
    scenario = Path(command[1])
    assert mounts[str(scenario.parent)] == ("./scenarios", "ro")
    assert (ROOT / "scenarios" / scenario.name).is_file()
    out = Path(_flag(command, "--out"))
    volume, _ = mounts[str(out.parent)]
    assert volume in compose["volumes"], "the run folder lives in a named volume"


@pytest.mark.parametrize("cid", CLIENTS)
def test_each_client_mounts_only_its_own_token_and_data_and_the_ca(cid: str) -> None:
    svc = _compose()["services"][cid]
    command, mounts = svc["command"], _mounts(svc)
    assert all(opts == "ro" for _, opts in mounts.values()), mounts
    token, _ = mounts[_flag(command, "--token-file")]
    ca, _ = mounts[_flag(command, "--ca")]
    kind, _, path = _flag(command, "--data").partition(":")
    data, _ = mounts[path]
    assert token == f"./deploy/certs/clients/{cid}.token"
    assert ca == "./deploy/certs/ca.pem"
    assert kind == "npz" and data == f"./deploy/data/{cid}.npz"
    assert set(mounts) == {_flag(command, "--token-file"), _flag(command, "--ca"), path}


def test_compose_commands_parse_and_the_scenario_fits_two_clients() -> None:
    services = _compose()["services"]
    parser = build_parser()
    server = parser.parse_args(services["server"]["command"])
    for cid in CLIENTS:
        assert parser.parse_args(services[cid]["command"]).client_id == cid
    scenario = ROOT / "scenarios" / Path(server.scenario).name
    cfg = load_scenario(scenario, server.set)
    assert cfg.rounds.num_clients == len(CLIENTS) == cfg.rounds.min_clients


def test_compose_header_documents_certs_naming_the_server_and_shards() -> None:
    header = "\n".join(
        ln.lstrip("# ")
        for ln in (ROOT / "docker-compose.yml").read_text().splitlines()
        if ln.startswith("#")
    )
    certs = next(shlex.split(ln) for ln in header.splitlines() if ln.startswith("fedq certs"))
    hosts = [certs[i + 1] for i, word in enumerate(certs) if word == "--host"]
    assert {"server", "localhost", "127.0.0.1"} <= set(hosts), certs
    assert certs[certs.index("--clients") + 1] == str(len(CLIENTS))
    assert "fedq shard" in header and "--out deploy/data" in header


def test_dockerfile_installs_torch_first_on_base_image_and_runs_fedq_unprivileged() -> None:
    steps = _dockerfile()
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) == 2 and all(f.startswith("${BASE_IMAGE}") for f in froms), froms
    pins = re.findall(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert pins == ["2.13.0"]
    installs = [args for word, args in steps if word == "RUN" and "pip install" in args]
    assert len(installs) == 2, installs
    torch_step, fedq_step = installs
    assert '"torch==2.13.0"' in torch_step and "-c constraints.txt" in torch_step
    assert "-c constraints.txt" in fedq_step
    assert re.findall(r'"\.\[([^]]*)\]"', fedq_step) == ["text,privacy"], "no dev or kernels"
    assert "torch was replaced" in fedq_step, "the build checks torch survived"
    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM") :]
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("ENTRYPOINT", '["fedq"]') in final
    assert any(word == "COPY" and args.startswith("--from=build /opt/fedq") for word, args in final)
    assert ("ENV", "PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1") in steps


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    allowed = {
        ln[1:] for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.startswith("!")
    }
    copied = [
        word
        for step, args in _dockerfile()
        if step == "COPY" and "--from" not in args
        for word in args.split()[:-1]
    ]
    assert copied and set(copied) <= allowed, (copied, allowed)
    assert all((ROOT / name).exists() for name in copied)
