"""Load scenarios and the request factory that turns one into ranking requests from the benchmark catalogue.

Used by the Locust file, the load-test runner, the upgrade report's latency benchmark and `fusionrank bench serve`
alike, so they all send the same requests for the same scenario and seed.

A scenario YAML (see `fusionrank/request/scenarios/default.yaml`) fixes the request mix: candidates per request (a
weighted distribution), title lengths in words, image sizes, how many candidates have audio (the others are sent
with audio absent, `modality_present`), how many video items are sent as their clip instead of their cover
(`item_video`), the share of candidates drawn from a small set of repeated ("hot") items, and the pacing: a closed
loop (each user sends its next request when the previous one returns, after an optional think time) or a target
request rate shared by all users. Named scenarios ship inside the package (`default`, `ci`, `heavy`); any other file
is named by its path.
"""

from __future__ import annotations

import dataclasses
import io
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.project import packaged
from fusionrank.contract.spec import Modality, PipelineSpec
from fusionrank.contract.tensors import request_arrays

SCENARIO_DIR = Path(str(packaged("fusionrank.request", "scenarios")))  # package data, a real folder once pip-installed
DEFAULT_SCENARIO = SCENARIO_DIR / "default.yaml"

PACING_MODES = ("closed_loop", "target_rps")


class ScenarioError(FusionRankError):
    """A scenario or SLO file is missing or has a bad field."""

    def __init__(self, source: str, field_name: str, value: object, allowed: str):
        self.source = source
        self.field = field_name
        super().__init__(f"{source}: field '{field_name}' has value {value!r}; allowed: {allowed}")


def parse_duration(text: str | int | float) -> float:
    """Seconds in a Locust-style duration: 30, '30s', '2m', '1h30m', '1m30s'."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.fullmatch(r"(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?", s)
    if not s or not parts or not any(parts.groups()):
        raise ValueError(f"not a duration: {text!r} (e.g. 30s, 2m, 1h30m)")
    h, m, sec = (int(g or 0) for g in parts.groups())
    return float(h * 3600 + m * 60 + sec)


@dataclass(frozen=True)
class Pacing:
    mode: str = "closed_loop"
    think_time_s: float = 0.0  # closed loop: pause between a response and the user's next request
    target_rps: float | None = None  # target_rps: requests per second over all users

    def validate(self, source: str) -> None:
        if self.mode not in PACING_MODES:
            raise ScenarioError(source, "pacing.mode", self.mode, " | ".join(PACING_MODES))
        if self.mode == "target_rps" and not (self.target_rps or 0) > 0:
            raise ScenarioError(source, "pacing.target_rps", self.target_rps, "a number > 0")
        if self.think_time_s < 0:
            raise ScenarioError(source, "pacing.think_time_s", self.think_time_s, "a number >= 0")


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    users: int = 4
    spawn_rate: float = 2.0
    run_time: str = "30s"
    candidates: dict[int, float] = field(default_factory=lambda: {10: 1.0})  # candidates per request -> weight
    text_words: tuple[int, int] | None = None  # [min, max] words per title; None = titles as generated
    image_sizes: tuple[int, ...] = ()  # square sizes (px) images are re-encoded to; () = as generated
    audio_presence: float = 1.0  # share of candidates sent with their audio; the rest with audio absent
    video_share: float = 0.0  # share of video items sent as their clip (item_video) instead of their cover image
    repeat_share: float = 0.0  # share of candidates drawn from the hot set
    hot_items: int = 32
    zipf_exponent: float | None = None  # item popularity: P(rank r) ~ r^-a over the catalogue; None = uniform
    novel_share: float = 0.0  # share of candidates that are never-seen items (catalogue payloads, perturbed)
    pacing: Pacing = field(default_factory=Pacing)
    timeout_s: float = 30.0  # per-request deadline of the load-test client
    warmup_requests: int = 2
    source: str = "<defaults>"

    def __post_init__(self):
        def bad(name, allowed):
            raise ScenarioError(self.source, name, getattr(self, name, None), allowed)

        if self.users < 1:
            bad("users", "an integer >= 1")
        if self.spawn_rate <= 0:
            bad("spawn_rate", "a number > 0")
        try:
            if parse_duration(self.run_time) <= 0:
                bad("run_time", "a positive duration")
        except ValueError:
            bad("run_time", "a duration such as 30s, 2m, 1h30m")
        if not self.candidates or any(k < 1 or w < 0 for k, w in self.candidates.items()) \
                or sum(self.candidates.values()) <= 0:
            bad("candidates", "a mapping {candidates per request (>= 1): weight (>= 0)} with a positive total")
        if self.text_words is not None and not 1 <= self.text_words[0] <= self.text_words[1]:
            bad("text_words", "[min, max] with 1 <= min <= max")
        if any(s < 8 or s > 4096 for s in self.image_sizes):
            bad("image_sizes", "sizes in [8, 4096] pixels")
        for name in ("audio_presence", "video_share", "repeat_share", "novel_share"):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, "a number in [0, 1]")
        if self.zipf_exponent is not None and not self.zipf_exponent > 0:
            bad("zipf_exponent", "a number > 0, or null for uniform popularity")
        if self.hot_items < 1:
            bad("hot_items", "an integer >= 1")
        self.pacing.validate(self.source)
        if self.timeout_s <= 0:
            bad("timeout_s", "a number > 0")
        if self.warmup_requests < 0:
            bad("warmup_requests", "an integer >= 0")

    @property
    def run_seconds(self) -> float:
        return parse_duration(self.run_time)

    @property
    def max_candidates(self) -> int:
        return max(self.candidates)


def read_yaml(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ScenarioError(str(path), "<file>", str(path), f"a readable {what} YAML file ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ScenarioError(str(path), "<file>", str(path), f"valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ScenarioError(str(path), "<root>", data, "a mapping")
    return data


def resolve_scenario_path(path: str | Path | None) -> Path:
    """A scenario file by path, or by name from the packaged scenarios ('ci' -> scenarios/ci.yaml)."""
    if path is None:
        return DEFAULT_SCENARIO
    p = Path(path)
    if not p.exists() and not p.suffix and (SCENARIO_DIR / f"{p.name}.yaml").is_file():
        return SCENARIO_DIR / f"{p.name}.yaml"
    return p


def load_scenario(path: str | Path | None = None) -> Scenario:
    """Read a scenario YAML (the default scenario when None) into a validated `Scenario`."""
    path = resolve_scenario_path(path)
    data = dict(read_yaml(path, "scenario"))
    src = str(path)
    known = {f.name for f in dataclasses.fields(Scenario)} - {"source"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ScenarioError(src, unknown[0], data[unknown[0]], "no such field; known: " + ", ".join(sorted(known)))
    try:
        pacing = data.pop("pacing", None) or {}
        if not isinstance(pacing, dict) or set(pacing) - {"mode", "think_time_s", "target_rps"}:
            raise ScenarioError(src, "pacing", pacing, "a mapping with mode, think_time_s, target_rps")
        cands = data.pop("candidates", {10: 1.0})
        if isinstance(cands, int):
            cands = {cands: 1.0}
        if isinstance(cands, list):
            cands = {int(c): 1.0 for c in cands}
        if not isinstance(cands, dict):
            raise ScenarioError(src, "candidates", cands, "a mapping {count: weight}, a list of counts or a count")
        words = data.pop("text_words", None)
        sizes = data.pop("image_sizes", None) or ()
        return Scenario(
            **data,
            candidates={int(k): float(v) for k, v in cands.items()},
            text_words=tuple(int(w) for w in words) if words is not None else None,
            image_sizes=tuple(int(s) for s in sizes),
            pacing=Pacing(mode=str(pacing.get("mode", "closed_loop")),
                          think_time_s=float(pacing.get("think_time_s", 0.0)),
                          target_rps=None if pacing.get("target_rps") is None else float(pacing["target_rps"])),
            source=src,
        )
    except (TypeError, ValueError) as exc:
        raise ScenarioError(src, "<scenario>", str(exc), "fields of the types shown in scenarios/default.yaml") \
            from exc



# --- requests ------------------------------------------------------------------------------------------------------


def _reencode_jpeg(data: bytes, size: int) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        out = io.BytesIO()
        img.convert("RGB").resize((size, size), Image.BILINEAR).save(out, format="JPEG", quality=90)
        return out.getvalue()


def novel_payload(modality: Modality, payload: bytes, nonce: int) -> bytes:
    """A never-seen item made from a catalogue payload: still valid and of the same format and size, with different
    content and bytes for every nonce (a cache keyed on bytes misses it; the route still decodes and encodes it).
    Text gets one more word; an image a small block of a nonce-derived colour (JPEG: and the nonce as a comment,
    since quantisation may merge close colours); audio the nonce's bits added to its first samples (inaudible)."""
    if modality is Modality.TEXT:
        return payload + f" n{nonce:x}".encode()
    if modality is Modality.IMAGE:
        from PIL import Image

        with Image.open(io.BytesIO(payload)) as img:
            fmt, rgb = img.format, img.convert("RGB")
        colour = tuple(int(b) for b in nonce.to_bytes(8, "little")[:3])
        rgb.paste(colour, (0, 0, 6, 6))
        out = io.BytesIO()
        options = {"JPEG": {"quality": 90, "comment": f"novel {nonce}"}, "WEBP": {"lossless": True}}.get(fmt, {})
        rgb.save(out, format=fmt, **options)
        return out.getvalue()
    import soundfile as sf

    samples, rate = sf.read(io.BytesIO(payload), dtype="int16", always_2d=True)
    info = sf.info(io.BytesIO(payload))
    bits = np.array([(nonce >> i) & 1 for i in range(min(48, len(samples)))], dtype=np.int16)
    samples[:len(bits), 0] = np.where(samples[:len(bits), 0] < 32767, samples[:len(bits), 0] + bits,
                                      samples[:len(bits), 0] - bits)
    out = io.BytesIO()
    sf.write(out, samples, rate, format="WAV", subtype=info.subtype)
    return out.getvalue()


def png_with_nonce(png: bytes, nonce: int) -> bytes:
    """The same PNG with a tEXt chunk after its header: a distinct payload (cache key), the same decoding cost."""
    data = b"nonce\x00" + str(nonce).encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return png[:33] + chunk + png[33:]  # 8-byte signature + 25-byte IHDR chunk


def renewed_payload(payload: bytes, nonce: int) -> bytes:
    """`payload` made distinct (a new cache key) at the same decoding cost and with the same content, without
    building a new item (a hundredth of `novel_payload`'s CPU): a PNG gets a tEXt chunk, a JPEG a comment segment, a
    WAV a trailing chunk the decoders skip, text a nonce word."""
    tag = str(nonce).encode()
    if payload.startswith(b"\x89PNG"):
        return png_with_nonce(payload, nonce)
    if payload.startswith(b"\xff\xd8"):
        return payload[:2] + b"\xff\xfe" + struct.pack(">H", len(tag) + 2) + tag + payload[2:]
    if payload.startswith(b"RIFF") and payload[8:12] == b"WAVE":
        body = payload[12:] + b"nonc" + struct.pack("<I", 8) + tag.rjust(8, b"0")[-8:]
        return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body
    return payload + b" n" + tag


def zipf_weights(items: int, exponent: float) -> np.ndarray:
    """P(rank r) proportional to r^-exponent for ranks 1..items (a finite Zipf law)."""
    weights = np.arange(1, items + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def _fit_words(title: str, words: int) -> str:
    tokens = title.split() or ["item"]
    return " ".join(tokens[i % len(tokens)] for i in range(words))


@dataclass(frozen=True)
class ScenarioRequest:
    """One ranking request: payloads per modality (None: absent), history [N, L] int64, videos (None: none)."""

    items: dict[Modality, list[bytes | None]]
    history: np.ndarray
    videos: list[bytes | None] | None = None

    def __len__(self) -> int:
        return len(self.history)

    def arrays(self) -> dict[str, np.ndarray]:
        """The contract's named input arrays (`fusionrank.contract.tensors.request_arrays`)."""
        return request_arrays(self.items, self.history, self.videos)


class RequestFactory:
    """Ranking requests drawn from the benchmark catalogue as a scenario describes; deterministic per seed."""

    def __init__(self, spec: PipelineSpec, bench, scenario: Scenario, seed: int = 0, renew_novel: bool = False):
        """`renew_novel`: make never-seen items with new bytes only (`renewed_payload`: the same content, decoded and
        encoded at the same cost) instead of perturbed content (`novel_payload`, about 1.7 CPU ms per candidate):
        for a load generator on the cores it measures (`fusionrank bench`, `tune`), whose own CPU would otherwise
        weigh on the system measured, most on the fastest."""
        self.spec = spec
        self.renew_novel = renew_novel
        self.bench = bench
        self.scenario = scenario
        self.modalities = spec.modalities.enabled
        self.rng = np.random.default_rng(seed)
        self._sizes = np.array(sorted(scenario.candidates), dtype=np.int64)
        weights = np.array([scenario.candidates[int(k)] for k in self._sizes], dtype=np.float64)
        self._size_p = weights / weights.sum()
        # The hot set is the same for every seed, so all users of a run repeat the same items.
        hot = np.random.default_rng(spec.data.seed).permutation(np.arange(1, bench.num_items + 1))
        self.hot = hot[: min(scenario.hot_items, bench.num_items)]
        self._cache: dict[tuple, bytes] = {}
        self.video = spec.modalities.video_enabled and scenario.video_share > 0
        self.requests = 0
        # Popularity ranks are the same for every seed (like the hot set): every caller favours the same items.
        self.by_rank = np.random.default_rng(spec.data.seed + 1).permutation(np.arange(1, bench.num_items + 1))
        self._zipf = zipf_weights(bench.num_items, scenario.zipf_exponent) if scenario.zipf_exponent else None
        # Never-seen items are numbered per factory; the seed keeps factories (callers, runs) apart.
        self._novel = int(seed) << 32
        self.novel_candidates = 0

    def candidate_ids(self) -> np.ndarray:
        """Item ids of the next request: its size drawn from the scenario, distinct items by the scenario's
        popularity, some from the hot set."""
        n = int(self.rng.choice(self._sizes, p=self._size_p))
        if self._zipf is not None:
            ids = self.by_rank[self.rng.choice(len(self.by_rank), size=min(n, len(self.by_rank)), replace=False,
                                               p=self._zipf)]
        else:
            ids = self.rng.integers(1, self.bench.num_items + 1, size=n)
        hot = self.rng.random(n) < self.scenario.repeat_share
        if hot.any():
            ids[hot] = self.rng.choice(self.hot, size=int(hot.sum()))
        return ids

    def payload(self, modality: Modality, item_id: int) -> bytes | None:
        """One candidate's payload for one modality, after the scenario's text/image/audio variation; None when
        the scenario sends it without (audio)."""
        sc = self.scenario
        if modality is Modality.TEXT:
            words = None if sc.text_words is None else int(self.rng.integers(sc.text_words[0], sc.text_words[1] + 1))
            key = ("text", item_id, words)
            if key not in self._cache:
                title = self.bench.item(item_id).title
                self._cache[key] = (title if words is None else _fit_words(title, words)).encode("utf-8")
            return self._cache[key]
        if modality is Modality.IMAGE:
            size = int(self.rng.choice(sc.image_sizes)) if sc.image_sizes else None
            key = ("image", item_id, size)
            if key not in self._cache:
                raw = self.bench.item(item_id).image_bytes()
                self._cache[key] = raw if size is None else _reencode_jpeg(raw, size)
            return self._cache[key]
        if self.rng.random() >= sc.audio_presence:
            return None
        key = ("audio", item_id)
        if key not in self._cache:
            self._cache[key] = self.bench.item(item_id).audio_bytes()
        return self._cache[key]

    def clip(self, item_id: int) -> bytes | None:
        """The item's video clip when the scenario sends this video item as a clip, else None (its cover)."""
        item = self.bench.item(item_id)
        if not self.video or item.video_path is None or self.rng.random() >= self.scenario.video_share:
            return None
        key = ("video", item_id)
        if key not in self._cache:
            self._cache[key] = item.video_bytes()
        return self._cache[key]

    def next(self) -> ScenarioRequest:
        """The next request: one payload list per enabled modality, history [N, L] int64 (one user's history per
        row) and, when any candidate is sent as a clip, the videos (the clip replaces the candidate's image)."""
        ids = [int(i) for i in self.candidate_ids()]
        items = {m: [self.payload(m, i) for i in ids] for m in self.modalities}
        clips = [self.clip(i) for i in ids]
        if self.scenario.novel_share:
            for row in np.flatnonzero(self.rng.random(len(ids)) < self.scenario.novel_share):
                self._novel += 1
                self.novel_candidates += 1
                clips[row] = None  # never seen: sent with its cover made new (its clip's bytes would be seen ones)
                for m in self.modalities:
                    if items[m][row] is not None:
                        items[m][row] = (renewed_payload(items[m][row], self._novel) if self.renew_novel
                                         else novel_payload(m, items[m][row], self._novel))
        videos = None
        if any(c is not None for c in clips):
            videos = clips
            if Modality.IMAGE in items:
                items[Modality.IMAGE] = [None if c is not None else b for b, c in zip(items[Modality.IMAGE], clips)]
        histories = np.asarray(self.bench.sessions.history)
        session = int(self.rng.integers(0, len(histories)))
        history = np.repeat(histories[session][None, :].astype(np.int64), len(ids), axis=0)
        self.requests += 1
        return ScenarioRequest(items, history, videos)
