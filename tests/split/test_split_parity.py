"""Parity: with the identity codec the split model is the unsplit model (loss, LoRA gradients, and
one optimizer step of the full protocol)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedq.adapt import IdentityQuantizer
from fedq.codec import dequantize
from fedq.rounds import client_seed
from fedq.split.protocol import SplitClientWorker, SplitServer


def _unsplit_loss(sm, batch):  # type: ignore[no-untyped-def]
    if sm.task == "classify":
        logits = sm.full(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch.get("token_type_ids"),
        )
        return F.cross_entropy(logits, batch["labels"])
    return sm.full(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss


@pytest.mark.parametrize("model", ["tiny_bert_lora", "tiny_llama_lora"])
def test_identity_split_matches_unsplit_loss_and_lora_grads(model: str, kit) -> None:  # type: ignore[no-untyped-def]
    cfg = kit.tiny_cfg(model, act_codec="none", grad_codec="none")
    sm = kit.build(cfg)
    sm.full.eval()  # no dropout: both paths must see the same function
    with torch.no_grad():  # non-zero LoRA B, so every LoRA tensor gets a gradient
        for n, p in sm.full.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    texts = ["a gripping, well acted film", "dull and far too long", "fine"]
    batch = sm.make_batch(texts, torch.tensor([1, 0, 1]))
    h = sm.bottom(batch)
    h_hat, packed = IdentityQuantizer().forward_encode(h)
    h_srv = dequantize(packed).requires_grad_()  # what the server decodes
    loss, _, _ = sm.top(h_srv, batch["attention_mask"], batch["labels"])
    loss.backward()
    assert h_srv.grad is not None
    h_hat.backward(dequantize(IdentityQuantizer().encode(h_srv.grad)))
    split = {n: p.grad.clone() for n, p in sm.full.named_parameters() if p.requires_grad}
    sm.full.zero_grad()
    ref = _unsplit_loss(sm, batch)
    ref.backward()
    full = {n: p.grad.clone() for n, p in sm.full.named_parameters() if p.requires_grad}
    assert float(loss.detach()) == float(ref.detach())
    assert split.keys() == full.keys() and any("lora_A" in n for n in split)
    for n in full:
        assert torch.count_nonzero(full[n]) > 0, n
        torch.testing.assert_close(split[n], full[n], rtol=0, atol=1e-7, msg=n)


def test_identity_protocol_step_equals_unsplit_adamw_step(kit, open_rounds) -> None:  # type: ignore[no-untyped-def]
    """One step of client + server through the round engine (wire framing included) == one
    AdamW step of the whole model."""
    cfg = kit.tiny_cfg(
        act_codec="none",
        grad_codec="none",
        local_steps=1,
        rounds={"count": 1, "num_clients": 1, "clients_per_round": 1},
    )
    split, parts = kit.data(cfg)
    srv_model, cli_model, ref_model = kit.build(cfg), kit.build(cfg), kit.build(cfg)
    for m in (srv_model, cli_model, ref_model):
        m.full.eval()
    server = SplitServer(cfg, srv_model, split.test, 2)
    shards = kit.shards(cfg, split, parts)
    harness = open_rounds(cfg, server, {c: sh.size for c, sh in shards.items()})
    harness.engine.start()
    (task,) = harness.next_task().tasks
    worker = SplitClientWorker(cfg, cli_model, shards, {"client-0": 0})
    out = worker.run(task, harness.connection())
    rec = harness.record(0)
    assert rec["applied"] and out["steps"] == 1
    # the same batch, unsplit, one AdamW step over all trainable parameters
    gen = torch.Generator().manual_seed(client_seed(cfg.seed, 0, 0))
    idx = parts[0][torch.randperm(parts[0].numel(), generator=gen)][: cfg.train.batch_size]
    batch = ref_model.make_batch([split.train.texts[int(i)] for i in idx], split.train.y[idx])
    params = [p for p in ref_model.full.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    loss = _unsplit_loss(ref_model, batch)
    loss.backward()
    opt.step()
    (row,) = rec["steps"]
    assert row["loss"] == out["loss"] == pytest.approx(float(loss), abs=1e-6)
    ref = dict(ref_model.full.named_parameters())
    fresh = dict(kit.build(cfg).full.named_parameters())
    assert any(not torch.equal(ref[n], fresh[n]) for n in ref)  # the step did move things
    moved = 0
    for model, side in ((srv_model, srv_model.top), (cli_model, cli_model.bottom)):
        names = {id(p): n for n, p in model.full.named_parameters()}
        for p in side.parameters():
            if p.requires_grad:
                name = names[id(p)]
                torch.testing.assert_close(p, ref[name], rtol=0, atol=1e-6, msg=name)
                moved += 1
    assert moved == len(params)  # every trainable tensor lives on exactly one side
    # the client's uploaded state is its stepped bottom, and it is what the round averaged in
    for n, p in cli_model.bottom_state().items():
        torch.testing.assert_close(server.client_state[n], p, rtol=0, atol=0, msg=n)
