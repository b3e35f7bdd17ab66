"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class FedfuseError(Exception):
    """A problem with the user's input or environment, described in one line."""


class ConfigError(FedfuseError):
    """A scenario setting is missing, unknown, of the wrong type or impossible."""

    def __init__(self, key: str | None, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"config: {key}: {message}" if key else f"config: {message}")

    def within(self, path: str) -> ConfigError:
        """The same error, with its key placed under the table ``path``."""
        if not path:
            return self
        return ConfigError(f"{path}.{self.key}" if self.key else path, self.message)


class DataError(FedfuseError):
    """The data cannot be loaded or cannot be split as the scenario asks."""


class ArtifactError(FedfuseError):
    """An artifact is missing, incomplete, does not match its recorded hashes, or (when a
    trusted signer is required) is not signed by one."""
