"""Admission control without a server (issue 19): the spec's queues and priorities in every rendered config, the
route's deadlines, its per-request cost budget and its fast path for requests the cache answers whole."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import time

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from fusionrank.contract.errors import PreprocessError, SpecError
from fusionrank.contract.spec import (
    AdmissionSpec,
    CostBudgetSpec,
    Modality,
    Priority,
    QueuePolicySpec,
    from_dict,
    to_dict,
)
from fusionrank.contract.tensors import CLICK_PROBABILITY, PRIORITY_PARAMETER
from fusionrank.request.cost import RequestCost, check_budget, request_cost
from fusionrank.route.members import RouteError, Status
from fusionrank.route.shedding import DecodeGate, ServiceTime, Slot
from fusionrank.route.stages import LATE, RouteRequest
from fusionrank.triton.render import model_configs
from tests.fakes.pb_utils import FakeError, FakeRequest, route_responses

from . import test_route
from .test_route import _request, _route
from .test_route_cache import _cache

shell = test_route.route_model  # the route's Triton shell on a fake pb_utils (a fixture, collected as `shell`)


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format="PNG")
    return out.getvalue()


def _with_admission(spec, **changes):
    admission = dataclasses.replace(spec.serving.admission, **changes)
    return spec.with_overrides(serving=dataclasses.replace(spec.serving, admission=admission))


# --- spec and render ---------------------------------------------------------------------------------------------


def test_priority_levels_follow_the_spec_order_and_bad_values_name_the_field(default_spec):
    admission = default_spec.serving.admission
    assert [admission.level(p) for p in (Priority.PRODUCTION, Priority.WARMUP, Priority.LOADTEST)] == [1, 2, 3]
    with pytest.raises(SpecError, match="serving.admission.default_priority"):
        AdmissionSpec(priorities=(Priority.WARMUP,), default_priority=Priority.PRODUCTION)
    with pytest.raises(SpecError, match="serving.admission.priorities"):
        AdmissionSpec(priorities=(Priority.WARMUP, Priority.WARMUP), default_priority=Priority.WARMUP)
    with pytest.raises(SpecError, match="max_queue_size"):
        QueuePolicySpec(max_queue_size=-1)
    with pytest.raises(SpecError, match="serving.admission.cost.max_pixels"):
        CostBudgetSpec(max_pixels=-5)
    data = to_dict(default_spec)
    data["serving"]["admission"]["priorities"] = ["production", "vip"]
    with pytest.raises(SpecError, match="serving.admission.priorities"):
        from_dict(data)


def test_every_batched_model_gets_a_bounded_rejecting_queue_and_the_route_gets_priority_levels(default_spec):
    admission = default_spec.serving.admission
    for model, profiles in model_configs(default_spec).items():
        for profile, config in profiles.items():
            if not config.HasField("dynamic_batching"):
                continue
            policy = config.dynamic_batching.default_queue_policy
            wanted = admission.queue(model, route=model == default_spec.serving.route)
            assert policy.timeout_action == mc.ModelQueuePolicy.REJECT, (model, profile)
            assert policy.allow_timeout_override, f"{model}: the caller's (and the route's) deadline must apply"
            assert (policy.max_queue_size, policy.default_timeout_microseconds) == (wanted.max_queue_size,
                                                                                   wanted.timeout_us)
            assert (config.dynamic_batching.priority_levels, config.dynamic_batching.default_priority_level) == (
                3, 1), f"{model}: production (and the route's BLS calls) outrank warm-up and load tests"
    route = model_configs(default_spec)[default_spec.serving.route]["cpu"].dynamic_batching
    assert route.default_queue_policy.max_queue_size > 0, "callers' queue is bounded on the default spec"
    assert (route.priority_levels, route.default_priority_level) == (3, 1)
    background = QueuePolicySpec(max_queue_size=4, timeout_us=1000)
    spec = _with_admission(default_spec, background_queue=background)
    route = model_configs(spec)[spec.serving.route]["cpu"].dynamic_batching
    assert sorted(route.priority_queue_policy) == [2, 3], "the levels below production get their own queue"
    assert route.priority_queue_policy[3].max_queue_size == 4
    assert route.priority_queue_policy[2].default_timeout_microseconds == 1000


# --- deadlines -----------------------------------------------------------------------------------------------------


def test_a_request_past_its_deadline_is_refused_before_decoding_and_members_get_the_callers_deadline(ci_spec,
                                                                                                     preparer):
    route, members = _route(ci_spec, preparer)
    soon = time.monotonic() + 60
    late, alive = _request(ci_spec, 2, seed=1), _request(ci_spec, 3, seed=2)
    results = asyncio.run(route.rank([RouteRequest(late, deadline=time.monotonic() - 0.001),
                                      RouteRequest(alive, deadline=soon)]))
    assert isinstance(results[0], RouteError) and results[0].status is Status.UNAVAILABLE
    assert results[0].message == LATE and "over capacity" in LATE
    assert results[1][CLICK_PROBABILITY].shape == (3, 1)
    assert members.rows("image_encoder") == [3], "the late request's rows were never encoded"
    assert set(members.deadlines) == {soon}, "every member call carries the live request's deadline"


def test_a_request_whose_deadline_cannot_hold_its_work_here_now_is_shed_at_once(ci_spec, preparer):
    route, members = _route(ci_spec, preparer)
    route.gate.service.observe(2.0, units=2)  # requests decoding 2 candidates take about 2 s here now
    short, long = _request(ci_spec, 2, seed=1), _request(ci_spec, 3, seed=2)
    results = asyncio.run(route.rank([RouteRequest(short, deadline=time.monotonic() + 0.5),
                                      RouteRequest(long, deadline=time.monotonic() + 60)]))
    assert isinstance(results[0], RouteError) and results[0].status is Status.UNAVAILABLE
    assert "over capacity" in results[0].message and "takes about 2000 ms" in results[0].message
    assert results[1][CLICK_PROBABILITY].shape == (3, 1)
    assert members.rows("image_encoder") == [3], "the shed request's rows were never encoded"
    # Each refusal decays the estimate: after a burst the route admits again although nothing completed meanwhile.
    service = route.gate.service
    service.observe(2.0, units=2)  # the estimate is a high quantile of recent requests: 2 s again
    assert service.seconds == pytest.approx(2.0)
    refusals = 0
    while service.too_late(0.5):
        refusals += 1
    assert 0 < refusals < 20 and service.seconds <= 0.5
    assert not service.too_late(None), "a request without deadline is never shed"


@pytest.mark.parametrize("payload, problem", [(b"GIF89a" + bytes(40), "unsupported image format"),
                                              (_png(400, 20), "aspect ratio of 400x20 exceeds")])
def test_a_bad_payload_is_invalid_even_when_the_gate_sheds_its_request_and_nothing_is_decoded(ci_spec, preparer,
                                                                                            payload, problem):
    """A payload the preprocessing refuses from its header is answered INVALID_ARG naming the row, with the image
    check's own message, before the gate: an over-capacity UNAVAILABLE would send its caller to retry it elsewhere."""
    from .test_route_cache import GroupSpy

    spy = GroupSpy(preparer)
    route, members = _route(ci_spec, spy)
    route.gate.service.observe(2.0, units=2)  # the gate sheds a request with 0.5 s left
    bad, good = _request(ci_spec, 3, seed=1), _request(ci_spec, 3, seed=2)
    bad["item_image"][1, 0] = payload
    results = asyncio.run(route.rank([RouteRequest(bad, deadline=time.monotonic() + 0.5),
                                      RouteRequest(good, deadline=time.monotonic() + 0.5)]))
    assert results[0].status is Status.INVALID_ARG and results[0].message.startswith(f"item_image[1]: {problem}")
    with pytest.raises(PreprocessError) as decoded:
        preparer.preprocessors[Modality.IMAGE].decode(payload, "item_image[1]")
    assert results[0].message == str(decoded.value), "the header check says what decoding says"
    assert results[1].status is Status.UNAVAILABLE and "over capacity" in results[1].message
    assert not any(spy.rows.values()) and not members.calls, "nothing decoded, nothing encoded"


def test_the_served_route_admits_requests_without_a_deadline_within_the_specs_slo_median(shell, ci_spec):
    """The route reads the spec from its rendered config: the SLO must travel with it (a route that fell back to the
    spec's class defaults would admit to another median than the one the spec states)."""
    model, _ = shell
    assert ci_spec.slo.p50_ms != type(ci_spec.slo)().p50_ms, "the CI spec's median differs from the class default"
    assert model.route.gate.default_deadline_s == pytest.approx(ci_spec.slo.p50_ms / 1e3)


def test_the_callers_absolute_deadline_counts_the_time_the_request_waited_in_the_queue():
    """Triton's `timeout` is counted by the route from its execute; the absolute deadline the client sends also
    counts the time the request already spent in Triton's queue, so the earlier of the two is the deadline."""
    from fusionrank.contract.tensors import DEADLINE_PARAMETER
    from fusionrank.triton.route import request_deadline

    now = time.monotonic()
    waited = FakeRequest({}, timeout_us=1_000_000, params={DEADLINE_PARAMETER: int((time.time() + 0.2) * 1e6)})
    assert abs(request_deadline(waited, now) - (now + 0.2)) < 0.05
    assert request_deadline(FakeRequest({}, timeout_us=1_000_000), now) == now + 1.0
    assert request_deadline(FakeRequest({}), now) is None


def test_a_call_holding_a_request_without_deadline_carries_none(ci_spec, preparer):
    route, members = _route(ci_spec, preparer)
    asyncio.run(route.rank([RouteRequest(_request(ci_spec, 1), deadline=time.monotonic() + 5),
                            RouteRequest(_request(ci_spec, 1, seed=3))]))
    assert set(members.deadlines) == {None}


def test_shell_turns_the_request_timeout_into_a_deadline_and_the_members_timeout(shell, ci_spec):
    model, pb = shell
    (answered,) = route_responses(model, [FakeRequest(_request(ci_spec, 1), timeout_us=30_000_000)])
    assert answered.error is None
    assert pb.timeouts and all(0 < t <= 30_000_000 for t in pb.timeouts), pb.timeouts
    pb.timeouts.clear()
    route_responses(model, [FakeRequest(_request(ci_spec, 1, seed=9))])
    assert pb.timeouts and set(pb.timeouts) == {0}, "no timeout from the caller: none to the members"


def test_shell_reads_the_callers_priority_level_and_falls_back_to_the_default_class():
    from fusionrank.triton.route import request_level

    def level(params):
        return request_level(FakeRequest({}, params=params), default=1, levels=3)

    assert level({PRIORITY_PARAMETER: 3}) == 3 and level({PRIORITY_PARAMETER: 9}) == 3, "past the last: the last"
    assert level({}) == level({PRIORITY_PARAMETER: "loadtest"}) == level({PRIORITY_PARAMETER: 0}) == 1
    assert level({PRIORITY_PARAMETER: True}) == 1


def test_shell_answers_a_full_member_queue_unavailable(shell, ci_spec):
    from tests.fakes.pb_utils import FakeMemberError

    model, pb = shell
    pb.members["image_encoder"] = lambda arrays: FakeMemberError(
        "Model image_encoder - Error when running inference: Exceeds maximum queue size", FakeError.INTERNAL)
    (response,) = route_responses(model, [FakeRequest(_request(ci_spec, 1, seed=4))])
    assert response.error.code == FakeError.UNAVAILABLE


# --- cost budget ---------------------------------------------------------------------------------------------------


def test_cost_is_read_from_headers_and_counts_only_the_rows_to_decode(ci_spec, preparer):
    arrays = _request(ci_spec, 3)
    arrays["item_image"] = np.array([[_png(100, 50)], [_png(30, 20)], [_png(40, 40)]], dtype=object)
    valid = preparer.validate(arrays)
    cost = request_cost(preparer, valid, {Modality.IMAGE: [0, 2], Modality.AUDIO: [1], Modality.TEXT: [0]})
    assert cost.pixels == 100 * 50 + 40 * 40
    assert cost.audio_samples == 8000, "the test clip: 0.5 s at 16 kHz, under one clip"
    assert cost.video_frames == 0
    with pytest.raises(Exception, match=r"request: the request costs 6600 decoded pixels .* "
                                        r"serving.admission.cost.max_pixels = 6000"):
        check_budget(CostBudgetSpec(max_pixels=6000), cost)
    check_budget(CostBudgetSpec(max_pixels=6600), cost)
    check_budget(CostBudgetSpec(max_pixels=0), RequestCost(pixels=10**12))  # 0: no budget


def test_a_decompression_bomb_is_refused_by_the_header_check_with_the_image_checks_message(ci_spec, preparer):
    """PIL refuses to open an image of over twice its pixel limit (DecompressionBombError, not an OSError): the header
    check names the row and says why, as the image preprocessing does, never an internal error."""
    from PIL import Image

    arrays = _request(ci_spec, 1)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 1000  # a 100x50 PNG is then over twice the limit
        arrays["item_image"] = np.array([[_png(100, 50)]], dtype=object)
        with pytest.raises(PreprocessError, match=r"decompression bomb") as info:
            request_cost(preparer, preparer.validate(arrays), {Modality.IMAGE: [0]})
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    assert info.value.input_name == "item_image[0]"


def test_a_request_over_budget_is_invalid_before_anything_is_decoded_and_cached_rows_cost_nothing(ci_spec,
                                                                                                  preparer):
    from .test_route_cache import GroupSpy

    spec = _with_admission(ci_spec, cost=CostBudgetSpec(max_pixels=2 * 48 * 70))  # two of `_request`'s images
    spy, cache = GroupSpy(preparer), _cache(spec)
    route, members = _route(spec, spy, cache=cache)
    (refused,) = asyncio.run(route.rank([RouteRequest(_request(spec, 3))]))
    assert refused.status is Status.INVALID_ARG
    assert refused.message.startswith("request: the request costs 10080 decoded pixels")
    assert not any(spy.rows.values()) and not members.calls, "nothing decoded, nothing encoded"
    asyncio.run(route.rank([RouteRequest(_request(spec, 2))]))  # rows 0 and 1 into the cache
    (served,) = asyncio.run(route.rank([RouteRequest(_request(spec, 3))]))
    assert served[CLICK_PROBABILITY].shape == (3, 1), "only the one new image counts against the budget"


# --- fast path -----------------------------------------------------------------------------------------------------


def test_requests_the_cache_answers_whole_are_ranked_and_answered_before_the_others_decoding_ends(ci_spec, preparer):
    cache = _cache(ci_spec)
    order: list[str] = []
    warm, _ = _route(ci_spec, preparer, cache=cache)
    asyncio.run(warm.rank([RouteRequest(_request(ci_spec, 2))]))

    async def decode(work):
        order.append("decode start")
        await asyncio.sleep(0.05)  # a slow decode of the other request, off the event loop
        work()
        order.append("decode end")

    route, members = _route(ci_spec, preparer, cache=cache)
    route.decode = decode
    real = members.functions["fusion_ranker"]

    def ranker(arrays):
        order.append(f"rank {len(arrays['history'])}")
        return real(arrays)

    members.functions["fusion_ranker"] = ranker
    cached, fresh = _request(ci_spec, 2), _request(ci_spec, 3, seed=7, title=b"never seen")
    results = asyncio.run(route.rank([RouteRequest(fresh), RouteRequest(cached)],
                                     answer=lambda i, result: order.append(f"answer {i}")))
    assert all(not isinstance(r, RouteError) for r in results)
    assert order.index("rank 2") < order.index("answer 1") < order.index("decode end"), order
    assert order.index("answer 0") > order.index("decode end") and order.count("answer 0") == 1
    assert order.count("decode start") == 1, "the cached request never went to the decoding pool"


def test_requests_to_decode_pass_the_gate_a_few_at_a_time_the_rest_wait_or_are_refused_and_cached_ones_never_wait(
        ci_spec, preparer):
    spec = _with_admission(ci_spec, max_decoding_requests=1,
                           route_queue=dataclasses.replace(ci_spec.serving.admission.route_queue, max_queue_size=1))
    cache = _cache(spec)
    warm, _ = _route(spec, preparer, cache=cache)
    asyncio.run(warm.rank([RouteRequest(_request(spec, 2))]))
    route, members = _route(spec, preparer, cache=cache, slots=1)
    release = asyncio.Event()
    decoded: list[int] = []

    async def slow_decode(work):
        await release.wait()
        work()
        decoded.append(len(decoded))

    route.decode = slow_decode

    async def main():
        # One execute: the first cold request takes the only slot, the second waits its turn (no deadline), the
        # third finds the waiting room full.
        first = asyncio.ensure_future(route.rank([RouteRequest(_request(spec, 1, seed=s, title=b"new")) for s in
                                                  (11, 12, 13)]))
        await asyncio.sleep(0.01)
        assert (route.gate.busy, len(route.gate.waiting)) == (1, 1)
        # Another execute meanwhile: its cached request is answered although the slot is held.
        cached = await asyncio.wait_for(route.rank([RouteRequest(_request(spec, 2))]), 5)
        release.set()
        return await first, cached

    first, (cached,) = asyncio.run(main())
    assert not isinstance(cached, RouteError), "a request the cache answers whole never waits for the gate"
    assert [isinstance(r, RouteError) for r in first] == [False, False, True]
    assert first[2].status is Status.UNAVAILABLE and "over capacity" in first[2].message
    assert "1 requests with payloads to decode already wait" in first[2].message
    assert decoded == [0, 1], "the waiting request was served once the first gave its slot back"
    assert route.gate.busy == 0 and not route.gate.waiting, "every slot is given back, answered or not"


def test_the_gate_refuses_at_once_what_its_deadline_cannot_hold_and_a_waiter_whose_time_runs_out():
    clock = [100.0]
    gate = DecodeGate(max_slots=1, max_waiting=8, clock=lambda: clock[0])
    gate.service.observe(0.4)  # a request takes about 400 ms here now

    async def main():
        first = await gate.enter(deadline=101.0)  # idle: admitted
        assert isinstance(first, Slot) and gate.busy == 1
        clock[0] += 0.1
        # The slot frees in about 300 ms (its request has had 100 of its 400 ms), then this one takes 400 ms.
        assert gate.expected() == pytest.approx(0.7) and gate.expected(1, [1]) == pytest.approx(1.1)
        refused = await gate.enter(deadline=clock[0] + 0.6)
        assert isinstance(refused, str) and "takes about 700 ms" in refused and "leaves 600 ms" in refused
        # 800 ms left: admitted to wait; refused as soon as what is left (here: all of it, on this frozen clock,
        # after its 400 ms of patience) no longer holds the service time.
        late = await gate.enter(deadline=clock[0] + 0.8)
        assert isinstance(late, str) and "over capacity" in late
        assert not [w for w in gate.waiting if not w.turn.done()]
        # A waiter without deadline gets the slot when it is given back, in arrival order; a served request's time
        # feeds the estimate.
        waiter = asyncio.ensure_future(gate.enter(deadline=None))
        await asyncio.sleep(0)
        clock[0] += 0.5
        gate.leave(first, served=True)
        second = await waiter
        assert isinstance(second, Slot) and gate.busy == 1
        assert gate.service.seconds == pytest.approx(0.6)  # the 90th percentile of the recent ones (nearest rank)
        gate.leave(second)
        assert gate.busy == 0

    asyncio.run(main())


def test_shell_answers_every_request_internal_when_the_route_itself_fails(shell, ci_spec, monkeypatch):
    model, pb = shell

    async def broken(requests, answer=None):
        answer(0, RouteError(Status.INVALID_ARG, "item_text[0]: bad"))
        raise RuntimeError("a bug")

    monkeypatch.setattr(model.route, "rank", broken)
    first, second = route_responses(model, [FakeRequest(_request(ci_spec, 1)), FakeRequest(_request(ci_spec, 1))])
    assert first.error.code == FakeError.INVALID_ARG
    assert second.error.code == FakeError.INTERNAL and "a bug" not in second.error.message


def test_one_slow_request_does_not_shut_the_gate_and_refusals_of_an_idle_gate_decay_the_estimate():
    service = ServiceTime(window=10)
    for seconds in (0.3, 0.3, 9.0, 0.3, 0.2, 0.25, 0.3, 0.2, 0.3, 0.25):
        service.observe(seconds)
    assert service.seconds == pytest.approx(0.3), "the 9th of 10 recent requests, not their mean (1.14 s)"
    assert service.too_late(0.1) and service.seconds == pytest.approx(0.27)
    service.observe(0.3)
    assert service.seconds == pytest.approx(0.3), "a served request resets the decay"


def test_the_service_estimate_follows_each_requests_work_so_one_new_candidate_is_not_charged_a_floods_time():
    service = ServiceTime(window=8)
    for units, seconds in ((16, 1.65), (1, 0.14), (16, 1.55), (4, 0.5), (1, 0.16), (8, 0.9), (2, 0.2), (16, 1.6)):
        service.observe(seconds, units)  # about 60 ms a request plus 100 ms a candidate, give or take
    one, sixteen = service.estimate(1), service.estimate(16)
    assert 0.14 <= one <= 0.25, "one candidate: its fixed part and one candidate's time, with the margin"
    assert 1.6 <= sixteen <= 1.9
    assert not service.too_late(0.5, units=1) and service.too_late(0.5, units=16)
    # Requests that all had the same work: proportional to it (no fixed part to see), scaled by the quantile.
    same = ServiceTime(window=4, quantile=0.75)
    for seconds in (0.4, 0.5, 0.6, 0.5):
        same.observe(seconds, units=4)
    assert same.seconds == pytest.approx(0.5) and same.estimate(8) == pytest.approx(1.0)
    assert same.estimate(1) == pytest.approx(0.125)


def test_the_gate_admits_a_light_request_whose_deadline_holds_its_own_work_where_a_heavy_one_is_refused():
    clock = [0.0]
    gate = DecodeGate(max_slots=1, max_waiting=8, clock=lambda: clock[0])
    for units, seconds in ((16, 1.6), (1, 0.1), (16, 1.6), (1, 0.1)):
        gate.service.observe(seconds, units)

    async def main():
        holder = gate.try_enter(None, units=1)
        assert isinstance(holder, Slot)
        heavy = await gate.enter(deadline=1.0, units=16)
        assert isinstance(heavy, str) and "over capacity" in heavy
        light = asyncio.ensure_future(gate.enter(deadline=1.0, units=1))
        await asyncio.sleep(0)
        assert not light.done(), "it waits: the holder's candidate and its own fit in its second"
        clock[0] += 0.1
        gate.leave(holder, served=True)
        assert isinstance(await light, Slot)

    asyncio.run(main())


def test_requests_without_a_deadline_are_served_few_enough_at_once_to_answer_within_the_default():
    """The default deadline (the SLO's median) is the budget the slots adapt to when callers bring none: past
    capacity, requests without a deadline are not all served at once, each then taking longer than the median."""
    clock = [0.0]
    gate = DecodeGate(max_slots=4, max_waiting=64, default_deadline_s=0.8, clock=lambda: clock[0])
    gate.slots = 4

    async def main():
        held = [gate.try_enter(None) for _ in range(4)]
        assert all(isinstance(s, Slot) for s in held)
        waiters = [asyncio.ensure_future(gate.enter(None)) for _ in range(40)]
        for _ in range(32):  # each takes 600 ms, over half the median: the slots shrink
            for _ in range(10):
                await asyncio.sleep(0)
            slot = min(gate.held, key=lambda s: s.since)
            clock[0] = max(clock[0], slot.since + 0.6)
            gate.leave(slot, served=True)
        assert gate.slots == 1
        for w in waiters:
            w.cancel()

    asyncio.run(main())


def test_a_request_without_a_deadline_is_admitted_within_the_default_counted_from_its_arrival():
    """The default deadline (the SLO's median) runs from the request's arrival at the route: the time it already spent
    in validation and the cache lookup counts, so what the gate admits can still meet the median; admission aims at
    `DEFAULT_AIM` of it (800 x 0.8 = 640 ms), a margin for the estimate's error past capacity."""
    clock = [100.0]
    gate = DecodeGate(max_slots=1, max_waiting=8, default_deadline_s=0.8, clock=lambda: clock[0])
    gate.service.observe(0.3)

    async def main():
        holder = gate.try_enter(None)
        assert isinstance(holder, Slot)
        # The slot frees in 300 ms, then the request takes 300 ms: 600 ms from now.
        early = await gate.enter(None, arrived=clock[0] - 0.1)  # arrived 100 ms ago: 540 ms of its 640 left
        assert isinstance(early, str) and "takes about 600 ms" in early and "leaves 540 ms" in early
        fresh = asyncio.ensure_future(gate.enter(None, arrived=clock[0]))
        await asyncio.sleep(0)
        assert not fresh.done(), "arrived now: its 640 ms hold the 600 ms, it waits its turn"
        gate.leave(holder, served=True)
        assert isinstance(await fresh, Slot)

    asyncio.run(main())


@pytest.mark.parametrize("room", [4, 2])
def test_the_gate_serves_waiters_by_priority_level_and_a_full_room_gives_way_to_a_higher_class(room):
    gate = DecodeGate(max_slots=1, max_waiting=room)
    served: list[str] = []

    async def wait(name: str, level: int):
        slot = await gate.enter(deadline=None, level=level)
        if isinstance(slot, str):
            served.append(f"{name} refused: {slot}")
            return
        served.append(name)
        gate.leave(slot)

    async def main():
        holder = gate.try_enter(None)
        assert isinstance(holder, Slot)
        tasks = [asyncio.ensure_future(wait(name, level)) for name, level in
                 (("loadtest-1", 3), ("loadtest-2", 3), ("production", 1), ("warmup", 2))]
        await asyncio.sleep(0.01)  # every one queued (or refused) behind the holder
        gate.leave(holder)
        await asyncio.gather(*tasks)

    asyncio.run(main())
    refused = [s for s in served if "refused" in s]
    if room == 4:  # room for all: served by level, then arrival
        assert served == ["production", "warmup", "loadtest-1", "loadtest-2"]
    else:  # two places: production, then warm-up, took the newest load-test request's place
        assert [s.split()[0] for s in refused] == ["loadtest-2", "loadtest-1"]
        assert all("over capacity" in s and "higher-priority class took its place" in s for s in refused)
        assert [s for s in served if "refused" not in s] == ["production", "warmup"]


def test_the_gates_slots_grow_while_the_deadlines_allow_and_shrink_when_service_outgrows_them():
    clock = [0.0]
    gate = DecodeGate(max_slots=3, max_waiting=64, clock=lambda: clock[0])
    callers: list[asyncio.Future] = []

    async def settle() -> None:  # a handed-over slot reaches its waiter through a few loop turns (shield, wait_for)
        for _ in range(10):
            await asyncio.sleep(0)

    async def fill(waiting: int) -> None:
        """Callers with 1-s deadlines enter until every slot is held and `waiting` more wait (or one is refused)."""
        while gate.busy < gate.slots or len(gate._live()) < waiting:
            callers.append(asyncio.ensure_future(gate.enter(clock[0] + 1.0)))
            await settle()
            if callers[-1].done() and isinstance(callers[-1].result(), str):
                return

    async def serve(count: int, seconds: float, waiting: int) -> None:
        """`count` requests served, each `seconds` after its admission, with `waiting` callers queued meanwhile."""
        for _ in range(count):
            await fill(waiting)
            slot = next(c.result() for c in callers if c.done() and isinstance(c.result(), Slot)
                        and c.result() in gate.held)
            clock[0] = slot.since + seconds
            gate.leave(slot, served=True)
            await settle()

    async def main():
        assert gate.slots == 1, "it starts with one"
        # 100-ms requests under 1-s deadlines (target: half of it) with callers waiting: it grows to its most, 3.
        await serve(40, 0.1, waiting=1)
        assert gate.slots == 3
        # Then each takes 800 ms, over half the deadline: it shrinks back to one.
        await serve(60, 0.8, waiting=1)
        assert gate.slots == 1
        for c in callers:
            c.cancel()

    asyncio.run(main())
    # Without demand (nobody waits, nobody refused) it does not grow, however fast requests are.
    gate = DecodeGate(max_slots=3, max_waiting=64, clock=lambda: clock[0])
    callers.clear()
    asyncio.run(serve(40, 0.05, waiting=0))
    assert gate.slots == 1
