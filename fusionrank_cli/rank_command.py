"""`fusionrank rank`: rank candidates from JSON files or from the benchmark catalogue over gRPC; print a table.

A candidates file is JSON: either a list of candidates or `{"history": [item ids], "candidates": [...]}`, each
candidate `{"id": ..., "text": "title", "image": "a.jpg", "audio": "a.wav", "video": "a.mp4"}` (paths relative to
the file). Every field but one of text/image/audio/video may be left out (or null): the candidate is then sent with
that modality absent. Without a `history` the request is sent for a cold-start user (an all-padding history).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clients._request import Candidate, RankingResult
from clients.sync import RankingClient
from clients.tls import ClientTls
from fusionrank.contract.errors import DataError
from fusionrank.contract.spec import PipelineSpec
from fusionrank.model.synthetic_data import load_benchmark

READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RankInput:
    """What `fusionrank rank` sends: candidates with display labels, and the user's history."""

    candidates: list[Candidate]
    titles: list[str]
    history: np.ndarray  # 1-D recent item ids
    description: str


def _ragged(spec: PipelineSpec, bench, items: list) -> tuple[list[Candidate], list[str]]:
    """Candidates as a real catalogue has them: every third without audio, one with its title only, and the
    session's first video item (or the catalogue's) sent as its clip instead of its cover image."""
    videos = [i for i, it in enumerate(items) if it.is_video]
    if not videos and spec.modalities.video_enabled:
        items[-1] = bench.item(int(np.flatnonzero(bench.video_items)[0]))
        videos = [len(items) - 1]
    video_row = videos[0] if videos and spec.modalities.video_enabled else None
    cands, titles = [], []
    for row, it in enumerate(items):
        title_only = row == 4 % len(items) and row != video_row
        clip = row == video_row
        cands.append(Candidate(text=it.text_bytes(), item_id=it.item_id,
                               image=None if title_only or clip else it.image_bytes(),
                               audio=None if title_only or row % 3 == 1 else it.audio_bytes(),
                               video=it.video_bytes() if clip else None))
        titles.append(it.title)
    return cands, titles


def benchmark_request(spec: PipelineSpec, user: int = 0, candidates: int = 10, ragged: bool = False) -> RankInput:
    """The candidates of one benchmark user's first session (topped up from the catalogue) and their history;
    `ragged`: some sent without audio, one with its title only and a video item as its clip (`_ragged`)."""
    if candidates < 1:
        raise DataError(f"--candidates must be >= 1, got {candidates}")
    bench = load_benchmark(spec)
    sessions = np.flatnonzero(np.asarray(bench.sessions.user) == user)
    if not len(sessions):
        raise DataError(f"benchmark has no user {user} (users 0..{int(np.max(bench.sessions.user))})")
    session = int(sessions[0])
    ids = [int(i) for i in bench.sessions.candidates[session]][:candidates]
    rng = np.random.default_rng(spec.data.seed * 1_000_003 + user)
    extra = [int(i) for i in rng.permutation(np.arange(1, bench.num_items + 1)) if int(i) not in ids]
    ids += extra[: candidates - len(ids)]
    items = [bench.item(i) for i in ids]
    if ragged:
        cands, titles = _ragged(spec, bench, items)
    else:
        cands = [Candidate(text=it.text_bytes(), image=it.image_bytes(), audio=it.audio_bytes(), item_id=it.item_id)
                 for it in items]
        titles = [it.title for it in items]
    return RankInput(cands, titles, np.asarray(bench.sessions.history[session], np.int64),
                       f"benchmark user {user}, session {session}" + (" (ragged candidates)" if ragged else ""))


def _beside(json_file: Path, value: str | None) -> Path | None:
    return None if value is None else json_file.parent / value


def file_request(paths: Sequence[str]) -> RankInput:
    """Candidates (and optionally the history) from one or more JSON files."""
    candidates, titles, history = [], [], None
    for path in map(Path, paths):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read candidates file {str(path)!r}: {exc}") from exc
        if isinstance(data, dict):
            history = data.get("history", history)
            entries = data.get("candidates", [])
        else:
            entries = data
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise DataError(f"{path}: expected a list of candidate objects (or {{'candidates': [...]}})")
        for n, entry in enumerate(entries):
            unknown = set(entry) - {"id", "text", "image", "audio", "video", "title"}
            if unknown:
                raise DataError(f"{path}: candidate {n} has unknown field(s) {sorted(unknown)}; "
                                "allowed: id, text, image, audio, video")
            item_id = entry.get("id", f"{path.stem}[{n}]")
            text = entry.get("text", entry.get("title"))
            media = {k: _beside(path, entry.get(k)) for k in ("image", "audio", "video")}
            if text is None and not any(media.values()):
                raise DataError(f"{path}: candidate {n} has none of text, image, audio, video")
            candidates.append(Candidate(text=text, item_id=item_id, **media))
            titles.append(str(text or ""))
    if not candidates:
        raise DataError("no candidates in " + ", ".join(paths))
    hist = np.asarray(history if history is not None else [], dtype=np.int64)
    return RankInput(candidates, titles, hist, f"{len(candidates)} candidate(s) from {', '.join(paths)}")


def rank_request(spec: PipelineSpec, url: str, request: RankInput, tls: ClientTls | None = None) -> RankingResult:
    """Send one ranking request (chunked, with retries and failover over `url`'s endpoints)."""
    with RankingClient(spec, url, tls=tls) as client:
        client.wait_ready(READY_TIMEOUT_S)
        return client.rank(request.candidates, request.history)


def result_rows(request: RankInput, result: RankingResult) -> list[dict]:
    """Ranked rows, best first: rank, item id, title, score, weight per modality."""
    rows = []
    for rank, i in enumerate(result.order(), start=1):
        rows.append({"rank": rank, "item_id": request.candidates[i].item_id, "title": request.titles[i],
                     "score": float(result.scores[i]),
                     "modality_weights": {m.value: float(w) for m, w in zip(result.modalities, result.weights[i])}})
    return rows


def sent(candidate: Candidate) -> str:
    """What a candidate was sent with, one letter per payload: T(ext) I(mage) A(udio) V(ideo clip), '-' absent."""
    return "".join(letter if getattr(candidate, field) is not None else "-"
                   for letter, field in (("T", "text"), ("I", "image"), ("A", "audio"), ("V", "video")))


def format_table(request: RankInput, result: RankingResult, url: str, title_width: int = 44) -> str:
    """A ranked table a person reads; the last column says what each candidate was sent with."""
    mods = [m.value for m in result.modalities]
    header = (f"{'rank':>4}  {'item':>6}  {'title':<{title_width}}  {'score':>8}  "
              + "  ".join(f"{m:>6}" for m in mods) + "  sent")
    lines = [f"ranked {request.description} on {url}", header, "-" * len(header)]
    order = result.order()
    for row, i in zip(result_rows(request, result), order):
        title = row["title"] if len(row["title"]) <= title_width else row["title"][: title_width - 3] + "..."
        weights = "  ".join(f"{row['modality_weights'][m]:>6.3f}" for m in mods)
        lines.append(f"{row['rank']:>4}  {str(row['item_id']):>6}  {title:<{title_width}}  {row['score']:>8.4f}  "
                     f"{weights}  {sent(request.candidates[i])}")
    lines.append("sent: T text, I image, A audio, V video clip (K frames pooled into the image), - absent "
                 "(an absent modality's weight is 0)")
    return "\n".join(lines)


def rank_benchmark_request(spec: PipelineSpec, url: str, user: int = 0, candidates: int = 10,
                           ragged: bool = False, tls: ClientTls | None = None) -> str:
    """Rank one benchmark user's candidates over gRPC and return the table text."""
    request = benchmark_request(spec, user=user, candidates=candidates, ragged=ragged)
    return format_table(request, rank_request(spec, url, request, tls=tls), url)


def run_rank(spec: PipelineSpec, url: str, items: Sequence[str] | None = None, user: int = 0, candidates: int = 10,
             as_json: bool = False, out=None, tls: ClientTls | None = None) -> int:
    """`fusionrank rank`: candidates from `items` JSON files, else one benchmark user's; print a table or JSON."""
    out = out or sys.stdout
    request = file_request(items) if items else benchmark_request(spec, user, candidates)
    result = rank_request(spec, url, request, tls=tls)
    if as_json:
        out.write(json.dumps({"model": spec.serving.route, "endpoint": url,
                              "request": request.description, "ranking": result_rows(request, result)},
                             indent=2) + "\n")
    else:
        out.write(format_table(request, result, url) + "\n")
    return 0
