import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.model import LSTMClassifier, pad_arrow


def _seq(rng, length, n_features=5):
    return rng.standard_normal((length, n_features)).astype(np.float32)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_padding_does_not_change_a_prediction(bidirectional, num_layers):
    torch.manual_seed(0)
    model = LSTMClassifier(5, 3, hidden_size=16, num_layers=num_layers, dropout=0.1,
                           bidirectional=bidirectional).eval()
    rng = np.random.default_rng(0)
    short = _seq(rng, 4)
    others = [_seq(rng, 11), _seq(rng, 7), _seq(rng, 15)]
    alone, lengths, _ = pad_arrow(pa.array([short.tolist()]))
    batch, blengths, _ = pad_arrow(pa.array([o.tolist() for o in others[:2]] + [short.tolist()]
                                            + [others[2].tolist()]))
    assert batch.shape == (4, 15, 5) and list(blengths) == [11, 7, 4, 15]
    with torch.no_grad():
        a = model(torch.from_numpy(alone), torch.from_numpy(lengths))
        b = model(torch.from_numpy(batch), torch.from_numpy(blengths))
    torch.testing.assert_close(b[2:3], a, rtol=0, atol=1e-6)
    # And padding values really are ignored: garbage in the padded area changes nothing.
    dirty = batch.copy()
    dirty[2, 4:] = 1e3
    with torch.no_grad():
        c = model(torch.from_numpy(dirty), torch.from_numpy(blengths))
    torch.testing.assert_close(c, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_the_dense_cpu_path_equals_the_packed_path(bidirectional, num_layers):
    """On the CPU the padded batch runs dense and each row is read at its last valid step (the
    backward direction over rows reversed within their lengths); CUDA packs the batch. Both give
    the same outputs and the same gradients, none of which reaches a padded step."""
    torch.manual_seed(0)
    model = LSTMClassifier(5, 3, hidden_size=16, num_layers=num_layers,
                           bidirectional=bidirectional).eval()
    lengths = torch.tensor([12, 3, 7, 1, 12, 5])
    x = torch.randn(6, 12, 5)
    x[torch.arange(12)[None, :] >= lengths[:, None]] = 0.0
    x.requires_grad_(True)
    dense = model(x, lengths)
    packed = model.head(model._summary_packed(x, lengths))
    torch.testing.assert_close(dense, packed, rtol=0, atol=1e-6)
    weights = [x, *model.parameters()]
    for a, b in zip(torch.autograd.grad(dense.square().sum(), weights),
                    torch.autograd.grad(packed.square().sum(), weights)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    grad_x = torch.autograd.grad(model(x, lengths).sum(), x)[0]
    assert not grad_x[torch.arange(12)[None, :] >= lengths[:, None]].any()


def test_the_last_valid_step_matters():
    """The seed read out[:, -1], a padding step; a change at a sequence's last real step must count."""
    torch.manual_seed(0)
    model = LSTMClassifier(5, 3, hidden_size=16).eval()
    x = torch.zeros(2, 10, 5)
    lengths = torch.tensor([3, 10])
    with torch.no_grad():
        before = model(x, lengths)
        x[0, 2] = 5.0
        after = model(x, lengths)
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1], after[1])


def test_pad_arrow_matches_a_plain_loop_and_accepts_fixed_size_lists():
    rng = np.random.default_rng(1)
    seqs = [_seq(rng, n, 3) for n in (2, 5, 1)]
    x, lengths, width = pad_arrow(pa.array([s.tolist() for s in seqs]))
    assert width == 3 and list(lengths) == [2, 5, 1]
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(x[i, : len(s)], s)
        assert not x[i, len(s):].any()
    fixed = pa.array([s.tolist() for s in seqs], type=pa.list_(pa.list_(pa.float32(), 3)))
    x2, lengths2, _ = pad_arrow(fixed)
    np.testing.assert_array_equal(x2, x)
    # Sliced arrays (as Ray Data hands out) keep their own rows only.
    x3, lengths3, _ = pad_arrow(pa.array([s.tolist() for s in seqs]).slice(1, 2))
    np.testing.assert_array_equal(x3[0, :5], seqs[1])
    assert list(lengths3) == [5, 1]


@pytest.mark.parametrize("rows, message", [
    ([[[1.0, 2.0]], [[1.0]]], "inconsistent n_features: row 1"),
    ([[[1.0, float("nan")]]], "NaN or inf"),
    ([[[1.0, 2.0]], [[float("inf"), 0.0]]], "NaN or inf feature values (first in row 1"),
    ([[[1.0, 2.0]], []], "zero-length sequence in row 1"),
    ([[[1.0, 2.0]], None], "null sequences"),
])
def test_pad_arrow_rejects_bad_rows(rows, message):
    with pytest.raises(ValueError) as err:
        pad_arrow(pa.array(rows, type=pa.list_(pa.list_(pa.float32()))))
    assert message in str(err.value)
