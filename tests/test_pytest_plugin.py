"""The pytest plugin, run in an inner pytest session (pytester): a healthy training test passes,
a deep sigmoid net's test fails with the report as its message, and the marker permits kinds."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

pytest_plugins = ["pytester"]

MODELS = '''
import pytest
import torch
from torch import nn


def train(model, steps=60, lr=0.05):
    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return opt, x, y


def sigmoid_net():
    torch.manual_seed(0)
    layers = []
    for _ in range(10):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, 4))


def relu_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


def fit(gradient_health, model, steps=60):
    opt, x, y = train(model)
    w = gradient_health.watch(model, optimizer=opt)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        w.observe_loss(loss)
        opt.step()
    return w
'''


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(helpers=MODELS)
    # The inner session must load the plugin from its entry point, as a user's would: no -p.
    pytester.makeini("[pytest]\nfilterwarnings =\n    ignore::gradwatch.GradientHealthWarning\n")
    return pytester


@pytest.mark.parametrize("args", [["-q"], ["-q", "-n", "2"]], ids=["serial", "xdist"])
def test_a_healthy_test_passes_and_a_vanishing_gradient_fails_with_the_report(inner, args):
    inner.makepyfile(test_models='''
from helpers import fit, relu_net, sigmoid_net


def test_healthy(gradient_health):
    w = fit(gradient_health, relu_net())
    assert w.report().steps == 60


def test_broken(gradient_health):
    fit(gradient_health, sigmoid_net())
''')
    result = inner.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    # The failure is the broken test's, in the call phase (a failure, not a teardown error).
    assert "FAILED test_models.py::test_broken" in out
    assert "test_healthy" not in out.split("short test summary")[-1]
    # The message is the report: the finding, the layer table's flagged rows and the advice.
    result.stdout.fnmatch_lines([
        "*gradwatch: * unhealthy-gradient finding* in this test*",
        "*gradwatch report (torch): 60 optimizer steps*",
        "*[[]vanishing_gradient[]] step *",
        "*    * *",  # an advice line
        "*@pytest.mark.gradwatch(allow=*",
    ])
    # Short enough for a CI log: only flagged layers, not the whole table.
    failure = out.split(" test_broken _")[1].split("short test summary")[0]
    assert len(failure.splitlines()) < 60


def test_the_marker_permits_a_kind_and_only_that_kind(inner):
    inner.makepyfile(test_allowed='''
import pytest
from helpers import fit, sigmoid_net


@pytest.mark.gradwatch(allow=["vanishing_gradient", "saturated_units", "loss_plateau"])
def test_known_slow(gradient_health):
    w = fit(gradient_health, sigmoid_net())
    assert "vanishing_gradient" in {f.kind for f in w.findings}


@pytest.mark.gradwatch(allow=["loss_plateau"])
def test_other_kind(gradient_health):
    fit(gradient_health, sigmoid_net())
''')
    result = inner.runpytest_subprocess("-q")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*FAILED test_allowed.py::test_other_kind*"])
    result.stdout.fnmatch_lines(["*(allowed: loss_plateau)*"])


def test_a_test_that_fails_by_itself_keeps_its_own_failure_and_the_hooks_are_removed(inner):
    inner.makepyfile(test_own='''
from helpers import fit, sigmoid_net

KEPT = []


def test_own_assert(gradient_health):
    KEPT.append(fit(gradient_health, sigmoid_net()))
    assert 1 == 2, "the test's own assertion"


def test_after():
    assert KEPT and KEPT[0].removed
''')
    result = inner.runpytest_subprocess("-q", "-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "the test's own assertion" in out
    assert "unhealthy-gradient finding" not in out


def test_bad_markers_are_usage_errors_that_name_the_problem(inner):
    inner.makepyfile(test_bad='''
import pytest


@pytest.mark.gradwatch(allow=["vanishing"])
def test_typo(gradient_health):
    pass


@pytest.mark.gradwatch(allow=["loss_plateau"])
def test_no_fixture():
    pass
''')
    result = inner.runpytest_subprocess("-q")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*unknown finding kind(s) 'vanishing'*"])
    result.stdout.fnmatch_lines(["*has no effect without the gradient_health fixture*"])


def test_the_plugin_is_inert_for_tests_that_do_not_use_it(inner):
    inner.makepyfile(test_plain='''
import sys


def test_plain():
    # the plugin loaded (its marker is known) but imported no adapter, no framework
    assert "gradwatch.pytest_plugin" in sys.modules
    assert "gradwatch_torch" not in sys.modules and "torch" not in sys.modules
''')
    result = inner.runpytest_subprocess("-q")
    result.assert_outcomes(passed=1)


def test_the_integrations_pages_pytest_example_runs_as_it_stands(pytester):
    import pathlib
    import re

    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
    block = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)[0]
    pytester.makepyfile(test_example=block)
    result = pytester.runpytest_subprocess("-q", "-W", "ignore::gradwatch.GradientHealthWarning")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([  # in order: the message, then the summary line
        "*gradwatch: 1 unhealthy-gradient finding in this test (allowed: loss_plateau)*",
        "*[[]vanishing_gradient[]] step 30: layer '0' (Linear, first of 11)*",
        "*FAILED test_example.py::test_deep_sigmoid_net_trains*",
    ])
