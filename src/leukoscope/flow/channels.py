"""FCS channel names and the error of an unreadable FCS file: shared by the reader (:mod:`.fcs`) and compensation
(:mod:`.compensation`), which both match channels by their ``$PnN``."""

from __future__ import annotations

from leukoscope.errors import LeukoscopeError


class FCSReadError(LeukoscopeError, ValueError):
    """An FCS file could not be read: missing, empty, not FCS, truncated, or inconsistent."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read FCS file {self.path}: {reason}")


def normalize_channel_name(name: str) -> str:
    """Case-folded, whitespace-collapsed channel name, so ``'FL1  log'`` matches ``'FL1 Log'``."""
    return " ".join(str(name).split()).casefold()


def match_channels(
    available: list[str], wanted: list[str], positions: list[int] | None = None, source: object = "<events>"
) -> list[int]:
    """Column index of each wanted channel, by ``$PnN``; by 1-based ``positions`` where a name is not found.

    Raises:
        FCSReadError: a channel is found neither by name nor by position.
    """
    norm = [normalize_channel_name(c) for c in available]
    out = []
    for i, name in enumerate(wanted):
        key = normalize_channel_name(name)
        if key in norm:
            out.append(norm.index(key))
        elif positions is not None and i < len(positions) and 1 <= positions[i] <= len(available):
            out.append(positions[i] - 1)
        else:
            raise FCSReadError(source, f"no channel with $PnN {name!r}; the file has {available}")
    return out
