"""prep's options, each with its default, help and bounds: the one place they are written.

`scan` and `prepare` take a `PrepOptions`; `cnnflow prep` is PrepOptions plus Ray's options
and INPUT/OUTPUT (workflows/config.py), its flags and YAML keys generated from these fields
(the "help" of their metadata). predict decodes with the same `ImageLimits`.

A value out of bounds is refused when the object is built, as an `OptionError` whose
message says what is allowed; `check` and `check_range` are the checks every option of
cnnflow uses (workflows/ imports them: data_prep/ may not import workflows/).

Imports nothing heavier than the standard library: the command line reads this module
before it knows which command runs.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class OptionError(ValueError):
    """An option value that cannot be used; the message says what is allowed."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise OptionError(message)


def check_range(
    name: str, value: float, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    """low <= value <= high (or < where open); NaN fails every comparison, so it is refused too."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high

    def show(bound: float) -> str:
        return str(int(bound)) if float(bound).is_integer() else str(bound)

    interval = f"{'(' if low_open else '['}{show(low)}, {show(high)}{')' if high_open else ']'}"
    check(above and below, f"{name} must be in {interval}, got {value}")


def option(default: Any, help: str) -> Any:
    """A dataclass field with its default and, in its metadata, the help the CLI shows."""
    return field(default=default, metadata={"help": help})


ResizeMode = Literal["squash", "crop", "pad"]
NearDuplicates = Literal["together", "ignore"]
RESIZE_MODES: tuple[str, ...] = typing.get_args(ResizeMode)  # what decode_image accepts

# Where labels come from: "folder", or a source's prefix followed by its argument.
LABEL_PREFIXES = ("regex:", "csv:")
LABELS_SYNTAX = "folder, regex:PATTERN or csv:FILE"

MIN_IMAGE_SIZE = 8
# Raw uint8 pixels are stored per row: 3 MiB an image at 1024 px, and the CNNs here have
# no use for more (a larger side only multiplies decode, disk and training memory).
MAX_IMAGE_SIZE = 1024
MAX_SEED = 2**32 - 1  # what numpy's and torch's seeding both accept
# Poison files (see data_prep/decode.py): a file over the size cap is quarantined before
# it is read; an image whose header promises more pixels than the budget, before it is
# decoded. Defaults: a 48 Mpx phone photo passes both (its JPEG is ~10-25 MB and decodes
# at 1/8 scale); at the budget an RGBA PNG decodes to ~200 MB, so a decoding CPU peaks
# around half a GB. Pillow refuses more than MAX_MEGAPIXELS on its own (2x its 89.5 Mpx
# decompression-bomb limit), so the budget cannot be raised past that.
DEFAULT_MAX_FILE_MB, DEFAULT_MAX_MEGAPIXELS = 100.0, 50.0
MAX_FILE_MB, MAX_MEGAPIXELS = 2048.0, 178.0
# Near-duplicates (data_prep/near_duplicates.py): a re-encode or a resize moves a photo's
# hash 0-2 bits, a 2-5% crop 2-12; distinct photos are ~32 apart. Above 12 the 13 bands of
# 4-5 bits are too coarse to spare the matching most pairs.
MAX_NEAR_DUPLICATE_DISTANCE = 12
DEFAULT_NEAR_DUPLICATE_DISTANCE = 6  # bits of 64; a model logged without the manifest's matches at this too


def label_source(labels: str) -> tuple[str, str]:
    """("folder", ""), ("regex", PATTERN) or ("csv", FILE); OptionError for anything else."""
    if labels == "folder":
        return "folder", ""
    for prefix in LABEL_PREFIXES:
        if labels.startswith(prefix):
            return prefix[:-1], labels[len(prefix):]
    raise OptionError(f"labels must be {LABELS_SYNTAX}, got {labels!r}")


@dataclass(kw_only=True)
class ImageLimits:
    """What one input file may cost: prep and predict decode with the same limits."""

    max_file_mb: float = option(
        DEFAULT_MAX_FILE_MB,
        "Files larger than this (MB) are quarantined (prep) or error rows (predict), unread.",
    )
    max_megapixels: float = option(
        DEFAULT_MAX_MEGAPIXELS,
        "Images whose header promises more pixels to decode than this (millions; JPEGs count "
        "at the reduced scale they are decoded at) are quarantined or error rows, undecoded.",
    )

    def __post_init__(self) -> None:
        check_range("max_file_mb", self.max_file_mb, 0, MAX_FILE_MB, low_open=True)
        check_range("max_megapixels", self.max_megapixels, 0, MAX_MEGAPIXELS, low_open=True)


@dataclass(kw_only=True)
class PrepOptions(ImageLimits):
    """How an image folder becomes shards: image size, labels, split, shard size, limits."""

    image_size: int = option(
        128, f"Side of the square images written, in pixels ({MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE})."
    )
    resize: ResizeMode = option(
        "squash",
        "How to make images square: squash (stretch), crop (centre) or pad (letterbox).",
    )
    val_fraction: float = option(0.2, "Share of each class held out for validation.")
    seed: int = option(0, "Seed of the content hash that decides each file's split.")
    labels: str = option(
        "folder",
        "Where labels come from: folder (top-level subfolder), regex:PATTERN "
        "(first group matched on the file name) or csv:FILE (rows path,label).",
    )
    unlabeled: bool = option(False, "Input has no labels: any nesting, label -1, no split.")
    rows_per_shard: int = option(
        2048, "Most images per Parquet file (fewer when that keeps every CPU busy)."
    )
    near_duplicates: NearDuplicates = option(
        "together",
        "together: each near-duplicate group goes to one split (validation never scores a "
        "near-copy of a training image); ignore: each file's split from its own bytes.",
    )
    near_duplicate_distance: int = option(
        DEFAULT_NEAR_DUPLICATE_DISTANCE, f"Images whose perceptual hashes differ in at most this many of 64 bits are "
        f"reported as near-duplicates (0-{MAX_NEAR_DUPLICATE_DISTANCE})."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)
        check_range("image_size", self.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        check_range("seed", self.seed, 0, MAX_SEED)
        check_range("rows_per_shard", self.rows_per_shard, 1, 1_000_000)
        check(self.near_duplicates in typing.get_args(NearDuplicates),
              f"near_duplicates must be together or ignore, got {self.near_duplicates!r}")
        check_range("near_duplicate_distance", self.near_duplicate_distance, 0, MAX_NEAR_DUPLICATE_DISTANCE)
        check(self.resize in RESIZE_MODES, f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        label_source(self.labels)
