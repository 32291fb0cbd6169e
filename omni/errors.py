"""Exception types raised at the engine's public boundary."""
from __future__ import annotations


class OmniError(Exception):
    """Base class of every error the engine raises on purpose."""


class CheckpointError(OmniError):
    """A checkpoint directory is missing, incomplete or does not match the model."""


class CheckpointDownloadError(CheckpointError):
    """The checkpoint could not be fetched (offline, hub error)."""


class AudioInputError(OmniError, ValueError):
    """The input audio is missing, unreadable, empty or silent."""


class ImageInputError(OmniError, ValueError):
    """The input image is unreadable, corrupt, too large or of the wrong array type."""
