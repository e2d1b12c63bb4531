"""Benchmark data with a known truth: a seeded catalogue and interaction log, generated on demand into the cache.

No public dataset can be downloaded here, and none would tell the true click probabilities, so fusionrank
generates one where the truth is known:

- items carry hidden attributes, each visible in exactly one modality: a *topic* (title words), a *colour* and a
  *shape* (a Pillow drawing, saved as JPEG, some PNG/WebP), a *pitch* and a *tempo* (a WAV tone pulsing at a rate;
  some files at 22.05 kHz stereo so resampling and mix-down are exercised);
- every fourth item is a *video item*: besides its still (its cover image) it has a one-second clip (8 frames, MP4
  H.264, every third one WebM VP9) of its shape in its colour moving across the frame. Training and evaluation see
  a video item through its clip alone (K frames mean-pooled), so the evaluation can compare video candidates with
  image candidates; clients that cannot send video send the cover;
- users have hidden preferences = population taste (N(0, 1) per attribute value) + a personal deviation
  (N(0, 0.5)), over topic, colour and pitch; their
  histories are items drawn in proportion to exp(affinity);
- each session shows candidates drawn uniformly; clicks are Bernoulli draws from the true click probability
  sigmoid(bias + topic + colour + pitch preferences), which depends on all three modalities at once, so no single
  modality suffices. Shape and tempo carry no signal (distractors).

Because the true probabilities are stored, every evaluation can report the oracle AUC beside the models'.
Users are split into train / validation / test, so test users are never seen in training.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from fusionrank.contract.errors import DataError
from fusionrank.contract.paths import cache_dir
from fusionrank.contract.spec import Modality, PipelineSpec, to_dict

log = logging.getLogger(__name__)

TOPICS = {
    "outdoor": "tent hiking trail camping backpack lantern compass summit canoe fishing rope boots forest river",
    "kitchen": "skillet knife espresso blender spatula oven recipe teapot cutting board whisk saucepan bakery spice",
    "electronics": "laptop charger headphones bluetooth monitor keyboard router camera battery usb tablet speaker",
    "fashion": "jacket denim sneakers scarf leather dress wool handbag silk sunglasses linen hoodie tailored",
    "books": "novel paperback mystery poetry biography atlas hardcover fiction memoir anthology thriller essays",
    "fitness": "yoga dumbbell treadmill protein kettlebell running stretching gym resistance cycling rowing mat",
}
FILLER = "new classic premium set edition daily pro mini deluxe original compact essential limited travel home".split()
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215), "yellow": (235, 200, 40),
           "purple": (135, 55, 175), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")
PITCHES_HZ = (220.0, 349.2, 554.4, 880.0, 1396.9)
TEMPOS_HZ = (2.0, 6.0)
TRAIN, VAL, TEST = 0, 1, 2
TEST_FRACTION = 0.2
VIDEO_EVERY = 4  # item ids 2, 6, 10, ... are video items
VIDEO_FRAMES, VIDEO_FPS = 8, 8
# 3: video items (a clip beside the cover image), from their own random stream: titles, images, audio and sessions
# are those of version 2.
GENERATOR_VERSION = 3


@dataclass(frozen=True)
class Item:
    item_id: int
    title: str
    topic: int
    colour: int
    shape: int
    pitch: int
    tempo: int
    image_path: Path
    audio_path: Path
    video_path: Path | None = None

    @property
    def is_video(self) -> bool:
        return self.video_path is not None

    def text_bytes(self) -> bytes:
        return self.title.encode("utf-8")

    def image_bytes(self) -> bytes:
        """The still: the image of an image item, the cover of a video item."""
        return self.image_path.read_bytes()

    def audio_bytes(self) -> bytes:
        return self.audio_path.read_bytes()

    def video_bytes(self) -> bytes | None:
        return self.video_path.read_bytes() if self.video_path is not None else None

    def visual(self) -> tuple[bytes, bytes | None]:
        """(item_image, item_video) as training and evaluation see the item: a video item by its clip alone."""
        return (b"", self.video_bytes()) if self.is_video else (self.image_bytes(), None)

    def payload(self, modality: Modality) -> bytes:
        """The raw bytes a client sends for this item's `modality` (title, encoded image or WAV)."""
        if modality is Modality.TEXT:
            return self.text_bytes()
        return self.image_bytes() if modality is Modality.IMAGE else self.audio_bytes()


@dataclass(frozen=True)
class Sessions:
    """One row per session; candidates/clicks/true_prob are [S, C], history [S, L] (left-padded with 0)."""

    user: np.ndarray
    split: np.ndarray
    history: np.ndarray
    candidates: np.ndarray
    clicks: np.ndarray
    true_prob: np.ndarray
    population_prob: np.ndarray  # the truth without personal taste: what content alone can reach

    def __len__(self) -> int:
        return len(self.user)


def data_key(spec: PipelineSpec) -> str:
    """Identity of the generated data: its spec fields and the generator version (a cache key)."""
    payload = {"data": to_dict(spec.data, drop=("cache_dir",)), "items": spec.num_items,
               "history": spec.ranker.history.length, "version": GENERATOR_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


class Benchmark:
    def __init__(self, spec: PipelineSpec, root: Path, catalogue: dict, sessions: Sessions):
        self.spec = spec
        self.root = root
        self.sessions = sessions
        self._catalogue = catalogue
        self.items = [Item(item_id=i + 1, title=row["title"], topic=row["topic"], colour=row["colour"],
                           shape=row["shape"], pitch=row["pitch"], tempo=row["tempo"],
                           image_path=root / "items" / row["image"], audio_path=root / "items" / row["audio"],
                           video_path=root / "items" / row["video"] if row.get("video") else None)
                      for i, row in enumerate(catalogue["items"])]

    @property
    def num_items(self) -> int:
        return len(self.items)

    def item(self, item_id: int) -> Item:
        if not 1 <= item_id <= self.num_items:
            raise DataError(f"item id {item_id} is not in the catalogue (1..{self.num_items})")
        return self.items[int(item_id) - 1]

    def split_sessions(self, split: int) -> np.ndarray:
        return np.flatnonzero(self.sessions.split == split)

    @cached_property
    def video_items(self) -> np.ndarray:
        """bool [num_items + 1]: whether each item id is a video item (row 0 is padding)."""
        return np.array([False] + [it.is_video for it in self.items])

    def frozen_sessions(self, n: int) -> np.ndarray:
        """The first `n` test sessions: a frozen candidate set for parity and serving checks."""
        return self.split_sessions(TEST)[:n]

    @cached_property
    def attributes(self) -> np.ndarray:
        """[num_items + 1, 5] hidden attributes (topic, colour, shape, pitch, tempo); row 0 is padding."""
        rows = [(0, 0, 0, 0, 0)] + [(it.topic, it.colour, it.shape, it.pitch, it.tempo) for it in self.items]
        return np.asarray(rows, dtype=np.int64)

    def oracle_auc(self, split: int = TEST, personal: bool = True) -> float:
        """AUC of the true click probabilities (or, personal=False, of the population-level truth)."""
        from sklearn.metrics import roc_auc_score

        rows = self.split_sessions(split)
        truth = self.sessions.true_prob if personal else self.sessions.population_prob
        return float(roc_auc_score(self.sessions.clicks[rows].ravel(), truth[rows].ravel()))

    def summary(self) -> str:
        s = self.sessions
        counts = [len(self.split_sessions(k)) for k in (TRAIN, VAL, TEST)]
        return (f"benchmark {self.root}\n"
                f"  catalogue: {self.num_items} items (title text, image, WAV audio; {int(self.video_items.sum())} "
                f"also with a video clip), {len(TOPICS)} topics, "
                f"{len(COLOURS)} colours x {len(SHAPES)} shapes, {len(PITCHES_HZ)} pitches x {len(TEMPOS_HZ)} tempos\n"
                f"  interactions: {len(np.unique(s.user))} users, {len(s)} sessions x {s.candidates.shape[1]} "
                f"candidates (train/val/test sessions {counts[0]}/{counts[1]}/{counts[2]}, split by user)\n"
                f"  click rate {s.clicks.mean():.3f}; oracle AUC (true probabilities) on test: "
                f"{self.oracle_auc(TEST):.4f} (without personal taste: {self.oracle_auc(TEST, personal=False):.4f})")


# --- generation ---------------------------------------------------------------------------------------------------


def _title(rng: np.random.Generator, topic: int, words: tuple[int, ...]) -> str:
    vocab = list(TOPICS.values())[topic].split()
    n = int(rng.integers(words[0], words[1] + 1))
    n_topic = max(1, int(round(n * 0.6)))
    chosen = list(rng.choice(vocab, size=min(n_topic, len(vocab)), replace=False))
    chosen += list(rng.choice(FILLER, size=n - len(chosen)))
    rng.shuffle(chosen)
    return " ".join(chosen)


def _image(rng: np.random.Generator, colour: int, shape: int, fmt: str) -> bytes:
    from PIL import Image, ImageDraw

    width, height = (int(v) for v in rng.integers(96, 192, size=2))
    background = tuple(int(v) for v in rng.integers(215, 250, size=3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    rgb = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in list(COLOURS.values())[colour])
    side = min(width, height)
    r = int(side * rng.uniform(0.25, 0.4))
    cx, cy = width // 2 + int(rng.integers(-side // 8, side // 8 + 1)), height // 2 + int(rng.integers(-8, 9))
    if SHAPES[shape] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    elif SHAPES[shape] == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def _video(rng: np.random.Generator, colour: int, shape: int, container: str) -> bytes:
    """A one-second clip: the item's shape in its colour crossing the frame from left to right."""
    from PIL import Image, ImageDraw

    from fusionrank.preprocess.video import encode_video  # PyAV: only while generating

    width, height = (2 * int(v) for v in rng.integers(48, 80, size=2))  # even sizes: YUV 4:2:0
    background = tuple(int(v) for v in rng.integers(215, 250, size=3))
    rgb = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in list(COLOURS.values())[colour])
    r = int(min(width, height) * rng.uniform(0.2, 0.3))
    cy = height // 2 + int(rng.integers(-6, 7))
    frames = []
    for x in np.linspace(r + 2, width - r - 2, VIDEO_FRAMES).astype(int).tolist():
        image = Image.new("RGB", (width, height), background)
        box = (x - r, cy - r, x + r, cy + r)
        draw = ImageDraw.Draw(image)
        if SHAPES[shape] == "circle":
            draw.ellipse(box, fill=rgb)
        elif SHAPES[shape] == "square":
            draw.rectangle(box, fill=rgb)
        else:
            draw.polygon([(x, cy - r), (x - r, cy + r), (x + r, cy + r)], fill=rgb)
        frames.append(image)
    return encode_video(frames, container=container, fps=VIDEO_FPS)


def _audio(rng: np.random.Generator, pitch: int, tempo: int, stereo_22k: bool) -> bytes:
    import soundfile as sf

    rate = 22050 if stereo_22k else 16000
    seconds = float(rng.uniform(1.0, 2.0))
    t = np.arange(int(seconds * rate)) / rate
    f0 = PITCHES_HZ[pitch] * float(rng.uniform(0.98, 1.02))
    tone = np.sin(2 * np.pi * f0 * t) + 0.3 * np.sin(2 * np.pi * 2 * f0 * t + rng.uniform(0, np.pi))
    envelope = 0.5 * (1 + np.cos(2 * np.pi * TEMPOS_HZ[tempo] * t + rng.uniform(0, 2 * np.pi)))
    signal = 0.3 * tone * envelope + 0.01 * rng.standard_normal(len(t))
    if stereo_22k:
        signal = np.stack([signal, 0.8 * signal], axis=1)
    buf = io.BytesIO()
    sf.write(buf, signal.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _generate(spec: PipelineSpec, root: Path) -> None:
    data, length = spec.data, spec.ranker.history.length
    rng = np.random.default_rng(data.seed)
    n_items = spec.num_items
    if n_items < data.candidates_per_session or n_items < length:
        raise DataError(f"ranker.history.vocab_size {spec.ranker.history.vocab_size} gives {n_items} items: too few "
                        f"for {data.candidates_per_session} candidates and histories of {length}")
    attrs = np.stack([rng.integers(0, len(TOPICS), n_items), rng.integers(0, len(COLOURS), n_items),
                      rng.integers(0, len(SHAPES), n_items), rng.integers(0, len(PITCHES_HZ), n_items),
                      rng.integers(0, len(TEMPOS_HZ), n_items)], axis=1)
    items_dir = root / "items"
    items_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    video_rng = np.random.default_rng([data.seed, GENERATOR_VERSION])
    for i, (topic, colour, shape, pitch, tempo) in enumerate(attrs.tolist()):
        item_id = i + 1
        fmt = "PNG" if item_id % 7 == 0 else "WEBP" if item_id % 11 == 0 else "JPEG"
        image_name = f"{item_id:05d}.{fmt.lower().replace('jpeg', 'jpg')}"
        (items_dir / image_name).write_bytes(_image(rng, colour, shape, fmt))
        audio_name = f"{item_id:05d}.wav"
        (items_dir / audio_name).write_bytes(_audio(rng, pitch, tempo, stereo_22k=item_id % 5 == 0))
        video_name = None
        if item_id % VIDEO_EVERY == 2:
            container = "webm" if item_id % (3 * VIDEO_EVERY) == 2 else "mp4"
            video_name = f"{item_id:05d}.{container}"
            (items_dir / video_name).write_bytes(_video(video_rng, colour, shape, container))
        rows.append({"title": _title(rng, topic, data.title_words), "topic": topic, "colour": colour, "shape": shape,
                     "pitch": pitch, "tempo": tempo, "image": image_name, "audio": audio_name, "video": video_name})

    # Hidden tastes: population effects + personal deviations, over the three signal-carrying attributes.
    population = [rng.normal(0, 1.0, k) for k in (len(TOPICS), len(COLOURS), len(PITCHES_HZ))]
    n_users = data.num_users
    user_taste = [pop[None, :] + rng.normal(0, 0.5, (n_users, len(pop))) for pop in population]
    affinity = (user_taste[0][:, attrs[:, 0]] + user_taste[1][:, attrs[:, 1]] + user_taste[2][:, attrs[:, 3]])
    item_appeal = population[0][attrs[:, 0]] + population[1][attrs[:, 1]] + population[2][attrs[:, 3]]
    bias = -1.0

    n_sessions = n_users * data.sessions_per_user
    user = np.repeat(np.arange(n_users), data.sessions_per_user)
    history = np.zeros((n_sessions, length), dtype=np.int64)
    candidates = np.zeros((n_sessions, data.candidates_per_session), dtype=np.int64)
    for s, u in enumerate(user):
        k = int(rng.integers(3, length + 1))
        p = np.exp(affinity[u] - affinity[u].max())
        history[s, length - k:] = rng.choice(n_items, size=k, replace=False, p=p / p.sum()) + 1
        candidates[s] = rng.choice(n_items, size=data.candidates_per_session, replace=False) + 1
    true_prob = 1 / (1 + np.exp(-(bias + affinity[user[:, None], candidates - 1])))
    population_prob = 1 / (1 + np.exp(-(bias + item_appeal[candidates - 1])))
    clicks = (rng.random(true_prob.shape) < true_prob).astype(np.int64)

    order = rng.permutation(n_users)
    n_test = max(1, int(round(n_users * TEST_FRACTION)))
    n_val = max(1, int(round((n_users - n_test) * spec.train.validation_fraction)))
    user_split = np.full(n_users, TRAIN)
    user_split[order[:n_test]] = TEST
    user_split[order[n_test:n_test + n_val]] = VAL
    np.savez(root / "sessions.npz", user=user, split=user_split[user], history=history, candidates=candidates,
             clicks=clicks, true_prob=true_prob.astype(np.float32), population_prob=population_prob.astype(np.float32))
    (root / "catalogue.json").write_text(json.dumps({"items": rows, "topics": list(TOPICS),
                                                     "colours": list(COLOURS), "shapes": SHAPES}, indent=1))


def benchmark_dir(spec: PipelineSpec) -> Path:
    return cache_dir(spec) / "benchmark" / data_key(spec)


def load_benchmark(spec: PipelineSpec) -> Benchmark:
    """The spec's benchmark, generated into the cache on first use (seconds) and reused afterwards."""
    root = benchmark_dir(spec)
    done = root / ".complete"
    if not done.is_file():
        log.info("generating benchmark data into %s", root)
        _generate(spec, root)
        done.touch()
    try:
        catalogue = json.loads((root / "catalogue.json").read_text())
        with np.load(root / "sessions.npz") as z:
            sessions = Sessions(**{k: z[k] for k in z.files})
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"benchmark cache {root} is unreadable ({exc}); delete it to regenerate") from None
    return Benchmark(spec, root, catalogue, sessions)
