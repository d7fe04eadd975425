"""unf.quant: the symmetric restricted grid against hand-computed values, the model-level rule, the MSE, errors."""
import pytest
import torch
import torch.nn as nn

from unf.quant import layer_bits, levels, quantization_mse, quantize, quantize_model, step_size


def test_grid_and_rounding_by_hand():
    w = torch.tensor([1.0, -0.4, 0.2, 0.1, -1.0, 0.0])
    # 2 bits: levels -1, 0, 1 at step 1 (max|w| / 1)
    assert torch.equal(quantize(w, 2), torch.tensor([1.0, 0.0, 0.0, 0.0, -1.0, 0.0]))
    # 3 bits: step 1/3, w/step = 3, -1.2, .6, .3, -3, 0 -> 3, -1, 1, 0, -3, 0
    assert torch.allclose(quantize(w, 3), torch.tensor([1.0, -1 / 3, 1 / 3, 0.0, -1.0, 0.0]))
    # 4 bits: step 1/7, w/step = 7, -2.8, 1.4, .7, -7, 0 -> 7, -3, 1, 1, -7, 0
    assert torch.allclose(quantize(w, 4), torch.tensor([7, -3, 1, 1, -7, 0]) / 7.0)
    assert [levels(b) for b in (2, 3, 4, 8)] == [1, 3, 7, 127]
    assert float(step_size(w, 8)) == pytest.approx(1 / 127)


def test_ties_round_to_even_and_every_value_is_on_the_grid():
    w = torch.tensor([2.0, 0.5, 1.5, -0.5])  # 2 bits, step 2: w/step = 1, .25, .75, -.25
    assert torch.equal(quantize(w, 2), torch.tensor([2.0, 0.0, 2.0, -0.0]))
    w = torch.tensor([3.0, 0.5, 1.5, 2.5])  # 3 bits, step 1: ties .5 -> 0, 1.5 -> 2, 2.5 -> 2
    assert torch.equal(quantize(w, 3), torch.tensor([3.0, 0.0, 2.0, 2.0]))
    x = torch.randn(200, dtype=torch.float64)
    q = quantize(x, 3)
    k = q / step_size(x, 3)
    assert torch.allclose(k, k.round()) and k.abs().max() <= 3
    assert ((x - q).abs() <= step_size(x, 3) / 2 + 1e-12).all()  # nearest level


def test_running_range_clips_and_zero_tensor_stays_zero():
    w = torch.tensor([0.5, -2.0, 0.26])
    assert torch.allclose(quantize(w, 2, max_abs=0.5), torch.tensor([0.5, -0.5, 0.5]))  # step .5, clipped
    assert torch.equal(quantize(torch.zeros(3), 4), torch.zeros(3))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))


def test_quantize_model_first_last_rule_copy_and_mse():
    m = _net()
    assert layer_bits(m, 2) == {"0.weight": 8, "2.weight": 2, "4.weight": 8}
    assert layer_bits(m, 4) == {"0.weight": 4, "2.weight": 4, "4.weight": 4}
    assert layer_bits(m, 2, first_last_bits=None, skip=["2.weight"]) == {"0.weight": 2, "4.weight": 2}
    q = quantize_model(m, 2)
    assert torch.equal(q[2].weight, quantize(m[2].weight, 2)) and torch.equal(q[0].weight, quantize(m[0].weight, 8))
    assert torch.equal(q[0].bias, m[0].bias) and not torch.equal(q[2].weight, m[2].weight)  # a copy; biases kept
    with torch.no_grad():
        direct = sum(float((m[i].weight - quantize(m[i].weight, b)).double().pow(2).sum()) for i, b in
                     ((0, 8), (2, 2), (4, 8))) / (24 + 36 + 18)
    assert quantization_mse(m, 2) == pytest.approx(direct)
    w0, w2 = m[0].weight.detach().clone(), m[2].weight.detach().clone()
    assert quantize_model(m, {"2.weight": 3}, inplace=True) is m
    assert torch.equal(m[2].weight, quantize(w2, 3)) and torch.equal(m[0].weight, w0)  # only the mapped tensor


@pytest.mark.parametrize("bits", [1, 0, 2.5, "4", True])
def test_bad_bits_name_the_argument(bits):
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.ones(3), bits)


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="skip"):
        quantize_model(_net(), 4, skip=["nope.weight"])
    with pytest.raises(ValueError, match="bits"):
        quantize_model(_net(), {"nope.weight": 4})
