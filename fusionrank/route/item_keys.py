"""Cache keys of item embeddings: the payload's bytes and the identity of everything that turns them into an
embedding. The route (`fusionrank.route.stages`) and `fusionrank embed-catalogue` compute keys here and nowhere
else, so a warmed store is hit by the route.

A key is `fusionrank:emb:v2:<kind>:<identity>:<sha256 of the payload>`. The kind (`PayloadKind`: text, still,
frames, audio) is the namespace of what the hashed bytes are: a candidate with a video is keyed by a digest of its
still, its clip and the video spec (`fusionrank.request.candidates.image_cache_payload`), bytes anybody can
rebuild; in its own `frames` namespace, those bytes sent as a still (`item_image`) hash to a `still` key that
nothing ever stored, so they miss and go through the image decoder's checks (issue 19). The identity is a digest of
- the encoder: its model name, the version folder Triton serves and the sha256 of the file that version serves
  under the running profile (`model.onnx`, a quantised ONNX, `model.plan`: what the profile's member config names;
  rendered into the route's config as the `member_files` parameter), so a new export or engine never serves old
  embeddings;
- the preprocessing: `PREPROCESS_VERSION`, the modality's spec section (decoder limits included) and, for text,
  the tokenizer's files.

Because the limits are part of the identity, a payload found in the cache is byte for byte one that passed the same
decoder checks when it was stored (nothing is stored for a row that failed them), so a hit may skip decoding.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.names import encoder_name
from fusionrank.contract.paths import tokenizer_dir
from fusionrank.contract.spec import Modality, PipelineSpec, ServingProfile, to_dict
from fusionrank.preprocess import PREPROCESS_VERSION

KEY_PREFIX = "fusionrank:emb:v2"  # v2: one namespace per payload kind (v1 keyed stills and videos alike)
MEMBER_FILES = "member_files"  # the route config's parameter: the file each encoder serves under its profile


class IdentityError(FusionRankError):
    """An encoder's served file (or the tokenizer) that the cache keys must digest cannot be found."""


class PayloadKind(enum.Enum):
    """What the bytes a key hashes are; each kind is its own key namespace."""

    TEXT = "text"
    STILL = "still"  # an image payload (`item_image`) decoded as one picture
    FRAMES = "frames"  # a candidate with a video: `image_cache_payload` of its still, clip and the video spec
    AUDIO = "audio"

    @classmethod
    def of(cls, modality: Modality, video: bool = False) -> PayloadKind:
        """The kind of a payload of `modality`; `video`: an image-modality candidate pooled from its clip."""
        if video and modality is not Modality.IMAGE:
            raise IdentityError(f"a video is an image-modality payload, not {modality.value}")
        return {Modality.TEXT: cls.TEXT, Modality.AUDIO: cls.AUDIO}.get(modality, cls.FRAMES if video else cls.STILL)


@dataclass(frozen=True)
class EncoderIdentity:
    """What decides the embedding of a payload of one modality; its digest is part of every key."""

    modality: Modality
    model: str
    version: str
    model_sha256: str
    preprocess_sha256: str
    digest: str = field(init=False)

    def __post_init__(self):
        parts = [self.modality.value, self.model, self.version, self.model_sha256, self.preprocess_sha256]
        object.__setattr__(self, "digest", hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16])

    def prefix(self, kind: PayloadKind) -> str:
        """The namespace of one payload kind of this encoder."""
        if PayloadKind.of(self.modality, kind is PayloadKind.FRAMES) is not kind:
            raise IdentityError(f"a {kind.value} payload is not encoded by {self.model}")
        return f"{KEY_PREFIX}:{kind.value}:{self.digest}:"

    def key(self, payload: bytes, kind: PayloadKind | None = None) -> str:
        """The cache key of one payload's embedding; `kind` defaults to the modality's plain payload (a still for
        images)."""
        return self.prefix(kind or PayloadKind.of(self.modality)) + hashlib.sha256(payload).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def served_version(repo: Path, model: str, filename: str) -> str:
    """The version folder Triton serves (its default policy: the highest number) that holds `filename`."""
    versions = sorted((int(p.name) for p in (Path(repo) / model).glob("*") if p.is_dir() and p.name.isdigit()),
                      reverse=True)
    for version in versions:
        if (Path(repo) / model / str(version) / filename).is_file():
            return str(version)
    raise IdentityError(f"{model}: no version folder under {Path(repo) / model} holds {filename}; the embedding "
                        "cache keys digest the served file (run `fusionrank export`)")


def preprocess_sha256(spec: PipelineSpec, modality: Modality, repo: Path) -> str:
    """Digest of the preprocessing of one modality: its version, spec section and (text) tokenizer files."""
    section = to_dict(getattr(spec.modalities, modality.value))
    digest = hashlib.sha256(json.dumps({"version": PREPROCESS_VERSION, "spec": section}, sort_keys=True).encode())
    if modality is Modality.TEXT:
        folder = tokenizer_dir(repo)
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        if not files:
            raise IdentityError(f"no tokenizer in {folder}: the text cache keys digest it (run `fusionrank export`)")
        for path in files:
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + file_sha256(path).encode())
    return digest.hexdigest()


def encoder_identities(spec: PipelineSpec, repo: Path, member_files: dict[str, str]) -> dict[Modality, EncoderIdentity]:
    """The identity of every enabled modality's encoder as served from `repo` (`member_files`: model -> the file its
    profile serves)."""
    identities = {}
    for modality in spec.modalities.enabled:
        model = encoder_name(modality)
        if model not in member_files:
            raise IdentityError(f"the route's {MEMBER_FILES} parameter names no file for {model}")
        version = served_version(repo, model, member_files[model])
        identities[modality] = EncoderIdentity(modality, model, version,
                                               file_sha256(Path(repo) / model / version / member_files[model]),
                                               preprocess_sha256(spec, modality, repo))
    return identities


def route_member_files(spec: PipelineSpec, repo: Path, profile: ServingProfile | str) -> dict[str, str]:
    """The `member_files` parameter of the route's config for `profile` as written in `repo` (what the served route
    reads, so callers outside the server compute the same cache keys)."""
    # Imported here: tritonclient.grpc maps gRPC and protobuf (~40 MiB) into every process that imports it, and the
    # route's stubs import this module but never call this function (only callers outside the server do).
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    path = ServingProfile(profile).served_config(Path(repo) / spec.serving.route)
    try:
        return json.loads(text_format.Parse(path.read_text(), mc.ModelConfig()).parameters[MEMBER_FILES].string_value)
    except (OSError, ValueError, text_format.ParseError) as exc:
        raise FusionRankError(f"{path}: no {MEMBER_FILES} parameter to read ({exc}); run `fusionrank render`") \
            from None
