"""Property-based fuzzing of every preprocessor in process (Hypothesis).

Properties, each over thousands of drawn inputs:
- text, image, audio: arbitrary bytes and mutated valid payloads (`tests.robustness.mutations`) placed among valid rows
  give either finite arrays of the contract's shape and dtype, with the valid rows' values unchanged, or a
  `PreprocessError` naming exactly that input and row; never another exception, never slower than `time_limit_s`;
  the payload's header check (`header`, which the route runs before a request waits to decode) refuses it only
  when the preprocessing does, with the same message;
- history: arbitrary integer or float arrays of any shape give the checked int64 history or an error naming it;
- request: whole requests with inputs dropped, rows added or removed, wrong dtypes and mutated payloads give the
  encoder inputs or one error naming an input of the request.

`make test` runs a seeded slice (tests/robustness/test_fuzz.py); the long run is this command (Hypothesis comes with the
`dev` extra), which ends by itself:

    python -m tests.robustness.fuzz --cases 50000 [--seed N] [--spec tests/specs/ci.yaml]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fusionrank.contract.errors import PreprocessError
from fusionrank.contract.spec import Modality, PipelineSpec, load_spec
from fusionrank.contract.tensors import ITEM_INPUT, USER_HISTORY, encoder_inputs
from fusionrank.preprocess import validate_history
from fusionrank.request.validation import RequestPreprocessor
from tests.robustness.mutations import EXTREMES, FIELD, OPS, Op, mutate, seeds

PROPERTIES = ("text", "image", "audio", "history", "request")
ROWS = 3  # the fuzzed row sits among valid neighbours


class FuzzFailure(Exception):
    """A preprocessor broke its contract on a drawn input; the message says how and shows the input."""


@dataclass
class FuzzStats:
    cases: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROPERTIES, 0))
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROPERTIES, 0))
    slowest_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PROPERTIES, 0.0))

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def table(self) -> str:
        """Per property: cases run, accepted, rejected with a named error, slowest case."""
        lines = [f"{'property':<10}{'cases':>9}{'accepted':>10}{'rejected':>10}{'slowest ms':>12}"]
        for name in PROPERTIES:
            n, bad = self.cases[name], self.rejected[name]
            lines.append(f"{name:<10}{n:>9}{n - bad:>10}{bad:>10}{self.slowest_s[name] * 1e3:>12.1f}")
        lines.append(f"{'total':<10}{self.total:>9}")
        return "\n".join(lines)


def op_strategy() -> st.SearchStrategy[Op]:
    """One mutation (`tests.robustness.mutations.Op`), header-field extremes weighted in."""
    values = st.one_of(st.sampled_from(EXTREMES), st.integers(0, 2**32 - 1))
    return st.builds(Op, kind=st.sampled_from(OPS), position=st.integers(0, 2**20), value=values,
                     data=st.binary(min_size=1, max_size=64))


def field_strategy() -> st.SearchStrategy[Op]:
    """One header field (width, height, rate, channels, sizes) set to an extreme or arbitrary value."""
    values = st.one_of(st.sampled_from(EXTREMES), st.sampled_from(EXTREMES), st.integers(0, 2**32 - 1))
    return st.builds(Op, kind=st.just(FIELD), position=st.integers(0, 15), value=values)


def payload_strategy(valid: list[bytes]) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, or a valid payload with blind mutations, header fields set to extremes, or both (splices
    take another valid payload)."""
    blind = st.lists(op_strategy(), min_size=1, max_size=4)
    fields = st.lists(field_strategy(), min_size=1, max_size=2)
    ops = st.one_of(blind, fields, st.tuples(fields, blind).map(lambda pair: pair[0] + pair[1]))
    mutated = st.builds(mutate, st.sampled_from(valid), ops, st.sampled_from(valid))
    return st.one_of(st.binary(max_size=2048), mutated, mutated, mutated)


def _text_strategy(valid: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(payload_strategy(valid), st.text(max_size=400).map(lambda t: t.encode("utf-8")))


def _history_strategy(spec: PipelineSpec) -> st.SearchStrategy[np.ndarray]:
    length = spec.ranker.history.length
    dtypes = st.sampled_from([np.int64, np.int32, np.uint64, np.int8, np.float32, np.bool_])
    shapes = st.one_of(st.tuples(st.integers(0, 4), st.sampled_from([length, length - 1, 1])),
                       hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
    return hnp.arrays(dtypes, shapes)


class Fuzzer:
    """The properties, over one spec's preprocessors (built once, shared by every case)."""

    def __init__(self, spec: PipelineSpec, time_limit_s: float = 5.0):
        self.spec = spec
        self.time_limit_s = time_limit_s
        self.request = RequestPreprocessor(spec)
        self.pre = dict(self.request.preprocessors)
        self.seeds = seeds()
        self.stats = FuzzStats()
        self.last_error = ""
        # Each modality's valid rows alone: a fuzzed neighbour must not change them (text: same ids, any bucket).
        self.clean = {m: self.pre[m](self.seeds[m][:ROWS]) for m in self.pre}

    def _timed(self, prop: str, call: Callable[[], dict], shown: object) -> dict | None:
        """Run one case; None when it was refused with a PreprocessError (its message is kept in `last_error`)."""
        self.stats.cases[prop] += 1
        start = time.perf_counter()
        try:
            out = call()
        except PreprocessError as exc:
            self.stats.rejected[prop] += 1
            self.last_error, out = str(exc), None
        except Exception as exc:
            raise FuzzFailure(f"{prop}: {type(exc).__name__}: {exc} on {shown!r:.300}") from exc
        elapsed = time.perf_counter() - start
        self.stats.slowest_s[prop] = max(self.stats.slowest_s[prop], elapsed)
        if elapsed > self.time_limit_s:
            raise FuzzFailure(f"{prop}: {elapsed:.2f} s for one case (limit {self.time_limit_s} s) on {shown!r:.300}")
        return out

    @staticmethod
    def _header(prop: str, pre, raw: bytes, name: str) -> str | None:
        """The header check's refusal of one payload (None: passed); any other exception fails the property."""
        try:
            pre.header(raw, name)
        except PreprocessError as exc:
            return str(exc)
        except Exception as exc:
            raise FuzzFailure(f"{prop}: header check: {type(exc).__name__}: {exc} on {raw!r:.300}") from exc
        return None

    def _check_arrays(self, prop: str, out: dict[str, np.ndarray], modalities, rows: int, shown: object) -> None:
        for modality in modalities:
            for t in encoder_inputs(self.spec, modality):
                array = out.get(t.name)
                want = (rows, *t.dims)
                if array is None or array.dtype != np.dtype(t.dtype) or len(array.shape) != len(want) or any(
                        w not in (-1, a) for w, a in zip(want, array.shape)):
                    raise FuzzFailure(f"{prop}: output {t.name} is {None if array is None else array.shape} "
                                      f"{getattr(array, 'dtype', '')}, expected {want} {t.dtype}, on {shown!r:.300}")
                if array.dtype.kind == "f" and not np.isfinite(array).all():
                    raise FuzzFailure(f"{prop}: output {t.name} is not finite on {shown!r:.300}")

    def payload(self, modality: Modality, raw: bytes, position: int) -> None:
        """Property of one modality: the fuzzed payload at `position` among valid rows."""
        prop, pre = modality.value, self.pre[modality]
        rows = list(self.seeds[modality][:ROWS])
        rows[position] = raw
        refused = self._header(prop, pre, raw, f"{pre.input_name}[{position}]")
        out = self._timed(prop, lambda: pre(rows), raw)
        if out is None:
            expected = f"{pre.input_name}[{position}]: "
            if not self.last_error.startswith(expected):
                raise FuzzFailure(f"{prop}: error does not name {expected!r}: {self.last_error} on {raw!r:.300}")
            if refused is not None and refused != self.last_error:
                raise FuzzFailure(f"{prop}: the header check said {refused!r}, decoding {self.last_error!r}, on "
                                  f"{raw!r:.300}")
            return
        if refused is not None:
            raise FuzzFailure(f"{prop}: the header check refused a payload the preprocessing accepts ({refused}) on "
                              f"{raw!r:.300}")
        self._check_arrays(prop, out, [modality], ROWS, raw)
        for name, clean in self.clean[modality].items():
            for row in (r for r in range(ROWS) if r != position):
                got, want = out[name][row], clean[row]
                if name in ("input_ids", "attention_mask"):  # padded to another bucket: compare the common part
                    got, want = got[: min(len(got), len(want))], want[: min(len(got), len(want))]
                if not np.array_equal(got, want):
                    raise FuzzFailure(f"{prop}: valid row {row} changed next to {raw!r:.300}")

    def history(self, array: np.ndarray) -> None:
        """Property of the history check."""
        out = self._timed("history", lambda: {"history": validate_history(array, self.spec)}, array)
        if out is None:
            if not self.last_error.startswith(USER_HISTORY):
                raise FuzzFailure(f"history: error does not name {USER_HISTORY}: {self.last_error}")
            return
        history = out["history"]
        vocab = self.spec.ranker.history.vocab_size
        if history.dtype != np.int64 or history.ndim != 2 or (history < 0).any() or (history >= vocab).any() or (
                history != history[:1]).any():
            raise FuzzFailure(f"history: accepted a bad history {array!r:.300}")

    def request_case(self, inputs: dict[str, np.ndarray]) -> None:
        """Property of whole requests."""
        shapes = {k: getattr(v, "shape", v) for k, v in inputs.items()}
        out = self._timed("request", lambda: self.request(inputs).flat(), shapes)
        names = (*(ITEM_INPUT[m] for m in self.spec.modalities.enabled), USER_HISTORY)
        if out is None:
            if not self.last_error.startswith(names):
                raise FuzzFailure(f"request: error names no input: {self.last_error}")
            return
        rows = len(out["history"])
        self._check_arrays("request", out, self.spec.modalities.enabled, rows, inputs)

    def request_strategy(self) -> st.SearchStrategy[dict[str, np.ndarray]]:
        """A valid request, then structural damage: inputs dropped, rows added/removed, dtypes, mutated rows."""
        spec = self.spec
        names = [ITEM_INPUT[m] for m in spec.modalities.enabled]

        @st.composite
        def build(draw):
            n = draw(st.integers(0, 4))
            history = np.repeat(np.arange(spec.ranker.history.length, dtype=np.int64)[None] % 7, n, axis=0)
            inputs = {ITEM_INPUT[m]: np.array([[self.seeds[m][i % len(self.seeds[m])]] for i in range(n)],
                                              dtype=object).reshape(n, 1) for m in spec.modalities.enabled}
            inputs[USER_HISTORY] = history
            for _ in range(draw(st.integers(0, 3))):
                name = draw(st.sampled_from([*names, USER_HISTORY]))
                action = draw(st.sampled_from(["drop", "extra_row", "less_rows", "as_int", "as_str", "mutate"]))
                value = inputs.get(name)
                if action == "drop" or value is None:
                    inputs.pop(name, None)
                elif action == "extra_row":
                    inputs[name] = np.concatenate([value, value[:1]]) if len(value) else value
                elif action == "less_rows":
                    inputs[name] = value[1:]
                elif action == "as_int":
                    inputs[name] = np.zeros(value.shape, dtype=np.int32)
                elif action == "as_str":
                    inputs[name] = np.array([str(v) for v in value.ravel()], dtype=object).reshape(value.shape)
                elif name != USER_HISTORY and len(value) and value.dtype == object and value.ndim == 2:
                    value = value.copy()
                    modality = next(m for m in spec.modalities.enabled if ITEM_INPUT[m] == name)
                    value[draw(st.integers(0, len(value) - 1)), 0] = draw(payload_strategy(self.seeds[modality]))
                    inputs[name] = value
            return inputs

        return build()

    def strategies(self) -> dict[str, tuple[st.SearchStrategy, Callable]]:
        """Property name -> (strategy, check)."""
        positions = st.integers(0, ROWS - 1)
        table = {"history": (_history_strategy(self.spec), self.history),
                 "request": (self.request_strategy(), self.request_case)}
        for m in self.spec.modalities.enabled:
            values = _text_strategy(self.seeds[m]) if m is Modality.TEXT else payload_strategy(self.seeds[m])
            table[m.value] = (st.tuples(values, positions), lambda case, m=m: self.payload(m, *case))
        return table


def _hypothesis_run(strategy: st.SearchStrategy, check: Callable, cases: int, seed: int | None) -> None:
    @settings(max_examples=cases, deadline=None, database=None, derandomize=seed is None, report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
    @given(strategy)
    def prop(value):
        check(value)

    (hypothesis_seed(seed)(prop) if seed is not None else prop)()


def run(fuzzer: Fuzzer, cases: int, seed: int | None = None, only: tuple[str, ...] = PROPERTIES) -> FuzzStats:
    """Run `cases` cases per property (seed None: Hypothesis' derandomized, reproducible run); raises FuzzFailure
    on the first broken property, after Hypothesis shrank the input."""
    for name, (strategy, check) in fuzzer.strategies().items():
        if name in only:
            _hypothesis_run(strategy, check, cases, seed)
    return fuzzer.stats


def main(argv: list[str] | None = None) -> int:
    """Command line: run the long fuzz, print the table, exit 1 on a broken property."""
    parser = argparse.ArgumentParser(prog="python -m tests.robustness.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=50000, help="cases in all, shared by the properties")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: a random one, printed)")
    parser.add_argument("--spec", default=None, help="pipeline spec (default: pipeline.yaml)")
    parser.add_argument("--time-limit", type=float, default=5.0, help="seconds one case may take")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(np.random.default_rng().integers(1 << 31))
    fuzzer = Fuzzer(load_spec(args.spec), time_limit_s=args.time_limit)
    started = time.monotonic()
    print(f"fuzzing {len(PROPERTIES)} properties, {args.cases // len(PROPERTIES)} cases each, seed {seed}")
    try:
        run(fuzzer, args.cases // len(PROPERTIES), seed=seed)
    except FuzzFailure as exc:
        print(fuzzer.stats.table())
        print(f"FAILED after {fuzzer.stats.total} cases: {exc}")
        return 1
    print(fuzzer.stats.table())
    print(f"{fuzzer.stats.total} cases in {time.monotonic() - started:.0f} s: every property held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
