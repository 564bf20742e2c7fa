"""Bring your own model and data, through the real CLI: a local Hugging Face checkpoint
(``hf:PATH``) fine-tuned with LoRA on instruction records (``jsonl:PATH``), its adapter exported
and reloaded with PEFT, an encoder checkpoint as a classifier, and a site whose base differs
refused before any round."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
Run = Any
ERR = "fedq: error: invalid configuration: "
TOKEN = "t" * 40


def _records(n: int) -> list[dict]:
    rows: list[dict] = []
    for i in range(n):
        if i % 3 == 0:
            rows.append({"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1)})
        elif i % 3 == 1:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Say the number {i}."},
                        {"role": "assistant", "content": str(i)},
                    ]
                }
            )
        else:
            rows.append({"text": f"The number {i} comes after {i - 1}."})
    return rows


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _scenario(tmp_path: Path, model_name: str, source: str, **sections: Any) -> Path:
    raw: dict[str, Any] = {
        "name": "byom",
        "seed": 0,
        "data": {"name": source, "partition": "iid"},
        "model": {"name": model_name, "max_length": 48, "lora": {"r": 4}},
        "train": {"batch_size": 8, "lr": 0.01, "optimizer": "adam"},
        "rounds": {"count": 2, "num_clients": 2, "clients_per_round": 2},
        "compression": {"uplink": {"policy": "fixed", "bits": 4}},
        "runtime": {"workers": 1},
    }
    for key, value in sections.items():
        if value is None or not isinstance(value, dict):
            raw.pop(key, None) if value is None else raw.update({key: value})
        else:
            raw[key] = {**raw.get(key, {}), **value}
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_local_causal_lm_is_instruction_tuned_and_its_adapter_loads_in_peft(
    fedq_cli: Run, tmp_path: Path, tiny_lm: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedq.config import load_scenario
    from fedq.models.hf import encode_records
    from fedq.modes import get_mode
    from fedq.runtime.checkpoint import load_checkpoint

    data = _jsonl(tmp_path / "train.jsonl", _records(40))
    # in one process: the README test below runs the same path on Ray
    scenario = _scenario(
        tmp_path,
        f"hf:{tiny_lm}",
        f"jsonl:{data}",
        runtime={"backend": "inprocess"},
        data={"site_holdout": 0.2},  # each site also measures the model on 4 of its own records
    )
    run = tmp_path / "run"
    done = fedq_cli("simulate", str(scenario), "--out", str(run))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done: perplexity " in done.stdout, done.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    for r in records:
        assert r["accuracy"] is None and r["perplexity"] > 1 and r["eval_tokens"] > 0
        assert abs(r["perplexity"] - torch.tensor(r["loss"]).exp().item()) < 1e-3 * r["perplexity"]
        assert r["mean_bits"] == 4.0
        sites = r["site_eval"]
        assert list(sites) == ["client-0", "client-1"] and r["site_perplexity"] > 1
        assert all(s["count"] > 0 and s["perplexity"] > 1 for s in sites.values())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_perplexity"] == records[-1]["perplexity"]
    samples = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    per_round = [sum(s["round"] == r for s in samples) for r in (0, 1)]
    assert per_round[0] == per_round[1] and 1 <= per_round[0] <= 3, samples
    assert all(isinstance(s["answer"], str) and s["prompt"] for s in samples)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["lora"]["r"] == 4

    # The run folder's adapter and `fedq export` give the global model's logits in PEFT.
    adapter = run / "adapter"
    assert (adapter / "adapter_config.json").is_file(), sorted(p.name for p in run.iterdir())
    exported = tmp_path / "exported"
    done = fedq_cli("export", str(run), "--out", str(exported))
    assert done.returncode == 0 and f"wrote adapter (PEFT) to {exported}" in done.stdout, done
    merged = tmp_path / "merged"
    done = fedq_cli("export", str(run), "--out", str(merged), "--merge")
    assert done.returncode == 0, done.stdout + done.stderr

    cfg = load_scenario(run / "config.json")
    ours = get_mode("federated").trained_model(cfg, load_checkpoint(run)["server"]["workload"])
    ours.eval()
    rows = [r for r in (ours.tokenizer,)]  # the tokenizer the run trained with
    from fedq.data.instruct import read_jsonl

    inputs, _ = encode_records(rows[0], read_jsonl(data)[:4], max_length=48)
    want = ours.forward(inputs)
    for folder in (adapter, exported):
        base = AutoModelForCausalLM.from_pretrained(str(tiny_lm), dtype=torch.float32)
        got = PeftModel.from_pretrained(base, str(folder)).eval()(**inputs).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    torch.testing.assert_close(plain(**inputs).logits, want, rtol=1e-4, atol=1e-4)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4


def test_a_local_encoder_fine_tunes_as_a_classifier(
    fedq_cli: Run, tmp_path: Path, tiny_encoder: Path
) -> None:
    csv = tmp_path / "reviews.csv"
    rows = [f"good film {i},pos" if i % 2 else f"bad film {i},neg" for i in range(40)]
    csv.write_text("text,label\n" + "\n".join(rows) + "\n")
    scenario = _scenario(
        tmp_path, f"hf:{tiny_encoder}", f"csv:{csv}", rounds={"count": 1}, model={"lora": {"r": 2}}
    )
    run = tmp_path / "run"
    done = fedq_cli("simulate", str(scenario), "--out", str(run))
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= record["accuracy"] <= 1.0 and "perplexity" not in record
    adapter = run / "adapter"
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors"} <= names
    assert json.loads((adapter / "fedq_head.json").read_text())["num_classes"] == 2


def test_split_mode_instruction_tunes_a_local_causal_lm(
    fedq_cli: Run, tmp_path: Path, tiny_lm: Path
) -> None:
    """The same instruction records as federated mode (Alpaca, chat and plain text in one file),
    cut after block 1 with AMAQ at the cut: perplexity on the held-out records, and the sample
    prompts' answers in generations.jsonl."""
    data = _jsonl(tmp_path / "train.jsonl", _records(24))
    done = fedq_cli(
        "simulate",
        str(ROOT / "scenarios" / "split_tiny.yaml"),
        "--set",
        f"model.name=hf:{tiny_lm}",
        "--set",
        f"data.name=jsonl:{data}",
        "--set",
        "split.cut=1",
        "--set",
        "rounds.count=1",
        "--set",
        "model.sample_prompts=[Add 2 and 3.]",
        "--set",
        "model.sample_tokens=4",
        "--out",
        str(tmp_path / "run"),
        "-q",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warning" not in done.stderr, done.stderr
    run = tmp_path / "run"
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["perplexity"] > 1 and record["act_bits"] > 0
    samples = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    assert [(s["round"], s["prompt"]) for s in samples] == [(0, "Add 2 and 3.")]
    assert isinstance(samples[0]["answer"], str)

    # Both halves' adapters in one PEFT adapter: the trained split model's logits in PEFT.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedq.config import load_scenario
    from fedq.data.instruct import read_jsonl
    from fedq.models.hf import encode_records
    from fedq.modes import get_mode
    from fedq.runtime.checkpoint import load_checkpoint

    cfg = load_scenario(run / "config.json")
    ours = get_mode("split").trained_model(cfg, load_checkpoint(run)["server"]["workload"])
    ours.eval()
    inputs, _ = encode_records(ours.tokenizer, read_jsonl(data)[:4], max_length=32)
    want = ours.forward(inputs)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_lm), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    lora_b = [p for n, p in peft.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 4 and all(bool(p.abs().sum() > 0) for p in lora_b)  # both halves
    torch.testing.assert_close(peft(**inputs).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "data", "extra", "problem"),
    [
        ("lm", "bad", {}, "data.name: {bad}:2: missing field 'output'"),
        (
            "lm",
            "good",
            {"privacy": {"mechanism": "dpsgd", "noise_multiplier": 1.0}},
            "privacy.mechanism: 'dpsgd' is not offered for causal-LM fine-tuning",
        ),
        ("encoder", "good", {}, "data.name: 'jsonl:{good}' holds instruction/text records"),
        ("lm", "digits", {}, "data.name: model 'hf:{lm}' is a causal LM; it trains on"),
        (
            "tiny_bert_lora",
            "good",
            {"mode": "split", "compression": None, "train": {"optimizer": "adamw"}},
            "data.name: 'jsonl:{good}' holds instruction/text records for a causal LM",
        ),
        (
            "encoder",
            "good",
            {"model": {"base_bits": 4}},
            "model.base_bits: a packed frozen base is offered for causal LMs",
        ),
        (
            "lm",
            "good",
            {
                "mode": "split",
                "compression": None,
                "train": {"optimizer": "adamw"},
                "model": {"gradient_checkpointing": True},
            },
            "model.gradient_checkpointing: not used in mode 'split'",
        ),
    ],
    ids=[
        "bad-record",
        "dpsgd",
        "classifier-on-records",
        "causal-lm-on-labels",
        "split-classifier-on-records",
        "packed-base-classifier",
        "checkpointing-split",
    ],
)
def test_what_cannot_train_is_one_error_before_anything_starts(
    fedq_cli: Run,
    tmp_path: Path,
    tiny_lm: Path,
    tiny_encoder: Path,
    model: str,
    data: str,
    extra: dict,
    problem: str,
) -> None:
    good = _jsonl(tmp_path / "good.jsonl", _records(20))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_records(1)[0]) + '\n{"instruction": "x"}\n')
    paths = {"lm": tiny_lm, "encoder": tiny_encoder, "good": good, "bad": bad}
    source = "digits" if data == "digits" else f"jsonl:{paths[data]}"
    name = model if model == "tiny_bert_lora" else f"hf:{paths[model]}"
    scenario = _scenario(tmp_path, name, source, **extra)
    done = fedq_cli("simulate", str(scenario), "--out", str(tmp_path / "run"), "-q")
    assert done.returncode == 2, done.stdout + done.stderr
    want = ERR + problem.format(bad=bad, good=good, lm=tiny_lm)
    assert done.stderr.startswith(want) and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "run").exists()


def test_a_site_with_a_different_base_is_refused_before_any_round(
    fedq_cli: Run, tmp_path: Path, tiny_lm: Path
) -> None:
    """``fedq join --model PATH``: the site's own copy of the base must match the fingerprint
    the server sends; a different one is refused with both named, a byte-identical copy trains."""
    from support.hf_models import save_tiny_causal_lm

    same = tmp_path / "site-copy"
    shutil.copytree(tiny_lm, same)
    other = save_tiny_causal_lm(tmp_path / "other-base", seed=1)
    site = _jsonl(tmp_path / "site.jsonl", _records(12))
    scenario = _scenario(
        tmp_path,
        f"hf:{tiny_lm}",
        f"jsonl:{_jsonl(tmp_path / 'eval.jsonl', _records(10))}",
        rounds={"count": 1, "num_clients": 1, "clients_per_round": 1},
    )
    tokens, token = tmp_path / "tokens.yaml", tmp_path / "client-0.token"
    tokens.write_text(f"client-0: {TOKEN}\n")
    token.write_text(TOKEN)
    for f in (tokens, token):
        f.chmod(0o600)
    fedq = str(Path(sys.executable).with_name("fedq"))
    server = subprocess.Popen(
        [
            fedq,
            "serve",
            str(scenario),
            "--listen",
            "127.0.0.1:0",
            "--tokens",
            str(tokens),
            "--out",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        lines = []
        for line in server.stdout:
            lines.append(line)
            if line.startswith("listening on "):
                break
        address = lines[-1].split()[2]

        def join(base: Path) -> Any:
            return fedq_cli(
                "join",
                "--server",
                address,
                "--client-id",
                "client-0",
                "--token-file",
                str(token),
                "--data",
                f"jsonl:{site}",
                "--model",
                str(base),
                timeout=180,
            )

        refused = join(other)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"fedq: error: this site's base model ({other}, sha256 " in refused.stderr
        assert "is not the one the server trains on (sha256 " in refused.stderr
        assert "Traceback" not in refused.stderr and "round 0" not in refused.stdout
        joined = join(same)
        out, _ = server.communicate(timeout=180)
    finally:
        server.kill()
    assert joined.returncode == 0, joined.stdout + joined.stderr
    assert "done: perplexity " in out, out
    pinned = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert pinned["name"] == f"hf:{tiny_lm}"


def test_the_readme_commands_for_your_own_model_run_as_written(
    tmp_path: Path, tiny_lm: Path
) -> None:
    """The README's "Your own model" block, run as written in a scratch folder holding
    ``my-model`` (a tiny causal LM) and ``train.jsonl`` (one round instead of four)."""
    from test_readme import ENV, ROOT, readme_commands

    cmds = readme_commands("# your base model in ./my-model")
    assert [c[:2] for c in cmds] == [["fedq", "simulate"], ["fedq", "export"], ["fedq", "export"]]
    shutil.copytree(tiny_lm, tmp_path / "my-model")
    _jsonl(tmp_path / "train.jsonl", _records(30))
    (tmp_path / "scenarios").symlink_to(ROOT / "scenarios")
    cmds[0] += ["--set", "rounds.count=1", "--set", "runtime.workers=1", "-q"]
    for cmd in cmds:
        done = subprocess.run(
            cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, (cmd, done.stdout, done.stderr)
    assert (tmp_path / "runs" / "mine" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "my-merged" / "config.json").is_file()


def test_shard_writes_each_sites_instruction_records(fedq_cli: Run, tmp_path: Path) -> None:
    """``fedq shard`` of instruction data: one ``client-<i>.jsonl`` per client, the records the
    simulation would give it, readable again as ``jsonl:`` site data."""
    from fedq.config import load_scenario
    from fedq.data.instruct import read_jsonl
    from fedq.runtime.setup import client_partitions, load_data

    scenario = ROOT / "scenarios" / "smollm2_instruct_lora.yaml"
    done = fedq_cli("shard", str(scenario), "--out", str(tmp_path / "data"))
    assert done.returncode == 0, done.stdout + done.stderr
    cfg = load_scenario(scenario)
    split = load_data(cfg)
    for i, idx in enumerate(client_partitions(cfg, split.train)):
        got = read_jsonl(tmp_path / "data" / f"client-{i}.jsonl")
        assert got == [split.train.records[j] for j in idx.tolist()]


def test_a_causal_lm_trains_on_a_packed_base_and_merges_into_the_full_one(
    fedq_cli: Run, tmp_path: Path, tiny_lm: Path
) -> None:
    """A memory budget for the base (``model.base_budget_mb``, with gradient checkpointing and
    LoRA started from the packing residual): the frozen linear weights held packed while the
    adapters train; ``fedq export --merge`` merges the adapter into the full-precision base
    (what PEFT gives for that base and the exported adapter, which is rank 2r here).
    (``model.base_bits`` and split mode: the ``quantize-base`` test below.)"""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedq.data.instruct import read_jsonl
    from fedq.models.hf import encode_records, tokenizer

    data = _jsonl(tmp_path / "train.jsonl", _records(24))
    packing = {"base_budget_mb": 0.02, "gradient_checkpointing": True, "base_lowrank_init": True}
    scenario = _scenario(
        tmp_path,
        f"hf:{tiny_lm}",
        f"jsonl:{data}",
        model=packing,
        rounds={"count": 1},
        runtime={"backend": "inprocess"},
    )
    run = tmp_path / "run"
    done = fedq_cli("simulate", str(scenario), "--out", str(run), "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["perplexity"] > 1
    saved = json.loads((run / "config.json").read_text())
    assert all(saved["model"][k] == v for k, v in packing.items())
    merged = tmp_path / "merged"
    done = fedq_cli("export", str(run), "--merge", "--out", str(merged))
    assert done.returncode == 0, done.stdout + done.stderr
    inputs, _ = encode_records(tokenizer(tiny_lm), read_jsonl(data)[:3], max_length=48)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_lm), dtype=torch.float32)
    want = PeftModel.from_pretrained(base, str(run / "adapter")).eval()(**inputs).logits
    got = AutoModelForCausalLM.from_pretrained(str(merged)).eval()(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_quantize_base_writes_a_packed_base_that_runs_as_a_model(
    fedq_cli: Run, tmp_path: Path, tiny_lm: Path
) -> None:
    """``fedq quantize-base``: a model directory whose base loads packed (the same layers as
    packing the checkpoint on the site), with its own fingerprint; a split run fine-tunes on it
    (both halves packed) and exports its adapter; ``--merge`` is refused with the reason (no
    full-precision base)."""
    import torch

    from fedq.errors import ConfigError
    from fedq.models.hf import fingerprint, frozen_causal_lm, packed_base

    out = tmp_path / "packed"
    done = fedq_cli(
        "quantize-base", f"hf:{tiny_lm}", "--bits", "4", "--group-size", "32", "--out", str(out)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "14 linear layers packed (14 at 4 bits)" in done.stdout
    assert f"use it as model.name: hf:{out}" in done.stdout
    assert fingerprint(out) in done.stdout and fingerprint(tiny_lm) in done.stdout
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        got = frozen_causal_lm(out)(ids).logits
        want = packed_base(tiny_lm, 4, 32)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"leave model\.base_bits and"):
        frozen_causal_lm(out, bits=4)
    again = fedq_cli("quantize-base", f"hf:{tiny_lm}", "--bits", "4", "--out", str(out))
    assert again.returncode != 0 and "holds a model already" in again.stderr
    data = _jsonl(tmp_path / "train.jsonl", _records(24))
    scenario = _scenario(
        tmp_path,
        f"hf:{out}",
        f"jsonl:{data}",
        mode="split",
        compression=None,
        split={"cut": 1, "local_steps": 2},
        train={"optimizer": "adamw"},
        rounds={"count": 1},
        runtime={"backend": "inprocess"},
    )
    run = tmp_path / "run"
    done = fedq_cli("simulate", str(scenario), "--out", str(run), "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    done = fedq_cli("export", str(run), "--merge", "--out", str(tmp_path / "merged"))
    assert done.returncode != 0
    assert "--merge needs the full-precision base" in done.stderr
