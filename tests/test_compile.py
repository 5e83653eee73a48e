"""torch.compile traces the whole model without a graph break, in training and on the inference fast path."""

from __future__ import annotations

import pytest
import torch

from deeplab import ModelConfig, build_model
from deeplab.deploy.fast import optimize_for_inference


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Compiled code is cached per code object (DeepLab.forward is shared by every model), so start and end clean.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Separable ASPP at output stride 16: dilated depthwise convs, which train through a custom autograd.Function.
    cfg = ModelConfig(backbone="mobilenet_v2", num_classes=4, decoder=True, separable=True, output_stride=16)
    return build_model(cfg)


def test_compiled_training_step_matches_eager_gradients():
    model = _model().train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # the compiled graph draws its dropout mask from a different random stream
    x = torch.randn(2, 3, 65, 97)
    target = torch.randint(0, 4, (2, 65, 97))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)  # BN running statistics as before the eager step
    # fullgraph=True: any graph break (data-dependent Python, an untraceable op) is an error, not a silent split.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c = torch.nn.functional.cross_entropy(compiled(x), target)
    loss_c.backward()
    assert torch.allclose(loss_c, loss, rtol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, eager[name], rtol=1e-4, atol=1e-6), name


def test_fast_path_compiles_without_graph_breaks():
    fast = optimize_for_inference(_model())
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        ref = fast(x)
        out = torch.compile(fast, fullgraph=True, backend="aot_eager")(x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
