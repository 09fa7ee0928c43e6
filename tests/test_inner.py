"""Inner loop: host plan tables, K-batched == K sequential, masking, failures, HF/torch parity.

Compiles are the cost here (each distinct (K, bs, T, StepConfig) is one XLA program), so the device
tests share a few shapes: one length bucket (64), K in {1, 4}, steps_per_chunk 8.
"""
import functools
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seal_jax import inner
from seal_jax import lora as lora_lib
from seal_jax.model import transformer
from seal_jax.model.config import LoraConfig
from seal_jax.model.presets import get_preset
from seal_jax.train_plan import merge_rare_shapes, pack_sequences
from tolerances import assert_close_scaled

CFG = get_preset("tiny-llama")
LC = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
PAD = 2
IC = inner.InnerConfig(epochs=3, steps_per_chunk=8, length_buckets=(64,))


def _tokens(rng, n):
    return rng.integers(3, CFG.vocab_size, size=n).astype(np.int32)


def _candidates(seed=0):
    """Four candidates with different numbers and lengths of sequences (and one partial mask)."""
    rng = np.random.default_rng(seed)
    lens = ([10, 20, 30], [5, 41], [40], [7, 8, 9, 10, 11])
    cands = [inner.CandidateData([_tokens(rng, n) for n in ls]) for ls in lens]
    # Candidate 3: only the second half of each sequence is a target (output-only style loss).
    cands[3].loss_masks = [np.r_[np.zeros(len(s) // 2), np.ones(len(s) - len(s) // 2)]
                           for s in cands[3].sequences]
    return cands


HPARAMS = [{"lr": 5e-3, "seed": 3}, {"epochs": 2, "lr": 3e-3}, {"epochs": 4},
           {"schedule": "cosine", "warmup_steps": 2, "lr": 5e-3}]


@pytest.fixture(scope="module")
def params():
    return transformer.init_params(CFG, jax.random.PRNGKey(0))


_RUNS = {}


def _batched(params, bs):
    """The K=4 run shared by several tests (cached per batch size)."""
    if bs not in _RUNS:
        ic = IC.replace(batch_size=bs)
        plan = inner.build_plan(_candidates(), HPARAMS, ic, pad_id=PAD)
        _RUNS[bs] = (plan, inner.train_candidates(params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=ic))
    return _RUNS[bs]


# ----------------------------------------------------------------------------------------------------
# Host side


def test_pack_sequences_fills_rows_first_fit_without_overlap_or_overflow():
    rng = np.random.default_rng(3)
    for _ in range(20):
        capacity, segments = int(rng.integers(16, 80)), int(rng.integers(1, 5))
        lengths = rng.integers(1, capacity + 1, size=int(rng.integers(1, 30))).tolist()
        placed, rows = pack_sequences(lengths, capacity, segments)
        used = {}
        for (row, offset, slot), n in zip(placed, lengths):
            assert 0 <= row < rows and 0 <= slot < segments and offset + n <= capacity
            used.setdefault(row, []).append((offset, n, slot))
        for spans in used.values():
            spans.sort()
            assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no overlap
            assert sorted(s for _, _, s in spans) == list(range(len(spans)))  # distinct slots
        # First fit: a new row opens only when no earlier row had room for the sequence.
        assert rows <= len(lengths) and sum(lengths) <= rows * capacity


def test_packed_gather_holds_every_candidate_sequence_with_its_adapter_and_targets():
    ic = IC.replace(batch_size=2, length_buckets=(16, 32, 64), pack_row_tokens=32, pack_row_segments=2)
    plan = inner.build_plan(_candidates(), HPARAMS, ic, pad_id=PAD)
    layout = plan.packed_layout()
    seen = 0
    for start, stop, length, rows, slots in plan.packed_chunks(ic.steps_per_chunk):
        batch = plan.gather_packed(start, stop, length, rows, slots, ic.steps_per_chunk)
        assert batch.tokens.shape == (ic.steps_per_chunk, rows, length)
        assert (batch.segments <= slots).all() and slots <= 2
        assert batch.member_tokens.shape[2] == ic.batch_size * length
        for c, s in enumerate(range(start, stop)):
            for k, b in zip(*np.nonzero(plan.batch_index_KxSxB[:, s] >= 0)):
                if not plan.active_KxS[k, s]:
                    continue
                n = plan.batch_index_KxSxB[k, s, b]
                size = plan.lengths_KxN[k, n]
                row, col, slot = (layout.row_KxSxB[k, s, b], layout.offset_KxSxB[k, s, b],
                                  layout.slot_KxSxB[k, s, b])
                np.testing.assert_array_equal(batch.tokens[c, row, col:col + size],
                                              plan.tokens_KxNxT[k, n, :size])
                assert (batch.segments[c, row, col:col + size] == slot + 1).all()
                # The step updates its members only, and the candidate's member lists the
                # sequence's tokens (its b-th block of T places) for its adapter.
                member = int(np.flatnonzero(batch.members[c] == k)[0])
                np.testing.assert_array_equal(
                    batch.member_tokens[c, member, b * length: b * length + size],
                    row * length + col + np.arange(size))
                # Targets as in the candidate's own row, except its first token (no prefix).
                assert batch.loss_mask[c, row, col] == 0
                np.testing.assert_array_equal(batch.loss_mask[c, row, col + 1:col + size],
                                              plan.loss_mask_KxNxT[k, n, 1:size])
                seen += 1
        # Nothing else in the rows: real tokens are exactly the candidates' sequences.
        real = sum(int(plan.lengths_KxN[k, plan.batch_index_KxSxB[k, s, b]])
                   for s in range(start, stop) for k, b in zip(*np.nonzero(plan.batch_index_KxSxB[:, s] >= 0))
                   if plan.active_KxS[k, s])
        assert int((batch.segments > 0).sum()) == real
        assert int((batch.member_tokens < rows * length).sum()) == real  # and no other token listed
        # Members: exactly the candidates active at each step, ascending, then distinct places
        # out of range (never written back); at most one per slot.
        assert batch.members.shape == (ic.steps_per_chunk, min(plan.num_candidates, rows * slots))
        for c, s in enumerate(range(start, stop)):
            active = np.flatnonzero(plan.active_KxS[:, s])
            np.testing.assert_array_equal(batch.members[c, :len(active)], active)
            assert (batch.members[c, len(active):] >= plan.num_candidates).all()
            assert len(set(batch.members[c].tolist())) == batch.members.shape[1]
    assert seen == int(((plan.batch_index_KxSxB >= 0) & plan.active_KxS[..., None]).sum())


def test_rare_packed_shapes_merge_into_larger_ones_within_the_token_budget():
    rng = np.random.default_rng(5)
    for budget in (0, 100, 1000, 10_000, 10**9):
        length = rng.choice([16, 32, 64], 60).astype(np.int32)
        rows = rng.choice([1, 2, 3, 4], 60).astype(np.int32)
        segments = rng.choice([1, 4], 60).astype(np.int32)
        before = (length.copy(), rows.copy(), segments.copy())
        merge_rare_shapes(length, rows, segments, budget)
        # Every step runs in a shape holding its own (same placements), at most `budget` more tokens.
        assert (length >= before[0]).all() and (rows >= before[1]).all() and (segments >= before[2]).all()
        extra = int((length * rows).sum() - (before[0] * before[1]).sum())
        assert 0 <= extra <= budget
        shapes = set(zip(length.tolist(), rows.tolist(), segments.tolist()))
        old_shapes = set(zip(*(b.tolist() for b in before)))
        assert shapes <= old_shapes  # into shapes the plan already had
        if budget == 0:
            assert shapes == old_shapes
        if budget == 10**9:  # everything fits the one shape that dominates all: (64, 4, 4)
            assert shapes == {(64, 4, 4)}
    # A cheaper merge goes first: one step of (16, 1) costs 16 tokens to join (32, 1), 48 for (64, 1).
    length, rows, segments = np.array([16, 32, 32, 64]), np.array([1, 1, 1, 1]), np.ones(4, np.int32)
    merge_rare_shapes(length, rows, segments, 20)
    assert length.tolist() == [32, 32, 32, 64]


def test_merged_packed_shapes_train_as_unmerged_ones(params):
    ic = IC.replace(batch_size=2, length_buckets=(16, 32, 64), pack_row_tokens=32, pack_row_segments=2,
                    pack_merge_share=0.0)
    plan = inner.build_plan(_candidates(), HPARAMS, ic, pad_id=PAD)
    merged_ic = ic.replace(pack_merge_share=0.5)
    merged_plan = inner.build_plan(_candidates(), HPARAMS, merged_ic, pad_id=PAD)

    def shapes(p):
        return {c[2:] for c in p.packed_chunks(ic.steps_per_chunk)}

    assert len(shapes(merged_plan)) < len(shapes(plan)) and merged_plan.packs_rows
    computed = plan.token_counts(packed=True)["computed_tokens"]
    assert computed < merged_plan.token_counts(packed=True)["computed_tokens"] <= 1.5 * computed
    a = inner.train_candidates(params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=ic)
    b = inner.train_candidates(params, merged_plan, cfg=CFG, lora_cfg=LC, inner_cfg=merged_ic)
    for x, y in zip(jax.tree.leaves(a.lora), jax.tree.leaves(b.lora)):
        assert_close_scaled(np.asarray(x), np.asarray(y), eps_multiple=1024, what="adapter")
    assert_close_scaled(a.losses, b.losses, eps_multiple=1024, what="losses")
    np.testing.assert_array_equal(a.steps, b.steps)
    with pytest.raises(ValueError, match="pack_merge_share"):
        ic.replace(pack_merge_share=-0.1)


def test_a_packed_step_with_more_active_candidates_than_slots_updates_them_all():
    # An active candidate without a sequence at a step (not produced by build_plan, but the step must
    # still update it as the row-per-candidate path does): all K become the step's members. Shapes
    # unmerged, so that the late step keeps its one single-slot row.
    plan = inner.build_plan(_candidates(), HPARAMS, IC.replace(pack_merge_share=0.0), pad_id=PAD)
    late = int(plan.num_steps_K.max()) - 1
    plan.active_KxS[:, late] = True
    start, stop, length, rows, slots = next(c for c in plan.packed_chunks(IC.steps_per_chunk)
                                            if c[0] <= late < c[1])
    assert rows * slots < plan.num_candidates
    batch = plan.gather_packed(start, stop, length, rows, slots, IC.steps_per_chunk)
    np.testing.assert_array_equal(batch.members[late - start], np.arange(plan.num_candidates))


def test_packed_rows_train_as_a_row_per_candidate_does(params):
    # Two sequences per row at most and short rows: candidates share rows, and a step spans several.
    ic = IC.replace(batch_size=2, length_buckets=(16, 32, 64), pack_row_tokens=32, pack_row_segments=2)
    plan = inner.build_plan(_candidates(), HPARAMS, ic, pad_id=PAD)
    assert any(r > 1 for _, _, _, r, _ in plan.packed_chunks(ic.steps_per_chunk))
    assert (plan.packed_layout().rows_S < plan.num_candidates).any()  # rows really are shared
    assert plan.packs_rows  # and the call trains in them
    # Late steps update fewer members than the call has candidates (the others are left alone).
    assert any(plan.gather_packed(*chunk, ic.steps_per_chunk).members.shape[1] < plan.num_candidates
               for chunk in plan.packed_chunks(ic.steps_per_chunk))
    packed = inner.train_candidates(params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=ic)
    rows_ic = ic.replace(packing=False)
    rows = inner.train_candidates(params, inner.build_plan(_candidates(), HPARAMS, rows_ic, pad_id=PAD),
                                  cfg=CFG, lora_cfg=LC, inner_cfg=rows_ic)
    assert packed.failure_reason == [None] * 4
    for a, b in zip(jax.tree.leaves(packed.lora), jax.tree.leaves(rows.lora)):
        assert_close_scaled(np.asarray(a), np.asarray(b), eps_multiple=1024, what="adapter")
    assert_close_scaled(packed.losses, rows.losses, eps_multiple=1024, what="losses")
    np.testing.assert_array_equal(packed.steps, rows.steps)


@pytest.mark.torch
@pytest.mark.parametrize("schedule,warmup,total", [("linear", 0, 30), ("linear", 5, 23),
                                                   ("cosine", 11, 40), ("cosine", 11, 7),
                                                   ("constant", 3, 10)])
def test_schedule_tables_match_hf(schedule, warmup, total):
    torch = pytest.importorskip("torch")
    from transformers import optimization

    make = {"linear": optimization.get_linear_schedule_with_warmup,
            "cosine": optimization.get_cosine_schedule_with_warmup,
            "constant": lambda opt, w, t: optimization.get_constant_schedule_with_warmup(opt, w)}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = make[schedule](opt, warmup, total)
    want = []
    for _ in range(total):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = 1e-3 * inner.schedule_multipliers(schedule, total, warmup)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_plan_tables():
    cands = _candidates()
    ic = IC.replace(batch_size=2)
    plan = inner.build_plan(cands, HPARAMS, ic, pad_id=PAD)
    epochs = [3, 2, 4, 3]
    for k, cand in enumerate(cands):
        n = len(cand.sequences)
        per_epoch = math.ceil(n / 2)
        steps = epochs[k] * per_epoch
        assert plan.num_steps_K[k] == steps
        assert plan.active_KxS[k].sum() == steps and plan.active_KxS[k, :steps].all()
        idx = plan.batch_index_KxSxB[k, :steps].reshape(epochs[k], per_epoch * 2)
        for epoch in idx:  # every sequence exactly once per epoch; odd N leaves one empty slot
            assert sorted(epoch[epoch >= 0].tolist()) == list(range(n))
            assert (epoch < 0).sum() == per_epoch * 2 - n
        assert (plan.batch_index_KxSxB[k, steps:] == -1).all()
        assert (plan.lr_KxS[k, steps:] == 0).all()
        for i, seq in enumerate(cand.sequences):
            np.testing.assert_array_equal(plan.tokens_KxNxT[k, i, : len(seq)], seq)
            assert (plan.tokens_KxNxT[k, i, len(seq):] == PAD).all()
            assert (plan.loss_mask_KxNxT[k, i, len(seq):] == 0).all()
    # Epoch orders differ between epochs (a fresh permutation each epoch).
    idx0 = plan.batch_index_KxSxB[3, :9].reshape(3, 6)
    assert len({tuple(e) for e in idx0}) > 1
    np.testing.assert_allclose(plan.lr_KxS[0, :6], 5e-3 * (6 - np.arange(6)) / 6, rtol=1e-6)
    assert plan.lr_KxS[3, 0] == 0.0  # HF warmup starts from 0
    assert (plan.step_length_S == 64).all()


def test_plan_fractional_epochs_empty_candidates_and_buckets():
    rng = np.random.default_rng(0)
    cands = [inner.CandidateData([_tokens(rng, 10) for _ in range(5)]),
             inner.CandidateData([]),
             inner.CandidateData([_tokens(rng, 100), _tokens(rng, 20)]),
             inner.CandidateData([_tokens(rng, 3000)])]
    ic = inner.InnerConfig(batch_size=2)
    plan = inner.build_plan(cands, [{"epochs": 1.5}, None, {"epochs": 0}, {"epochs": 1}], ic,
                            pad_id=PAD)
    assert plan.num_steps_K.tolist() == [math.ceil(1.5 * 3), 0, 0, 1]  # HF: ceil(E * steps/epoch)
    assert plan.lengths_KxN[3, 0] == 2048  # truncated to the largest bucket, like the reference
    # 10-token sequences land in the smallest default bucket (16)
    assert plan.step_length_S.tolist() == [2048, 16, 16, 16, 16]
    assert plan.chunks(2) == [(0, 1, 2048), (1, 3, 16), (3, 5, 16)]
    counts = plan.token_counts()
    assert counts["real_tokens"] == 5 * 10 + 4 * 10 + 2048  # 1.5 epochs: 3 + 2 batches of <= 2
    # A row per candidate: every step pads all 4 candidates x 2 slots to its bucket.
    assert plan.token_counts(packed=False)["computed_tokens"] == (2048 + 4 * 16) * 4 * 2
    # Packed: step 0 holds the 2,048-token sequence in one row and candidate 0's two in another;
    # each later step fits one row as short as its tokens allow (2 x 10 -> 32, 10 -> 16).
    unmerged = inner.build_plan(cands, [{"epochs": 1.5}, None, {"epochs": 0}, {"epochs": 1}],
                                ic.replace(pack_merge_share=0.0), pad_id=PAD)
    assert unmerged.token_counts()["computed_tokens"] == 2 * 2048 + 3 * 32 + 16
    # The default merges the one 16-token step into the 32-token rows the plan has (16 more tokens,
    # within 3% of them; one program fewer).
    assert counts["computed_tokens"] == 2 * 2048 + 4 * 32


def test_reference_faithful_plan_pads_to_2048_with_eos_targets():
    rng = np.random.default_rng(1)
    seqs = [_tokens(rng, 30), _tokens(rng, 3000)]
    ic = inner.InnerConfig(reference_faithful=True)
    plan = inner.build_plan([inner.CandidateData(seqs)], None, ic, pad_id=PAD, eos_id=PAD)
    assert plan.tokens_KxNxT.shape == (1, 2, 2048)
    np.testing.assert_array_equal(plan.tokens_KxNxT[0, 0, :30], seqs[0])  # no EOS appended
    assert (plan.tokens_KxNxT[0, 0, 30:] == PAD).all()
    assert (plan.loss_mask_KxNxT[0] == 1).all()  # labels = input_ids, pads included
    np.testing.assert_array_equal(plan.tokens_KxNxT[0, 1], seqs[1][:2048])
    assert plan.truncated_K.tolist() == [1]  # the 3000-token sequence, counted
    batch = plan.gather(0, 2, 2048, 4)
    assert isinstance(batch, inner.StepBatch)
    assert batch.tokens.shape == (4, 1, 1, 2048) and batch.active[:2].all()
    assert not batch.active[2:].any() and (batch.loss_mask[2:] == 0).all()
    assert plan.step_length_S.tolist() == [2048] * 20  # bs 1, 10 epochs, always the full length
    # reference_faithful alone implies no EOS (even where a domain config asks for one).
    implied = inner.InnerConfig(reference_faithful=True, append_eos=True)
    assert implied.append_eos is False
    plan2 = inner.build_plan([inner.CandidateData(seqs)], None, implied, pad_id=PAD, eos_id=7)
    np.testing.assert_array_equal(plan2.tokens_KxNxT, plan.tokens_KxNxT)


def test_overlong_sequences_are_counted_or_fail_the_candidate():
    rng = np.random.default_rng(4)
    cands = [inner.CandidateData([_tokens(rng, 10), _tokens(rng, 80), _tokens(rng, 70)]),
             inner.CandidateData([_tokens(rng, 20)])]
    ic = inner.InnerConfig(length_buckets=(32, 64), epochs=1)
    plan = inner.build_plan(cands, None, ic, pad_id=PAD)
    assert plan.truncated_K.tolist() == [2, 0] and plan.lengths_KxN[0].tolist() == [10, 64, 64]
    assert plan.num_steps_K.tolist() == [3, 1]
    failing = inner.build_plan(cands, None, ic.replace(overlong="fail"), pad_id=PAD)
    assert failing.rejected_K.tolist() == [True, False]
    assert failing.num_steps_K.tolist() == [0, 1]  # the rejected candidate takes no step
    with pytest.raises(ValueError, match="overlong"):
        inner.InnerConfig(overlong="drop")


def test_append_eos_and_errors():
    seq = np.arange(3, 13)
    plan = inner.build_plan([inner.CandidateData([seq])], None, IC.replace(append_eos=True),
                            pad_id=0, eos_id=7)
    assert plan.lengths_KxN[0, 0] == 11 and plan.tokens_KxNxT[0, 0, 10] == 7
    assert plan.loss_mask_KxNxT[0, 0, :11].all() and plan.tokens_KxNxT[0, 0, 11] == 0
    with pytest.raises(ValueError, match="eos_id"):
        inner.build_plan([inner.CandidateData([seq])], None, IC.replace(append_eos=True), pad_id=0)
    with pytest.raises(ValueError, match="unknown hyperparameter 'momentum'"):
        inner.build_plan([inner.CandidateData([seq])], [{"momentum": 0.9}], IC, pad_id=0)
    with pytest.raises(ValueError, match="candidate 0 sequence 0: loss mask shape"):
        inner.build_plan([inner.CandidateData([seq], [np.ones(4)])], None, IC, pad_id=0)
    with pytest.raises(ValueError, match="epochs"):
        inner.build_plan([inner.CandidateData([seq])], [{"epochs": float("nan")}], IC, pad_id=0)
    with pytest.raises(ValueError, match="microbatches"):
        inner.InnerConfig(batch_size=3, microbatches=2)


@pytest.mark.parametrize("mode", ["shared", "aligned"])
def test_length_aligned_shuffles_align_lengths_across_candidates(mode):
    rng = np.random.default_rng(2)
    # Same length profile in different orders; the long sequence sits at a different index.
    cands = []
    for k in range(16):
        lens = [48] * 11 + [180]
        rng.shuffle(lens)
        cands.append(inner.CandidateData([_tokens(rng, n) for n in lens]))
    base = inner.InnerConfig(epochs=10)
    assert base.shuffle == "aligned"  # the default
    indep = inner.build_plan(cands, None, base.replace(shuffle="independent"), pad_id=PAD)
    shared = inner.build_plan(cands, None, base.replace(shuffle=mode), pad_id=PAD)
    # Each candidate still sees every sequence once per epoch.
    for k in range(16):
        for epoch in shared.batch_index_KxSxB[k, :, 0].reshape(10, 12):
            assert sorted(epoch.tolist()) == list(range(12))
    # ... and at every step all candidates train on sequences of the same length.
    rows = np.arange(16)[:, None]
    used = shared.lengths_KxN[rows, shared.batch_index_KxSxB[:, :, 0]]
    assert (used == used[:1]).all()
    assert sorted(np.unique(shared.step_length_S).tolist()) == [48, 192]
    assert (shared.step_length_S == 192).sum() == 10
    assert (shared.token_counts(packed=False)["computed_tokens"]
            < 0.5 * indep.token_counts(packed=False)["computed_tokens"])
    assert shared.token_counts()["real_tokens"] == indep.token_counts()["real_tokens"]
    # Two candidates with the same sequences: 'shared' gives them one order, 'aligned' breaks
    # length ties with each candidate's own seed.
    same = inner.build_plan([cands[0], cands[0]], None, base.replace(shuffle=mode), pad_id=PAD)
    identical = (same.batch_index_KxSxB[0] == same.batch_index_KxSxB[1]).all()
    assert identical == (mode == "shared")


@pytest.mark.parametrize("mode", ["aligned", "independent"])
def test_each_candidates_order_is_a_uniform_permutation(mode):
    """Position of every sequence over many epochs: uniform over slots (chi-square at p ~ 1e-4),
    for a candidate with ragged lengths, whatever the others do."""
    rng = np.random.default_rng(5)
    lens = [5, 9, 30, 30, 31, 70]
    cand = inner.CandidateData([_tokens(rng, n) for n in lens])
    epochs = 3000
    plan = inner.build_plan([cand], [{"seed": 11, "epochs": epochs}], inner.InnerConfig(shuffle=mode),
                            pad_id=PAD)
    idx_ExN = plan.batch_index_KxSxB[0, :, 0].reshape(epochs, len(lens))
    counts_NxP = np.stack([(idx_ExN == i).sum(axis=0) for i in range(len(lens))])
    assert (counts_NxP.sum(axis=1) == epochs).all()
    expected = epochs / len(lens)
    chi2 = float(((counts_NxP - expected) ** 2 / expected).sum())
    # (N-1)^2 = 25 degrees of freedom: mean 25, chi2 > 65 has p < 1e-4.
    assert chi2 < 65, (chi2, counts_NxP)


# ----------------------------------------------------------------------------------------------------
# Device side


@pytest.mark.parametrize("bs", [1, 2])
def test_batched_equals_sequential(params, bs):
    plan, res = _batched(params, bs)
    ic = IC.replace(batch_size=bs)
    cands = _candidates()
    assert not res.failed.any() and res.failure_reason == [None] * 4
    assert (res.steps == plan.num_steps_K).all()
    for k in range(4):
        hp = {**HPARAMS[k], "seed": int(plan.seeds_K[k])}
        single_plan = inner.build_plan([cands[k]], [hp], ic, pad_id=PAD)
        np.testing.assert_array_equal(single_plan.batch_index_KxSxB[0],
                                      plan.batch_index_KxSxB[k, : single_plan.num_steps])
        single = inner.train_candidates(params, single_plan, cfg=CFG, lora_cfg=LC, inner_cfg=ic)
        for a, b in zip(jax.tree.leaves(res.lora), jax.tree.leaves(single.lora)):
            np.testing.assert_allclose(a[k], b[0], atol=1e-5, rtol=0)
        steps = single.losses.shape[1]
        np.testing.assert_allclose(res.losses[k, :steps], single.losses[0], atol=1e-5, rtol=0)
        # A finished candidate takes no further steps (and its adapter stopped changing: above).
        assert np.isnan(res.losses[k, steps:]).all()
    assert np.isfinite(res.losses[plan.active_KxS]).all()


@jax.jit
def _nll_sum_padded(params, lora, tokens_64, mask_64):
    """sum(mask * nll), #targets of one right-padded row, with no attention mask at all: causal
    attention keeps the real positions independent of the pads after them (independent of the
    engine's segment-id masking)."""
    tokens = tokens_64[None]
    logits = transformer.forward(params, tokens, cfg=CFG, lora=lora,
                                 lora_cfg=None if lora is None else LC)[0, :-1]
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[0, 1:, None], -1)[:, 0]
    w = mask_64[1:]
    return jnp.sum(w * nll), jnp.sum(w > 0)


def _nll_sum(params, lora, seq, mask):
    n = len(seq)
    tokens = np.full(64, PAD, np.int32)
    tokens[:n] = seq
    weights = np.zeros(64, np.float32)
    weights[:n] = mask
    return _nll_sum_padded(params, lora, tokens, weights)


def test_first_step_loss_is_hf_masked_mean(params):
    """Step 0 (B = 0, i.e. the base model): sum(mask * nll) / #targets over the two sequences of the
    batch, each scored at its own length (padding excluded)."""
    plan, res = _batched(params, 2)
    cands = _candidates()
    for k in range(4):
        total, count = 0.0, 0
        for i in plan.batch_index_KxSxB[k, 0]:
            if i < 0:
                continue
            mask = (np.ones(len(cands[k].sequences[i])) if cands[k].loss_masks is None
                    else cands[k].loss_masks[i])
            s, c = _nll_sum(params, None, cands[k].sequences[i], mask)
            total, count = total + float(s), count + int(c)
        np.testing.assert_allclose(res.losses[k, 0], total / count, rtol=1e-5)


def test_nonfinite_candidate_fails_alone_and_others_are_bit_identical(params):
    # A failure in packed rows retrains the call with a row per candidate: the others are then
    # bit-identical to that layout's run without the failing candidate's problem.
    ic_rows = IC.replace(packing=False)
    plan_ok = inner.build_plan(_candidates(), HPARAMS, ic_rows, pad_id=PAD)
    res_ok = inner.train_candidates(params, plan_ok, cfg=CFG, lora_cfg=LC, inner_cfg=ic_rows)
    packed_ok = _batched(params, 1)[1]
    for a, b in zip(jax.tree.leaves(res_ok.lora), jax.tree.leaves(packed_ok.lora)):
        assert_close_scaled(np.asarray(a), np.asarray(b), eps_multiple=1024, what="rows vs packed")
    bad = [dict(h) for h in HPARAMS]
    bad[1]["lr"] = float("inf")
    plan = inner.build_plan(_candidates(), bad, IC, pad_id=PAD)
    res = inner.train_candidates(params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=IC)
    assert res.failed.tolist() == [False, True, False, False]
    assert "non-finite parameters" in res.failure_reason[1] and "step 0" in res.failure_reason[1]
    assert res.failed_step[1] == 0 and res.steps[1] == 0
    init = lora_lib.init_lora_from_seeds(CFG, LC, plan.seeds_K)
    for got, want in zip(jax.tree.leaves(res.lora), jax.tree.leaves(init)):
        np.testing.assert_array_equal(got[1], want[1])  # frozen at its last finite value
    assert np.isnan(res.losses[1, 1:]).all()
    for k in (0, 2, 3):
        for got, want in zip(jax.tree.leaves(res.lora), jax.tree.leaves(res_ok.lora)):
            np.testing.assert_array_equal(got[k], want[k])
        np.testing.assert_array_equal(res.losses[k], res_ok.losses[k])


def test_memorisation_loss_decreases_and_zero_step_candidate_is_untouched(params):
    # Random tiny weights give near-uniform logits (|logit| < 0.2) that a rank-4 adapter cannot make
    # peaked; larger embeddings (same shapes, so the same compiled program) make memorising possible.
    params = {**params, "embed": {"embedding": params["embed"]["embedding"] * 10}}
    rng = np.random.default_rng(7)
    seq = _tokens(rng, 40)
    cands = [inner.CandidateData([seq])] * 4
    hp = [{"lr": 5e-2, "seed": s, "epochs": 16} for s in range(3)] + [{"epochs": 0, "seed": 9}]
    plan = inner.build_plan(cands, hp, IC, pad_id=PAD)
    res = inner.train_candidates(params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=IC)
    for k in range(3):
        assert res.losses[k, -1] < 0.5 * res.losses[k, 0], res.losses[k]
    assert res.steps.tolist() == [16, 16, 16, 0] and np.isnan(res.losses[3]).all()
    init = lora_lib.init_lora(CFG, LC, jax.random.PRNGKey(9))
    jax.tree.map(np.testing.assert_array_equal, lora_lib.candidate(res.lora, 3), init)
    # The trained adapter really memorised: higher likelihood than the base model.
    before, _ = _nll_sum(params, None, seq, np.ones(40))
    after, _ = _nll_sum(params, lora_lib.candidate(res.lora, 0), seq, np.ones(40))
    assert float(after) < 0.5 * float(before)


def test_reference_faithful_loss_is_mean_over_all_shifted_positions(params):
    rng = np.random.default_rng(3)
    seq = _tokens(rng, 20)
    ic = inner.InnerConfig(reference_faithful=True, faithful_length=64, epochs=1, learning_rate=0.0,
                           steps_per_chunk=8)
    plan = inner.build_plan([inner.CandidateData([seq])], None, ic, pad_id=PAD)
    res = inner.train_candidates(params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=ic)
    padded = np.r_[seq, np.full(44, PAD)].astype(np.int32)
    tokens = jnp.asarray(padded)[None]
    logits = transformer.forward(params, tokens, cfg=CFG)[0, :-1]  # pads attended as tokens
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[0, 1:, None], -1)[:, 0]
    np.testing.assert_allclose(res.losses[0, 0], float(jnp.mean(nll)), rtol=1e-5)  # / 63
    # The EOS-on-padding targets dominate: most of the 63 targets are pads.
    assert nll.shape == (63,)


@pytest.mark.torch
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_clip_adamw_schedule_and_grad_accumulation_match_torch(params, schedule):
    """The optax path vs torch.optim.AdamW + clip_grad_norm_ + HF warmup schedule, fed gradients of
    an independent plain-JAX loss (each sequence scored at its own length). bs 2 as 2 micro-batches."""
    torch = pytest.importorskip("torch")
    from transformers import optimization

    rng = np.random.default_rng(11)
    seqs = [_tokens(rng, 16) for _ in range(3)]
    ic = inner.InnerConfig(batch_size=2, microbatches=2, epochs=2, learning_rate=2e-2,
                           warmup_steps=1, max_grad_norm=0.05, weight_decay=0.1, schedule=schedule,
                           length_buckets=(64,), steps_per_chunk=8)
    plan = inner.build_plan([inner.CandidateData(seqs)], [{"seed": 4}], ic, pad_id=PAD)
    res = inner.train_candidates(params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=ic)

    value_and_grad = jax.value_and_grad(
        lambda lora, s: _nll_sum_padded(params, lora, s, (np.arange(64) < 16).astype(np.float32)),
        has_aux=True)

    def grad_fn(lora, seq):
        return value_and_grad(lora, np.r_[seq, np.full(48, PAD)].astype(np.int32))
    init = lora_lib.init_lora(CFG, LC, jax.random.PRNGKey(4))
    leaves, treedef = jax.tree.flatten(init)
    tparams = [torch.nn.Parameter(torch.tensor(np.asarray(x))) for x in leaves]
    opt = torch.optim.AdamW(tparams, lr=2e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    make = {"linear": optimization.get_linear_schedule_with_warmup,
            "cosine": optimization.get_cosine_schedule_with_warmup}[schedule]
    sched = make(opt, 1, plan.num_steps)
    losses = []
    for s in range(plan.num_steps):
        lora = jax.tree.unflatten(treedef, [jnp.asarray(p.detach().numpy()) for p in tparams])
        total, count, grads = 0.0, 0, None
        for i in plan.batch_index_KxSxB[0, s]:
            if i < 0:
                continue
            (l, c), g = grad_fn(lora, seqs[i])
            total, count = total + float(l), count + int(c)
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        losses.append(total / count)
        for p, g in zip(tparams, jax.tree.leaves(grads)):
            p.grad = torch.tensor(np.asarray(g) / count)
        torch.nn.utils.clip_grad_norm_(tparams, 0.05)
        opt.step()
        sched.step()
    assert_close_scaled(res.losses[0], losses, eps_multiple=64, what="losses")
    # Adam divides each update by the gradient's own running scale, so the few-eps differences of two
    # gradient computations (summed in another order on another CPU) reach the params undamped, step
    # after step: 1.0e-5-1.2e-5 on one x86 machine, under 7.6e-6 on another. A wrong schedule, clip or
    # decay moves them by ~lr = 2e-2.
    for got, want in zip(jax.tree.leaves(res.lora), tparams):
        assert_close_scaled(got[0], want.detach().numpy(), eps_multiple=512, what="adapter")
    assert res.grad_norms[0].min() > 0.05  # clipping was active on every step


def test_candidate_buckets_pad_k_and_reuse_the_compiled_program(params):
    # A row per candidate: K=3 padded to 4 has K=4's shapes (packed rows follow the sequences).
    rows_ic = IC.replace(packing=False)
    plan4 = inner.build_plan(_candidates(), HPARAMS, rows_ic, pad_id=PAD)
    res4 = inner.train_candidates(params, plan4, cfg=CFG, lora_cfg=LC, inner_cfg=rows_ic)
    ic = rows_ic.replace(candidate_buckets=(2, 4))
    plan3 = inner.build_plan(_candidates()[:3], HPARAMS[:3], ic, pad_id=PAD)
    before = inner.compiled_shape_count()
    res3 = inner.train_candidates(params, plan3, cfg=CFG, lora_cfg=LC, inner_cfg=ic)
    assert inner.compiled_shape_count() == before  # K=3 ran as K=4: no new program
    assert jax.tree.leaves(res3.lora)[0].shape[0] == 3 and res3.losses.shape[0] == 3
    for got, want in zip(jax.tree.leaves(res3.lora), jax.tree.leaves(res4.lora)):
        np.testing.assert_array_equal(got, want[:3])  # candidates never interact
    with pytest.raises(ValueError, match="candidate_buckets"):
        inner.InnerConfig(candidate_buckets=(4, 2))


# ----------------------------------------------------------------------------------------------------
# Fitting K to memory, grouped calls


def _assert_same_candidates(got: inner.InnerResult, want: inner.InnerResult, index):
    """got's candidates equal want's candidates `index` (scaled: a different K packs other rows, or a
    row per candidate, and sums in another order; Adam's normalised steps compound that over the
    steps, as remat's refusions do)."""
    for a, b in zip(jax.tree.leaves(got.lora), jax.tree.leaves(want.lora)):
        assert_close_scaled(np.asarray(a), np.asarray(b)[index], eps_multiple=1024, what="adapter")
    steps = got.losses.shape[1]
    assert_close_scaled(got.losses, want.losses[index, :steps], eps_multiple=1024, what="losses")
    assert np.isnan(want.losses[index, steps:]).all()
    np.testing.assert_array_equal(got.steps, want.steps[index])


def test_out_of_memory_splits_the_call_and_keeps_the_result(params, monkeypatch):
    plan, want = _batched(params, 1)
    monkeypatch.setattr(inner, "_FITTED_K", {})
    calls = []

    def fake_device(base_params, sub_plan, **kw):
        calls.append(sub_plan.num_candidates)
        if sub_plan.num_candidates > 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 86 GiB")
        return inner.train_candidates(base_params, sub_plan, **kw)

    got = inner.train_candidates_fitting(params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=IC,
                                         train=fake_device)
    assert calls == [4, 2, 2]
    _assert_same_candidates(got, want, np.arange(4))
    assert inner.fitted_candidates_per_call(CFG, LC, IC) == 2
    # Remembered: the next call is split up front and never fails again.
    calls.clear()
    again = inner.train_candidates_fitting(params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=IC,
                                           train=fake_device)
    assert calls == [2, 2]
    _assert_same_candidates(again, want, np.arange(4))
    # Anything other than running out of memory is not retried.
    with pytest.raises(ValueError, match="boom"):
        inner.train_candidates_fitting(params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=IC,
                                       train=lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))


def test_grouped_calls_give_each_candidate_its_own_result(params, monkeypatch):
    plan, want = _batched(params, 1)
    monkeypatch.setattr(inner, "_FITTED_K", {})
    cands = _candidates()
    # Work: 9, 4, 4 and 15 steps; the two 4-step candidates share a call, 3 and 0 the other.
    assert inner.group_candidates(cands, HPARAMS, IC, max_k=2) == [[3, 0], [1, 2]]
    got = inner.train_grouped(params, cands, HPARAMS, cfg=CFG, lora_cfg=LC, inner_cfg=IC, max_k=2,
                              pad_id=PAD)
    assert got.failure_reason == [None] * 4
    _assert_same_candidates(got, want, np.arange(4))


def test_step_config_resolves_remat_and_loss_chunk():
    # remat=None (auto) starts off; seal_jax.inner turns it on per program where memory needs it.
    assert inner.StepConfig.from_inner(CFG, LC, IC).cfg.remat is False
    assert inner.StepConfig.from_inner(CFG, LC, IC.replace(remat=True)).cfg.remat is True
    # 1 MiB of float32 logits over 4 candidates of a 256-token vocabulary: 256 tokens per chunk.
    small = inner.StepConfig.from_inner(CFG, LC, IC.replace(loss_chunk_mib=1), candidates_per_device=4)
    assert small.loss_chunk_tokens == (1 << 20) // (4 * 4 * CFG.vocab_size) == 256
    assert inner.StepConfig.from_inner(CFG, LC, IC.replace(loss_chunk_mib=0)).loss_chunk_tokens is None


def _chunk_compiles(caplog) -> int:
    """XLA compilations of the chunk program logged since `caplog` started (jax_log_compiles)."""
    return sum(("run_chunk" in r.getMessage() or "run_packed_chunk" in r.getMessage())
               and "Compiling" in r.getMessage() for r in caplog.records)


@pytest.fixture
def log_compiles():
    # The global flag: the `jax.log_compiles` context is thread-local, and precompile uses threads.
    jax.config.update("jax_log_compiles", True)
    yield
    jax.config.update("jax_log_compiles", False)


@pytest.mark.parametrize("on_mesh", [False, True])
def test_precompile_compiles_every_program_once_and_the_calls_reuse_them(params, caplog, log_compiles,
                                                                          on_mesh):
    from seal_jax import sharding

    mesh = sharding.make_mesh({"axes": {"candidate": -1}}) if on_mesh else None
    # Two length buckets and two Ks: programs the calls have not compiled yet in this process.
    ic = IC.replace(length_buckets=(16, 32, 48), epochs=1, steps_per_chunk=5 + on_mesh)
    plans = [inner.build_plan(_candidates(5), None, ic, pad_id=PAD),
             inner.build_plan(_candidates(6)[:3], None, ic, pad_id=PAD)]
    # Packed rows (one device, with or without a mesh): a program per (K, row length, rows).
    assert all(p.packs_rows for p in plans)
    wanted = {(p.num_candidates, t, r, m) for p in plans
              for _, _, t, r, m in p.packed_chunks(ic.steps_per_chunk)}
    assert len(wanted) >= 4  # the case is not trivial
    before = inner.compiled_shape_count()
    with caplog.at_level("WARNING"):
        compiled = inner.precompile(params, plans, cfg=CFG, lora_cfg=LC, inner_cfg=ic, mesh=mesh,
                                    workers=3)
        assert compiled == len(wanted) == inner.compiled_shape_count() - before
        assert _chunk_compiles(caplog) == compiled
        caplog.clear()
        results = [inner.train_candidates(params, p, cfg=CFG, lora_cfg=LC, inner_cfg=ic, mesh=mesh)
                   for p in plans]
        assert _chunk_compiles(caplog) == 0  # every call dispatched a precompiled program
        assert inner.precompile(params, plans, cfg=CFG, lora_cfg=LC, inner_cfg=ic, mesh=mesh) == 0
    assert inner.compiled_shape_count() - before == compiled
    for plan, result in zip(plans, results):
        assert result.failure_reason == [None] * plan.num_candidates


def test_calls_run_beside_a_background_precompile_and_compile_no_program_twice(params, caplog,
                                                                               log_compiles):
    ic = IC.replace(length_buckets=(16, 32, 48), epochs=1, steps_per_chunk=4)
    plans = [inner.build_plan(_candidates(s)[:k], None, ic, pad_id=PAD) for s, k in ((7, 4), (8, 3), (9, 2))]
    wanted = {(p.num_candidates, t, r, m) for p in plans for _, _, t, r, m in p.packed_chunks(ic.steps_per_chunk)}
    assert len(wanted) >= 5
    alone = [inner.train_candidates(params, p, cfg=CFG, lora_cfg=LC, inner_cfg=ic) for p in plans]
    inner.clear_compiled()
    jax.clear_caches()
    caplog.clear()
    with caplog.at_level("WARNING"):
        # One worker, the calls started at once: some programs are compiled by the worker while a
        # call waits for them, others by the call that reaches them first.
        compiling = inner.start_precompile(params, iter(plans), cfg=CFG, lora_cfg=LC, inner_cfg=ic,
                                           workers=1)
        beside = [inner.train_candidates(params, p, cfg=CFG, lora_cfg=LC, inner_cfg=ic) for p in plans]
        compiling.wait()
        assert compiling.done() and compiling.programs == len(wanted)
        assert compiling.seconds > 0
        assert _chunk_compiles(caplog) == len(wanted)  # each program compiled once, by one thread
    for a, b in zip(alone, beside):  # the same programs on the same inputs
        for x, y in zip(jax.tree.leaves(a.lora), jax.tree.leaves(b.lora)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(a.losses, b.losses)


def test_background_jobs_lower_one_at_a_time_in_the_order_the_calls_need_them():
    # Tracing + lowering hold the GIL: lowered by all workers at once, every program was ready at
    # about the same time, after nearly all of them. Later jobs here reach their lowering first; a job
    # that never lowers, or fails before it does, passes its turn on.
    events = []

    def job(i, delay, lowers=True, fails=False):
        def run():
            time.sleep(delay)
            if fails:
                raise RuntimeError("planning failed")
            if lowers:
                with inner._lowering_turn():
                    events.append(("start", i))
                    time.sleep(0.01)
                    events.append(("end", i))
        return run

    jobs = [job(i, 0.04 * (6 - i), lowers=i != 2, fails=i == 4) for i in range(6)]
    with inner._lowering_turn():  # outside a background job (a call's own compile): no turn to wait for
        pass
    compiling = inner.BackgroundCompile(iter(jobs), workers=6)
    assert compiling.wait() == 0 and compiling.programs == 6
    assert events == [(edge, i) for i in (0, 1, 3, 5) for edge in ("start", "end")]


def test_a_cancelled_background_precompile_stops_and_reports_done(params):
    ic = IC.replace(length_buckets=(16, 32, 48), epochs=1, steps_per_chunk=4)
    plans = (inner.build_plan(_candidates(s), None, ic, pad_id=PAD) for s in range(10, 16))
    inner.clear_compiled()
    compiling = inner.start_precompile(params, plans, cfg=CFG, lora_cfg=LC, inner_cfg=ic, workers=1)
    seen = []
    compiling.cancel()
    compiling.add_done_callback(lambda h: seen.append(h.programs))  # already done: called at once
    assert compiling.done() and seen == [compiling.programs]
    assert inner.compiled_shape_count() <= compiling.programs


def _one_chunk_of_length_48(params):
    """(step config, rules, frozen, abstract state, step batch) of a one-step chunk with a row per
    candidate, automatic remat allowed."""
    ic = IC.replace(packing=False, length_buckets=(48,), epochs=1, remat=None)
    plan = inner.build_plan(_candidates(3), None, ic, pad_id=PAD)
    padded, step_cfg, rules, frozen, state = inner._prepare(
        params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=ic, init_lora=None, mesh=None, rules=None,
        abstract=True)
    return step_cfg, rules, frozen, state, padded.gather(0, 1, 48, ic.steps_per_chunk)


def test_a_background_remat_choice_uses_the_memory_free_before_the_calls(params, monkeypatch):
    from seal_jax import train_step as step_lib

    monkeypatch.setattr(step_lib, "REMAT_CHOICE", {})
    monkeypatch.setattr(step_lib, "REMAT_NEED", {})
    step_cfg, rules, frozen, state, xs = _one_chunk_of_length_48(params)
    floor = inner._activation_bytes_floor(step_cfg, xs)
    # Now (a call running beside it) too little is free; before the calls, plenty was.
    monkeypatch.setattr(inner, "_free_device_bytes", lambda: int(floor / 2))
    inner._chunk_program(step_cfg, "auto", None, rules, frozen, state, xs, free=1 << 40)
    assert list(step_lib.REMAT_CHOICE.values()) == [False]


def test_auto_remat_turns_on_only_for_programs_that_would_not_fit(params, monkeypatch):
    from seal_jax import train_step as step_lib

    monkeypatch.setattr(step_lib, "REMAT_CHOICE", {})
    ic = IC.replace(packing=False, length_buckets=(16, 48), epochs=1, remat=None)
    plan = inner.build_plan(_candidates(7), None, ic, pad_id=PAD)
    assert {t for _, _, t in plan.chunks(ic.steps_per_chunk)} == {16, 48}
    # What each program plans to allocate without remat (CPU executables have a memory analysis).
    padded, step_cfg, rules, frozen, state = inner._prepare(
        params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=ic, init_lora=None, mesh=None, rules=None,
        abstract=True)
    need = {}
    for start, stop, t in padded.chunks(ic.steps_per_chunk):
        compiled, _ = inner._compile(step_cfg.with_remat(False), None, rules, frozen, state,
                                     padded.gather(start, stop, t, ic.steps_per_chunk))
        need[t] = inner._planned_bytes(compiled)
    assert need[48] > need[16] > 0
    # A device whose free memory holds the short program but not the long one.
    free = (need[16] + need[48]) / 2 / inner.REMAT_MEMORY_SHARE
    monkeypatch.setattr(inner, "_free_device_bytes", lambda: int(free))
    got = inner.train_candidates(params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=ic)
    chosen = {key[5]: remat for key, remat in step_lib.REMAT_CHOICE.items()}
    assert chosen == {16: False, 48: True}
    want = inner.train_candidates(params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=ic.replace(remat=False))
    # Recomputed activations fuse differently: equal to rounding, compounded over the steps.
    for a, b in zip(jax.tree.leaves(got.lora), jax.tree.leaves(want.lora)):
        assert_close_scaled(np.asarray(a), np.asarray(b), eps_multiple=1024, what="adapter")


def test_auto_remat_skips_compiling_a_plain_program_that_cannot_fit(params, monkeypatch):
    from seal_jax import train_step as step_lib

    monkeypatch.setattr(step_lib, "REMAT_CHOICE", {})
    step_cfg, rules, frozen, state, xs = _one_chunk_of_length_48(params)
    plain, _ = inner._compile(step_cfg.with_remat(False), None, rules, frozen, state, xs)
    floor = inner._activation_bytes_floor(step_cfg, xs)
    assert 0 < floor <= inner._planned_bytes(plain)  # a floor: never forces remat on what fits
    step_lib.PRECOMPILED.clear()
    compiled = []
    real_compile = inner._compile
    monkeypatch.setattr(inner, "_compile", lambda step_cfg, *a, **kw: (
        compiled.append(step_cfg.cfg.remat), real_compile(step_cfg, *a, **kw))[1])
    monkeypatch.setattr(inner, "_free_device_bytes", lambda: int(floor / 2))
    inner._chunk_program(step_cfg, "auto", None, rules, frozen, state, xs)
    assert compiled == [True]  # straight to the rematerialised program
    assert list(step_lib.REMAT_CHOICE.values()) == [True]


def test_auto_remat_of_a_packed_step_follows_the_estimate_that_admitted_its_k(params, monkeypatch):
    from seal_jax import train_step as step_lib

    monkeypatch.setattr(step_lib, "REMAT_CHOICE", {})
    monkeypatch.setattr(step_lib, "REMAT_NEED", {})
    ic = IC.replace(packing=True, length_buckets=(16, 48), pack_row_tokens=64, epochs=1, remat=None)
    plan = inner.build_plan(_candidates(3), None, ic, pad_id=PAD)
    padded, step_cfg, rules, frozen, state = inner._prepare(
        params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=ic, init_lora=None, mesh=None, rules=None,
        abstract=True)
    assert inner._packs(padded, LC, None)
    start, stop, length, rows, slots = max(padded.packed_chunks(ic.steps_per_chunk), key=lambda c: c[2] * c[3])
    xs = padded.gather_packed(start, stop, length, rows, slots, ic.steps_per_chunk)
    tokens = rows * length
    k_count = padded.num_candidates
    compiled = []
    real_compile = inner._compile
    monkeypatch.setattr(inner, "_compile", lambda step_cfg, *a, **kw: (
        compiled.append(step_cfg.cfg.remat), real_compile(step_cfg, *a, **kw))[1])
    # Free memory whose budget holds one token fewer than this step without remat (but more than
    # the activation floor): the step goes straight to remat, with no plain compile to find out.
    budget = inner._step_bytes(CFG, LC, tokens - 1, k_count, remat=False)
    assert inner.packed_plain_tokens(CFG, LC, k_count, budget) == tokens - 1
    assert inner._activation_bytes_floor(step_cfg, xs) < budget
    monkeypatch.setattr(inner, "_free_device_bytes", lambda: int(budget / inner.REMAT_MEMORY_SHARE) + 1)
    inner._chunk_program(step_cfg, "auto", None, rules, frozen, state, xs)
    assert compiled == [True] and list(step_lib.REMAT_CHOICE.values()) == [True]
    # Where it fits the estimate, the plain program is compiled and its own memory analysis decides.
    step_lib.REMAT_CHOICE.clear()
    compiled.clear()
    monkeypatch.setattr(inner, "_free_device_bytes", lambda: 1 << 40)
    inner._chunk_program(step_cfg, "auto", None, rules, frozen, state, xs)
    assert compiled == [False, False] and list(step_lib.REMAT_CHOICE.values()) == [False]


def test_packed_calls_may_rematerialise_only_their_largest_steps():
    class Plan:  # what the memory rule reads of a plan
        def __init__(self, tokens_S, k):
            self.num_candidates, self._tokens = k, np.asarray(tokens_S, np.int64)

        def computed_tokens_S(self):
            return self._tokens

    k = 4
    budget = inner._step_bytes(CFG, LC, 500, k, remat=False)
    assert inner.packed_plain_tokens(CFG, LC, k, budget) == 500
    fits = functools.partial(inner._packed_plans_fit, CFG, LC, budget=budget)
    # The largest step that fits with remat (above the 500 that fit without it).
    big = max(t for t in range(500, 5000) if inner._step_bytes(CFG, LC, t, k, remat=True) <= budget)
    assert big > 500
    small = 100
    few = int(np.ceil(big * (1 - inner.PACKED_REMAT_TOKEN_SHARE) / inner.PACKED_REMAT_TOKEN_SHARE / small))
    assert fits([Plan([small] * few + [500], k)])  # all plain
    # One step above the plain limit, at most PACKED_REMAT_TOKEN_SHARE of the tokens: admitted.
    assert fits([Plan([small] * few + [big], k)])
    # Two such steps: more than that share, refused.
    assert not fits([Plan([small] * few + [big] * 2, k)])
    # The share counts across the call's plans.
    assert fits([Plan([small] * few, k), Plan([big], k)])
    assert not fits([Plan([small] * (few // 2), k), Plan([big], k)])
    # A step too large even with remat is refused whatever its share.
    assert not fits([Plan([small] * few * 100, k), Plan([big + 1], k)])


def test_the_cost_model_charges_rematerialised_packed_steps():
    rng = np.random.default_rng(2)
    cands = [inner.CandidateData([_tokens(rng, int(n)) for n in rng.integers(5, 60, size=3)])
             for _ in range(8)]
    ic = inner.InnerConfig(epochs=1, length_buckets=(16, 32, 64), pack_row_tokens=64)
    plan = inner.build_plan(cands, [{"seed": k} for k in range(8)], ic, pad_id=PAD)
    assert plan.packs_rows
    tokens_S = plan.computed_tokens_S()
    step, token = inner._step_and_token_seconds(CFG)
    plain = inner.estimated_train_seconds(plan, CFG, ic)
    assert inner.estimated_train_seconds(plan, CFG, ic, plain_tokens=int(tokens_S.max())) == plain
    limit = int(np.median(tokens_S))
    extra = (inner.REMAT_TOKEN_COST - 1) * token * tokens_S[tokens_S > limit].sum()
    assert extra > 0
    assert inner.estimated_train_seconds(plan, CFG, ic, plain_tokens=limit) == pytest.approx(plain + extra)


def test_out_of_memory_under_auto_remat_retries_with_remat_before_splitting(params, monkeypatch):
    plan, want = _batched(params, 1)
    monkeypatch.setattr(inner, "_FITTED_K", {})
    monkeypatch.setattr(inner, "_REMAT_LIMIT", {})
    monkeypatch.setattr(inner.compile_cache, "directory", lambda: None)  # learn in this process only
    monkeypatch.setattr(inner, "_free_device_bytes", lambda: 1 << 40)  # an accelerator, ample memory
    calls = []

    def fake_device(base_params, sub_plan, **kw):
        mode = inner._remat_mode(CFG, LC, IC)
        calls.append((sub_plan.num_candidates, mode))
        if mode != "forced":
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 86 GiB")
        return inner.train_candidates(base_params, sub_plan, **kw)

    got = inner.train_candidates_fitting(params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=IC,
                                         train=fake_device)
    assert calls == [(4, "auto"), (4, "forced")]  # the same K again, rematerialised
    assert inner.fitted_candidates_per_call(CFG, LC, IC) is None
    # Rematerialised: equal to rounding (compounded over the steps), not bit for bit.
    for a, b in zip(jax.tree.leaves(got.lora), jax.tree.leaves(want.lora)):
        assert_close_scaled(np.asarray(a), np.asarray(b), eps_multiple=1024, what="adapter")
    np.testing.assert_array_equal(got.steps, want.steps)


class _PlainProgramOutOfMemory:
    """A compiled plain program whose first call fails as an over-full accelerator would."""

    def __init__(self, compiled, failures):
        self.compiled, self.failures = compiled, failures
        self.memory_analysis = compiled.memory_analysis

    def __call__(self, *args):
        if self.failures:
            self.failures.pop()
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 44.81GiB")
        return self.compiled(*args)


def test_out_of_memory_rematerialises_programs_as_big_as_the_failed_ones_and_remembers(
        params, monkeypatch, tmp_path):
    from seal_jax import train_step as step_lib

    for name in ("REMAT_CHOICE", "REMAT_NEED"):
        monkeypatch.setattr(step_lib, name, {})
    monkeypatch.setattr(inner, "_FITTED_K", {})
    monkeypatch.setattr(inner, "_REMAT_LIMIT", {})
    monkeypatch.setattr(inner.compile_cache, "directory", lambda: str(tmp_path))
    monkeypatch.setattr(inner, "_free_device_bytes", lambda: 1 << 40)  # the analysis says it all fits
    ic = IC.replace(packing=False, length_buckets=(16, 48), epochs=1, remat=None)
    plan = inner.build_plan(_candidates(7), None, ic, pad_id=PAD)
    # The long program's plain version fails once on the "device" (what ran beside it used the room).
    failures = [True]
    dispatched = []  # (remat, length, planned bytes of the plain program) per program handed out
    real_compile = inner._compile

    def compile_and_track(step_cfg, mesh, rules, frozen, state, xs, **kw):
        compiled, key = real_compile(step_cfg, mesh, rules, frozen, state, xs, **kw)
        length = xs.tokens.shape[3]
        if not step_cfg.cfg.remat:
            dispatched.append((False, length, inner._planned_bytes(compiled)))
            if length == 48:
                return _PlainProgramOutOfMemory(compiled, failures), key
        else:
            dispatched.append((True, length, None))
        return compiled, key

    monkeypatch.setattr(inner, "_compile", compile_and_track)
    got = inner.train_candidates_fitting(params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=ic)
    assert not failures and inner.fitted_candidates_per_call(CFG, LC, ic) is None  # no split needed
    need = {t: n for remat, t, n in dispatched if not remat}
    assert need[48] > need[16] > 0
    key = inner._fit_key(CFG, LC, ic)
    limit = inner._REMAT_LIMIT[key]
    assert limit == need[48]  # the largest plain program the failed call had dispatched
    # The retry ran rematerialised exactly the programs planning at least that much.
    for length in (16, 48):
        chosen = [remat for remat, t, _ in dispatched if t == length][-1]
        assert chosen == (need[length] >= limit), (length, dispatched)
    want = inner.train_candidates(params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=ic.replace(remat=False))
    for a, b in zip(jax.tree.leaves(got.lora), jax.tree.leaves(want.lora)):
        assert_close_scaled(np.asarray(a), np.asarray(b), eps_multiple=1024, what="adapter")

    # Saved beside the compilation cache: a new process (empty memory) starts from the lesson.
    saved = json.loads((tmp_path / inner.REMAT_LIMITS_FILE).read_text())
    assert list(saved.values()) == [limit]
    monkeypatch.setattr(inner, "_REMAT_LIMIT", {})
    assert inner._remat_limit(key) == limit and inner._remat_mode(CFG, LC, ic) == "auto"
    # A limit between the two programs keeps the short one plain and rematerialises the long one.
    monkeypatch.setattr(step_lib, "REMAT_CHOICE", {})
    monkeypatch.setattr(step_lib, "REMAT_NEED", {})
    dispatched.clear()
    padded, step_cfg, rules, frozen, state = inner._prepare(
        params, plan, cfg=CFG, lora_cfg=LC, inner_cfg=ic, init_lora=None, mesh=None, rules=None,
        abstract=True)
    between = (need[16] + need[48]) // 2
    for start, stop, t in padded.chunks(ic.steps_per_chunk):
        inner._chunk_program(step_cfg, "auto", None, rules, frozen, state,
                             padded.gather(start, stop, t, ic.steps_per_chunk), limit=between)
    assert {t: remat for remat, t, _ in dispatched} == {16: False, 48: True}
    # A damaged file costs only the lesson.
    (tmp_path / inner.REMAT_LIMITS_FILE).write_text("{not json")
    monkeypatch.setattr(inner, "_REMAT_LIMIT", {})
    assert inner._remat_limit(key) is None


def test_candidates_per_call_in_memory_takes_the_largest_power_of_two_the_free_memory_holds(monkeypatch):
    monkeypatch.setattr(inner, "_FITTED_K", {})
    ic = inner.InnerConfig(length_buckets=(16, 64, 256))
    in_memory = functools.partial(inner.candidates_per_call_in_memory, CFG, LC, ic, maximum=64, fallback=8)
    monkeypatch.setattr(inner, "_free_device_bytes", lambda: None)
    assert in_memory(100) == 8  # no memory statistics (CPU): the fallback
    # One candidate's estimate at the longest sequence's bucket (100 + EOS -> 256 tokens).
    tokens = 256
    per = (inner.ACTIVATION_PLAN_FACTOR * min(inner._activation_bytes(CFG, tokens),
                                              inner._activation_bytes(CFG, tokens, remat=True))
           + inner.TRAINABLE_STATE_BYTES * lora_lib.lora_num_params(CFG, LC))
    for fits, want in ((1, 1), (5, 4), (8, 8), (1000, 64)):
        free = (fits + 0.5) * per / inner.REMAT_MEMORY_SHARE
        monkeypatch.setattr(inner, "_free_device_bytes", lambda free=free: int(free))
        assert in_memory(100) == want, fits
    free = 4.5 * per / inner.REMAT_MEMORY_SHARE
    monkeypatch.setattr(inner, "_free_device_bytes", lambda: int(free))
    assert in_memory(10) > in_memory(100) == 4  # shorter sequences: more candidates in the same memory
    assert in_memory(100, devices=4) == 16  # the candidates spread over the mesh's devices
    bigger = CFG.replace(num_layers=4 * CFG.num_layers)
    assert inner.candidates_per_call_in_memory(bigger, LC, ic, 100, maximum=64, fallback=8) < in_memory(100)
    # Never above a K that already ran out of memory in this process.
    inner._FITTED_K[inner._fit_key(CFG, LC, ic)] = 2
    assert in_memory(100) == 2


def test_the_cost_model_widens_calls_for_step_bound_models_and_narrows_them_for_flop_bound_ones(monkeypatch):
    # Eight candidates: one long sequence each, and 1 to 8 short ones (steps differ, so wide calls
    # idle their light members and pad every step to the longest row).
    rng = np.random.default_rng(0)
    cands = [inner.CandidateData([rng.integers(3, 50, size=60).astype(np.int32)]
                                 + [rng.integers(3, 50, size=8).astype(np.int32)] * n)
             for n in range(1, 9)]
    hparams = [{"seed": k} for k in range(8)]
    # A row per candidate (packed rows are checked at the end).
    ic = inner.InnerConfig(epochs=2, length_buckets=(16, 64), candidate_buckets=(1, 2, 4, 8),
                           packing=False)
    fastest = functools.partial(inner.fastest_candidates_per_call, cands, hparams, CFG, ic, maximum=8,
                                pad_id=PAD)
    plan = inner.build_plan(cands, hparams, ic, pad_id=PAD)
    monkeypatch.setattr(inner, "CALL_OVERHEAD_S", 0.0)
    monkeypatch.setattr(inner, "TOKEN_FLOPS_PER_S", math.inf)  # every step costs its fixed part
    step, token = inner._step_and_token_seconds(CFG)
    assert token == 0 and inner.estimated_train_seconds(plan, CFG, ic) == pytest.approx(plan.num_steps * step)
    k, estimates = fastest()
    assert k == 8 and estimates[8] == min(estimates.values())  # one call: the fewest steps
    # 88 steps in all: K <= 4 runs at least 22 steps, more than the 18 of one call, so narrower calls
    # are bound out without being planned.
    assert list(estimates) == [8]
    monkeypatch.setattr(inner, "STEP_OVERHEAD_S", 0.0)  # every step costs its tokens' FLOPs
    monkeypatch.setattr(inner, "STEP_SECONDS_PER_WEIGHT_BYTE", 0.0)
    monkeypatch.setattr(inner, "TOKEN_FLOPS_PER_S", 1e12)
    computed = {kk: sum(inner.build_plan([cands[i] for i in g], [hparams[i] for i in g], ic, pad_id=PAD)
                        .token_counts()["computed_tokens"]
                        for g in inner.group_candidates(cands, hparams, ic, kk)) for kk in (1, 2, 4, 8)}
    k, estimates = fastest()
    assert k == min(computed, key=computed.get) == 1  # alone, no candidate pads or idles
    assert estimates[8] > estimates[1]
    # Packed rows: idle candidates add no rows and short sequences share them, so the wide call
    # computes no more tokens than single calls and wins on steps as well.
    packed_ic = ic.replace(packing=True)
    computed = {kk: sum(inner.build_plan([cands[i] for i in g], [hparams[i] for i in g], packed_ic,
                                         pad_id=PAD).token_counts()["computed_tokens"]
                        for g in inner.group_candidates(cands, hparams, packed_ic, kk)) for kk in (1, 8)}
    assert computed[8] <= computed[1]
    k, _ = inner.fastest_candidates_per_call(cands, hparams, CFG, packed_ic, maximum=8, pad_id=PAD)
    assert k == 8


def test_fitting_k_in_packed_rows_checks_each_k_by_its_largest_packed_step(monkeypatch):
    monkeypatch.setattr(inner, "_FITTED_K", {})
    rng = np.random.default_rng(1)
    cands = [inner.CandidateData([_tokens(rng, int(n)) for n in rng.integers(5, 60, size=3)])
             for _ in range(16)]
    hparams = [{"seed": k} for k in range(16)]
    ic = inner.InnerConfig(epochs=1, length_buckets=(16, 32, 64), pack_row_tokens=64,
                           candidate_buckets=(1, 2, 4, 8, 16))
    fit = functools.partial(inner.fit_candidates_per_call, cands, hparams, CFG, LC, ic, maximum=16,
                            fallback=4, pad_id=PAD)
    monkeypatch.setattr(inner, "_free_device_bytes", lambda: None)
    assert fit() == 4  # no memory statistics (CPU): the fallback

    def largest_step_bytes(k):
        plans = [inner.build_plan([cands[i] for i in g], [hparams[i] for i in g], ic, pad_id=PAD)
                 for g in inner.group_candidates(cands, hparams, ic, k)]
        tokens = max(int((p.packed_layout().rows_S * p.packed_layout().row_length_S).max()) for p in plans)
        return (inner.ACTIVATION_PLAN_FACTOR * inner._activation_bytes(CFG, tokens)  # without remat
                + inner.TRAINABLE_STATE_BYTES * lora_lib.lora_num_params(CFG, LC) * k)

    need = {k: largest_step_bytes(k) for k in (2, 4, 8, 16)}
    assert need[16] > need[8] > need[4]
    # No remat allowed: the widest K whose largest step fits without it (under this cost model wider
    # packed calls are faster).
    monkeypatch.setattr(inner, "PACKED_REMAT_TOKEN_SHARE", 0.0)
    for free, want in ((need[16] * 2, 16), ((need[8] + need[16]) / 2, 8), ((need[4] + need[8]) / 2, 4)):
        monkeypatch.setattr(inner, "_free_device_bytes", lambda free=free: int(free / inner.REMAT_MEMORY_SHARE))
        assert fit() == want
    # Remat allowed on any share of the steps: K=16 is admitted where only its rematerialised largest
    # step fits.
    tokens16 = max(int(p.computed_tokens_S().max())
                   for p in (inner.build_plan([cands[i] for i in g], [hparams[i] for i in g], ic, pad_id=PAD)
                             for g in inner.group_candidates(cands, hparams, ic, 16)))
    assert inner._step_bytes(CFG, LC, tokens16, 16, remat=True) < (need[8] + need[16]) / 2
    monkeypatch.setattr(inner, "PACKED_REMAT_TOKEN_SHARE", 1.0)
    monkeypatch.setattr(inner, "_free_device_bytes",
                        lambda: int((need[8] + need[16]) / 2 / inner.REMAT_MEMORY_SHARE))
    assert fit() == 16
    # A K that ran out of memory here caps later choices.
    monkeypatch.setattr(inner, "_free_device_bytes", lambda: int(need[16] * 2 / inner.REMAT_MEMORY_SHARE))
    monkeypatch.setattr(inner, "_FITTED_K", {(CFG, LC, ic): 8})
    assert fit() == 8
