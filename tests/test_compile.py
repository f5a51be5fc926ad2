"""torch.compile of a whole training step (forward, backward, opt.step(), zero_grad()) with fastavg's optimizer."""
import torch
import torch._dynamo as dynamo

import fastavg

from helpers import tolerance


def _setup(make_optimizer):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = make_optimizer(model.parameters())

    def train_step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return model, opt, train_step


def _fastavg(params):
    return fastavg.AdamW(params, lr=1e-2, average=fastavg.EMA(0.9))


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)) for _ in range(n)]


def test_graph_breaks_at_most_one_more_than_torch_optim():
    """torch.optim breaks the graph at backward(); fastavg's step may add one break around itself, no more."""
    x, y = _batches(1)[0]
    torch_breaks = dynamo.explain(_setup(lambda p: torch.optim.AdamW(p, lr=1e-2))[2])(x, y).graph_break_count
    dynamo.reset()
    ours = dynamo.explain(_setup(_fastavg)[2])(x, y)
    assert ours.graph_break_count <= torch_breaks + 1, [str(b.reason).splitlines()[0] for b in ours.break_reasons]


def test_compiled_training_step_matches_eager_without_recompiling():
    batches = _batches(6)
    eager_model, eager_opt, eager_step = _setup(_fastavg)
    for x, y in batches:
        eager_step(x, y)
    dynamo.reset()
    model, opt, train_step = _setup(_fastavg)
    compiled = torch.compile(train_step)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x, y in batches:
            compiled(x, y)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, **tolerance(torch.float32))
    for a, b in zip(opt.averaged_parameters(), eager_opt.averaged_parameters()):
        torch.testing.assert_close(a, b, **tolerance(torch.float32))
    assert float(opt.state[next(model.parameters())]["step"]) == len(batches)
