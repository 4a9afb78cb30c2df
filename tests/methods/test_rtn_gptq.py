import pytest
import torch

from builders import output_error
from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.methods.gptq import gptq_quantize
from hf_compress_prompt.methods import hessian
from hf_compress_prompt.methods.hessian import HessianAccumulator, damped_inverse_cholesky, inverse_cholesky_upper
from hf_compress_prompt.methods.rtn import rtn_quantize

SETTINGS = [  # (bits, group_size, symmetric, act_order)
    (4, -1, False, False),
    (4, 32, False, False),
    (4, 32, True, False),
    (3, 64, False, False),
    (3, -1, True, True),
    (4, 32, False, True),
    (2, 32, False, False),
    (8, -1, False, False),
]


@pytest.mark.parametrize("bits, group_size, symmetric, act_order", SETTINGS)
def test_gptq_beats_rtn_on_the_same_grid(layer, bits, group_size, symmetric, act_order):
    W, X, H = layer
    rtn = rtn_quantize(W, bits, group_size, symmetric).dequantize()
    gptq = gptq_quantize(W, H, bits, group_size, symmetric, act_order=act_order).dequantize()
    assert output_error(W, gptq, X) < 0.9 * output_error(W, rtn, X)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("bits, group_size, symmetric, act_order", SETTINGS)
def test_every_weight_lies_on_its_groups_grid(layer, method, bits, group_size, symmetric, act_order):
    W, _, H = layer
    if method == "rtn":
        qw = rtn_quantize(W, bits, group_size, symmetric)
    else:
        qw = gptq_quantize(W, H, bits, group_size, symmetric, act_order=act_order)
    size = 128 if group_size == -1 else group_size
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 2**bits - 1
    assert qw.scale.shape == qw.zero.shape == (64, 128 // size)
    assert torch.equal(qw.zero, qw.zero.round()) and bool((qw.scale > 0).all())
    if symmetric:
        assert bool((qw.zero == 2 ** (bits - 1)).all())
    deq = qw.dequantize()
    for g in range(128 // size):
        block = deq[:, g * size : (g + 1) * size]  # (rows, size)
        grid = qw.scale[:, g : g + 1] * (torch.arange(2**bits)[None, :] - qw.zero[:, g : g + 1])  # (rows, 2**bits)
        distance = (block[:, :, None] - grid[:, None, :]).abs().min(dim=-1).values
        assert float(distance.max()) < 1e-5


def test_rtn_error_shrinks_with_bits(layer):
    W, X, _ = layer
    errors = [output_error(W, rtn_quantize(W, b, 32).dequantize(), X) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3 * errors[0]


def test_rtn_rounds_to_the_nearest_grid_point():
    W = torch.tensor([[0.0, 0.1, 0.26, 1.0]])
    qw = rtn_quantize(W, bits=2, group_size=-1)  # range [0, 1], step 1/3
    torch.testing.assert_close(qw.dequantize(), torch.tensor([[0.0, 0.0, 1 / 3, 1.0]]))


def test_act_order_records_its_permutation_and_keeps_static_groups(layer):
    W, _, H = layer
    qw = gptq_quantize(W, H, 4, 32, act_order=True)
    assert torch.equal(qw.perm, torch.argsort(torch.diagonal(H), descending=True))
    assert qw.perm[0] == 5  # the outlier channel is visited first
    assert torch.equal(qw.group_index, torch.arange(128) // 32)


def test_dead_inputs_are_quantized_as_zero(layer):
    W, X, _ = layer
    X = X.clone()
    X[:, 3] = 0
    acc = HessianAccumulator(128)
    acc.add_batch(X)
    qw = gptq_quantize(W, acc.H, 4, 32)
    assert float(qw.dequantize()[:, 3].abs().max()) == 0.0


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"group_size": 100}, r"group_size=100 does not divide in_features=128; use one of 16, 32, 64, 128, -1"),
        ({"bits": 5}, r"bits=5 is not supported; use one of 2, 3, 4, 8"),
    ],
)
def test_bad_settings_are_rejected(layer, kwargs, pattern):
    W, _, H = layer
    with pytest.raises(UserInputError, match=pattern):
        rtn_quantize(W, **kwargs)
    with pytest.raises(UserInputError, match=pattern):
        gptq_quantize(W, H, **kwargs)


def test_hessian_accumulates_like_one_big_batch():
    X = torch.randn(3, 50, 16)
    acc = HessianAccumulator(16)
    for batch in X:
        acc.add_batch(batch)
    flat = X.reshape(-1, 16)
    torch.testing.assert_close(acc.H, 2 * flat.T @ flat / 150)
    assert acc.tokens == 150
    torch.testing.assert_close(acc.channel_sq_norm, (flat**2).mean(0))


def _twin_accumulators(X):
    """Two accumulators given the same batches ``X`` (batches, tokens, 16)."""
    acc, reference = HessianAccumulator(16), HessianAccumulator(16)
    for batch in X:
        acc.add_batch(batch)
        reference.add_batch(batch)
    return acc, reference


def test_a_finished_accumulator_gives_the_same_bytes_without_its_sum():
    X = torch.randn(3, 50, 16)
    acc, reference = _twin_accumulators(X)
    acc.finish()
    assert acc.sum is None  # the float64 sum (twice H's memory) is gone
    assert torch.equal(acc.H, reference.H) and torch.equal(acc.channel_sq_norm, reference.channel_sq_norm)
    assert acc.H is acc.H  # kept, not made again on each call
    with pytest.raises(RuntimeError, match="finished"):
        acc.add_batch(X[0])
    with pytest.raises(RuntimeError, match="finished"):
        reference.merge(acc)


def test_the_solvers_leave_the_caller_s_hessian_as_it_was(layer):
    from hf_compress_prompt.methods.sparsegpt import sparsegpt_prune

    weight, _, H = layer
    H = H.clone()
    H[3, :] = H[:, 3] = 0  # a dead input: the solvers set its diagonal to 1 on a copy
    before = H.clone()
    gptq_quantize(weight, H, 4, 32, False, True)
    sparsegpt_prune(weight, H, 0.5)
    assert torch.equal(H, before)


def _solve(method, weight, H, **kwargs):
    """The solver's result as a tuple of tensors (codes, grids, weights, masks)."""
    from hf_compress_prompt.methods.sparsegpt import sparsegpt_prune

    if method.startswith("gptq"):
        qw = gptq_quantize(weight, H, 4, 32, act_order=method == "gptq-act-order", **kwargs)
        return (qw.codes, qw.scale, qw.zero) + ((qw.perm,) if qw.perm is not None else ())
    new, mask, qw = sparsegpt_prune(weight, H, 0.5, bits=4, group_size=32, **kwargs)
    return new, mask, qw.codes, qw.scale, qw.zero


@pytest.mark.parametrize("method", ["gptq", "gptq-act-order", "sparsegpt"])
def test_with_a_spill_folder_the_solvers_factor_h_in_its_own_memory_with_the_same_bytes(layer, tmp_path, method,
                                                                                        monkeypatch):
    """Given ``spill_dir``, GPTQ and SparseGPT turn the H they are handed into its inverse factor instead of
    copying it (one n x n matrix fewer; act-order permutes it where it lies): the same bytes as the copy's, the
    factor in H's memory, nothing left in the folder."""
    from hf_compress_prompt.methods import gptq, sparsegpt

    weight, _, H = layer
    H = H.clone()
    H[3, :] = H[:, 3] = 0  # a dead input: set to 1 in H itself now
    expected = _solve(method, weight, H.clone())
    factors = []
    solver = sparsegpt if method == "sparsegpt" else gptq

    def spy(make, damp):
        factor, used = damped_inverse_cholesky(make, damp)
        factors.append(factor.data_ptr())
        return factor, used

    monkeypatch.setattr(solver, "damped_inverse_cholesky", spy)
    before = H.clone()
    got = _solve(method, weight, H, spill_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert factors == [H.data_ptr()] and not torch.equal(H, before)  # H's memory became the factor
    assert list(tmp_path.iterdir()) == []  # the spilled copy was never a named file


def test_act_order_s_permutation_in_h_s_own_memory_is_the_gather(monkeypatch):
    """In H's memory, act-order's permutation (blocks of rows gather their columns, then rows move along the cycles)
    gives the bytes of ``H[perm][:, perm]``, for permutations with fixed points, long and short cycles."""
    monkeypatch.setattr(hessian, "PRODUCT_BLOCK", 50 * 7)  # columns gathered 7 rows at a time
    X = torch.randn(80, 50)
    H = X.T @ X
    for perm in (torch.randperm(50), torch.arange(50), torch.arange(50).flip(0), torch.arange(50).roll(3)):
        M = H.clone()
        hessian._permute_in_place(M, perm)
        assert torch.equal(M, H[perm][:, perm])


def test_a_failed_attempt_in_h_s_memory_reads_h_back_from_the_spill(tmp_path):
    """An attempt that fails leaves H's memory half factored (torch zeroes the other triangle too): the next
    attempt reads H back from the spilled file, so the retries give what copies give."""
    indefinite = torch.diag(torch.tensor([1.0, 1.0, -0.01])) + 0.001 * (1 - torch.eye(3))  # 1% damping fails
    H = indefinite.clone()
    with hessian.hessian_in_place(H, torch.zeros(3, dtype=torch.bool), tmp_path) as make:
        first = make()
        assert first.data_ptr() == H.data_ptr() and first.stride() == (1, 3) and torch.equal(first, indefinite)
        first.zero_()  # what a failed attempt might leave
        assert torch.equal(make(), indefinite)
    H = indefinite.clone()
    with hessian.hessian_in_place(H, torch.zeros(3, dtype=torch.bool), tmp_path) as make:
        U, used = damped_inverse_cholesky(make, 0.01)
    assert used == pytest.approx(0.1) and U.data_ptr() == H.data_ptr()
    assert torch.equal(U, damped_inverse_cholesky(lambda: hessian.column_major_copy(indefinite), 0.01)[0])
    weight = torch.randn(4, 3)
    expected = gptq_quantize(weight, indefinite, 4)
    got = gptq_quantize(weight, indefinite.clone(), 4, spill_dir=tmp_path)
    assert torch.equal(got.codes, expected.codes) and torch.equal(got.scale, expected.scale)


def test_take_h_hands_the_hessian_over():
    X = torch.randn(2, 40, 16)
    acc, reference = _twin_accumulators(X)
    H = acc.take_H()  # finishes first
    assert torch.equal(H, reference.H) and torch.equal(acc.channel_sq_norm, reference.channel_sq_norm)
    with pytest.raises(RuntimeError, match="handed over"):
        acc.H
    with pytest.raises(RuntimeError, match="finished"):
        acc.add_batch(X[0])


def test_cholesky_retries_with_more_damping():
    H = torch.diag(torch.tensor([1.0, 1.0, -0.01]))  # indefinite: 1% damping is not enough, 10% is
    U, used = inverse_cholesky_upper(H, damp=0.01)
    assert used == pytest.approx(0.1)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(H + used * H.diagonal().mean() * torch.eye(3)))
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        inverse_cholesky_upper(torch.diag(torch.tensor([1.0, -5.0])))


def test_a_wide_layer_s_product_is_accumulated_in_blocks_of_rows_with_the_same_bytes(monkeypatch):
    """Wide layers add X^T X to the float64 sum in blocks of 128+ rows of its upper triangle (no second n x n
    matrix, about half the float64 one); the bytes equal those of the whole product added at once, its lower
    triangle mirrored, whether finished, read open, or merged."""
    X = torch.randn(3, 70, 300)
    whole = HessianAccumulator(300)  # 300 wide: one block, the whole product
    for batch in X:
        whole.add_batch(batch)
    assert [t.shape for t in whole.sum_tensors()] == [(300, 300)]
    reference = sum((batch.T @ batch).double() for batch in X)
    assert torch.equal(whole.sum, reference) and torch.equal(reference, reference.T)
    monkeypatch.setattr(hessian, "PRODUCT_BLOCK", 300 * 128)  # blocks of 128 rows: 128, 128 and a short 44
    blocks, first, rest = HessianAccumulator(300), HessianAccumulator(300), HessianAccumulator(300)
    for k, batch in enumerate(X):
        blocks.add_batch(batch)
        (first if k == 0 else rest).add_batch(batch)
    assert [t.shape for t in blocks.sum_tensors()] == [(128, 300), (128, 172), (44, 44)]  # 0.55 of 300 x 300
    assert torch.equal(blocks.sum, whole.sum)
    assert torch.equal(blocks.H, whole.H) and torch.equal(blocks.channel_sq_norm, whole.channel_sq_norm)
    first.merge(rest)
    blocks.finish()
    first.finish()
    assert torch.equal(blocks.H, whole.H) and torch.equal(first.H, whole.H)
    assert torch.equal(blocks.channel_sq_norm, whole.channel_sq_norm)


def test_the_in_place_inverse_factor_has_the_out_of_place_bytes():
    """The damped factor is computed in the one matrix ``make`` returns, with the bytes of the textbook's
    out-of-place steps; a failed attempt asks for a fresh copy."""
    X = torch.randn(200, 64)
    H = 2 * X.T @ X / 200
    damped = H + 0.01 * torch.diagonal(H).mean() * torch.eye(64)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    U, used = damped_inverse_cholesky(H.clone, 0.01)
    assert used == 0.01 and torch.equal(U, expected)

    calls = []
    indefinite = torch.diag(torch.tensor([1.0, 1.0, -0.01]))

    def make():
        calls.append(1)
        return indefinite.clone()

    U, used = damped_inverse_cholesky(make, 0.01)
    assert used == pytest.approx(0.1) and len(calls) == 2
    assert torch.equal(indefinite, torch.diag(torch.tensor([1.0, 1.0, -0.01])))


def test_the_solver_s_copy_is_column_major_and_factored_with_the_row_major_bytes(monkeypatch):
    """The solvers' copy of H is laid out column-major (LAPACK's order: torch factors it in place, with no temporary
    n x n matrix at each step), holds the values of the row-major gather, and gives the same factor's bytes."""
    X = torch.randn(300, 96)
    H = 2 * X.T @ X / 300
    H[5, :] = H[:, 5] = 0
    dead, perm = torch.diagonal(H) == 0, torch.randperm(96)
    monkeypatch.setattr(hessian, "PRODUCT_BLOCK", 96 * 10)  # act-order's gather in blocks of 10 rows
    for order in (None, perm):
        expected = H.clone() if order is None else H[order][:, order]
        expected.diagonal()[dead if order is None else dead[order]] = 1
        copy = hessian.solver_hessian(H, dead, order)
        assert copy.stride() == (1, 96) and torch.equal(copy, expected)
        U, _ = damped_inverse_cholesky(lambda o=order: hessian.solver_hessian(H, dead, o), 0.01)
        assert U.stride() == (1, 96)  # factored where it lies
        assert torch.equal(U, damped_inverse_cholesky(expected.clone, 0.01)[0])  # the row-major copy's bytes
    assert inverse_cholesky_upper(expected)[0].is_contiguous()  # the public function gives a row-major factor


def test_the_lazy_batch_update_made_a_block_of_columns_at_a_time_keeps_the_solvers_bytes(monkeypatch):
    """GPTQ's and SparseGPT's update of the columns after each block is made 128 columns at a time when
    ``PRODUCT_BLOCK`` says so (no temporary as large as W): the codes, grids and weights are the same bytes."""
    from hf_compress_prompt.methods.sparsegpt import sparsegpt_prune

    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 640, generator=g)  # 5 blocks of 128 columns: updates of 512, 384, 256 and 128 columns
    X = torch.randn(2048, 640, generator=g) @ (torch.eye(640) + torch.randn(640, 640, generator=g) / 640**0.5)
    H = 2 * X.T @ X / 2048
    runs = []
    for block in (hessian.PRODUCT_BLOCK, W.shape[0] * 128):
        monkeypatch.setattr(hessian, "PRODUCT_BLOCK", block)
        runs.append([gptq_quantize(W, H, 4, 32, False, act_order) for act_order in (False, True)]
                    + [sparsegpt_prune(W, H, "2:4", bits=4, group_size=32)])
    for whole, blocked in zip(*runs):
        whole, blocked = (r if isinstance(r, tuple) else (r,) for r in (whole, blocked))
        for a, b in zip(whole, blocked):
            for name in ("codes", "scale", "zero") if hasattr(a, "codes") else (None,):
                assert torch.equal(a if name is None else getattr(a, name), b if name is None else getattr(b, name))


def test_diagonal_only_accumulator_matches_the_full_diagonal():
    X = torch.randn(2, 40, 12)
    full, diag = HessianAccumulator(12), HessianAccumulator(12, diagonal_only=True)
    for batch in X:
        full.add_batch(batch)
        diag.add_batch(batch)
    torch.testing.assert_close(diag.channel_sq_norm, full.channel_sq_norm)
    with pytest.raises(ValueError, match="keeps only the diagonal"):
        diag.H


def test_gptq_keeps_an_earlier_pruning_mask(layer):
    from hf_compress_prompt.methods.sparsegpt import sparsegpt_prune

    W, X, H = layer
    pruned, mask, _ = sparsegpt_prune(W, H, 0.5)
    for act_order in (False, True):
        qw = gptq_quantize(pruned, H, 4, 32, act_order=act_order, prune_mask=mask)
        deq = qw.dequantize()
        assert bool((deq[mask] == 0).all())
        naive = rtn_quantize(pruned, 4, 32).dequantize()
        assert output_error(W, deq, X) < output_error(W, naive, X)


def test_hessian_clips_massive_tokens_to_a_multiple_of_the_median_norm():
    X = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    X[0] *= 100  # an attention-sink-like token
    clipped = HessianAccumulator(16, clip_token_norm=4.0)
    clipped.add_batch(X)
    norms = X.norm(dim=1)
    expected = X * torch.clamp(4.0 * norms.median() / norms, max=1.0)[:, None]  # only the massive token changes
    assert int((expected != X).any(dim=1).sum()) == 1
    torch.testing.assert_close(clipped.H, 2 * expected.T @ expected / 200)


def test_massive_tokens_do_not_cost_gptq_its_accuracy_on_ordinary_tokens():
    # 32 tokens 100x larger than the rest along one direction (what attention sinks feed o_proj / down_proj in
    # SmolLM2) hold most of an unclipped Hessian: GPTQ then fits them and its error on ordinary held-out tokens
    # climbs towards round-to-nearest's. Clipped, GPTQ keeps its usual margin on ordinary tokens and still fits
    # the massive ones far better than round-to-nearest does.
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 128, generator=g)
    mix = torch.eye(128) + 2 * torch.randn(128, 128, generator=g) / 128**0.5
    ordinary, held_out = torch.randn(2048, 128, generator=g) @ mix, torch.randn(1024, 128, generator=g) @ mix
    sink = torch.randn(128, generator=g)
    sink[[3, 40, 99]] *= 10
    massive = 100 * (sink + 0.1 * torch.randn(32, 128, generator=g))
    full, clipped = HessianAccumulator(128), HessianAccumulator(128, clip_token_norm=4.0)
    for acc in (full, clipped):
        acc.add_batch(torch.cat([ordinary, massive]))
    rtn = rtn_quantize(W, 4, 64).dequantize()
    for act_order in (False, True):
        unclipped = gptq_quantize(W, full.H, 4, 64, act_order=act_order).dequantize()
        fixed = gptq_quantize(W, clipped.H, 4, 64, act_order=act_order).dequantize()
        assert output_error(W, unclipped, held_out) > 0.75 * output_error(W, rtn, held_out)  # the failure
        assert output_error(W, fixed, held_out) < 0.65 * output_error(W, rtn, held_out)
        assert output_error(W, fixed, massive) < 0.1 * output_error(W, rtn, massive)


def _textbook_gptq(W, H, bits, group_size, symmetric, act_order, block_size, prune_mask):
    """GPTQ as the reference writes it: columns of the row-major weight one at a time, the grid of a group fitted
    when its first column is reached (static grids from the original weights under act-order or per channel)."""
    from hf_compress_prompt.methods.quant_grid import dequantize_codes, grid_params, quantize_codes
    from hf_compress_prompt.validation import static_group_index

    rows, cols = W.shape
    size = cols if group_size == -1 else group_size
    W, H = W.clone(), H.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if prune_mask is not None:
        W[prune_mask] = 0
    groups, group_of = cols // size, static_group_index(cols, group_size)
    static = group_size == -1 or act_order
    if static:
        scale, zero = grid_params(W.reshape(rows, groups, size).transpose(0, 1).reshape(-1, size), bits, symmetric)
        scale, zero = scale.view(groups, rows).T.contiguous(), zero.view(groups, rows).T.contiguous()
    else:
        scale, zero = torch.empty(rows, groups), torch.empty(rows, groups)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H, group_of = W[:, perm], H[perm][:, perm], group_of[perm]
        prune_mask = None if prune_mask is None else prune_mask[:, perm]
    Hinv, _ = inverse_cholesky_upper(H, 0.01)
    codes = torch.zeros_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            g = group_of[i1 + i]
            if not static and (i1 + i) % size == 0:
                scale[:, g], zero[:, g] = grid_params(torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :size], bits,
                                                      symmetric)
            c = quantize_codes(W1[:, i], scale[:, g], zero[:, g], bits)
            if prune_mask is not None:
                c = torch.where(prune_mask[:, i1 + i], zero[:, g], c)
            codes[:, i1 + i] = c
            err = (W1[:, i] - dequantize_codes(c, scale[:, g], zero[:, g])) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.to(torch.uint8), scale, zero


@pytest.mark.parametrize("block_size", [128, 16, 24])  # 16 / 24: groups span blocks; 128 columns end mid-block
@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize("bits, group_size, symmetric, act_order", SETTINGS)
def test_gptq_gives_the_textbook_loops_bits(bits, group_size, symmetric, act_order, block_size, pruned):
    """The solver works on transposed blocks for speed; its codes and grids equal the textbook loop's exactly."""
    torch.manual_seed(3)
    W, X = torch.randn(48, 128), torch.randn(400, 128) * torch.linspace(0.1, 2.0, 128)
    X[:, 5] = 0  # a dead input
    H = 2 * X.T @ X / X.shape[0]
    mask = torch.rand(48, 128) < 0.5 if pruned else None
    qw = gptq_quantize(W, H, bits, group_size, symmetric, act_order=act_order, block_size=block_size,
                       prune_mask=mask)
    codes, scale, zero = _textbook_gptq(W, H, bits, group_size, symmetric, act_order, block_size, mask)
    assert torch.equal(qw.codes, codes)
    assert torch.equal(qw.scale, scale) and torch.equal(qw.zero, zero)
