import pytest

from cacheroute import make_policy, register_policy
from cacheroute.policies import (
    LoadBalancingPolicy,
    RoundRobinPolicy,
    available_policies,
    policy_class,
    policy_descriptions,
    registry,
)


class FirstHealthy(LoadBalancingPolicy):
    name = "first_healthy_test"
    description = "first healthy worker"

    def __init__(self, skip: int = 0) -> None:
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip!r}")
        self.skip = skip

    def select_worker(self, workers, request_text=None):  # type: ignore[no-untyped-def]
        healthy = [i for i, w in enumerate(workers) if w.is_healthy()]
        return healthy[min(self.skip, len(healthy) - 1)] if healthy else None


@pytest.fixture
def clean_registry():  # type: ignore[no-untyped-def]
    saved = dict(registry._registry)
    yield
    registry._registry.clear()
    registry._registry.update(saved)


def test_builtins_registered_with_descriptions() -> None:
    names = available_policies()
    assert {"round_robin", "random", "shortest_queue", "power_of_two"} <= set(names)
    assert names == sorted(names)
    assert all(policy_descriptions()[n] for n in names)


def test_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'nope'.*round_robin"):
        make_policy("nope")
    with pytest.raises(TypeError, match=r"^name must be a str, got 3 \(int\)"):
        make_policy(3)  # type: ignore[arg-type]


def test_unknown_config_key_named() -> None:
    with pytest.raises(TypeError, match=r"'colour'.*accepted keys: seed"):
        make_policy("random", colour="red")
    with pytest.raises(TypeError, match=r"'seed'.*\(none\)"):
        make_policy("round_robin", seed=1)


@pytest.mark.usefixtures("clean_registry")
def test_register_and_make_custom() -> None:
    register_policy("first_healthy_test", FirstHealthy)
    assert "first_healthy_test" in available_policies()
    p = make_policy("first_healthy_test", skip=1)
    assert isinstance(p, FirstHealthy) and p.skip == 1
    with pytest.raises(ValueError, match="skip"):
        make_policy("first_healthy_test", skip=-1)


@pytest.mark.usefixtures("clean_registry")
def test_register_conflicts_and_bad_args() -> None:
    register_policy("first_healthy_test", FirstHealthy)
    register_policy("first_healthy_test", FirstHealthy)  # same class again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_policy("first_healthy_test", RoundRobinPolicy)
    register_policy("first_healthy_test", RoundRobinPolicy, replace=True)
    assert isinstance(make_policy("first_healthy_test"), RoundRobinPolicy)
    with pytest.raises(ValueError, match="policy name"):
        register_policy("has space", FirstHealthy)
    with pytest.raises(TypeError, match="LoadBalancingPolicy"):
        register_policy("x", int)  # type: ignore[arg-type]


def test_policy_class() -> None:
    assert policy_class("round_robin") is RoundRobinPolicy
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        policy_class("nope")


@pytest.mark.usefixtures("clean_registry")
@pytest.mark.parametrize("bad", ["no", 1, None])
def test_register_policy_refuses_a_non_bool_replace_and_registers_nothing(bad: object) -> None:
    register_policy("first_healthy_test", FirstHealthy)
    with pytest.raises(TypeError, match=rf"^replace must be a bool, got {bad!r}"):
        register_policy("first_healthy_test", RoundRobinPolicy, replace=bad)  # type: ignore[arg-type]
    assert registry._registry["first_healthy_test"] is FirstHealthy
    with pytest.raises(TypeError, match=r"^replace must be a bool"):
        register_policy("brand_new_name", RoundRobinPolicy, replace=bad)  # type: ignore[arg-type]
    assert "brand_new_name" not in available_policies()


def test_a_policy_name_that_is_not_a_str_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="name"):
        register_policy(3, RoundRobinPolicy)  # type: ignore[arg-type]
