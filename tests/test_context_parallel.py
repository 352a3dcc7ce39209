"""Context parallelism for MLA (trainer.context_parallel): the split, and CP equal to one process with the
classic mistakes caught. The whole trainer under CP (x DP, EP, TP+SP, MTP, resume) is in tests/test_trainer.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from model.transformer import IGNORE_INDEX, mtp_targets
from trainer.context_parallel import chunk_index, split_batch


def test_load_balanced_chunks_cover_the_sequence_once():
    """Rank r holds chunks r and 2CP-1-r: every rank gets as many early (cheap) as late (costly) causal rows."""
    for cp in (2, 4):
        held = [chunk_index(32, cp, r) for r in range(cp)]
        assert sorted(torch.cat(held).tolist()) == list(range(32))
        assert held[0].tolist()[:32 // (2 * cp)] == list(range(32 // (2 * cp)))  # rank 0: the first chunk ...
        assert held[0].tolist()[-1] == 31  # ... and the last
        work = [int((h + 1).sum()) for h in held]  # keys each rank's queries see under the causal mask
        assert len(set(work)) == 1
    with pytest.raises(ValueError, match="multiple of 2 x CP = 4"):
        chunk_index(30, 2, 0)


def test_split_takes_everything_from_the_whole_sequence():
    """Positions, segments and the MTP inputs/targets (k tokens ahead, never across a document) are sliced from
    the whole sequence; a length the chunks cannot take is padded with ignored labels in a segment of its own."""
    ids = torch.arange(10, 40).view(1, 30)
    seg = torch.tensor([[0] * 7 + [1] * 23])
    pos = torch.cat([torch.arange(7), torch.arange(23)]).view(1, 30)
    labels = torch.roll(ids, -1, 1).masked_fill(torch.roll(seg, -1, 1) != seg, IGNORE_INDEX)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "segment_ids": seg}
    parts = [split_batch(batch, 2, r, mtp_depth=1, pad_id=0) for r in range(2)]
    assert all(p["input_ids"].shape == (1, 16) for p in parts)  # 30 padded to 32
    index = torch.cat([p["cp_index"] for p in parts])
    order = index.argsort()
    whole = {k: torch.cat([p[k] for p in parts], 1)[:, order] for k in ("input_ids", "labels", "position_ids", "segment_ids")}
    assert whole["input_ids"][0, :30].tolist() == ids[0].tolist() and whole["input_ids"][0, 30:].tolist() == [0, 0]
    assert whole["labels"][0, 30:].tolist() == [IGNORE_INDEX] * 2 and whole["segment_ids"][0, 30:].tolist() == [-1, -1]
    assert whole["position_ids"][0, :30].tolist() == pos[0].tolist()  # global (per document) positions, not local
    mtp = torch.cat([p["mtp_labels"][0] for p in parts], 1)[:, order]
    assert mtp[0, :30].tolist() == mtp_targets(labels, seg, 1)[0][0].tolist()
    ahead = torch.cat([p["mtp_inputs"][0] for p in parts], 1)[:, order]
    assert ahead[0, :29].tolist() == ids[0, 1:].tolist()


def test_cp2_equals_one_process_and_the_classic_mistakes_do_not():
    """Two CP ranks (gloo) against one process on the same weights and packed batch (documents crossing the
    chunks, MTP on): loss and every parameter gradient equal; each classic mistake moves the gradients far
    beyond that: RoPE on local positions, a gather without backward for the other ranks' parts, no document
    mask on gathered keys, a loss normalised per rank with averaged gradients, a sequence-wise aux loss from
    this rank's part of each sequence. With DeepSeek's sequence-wise aux loss on, its statistics (expert
    counts, mean affinities) are those of whole sequences, as in one process."""
    modes = ["correct", "local_positions", "detached_gather", "no_document_mask", "local_mean_loss", "aux_loss_local_stats",
             "with_aux_loss"]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(ROOT / "tests" / "cp_worker.py"), *modes], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    got = {r["mode"]: r for r in (json.loads(ln[7:]) for ln in res.stdout.splitlines() if ln.startswith("RESULT "))}
    assert set(got) == set(modes)
    for good in ("correct", "with_aux_loss"):  # the sequence-wise aux loss from whole-sequence statistics too
        assert got[good]["loss_diff"] <= 2e-6 and got[good]["grad_diff"] <= 1e-6, got[good]
    for mode in modes[1:-1]:
        assert got[mode]["grad_diff"] >= 1e-4, got[mode]  # >= 100x the correct run's error


def test_cp_comm_benchmark_counts_equal_the_planners_formula():
    """benchmarks/cp_comm.py: DeepSeek-V3's bytes per layer vs ring attention (>= 50x fewer), and the bytes counted
    on gloo under CP2 and CP2 x TP2 equal to launcher/comm.py's formula (the one `launch plan` prints)."""
    res = subprocess.run([sys.executable, "benchmarks/cp_comm.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "target >= 50x fewer bytes than ring attention: met" in res.stdout
    assert res.stdout.count(": equal") == 2


def test_chunked_attention_equals_sdpa_with_the_whole_mask(monkeypatch):
    """The online-softmax attention CP uses (model.chunked_attention), K/V expanded per chunk from the latent (and
    a LoRA path's low-rank input), with chunks smaller than the documents and queries at global positions far
    apart: output and gradients (queries, latent, rope key, weights) equal SDPA over the whole expanded K/V with
    the whole causal + document mask. Its memory budget is the one the planner counts."""
    import torch.nn.functional as F

    from launcher.memory import CP_SCORE_CHUNK_BYTES
    from model import chunked_attention as C

    assert C.SCORE_BUDGET_BYTES == CP_SCORE_CHUNK_BYTES
    monkeypatch.setattr(C, "chunk_size", lambda b, h, q, k: 5)
    g = torch.Generator().manual_seed(0)
    b, h, nope, rope, vd, rank, low = 2, 3, 8, 4, 6, 10, 2
    q = torch.randn(b, h, 8, nope + rope, generator=g)
    k_rope = torch.randn(b, 1, 32, rope, generator=g)
    latent, w = torch.randn(b, 32, rank, generator=g), torch.randn(h * (nope + vd), rank, generator=g) / 3
    z, w_low = torch.randn(b, 32, low, generator=g), torch.randn(h * (nope + vd), low, generator=g) / 3
    inputs = (q, k_rope, latent, w, z, w_low)
    for t in inputs:
        t.requires_grad_()
    q_pos, k_pos = torch.tensor([0, 1, 2, 3, 28, 29, 30, 31]), torch.arange(32)
    seg = torch.tensor([[0] * 11 + [1] * 21, [0] * 30 + [1] * 2])
    out = C.LatentChunkedAttention.apply(q, k_rope, q_pos, k_pos, seg[:, q_pos], seg, 0.3, nope, latent, w, z, w_low)
    kv = (latent @ w.t() + z @ w_low.t()).view(b, 32, h, nope + vd).transpose(1, 2)
    k = torch.cat([kv[..., :nope], k_rope.expand(-1, h, -1, -1)], dim=-1)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None] & (seg[:, q_pos][:, None, :, None] == seg[:, None, None, :])
    ref = F.scaled_dot_product_attention(q, k, kv[..., nope:], attn_mask=mask, scale=0.3)
    assert (out - ref).abs().max() < 1e-6
    d = torch.randn(out.shape, generator=g)
    for a, r in zip(torch.autograd.grad(out, inputs, d), torch.autograd.grad(ref, inputs, d)):
        assert (a - r).abs().max() < 1e-4 * max(1.0, r.abs().max().item()), (a - r).abs().max()
